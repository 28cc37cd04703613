"""Pricing works in whole numbers for speed; it must agree exactly, token for token, with the
catalog's rule written in decimals (the multiplied sum, rounded up) for every multiplier the
catalog accepts (3 decimal places, under 10,000)."""

from decimal import ROUND_CEILING, Decimal

from hypothesis import given
from hypothesis import strategies as st

from allowances.pricing import Pricing

multiplier = st.integers(min_value=0, max_value=9_999_999).map(lambda thousandths: Decimal(thousandths) / 1000)
tokens = st.integers(min_value=0, max_value=10**12)


def pricing(multipliers) -> Pricing:
    return Pricing(multipliers=tuple(multipliers), prices=(Decimal(0),) * 3)


@given(st.tuples(multiplier, multiplier, multiplier), tokens, tokens, tokens)
def test_whole_number_pricing_is_the_decimal_rule(multipliers, input_tokens, output_tokens, cached_tokens):
    total = input_tokens * multipliers[0] + output_tokens * multipliers[1] + cached_tokens * multipliers[2]
    expected = int(total.to_integral_value(rounding=ROUND_CEILING))
    assert pricing(multipliers).weighted(input_tokens, output_tokens, cached_tokens) == expected


def test_a_fraction_of_a_token_counts_as_one():
    assert pricing([Decimal("0.001"), Decimal("1.5"), Decimal("0.25")]).weighted(1) == 1
    assert pricing([Decimal("1.5"), Decimal("2"), Decimal("0.5")]).weighted(2, 1, 1) == 6


def test_cost_is_exact_per_million():
    prices = Pricing(multipliers=(Decimal(1),) * 3, prices=(Decimal("3"), Decimal("15"), Decimal("0.3")))
    assert prices.cost(1_000, 100, 10) == Decimal("0.004503")
