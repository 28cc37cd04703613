from django import template

from billing.selectors import from_minor

register = template.Library()


@register.filter
def money(amount_minor, currency: str) -> str:
    """Minor units as the amount people read, e.g. 1234, "USD" -> "12.34 USD"."""
    return f"{from_minor(int(amount_minor), currency):,} {currency}"


@register.filter
def exact(tokens) -> str:
    """Tokens written out in full (what is charged is exact), e.g. 1,234,567."""
    return f"{int(tokens):,}"
