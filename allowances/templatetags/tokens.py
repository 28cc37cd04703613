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
