"""Budget-aware routing in the ledger and the catalog: which hold a routed statement takes (on the
locked account row), that a retry returns the same one, the refusal when neither fits; and the
rules for an economy counterpart and a policy's threshold, with field errors."""

import pytest
from django.core.exceptions import ValidationError

from allowances import ledger
from allowances import services as allowance_services
from allowances.ledger import Economy, InsufficientTokens, KeyCapExceeded
from portal.tenancy import scope
from tests.allowances.helpers import balance, snapshot

pytestmark = pytest.mark.django_db


def routed_hold(org, tokens, economy_tokens, key, **kwargs):
    return ledger.authorize(account=org.account, tokens=tokens, idempotency_key=key, model="premium",
                            economy=Economy(tokens=economy_tokens, model="economy", below_percent=50), **kwargs)


def test_the_premium_hold_above_the_threshold_the_economy_hold_below_it(org_a):
    # 5,000 granted, 1,000 held by the fixture: 80% left.
    with scope(org_a.organization):
        first = routed_hold(org_a, 1_400, 100, "r1")  # leaves 2,600 (52%): the premium hold, still above
        assert (first.model, first.tokens) == ("premium", 1_400)
        second = routed_hold(org_a, 1_000, 100, "r2")  # 52% left before it: still above the threshold
        assert (second.model, second.tokens) == ("premium", 1_000)
        third = routed_hold(org_a, 500, 100, "r3")  # 32% left: below, routed
        assert (third.model, third.tokens) == ("economy", 100)
        assert routed_hold(org_a, 500, 100, "r3") == third  # a retry is the same hold
    assert balance(org_a.members["employee"]) == (5_000, 3_500, 0)
    assert ledger.verify() == []


def test_the_economy_hold_when_only_it_fits_and_a_refusal_when_neither_does(org_a):
    with scope(org_a.organization):
        ledger.authorize(account=org_a.account, tokens=3_900, idempotency_key="fill")  # 100 left
        assert routed_hold(org_a, 500, 80, "fits").model == "economy"
        with pytest.raises(InsufficientTokens) as raised:
            routed_hold(org_a, 500, 80, "neither")
        assert raised.value.requested == 80  # what the cheapest choice would have needed
    assert balance(org_a.members["employee"]) == (5_000, 4_980, 0)


def test_a_keys_cap_nearly_spent_routes_and_caps_the_economy_hold_too(org_a):
    from apikeys import services as api_key_services

    employee = org_a.members["employee"]
    with scope(org_a.organization):
        key, _secret = api_key_services.api_key_create(member=employee, actor=employee.user, name="capped",
                                                       endpoints=["chat"], token_cap=1_000)
        by_key = {"api_key_id": key.pk, "spend_id": key.spend_id}
        assert routed_hold(org_a, 400, 100, "k1", **by_key).model == "premium"  # 100% of the cap left before
        assert routed_hold(org_a, 400, 100, "k2", **by_key).model == "premium"  # 60% left before
        assert routed_hold(org_a, 100, 90, "k3", **by_key).model == "economy"  # 20% left before
        with pytest.raises(KeyCapExceeded):
            routed_hold(org_a, 400, 200, "k4", **by_key)  # 110 left of the cap: neither fits


def test_an_economy_counterpart_is_another_active_model_of_the_organization_in_the_same_api(org_a, org_b):
    organization, admin = org_a.organization, org_a.members["admin"].user
    with scope(organization):
        small = allowance_services.catalog_model_create(organization=organization, actor=admin, model_id="gpt-small",
                                                        connection=org_a.provider_connection)
        before = snapshot()
        for value, message in ((org_a.catalog_model, "its own economy counterpart"),
                               (org_b.catalog_model.pk, "another model of the catalog"),
                               ("not an id", "another model of the catalog")):
            with pytest.raises(ValidationError) as raised:
                allowance_services.catalog_model_update(catalog_model=org_a.catalog_model, actor=admin,
                                                        economy_counterpart=value)
            assert message in raised.value.message_dict["economy_counterpart"][0]
        assert snapshot() == before  # refused: nothing changed
        allowance_services.catalog_model_update(catalog_model=small, actor=admin, is_active=False)
        with pytest.raises(ValidationError) as raised:
            allowance_services.catalog_model_update(catalog_model=org_a.catalog_model, actor=admin,
                                                    economy_counterpart=small)
        assert "switched off" in raised.value.message_dict["economy_counterpart"][0]
        allowance_services.catalog_model_update(catalog_model=small, actor=admin, is_active=True)

        entry = allowance_services.catalog_model_update(catalog_model=org_a.catalog_model, actor=admin,
                                                        economy_counterpart=small.pk)
        assert entry.economy_counterpart == small
        with pytest.raises(ValidationError) as raised:  # routed once: no chains
            allowance_services.catalog_model_update(catalog_model=small, actor=admin,
                                                    economy_counterpart=org_a.catalog_model)
        assert "routed to an economy model itself" in raised.value.message_dict["economy_counterpart"][0]


@pytest.mark.parametrize("value", [0, 101, "ten", "1.5", True])
def test_a_policys_routing_threshold_is_a_percentage(org_a, value):
    with scope(org_a.organization), pytest.raises(ValidationError) as raised:
        allowance_services.policy_create(organization=org_a.organization, actor=None, name="Routing",
                                         monthly_tokens=1_000, economy_below_percent=value)
    assert "percentage from 1 to 100" in raised.value.message_dict["economy_below_percent"][0]
