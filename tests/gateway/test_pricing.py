"""The gateway prices with whole numbers what the catalog defines with decimals: the two must agree
exactly, token for token, for every multiplier the catalog accepts (3 decimal places, under 10,000)."""

from decimal import Decimal

from hypothesis import given
from hypothesis import strategies as st

from allowances.models import CatalogModel
from gateway.metering import ModelRoute
from gateway.upstream import Usage

multiplier = st.integers(min_value=0, max_value=9_999_999).map(lambda thousandths: Decimal(thousandths) / 1000)
tokens = st.integers(min_value=0, max_value=10**12)


def route(multipliers) -> ModelRoute:
    return ModelRoute(model_id="m", provider_model="m", is_active=True, family="openai", is_sandbox=False,
                      base_url="", secret_ciphertext="", connect_timeout=1, read_timeout=1, connection_active=True,
                      max_output_tokens=1, multipliers=tuple(multipliers), prices=(Decimal(0),) * 3)


@given(st.tuples(multiplier, multiplier, multiplier), tokens, tokens, tokens)
def test_the_gateways_price_is_the_catalogs(multipliers, input_tokens, output_tokens, cached_tokens):
    catalog = CatalogModel(input_multiplier=multipliers[0], output_multiplier=multipliers[1],
                           cached_multiplier=multipliers[2])
    expected = catalog.weighted_tokens(input_tokens=input_tokens, output_tokens=output_tokens,
                                       cached_tokens=cached_tokens)
    assert route(multipliers).weighted(Usage(input=input_tokens, output=output_tokens, cached=cached_tokens)) == expected


def test_a_fraction_of_a_token_counts_as_one():
    assert route([Decimal("0.001"), Decimal("1.5"), Decimal("0.25")]).weighted(Usage(input=1)) == 1
    assert route([Decimal("1.5"), Decimal("2"), Decimal("0.5")]).weighted(Usage(input=2, output=1, cached=1)) == 6
