from django import template
from django.utils.html import format_html

register = template.Library()

_UNITS = [(10**12, "T"), (10**9, "B"), (10**6, "M"), (10**3, "k")]


def humanize_tokens(value: int) -> str:
    """12_400_000 -> '12.4M'; exact numbers stay below a thousand."""
    value = int(value or 0)
    sign = "-" if value < 0 else ""
    magnitude = abs(value)
    for size, unit in _UNITS:
        if magnitude >= size:
            text = f"{magnitude / size:.1f}".rstrip("0").rstrip(".")
            return f"{sign}{text}{unit}"
    return f"{sign}{magnitude}"


@register.filter
def tokens(value):
    """Tokens for people, with the exact number on hover: <span title="12,400,000">12.4M</span>."""
    if value is None or value == "":
        return "—"
    return format_html('<span class="tokens" title="{} tokens">{}</span>', f"{int(value):,}", humanize_tokens(value))


@register.filter
def share_used(used, allowance) -> str:
    """The share of `allowance` that `used` is, as a percentage with up to two decimals, rounded
    down (4,999 of 5,000 is '99.98', never '100'): integers only, as everything in the ledger."""
    used, allowance = int(used or 0), int(allowance or 0)
    if allowance <= 0:
        return "0"
    whole, hundredths = divmod(used * 10_000 // allowance, 100)
    return f"{whole}.{hundredths:02d}".rstrip("0").rstrip(".")


@register.filter
def signed_tokens(value):
    """A change of balance, signed and coloured: +12.4M (a grant), −3k (usage)."""
    value = int(value or 0)
    sign, css = ("+", "plus") if value > 0 else ("\u2212", "minus") if value < 0 else ("", "zero")
    return format_html('<span class="tokens amount-{}" title="{}{} tokens">{}{}</span>', css, sign, f"{abs(value):,}",
                       sign, humanize_tokens(abs(value)))


@register.simple_tag
def balance_level(member) -> str:
    """The level of a row of allowances.selectors.member_balances: ok, low or exhausted."""
    from allowances.selectors import balance_level as level_of

    return level_of(available=member.available_now, granted=member.granted_this_period)
