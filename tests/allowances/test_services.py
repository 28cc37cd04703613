"""allowances.services: grants and revocation, policies and their assignments, accounts opening pro rata,
the catalog, and `manage.py verify_ledger`. A refused call names the field at fault and changes nothing."""

from datetime import datetime, timedelta
from datetime import timezone as dt_timezone
from decimal import Decimal
from io import StringIO
from zoneinfo import ZoneInfo

import pytest
from django.core.exceptions import ValidationError
from django.core.files.uploadedfile import SimpleUploadedFile
from django.core.management import CommandError, call_command
from django.db import connection
from django.utils import timezone

from allowances import ledger, services
from allowances.models import (
    MAX_TOKENS,
    Account,
    CatalogModel,
    Grant,
    LedgerEntry,
)
from allowances.periods import next_period_start, period_bounds, period_start_for, prorate, remaining_fraction
from allowances.selectors import policy_in_force
from portal.models import AuditLogEntry, Member
from portal.tenancy import scope, unscoped
from tests.allowances.helpers import balance, snapshot
from tests.factories import MemberFactory, TeamFactory, UserFactory


# -- helpers ---------------------------------------------------------------------------------------------------




def available(member) -> int:
    granted, held, used = balance(member)
    return granted - held - used


def entries_for(member, **filters) -> list[LedgerEntry]:
    with unscoped():
        return list(LedgerEntry.all_objects.filter(account__member=member, **filters).order_by("id"))


def audit(org, action) -> list[AuditLogEntry]:
    return list(AuditLogEntry.all_objects.filter(organization=org.organization, action=action).order_by("id"))


def period_begin(organization) -> datetime:
    return period_bounds(organization, period_start_for(organization))[0]


def in_period(organization, *, days: int, hours: int = 12) -> datetime:
    """A fixed moment inside the open period: `days` and `hours` after its first instant."""
    return period_begin(organization) + timedelta(days=days, hours=hours)


def new_team(org, name: str, count: int, **member_fields):
    team = TeamFactory(organization=org.organization, name=name)
    members = [MemberFactory(organization=org.organization, team=team,
                             user=UserFactory(email=f"{name.lower()}{index}@{org.slug}.example"), **member_fields)
               for index in range(count)]
    return team, members


def hr(org):
    return org.members["hr"].user


def use(member, tokens: int, *, model: str = "gpt-test", key: str = "") -> None:
    """Spend `tokens` as the gateway does: a hold, then settled with exactly that usage."""
    with scope(member.organization):
        account = Account.objects.get(member=member)
        hold = ledger.authorize(account=account, tokens=tokens, idempotency_key=key or f"use-{member.pk}-{tokens}",
                                model=model)
        ledger.settle(hold=hold, used_tokens=tokens)


# -- grants: bad input ------------------------------------------------------------------------------------------

BAD_TOKENS = [-5, "-5", 0, "0", "abc", "1.5", 1.5, MAX_TOKENS + 1, "10000000001", 10**30, True, None, "", "  "]


@pytest.mark.parametrize("tokens", BAD_TOKENS, ids=repr)
def test_grant_with_bad_tokens_is_a_tokens_error_and_changes_nothing(org_a, tokens):
    before = snapshot()
    with scope(org_a.organization), pytest.raises(ValidationError) as caught:
        services.grant_create(organization=org_a.organization, actor=hr(org_a), tokens=tokens, reason="bonus",
                              member=org_a.members["employee"])
    assert set(caught.value.message_dict) == {"tokens"}
    assert snapshot() == before


def test_grant_of_exactly_the_maximum_is_accepted_and_one_more_is_not(org_a):
    employee = org_a.members["approver"]
    with scope(org_a.organization):
        services.grant_create(organization=org_a.organization, actor=hr(org_a), tokens=MAX_TOKENS, reason="max",
                              member=employee)
        assert balance(employee)[0] == MAX_TOKENS
        with pytest.raises(ValidationError) as caught:
            services.grant_create(organization=org_a.organization, actor=hr(org_a), tokens=MAX_TOKENS + 1,
                                  reason="max", member=employee)
    assert "10,000,000,000" in caught.value.message_dict["tokens"][0]
    assert balance(employee)[0] == MAX_TOKENS


@pytest.mark.parametrize("reason", ["", "   ", None])
def test_grant_without_a_reason_is_a_reason_error_and_changes_nothing(org_a, reason):
    before = snapshot()
    with scope(org_a.organization), pytest.raises(ValidationError) as caught:
        services.grant_create(organization=org_a.organization, actor=hr(org_a), tokens=1000, reason=reason,
                              member=org_a.members["employee"])
    assert set(caught.value.message_dict) == {"reason"}
    assert snapshot() == before


def test_grant_to_a_member_of_another_organization_is_refused(org_a, org_b):
    before = snapshot()
    with scope(org_a.organization), pytest.raises(ValidationError) as caught:
        services.grant_create(organization=org_a.organization, actor=hr(org_a), tokens=1000, reason="x",
                              member=org_b.members["employee"])
    assert "member" in caught.value.message_dict
    assert snapshot() == before


# -- grants: what they do ---------------------------------------------------------------------------------------


def test_grant_to_a_member_adds_a_bonus_entry_and_audits(org_a):
    employee = org_a.members["employee"]
    granted, held, used = balance(employee)
    with scope(org_a.organization):
        grant = services.grant_create(organization=org_a.organization, actor=hr(org_a), tokens=" 12_500 ",
                                      reason="  hackathon  ", member=employee)
    assert (grant.tokens, grant.reason) == (12_500, "hackathon")
    assert balance(employee) == (granted + 12_500, held, used)
    [entry] = entries_for(employee, reference=f"grant:{grant.pk}")
    assert (entry.kind, entry.tokens, entry.granted_delta, entry.reason, entry.actor_id) == (
        "bonus", 12_500, 12_500, "hackathon", hr(org_a).pk)
    [logged] = audit(org_a, "grant.created")[-1:]
    assert logged.object_id == str(grant.pk) and logged.data["tokens"] == 12_500


def test_team_grant_gives_every_active_member_the_tokens(org_a):
    team = org_a.team
    inactive = MemberFactory(organization=org_a.organization, team=team, is_active=False,
                             user=UserFactory(email="gone@a.example"))
    elsewhere = MemberFactory(organization=org_a.organization, team=TeamFactory(organization=org_a.organization,
                                                                                   name="Other"))
    active = list(org_a.members.values())
    with unscoped():
        before = {m.pk: (Account.all_objects.filter(member=m).values_list("granted", flat=True).first() or 0)
                  for m in active}
    with scope(org_a.organization):
        grant = services.grant_create(organization=org_a.organization, actor=hr(org_a), tokens=7_000,
                                      reason="team offsite", team=team)
    assert grant.team_id == team.pk and grant.member_id is None
    for member in active:
        [entry] = entries_for(member, reference=f"grant:{grant.pk}")
        assert (entry.kind, entry.tokens, entry.granted_delta) == ("bonus", 7_000, 7_000)
        assert balance(member)[0] == before[member.pk] + 7_000
    with unscoped():
        assert not Account.all_objects.filter(member__in=[inactive, elsewhere]).exists()
        assert LedgerEntry.all_objects.filter(reference=f"grant:{grant.pk}").count() == len(active)


def test_team_grant_to_a_team_without_active_members_is_refused(org_a):
    empty = TeamFactory(organization=org_a.organization, name="Empty")
    before = snapshot()
    with scope(org_a.organization), pytest.raises(ValidationError) as caught:
        services.grant_create(organization=org_a.organization, actor=hr(org_a), tokens=10, reason="x", team=empty)
    assert set(caught.value.message_dict) == {"team"}
    assert snapshot() == before


def test_same_idempotency_key_grants_once(org_a):
    employee = org_a.members["employee"]
    granted = balance(employee)[0]
    with scope(org_a.organization):
        first = services.grant_create(organization=org_a.organization, actor=hr(org_a), tokens=3_000, reason="x",
                                      member=employee, idempotency_key="form-key-1")
        after_first = snapshot()
        second = services.grant_create(organization=org_a.organization, actor=hr(org_a), tokens=3_000, reason="x",
                                       member=employee, idempotency_key="form-key-1")
    assert second.pk == first.pk
    assert snapshot() == after_first
    assert balance(employee)[0] == granted + 3_000


# -- grants: revocation -----------------------------------------------------------------------------------------


def test_revoking_an_unused_team_grant_restores_every_balance(org_a):
    team, members = new_team(org_a, "Revokers", 3)
    with scope(org_a.organization):
        for member in members:
            services.grant_create(organization=org_a.organization, actor=hr(org_a), tokens=500, reason="base",
                                  member=member)
        before = {m.pk: balance(m) for m in members}
        grant = services.grant_create(organization=org_a.organization, actor=hr(org_a), tokens=4_000,
                                      reason="sprint", team=team)
        assert all(balance(m)[0] == before[m.pk][0] + 4_000 for m in members)
        services.grant_revoke(grant=grant, actor=hr(org_a))
    for member in members:
        assert balance(member) == before[member.pk]
        bonus, adjustment = entries_for(member, reference=f"grant:{grant.pk}")
        assert (bonus.kind, bonus.tokens) == ("bonus", 4_000)
        assert (adjustment.kind, adjustment.tokens, adjustment.granted_delta) == ("adjustment", -4_000, -4_000)
        assert adjustment.actor_id == hr(org_a).pk
    with unscoped():
        grant = Grant.all_objects.get(pk=grant.pk)
    assert grant.revoked_at is not None and grant.revoked_by_id == hr(org_a).pk
    [logged] = audit(org_a, "grant.revoked")
    assert logged.object_id == str(grant.pk) and logged.data == {"tokens": 4_000, "reason": "sprint"}


def test_revoking_a_partly_used_grant_is_refused_naming_the_member_and_changes_nothing(org_a):
    team, (keeps, spends) = new_team(org_a, "Spenders", 2)
    with scope(org_a.organization):
        grant = services.grant_create(organization=org_a.organization, actor=hr(org_a), tokens=10_000,
                                      reason="bonus", team=team)
    use(spends, 3_000)
    assert available(spends) == 7_000
    before = snapshot()
    with scope(org_a.organization), pytest.raises(ValidationError) as caught:
        services.grant_revoke(grant=grant, actor=hr(org_a))
    message = " ".join(caught.value.messages)
    assert spends.user.email in message and keeps.user.email not in message
    assert "7,000 of 10,000" in message
    # Nothing moved, not even the account of the member who had not used anything.
    assert snapshot() == before
    assert available(keeps) == 10_000
    assert audit(org_a, "grant.revoked") == []


def test_revoking_twice_is_refused(org_a):
    employee = org_a.members["approver"]
    with scope(org_a.organization):
        grant = services.grant_create(organization=org_a.organization, actor=hr(org_a), tokens=800, reason="x",
                                      member=employee)
        services.grant_revoke(grant=grant, actor=hr(org_a))
        before = snapshot()
        with pytest.raises(ValidationError) as caught:
            services.grant_revoke(grant=grant, actor=hr(org_a))
    assert "already revoked" in " ".join(caught.value.messages)
    assert snapshot() == before
    assert len(audit(org_a, "grant.revoked")) == 1


# -- policies ---------------------------------------------------------------------------------------------------

GOOD_POLICY = {"name": "Research", "monthly_tokens": 2_000_000, "rollover_rule": "none", "overage_rule": "hard_stop"}

# (case, overrides of GOOD_POLICY, the field the error must be on)
BAD_POLICIES = [
    ("capped tokens without a cap", {"rollover_rule": "capped_tokens"}, "rollover_cap_tokens"),
    ("capped tokens with a zero cap", {"rollover_rule": "capped_tokens", "rollover_cap_tokens": 0}, "rollover_cap_tokens"),
    ("capped percent 0", {"rollover_rule": "capped_percent", "rollover_cap_percent": 0}, "rollover_cap_percent"),
    ("capped percent 150", {"rollover_rule": "capped_percent", "rollover_cap_percent": 150}, "rollover_cap_percent"),
    ("capped percent without a cap", {"rollover_rule": "capped_percent"}, "rollover_cap_percent"),
    ("capped percent abc", {"rollover_rule": "capped_percent", "rollover_cap_percent": "abc"}, "rollover_cap_percent"),
    ("cap in tokens with rule none", {"rollover_rule": "none", "rollover_cap_tokens": 1000}, "rollover_cap_tokens"),
    ("cap in tokens with rule all", {"rollover_rule": "all", "rollover_cap_tokens": 1000}, "rollover_cap_tokens"),
    ("cap in percent with rule all", {"rollover_rule": "all", "rollover_cap_percent": 10}, "rollover_cap_percent"),
    ("auto approve without tokens", {"overage_rule": "auto_approve", "auto_approve_requests": 2}, "auto_approve_tokens"),
    ("auto approve with zero tokens", {"overage_rule": "auto_approve", "auto_approve_tokens": 0,
                                       "auto_approve_requests": 2}, "auto_approve_tokens"),
    ("auto approve without requests", {"overage_rule": "auto_approve", "auto_approve_tokens": 1000},
     "auto_approve_requests"),
    ("auto approve with zero requests", {"overage_rule": "auto_approve", "auto_approve_tokens": 1000,
                                         "auto_approve_requests": 0}, "auto_approve_requests"),
    ("auto approve with 1001 requests", {"overage_rule": "auto_approve", "auto_approve_tokens": 1000,
                                         "auto_approve_requests": 1001}, "auto_approve_requests"),
    ("auto approve with 2.5 requests", {"overage_rule": "auto_approve", "auto_approve_tokens": 1000,
                                        "auto_approve_requests": "2.5"}, "auto_approve_requests"),
    ("auto approve requests with request approval", {"overage_rule": "request_approval", "auto_approve_requests": 3},
     "auto_approve_requests"),
    ("auto approve tokens with hard stop", {"overage_rule": "hard_stop", "auto_approve_tokens": 1000},
     "auto_approve_tokens"),
    ("auto approve tokens with request approval", {"overage_rule": "request_approval", "auto_approve_tokens": 1000},
     "auto_approve_tokens"),
    ("negative monthly", {"monthly_tokens": -1}, "monthly_tokens"),
    ("absurd monthly", {"monthly_tokens": MAX_TOKENS + 1}, "monthly_tokens"),
    ("monthly abc", {"monthly_tokens": "abc"}, "monthly_tokens"),
    ("monthly missing", {"monthly_tokens": None}, "monthly_tokens"),
    ("lifetime 0", {"rollover_rule": "all", "rollover_lifetime_periods": 0}, "rollover_lifetime_periods"),
    ("lifetime 0 with rule none", {"rollover_lifetime_periods": 0}, "rollover_lifetime_periods"),
    ("lifetime 25", {"rollover_rule": "all", "rollover_lifetime_periods": 25}, "rollover_lifetime_periods"),
    ("lifetime negative", {"rollover_rule": "all", "rollover_lifetime_periods": -1}, "rollover_lifetime_periods"),
    ("lifetime over 1 with rule none", {"rollover_rule": "none", "rollover_lifetime_periods": 3},
     "rollover_lifetime_periods"),
    ("unknown rollover rule", {"rollover_rule": "sometimes"}, "rollover_rule"),
    ("unknown overage rule", {"overage_rule": "sometimes"}, "overage_rule"),
    ("blank name", {"name": "   "}, "name"),
    ("duplicate name", {"name": "Standard"}, "name"),
    ("duplicate name, other case", {"name": "  sTANDARD "}, "name"),
]


@pytest.mark.parametrize("overrides, field", [case[1:] for case in BAD_POLICIES], ids=[case[0] for case in BAD_POLICIES])
def test_contradictory_policy_is_a_field_error_and_changes_nothing(org_a, overrides, field):
    before = snapshot()
    with scope(org_a.organization), pytest.raises(ValidationError) as caught:
        services.policy_create(organization=org_a.organization, actor=hr(org_a), **(GOOD_POLICY | overrides))
    assert set(caught.value.message_dict) == {field}
    assert snapshot() == before


@pytest.mark.parametrize("overrides, field", [case[1:] for case in BAD_POLICIES], ids=[case[0] for case in BAD_POLICIES])
def test_contradictory_policy_update_is_a_field_error_and_changes_nothing(org_a, overrides, field):
    with scope(org_a.organization):
        policy = services.policy_create(organization=org_a.organization, actor=hr(org_a), **GOOD_POLICY)
        before = snapshot()
        with pytest.raises(ValidationError) as caught:
            services.policy_update(policy=policy, actor=hr(org_a), immediately=True, **(GOOD_POLICY | overrides))
    assert set(caught.value.message_dict) == {field}
    assert snapshot() == before


@pytest.mark.parametrize("rules", [
    {"rollover_rule": "capped_tokens", "rollover_cap_tokens": 100_000, "rollover_lifetime_periods": 3},
    {"rollover_rule": "capped_percent", "rollover_cap_percent": 100, "rollover_lifetime_periods": 24},
    {"rollover_rule": "capped_percent", "rollover_cap_percent": "1"},
    {"rollover_rule": "all", "rollover_cap_tokens": "", "rollover_cap_percent": None},
    {"overage_rule": "auto_approve", "auto_approve_tokens": "250000", "auto_approve_requests": "3"},
    {"overage_rule": "request_approval", "monthly_tokens": 0},
    {"monthly_tokens": MAX_TOKENS},
], ids=repr)
def test_consistent_policies_are_created_and_audited(org_a, rules):
    with scope(org_a.organization):
        policy = services.policy_create(organization=org_a.organization, actor=hr(org_a), **(GOOD_POLICY | rules))
        policy.refresh_from_db()
    expected = GOOD_POLICY | rules
    assert policy.monthly_tokens == int(expected["monthly_tokens"])
    assert policy.rollover_rule == expected["rollover_rule"]
    assert policy.rollover_lifetime_periods == int(expected.get("rollover_lifetime_periods", 1))
    assert policy.auto_approve_tokens == (int(expected["auto_approve_tokens"]) if "auto_approve_tokens" in rules else None)
    assert policy.auto_approve_requests == (int(expected["auto_approve_requests"])
                                            if "auto_approve_requests" in rules else None)
    assert audit(org_a, "policy.created")[-1].object_id == str(policy.pk)


# -- assignments --------------------------------------------------------------------------------------------------


def test_assigning_from_the_next_period_changes_nothing_now(org_a):
    organization = org_a.organization
    organization.time_zone = "Asia/Tokyo"
    organization.save()
    team, members = new_team(org_a, "Tokyo", 2)
    at = in_period(organization, days=9)
    with scope(organization):
        old = services.policy_create(organization=organization, actor=hr(org_a), name="Old", monthly_tokens=600_000)
        services.policy_assign(organization=organization, actor=hr(org_a), policy=old, team=team, immediately=True,
                               at=at - timedelta(days=2))
        new = services.policy_create(organization=organization, actor=hr(org_a), name="New", monthly_tokens=9_000_000)
        before = snapshot()
        assignment = services.policy_assign(organization=organization, actor=hr(org_a), policy=new, team=team, at=at)
        after = snapshot()
        in_force_now = [policy_in_force(member=m, at=at) for m in members]
    start = next_period_start(period_start_for(organization, at))
    expected = datetime(start.year, start.month, 1, tzinfo=ZoneInfo("Asia/Tokyo"))
    assert assignment.effective_from == expected
    assert assignment.effective_from != datetime(start.year, start.month, 1, tzinfo=dt_timezone.utc)
    assert not assignment.applied_immediately
    # Only the assignment row and its audit entry are new: no ledger entry, no balance moved.
    assert after["accounts"] == before["accounts"] and after["entries"] == before["entries"]
    assert after["assignments"] == before["assignments"] + 1
    assert in_force_now == [old, old]
    with scope(organization):
        assert policy_in_force(member=members[0], at=expected - timedelta(seconds=1)) == old
        assert policy_in_force(member=members[0], at=expected) == new
    [logged] = [e for e in audit(org_a, "policy.assigned") if e.object_id == str(assignment.pk)]
    assert logged.data["applies"] == "from the next period" and logged.data["team"] == "Tokyo"
    assert logged.data["effective_from"] == expected.isoformat()


def test_assigning_immediately_tops_up_then_down_pro_rata(org_a):
    organization = org_a.organization
    team, members = new_team(org_a, "Lab", 2)
    at1, at2 = in_period(organization, days=4), in_period(organization, days=14, hours=6)
    with scope(organization):
        for member in members:
            services.account_open(member=member, at=at1)  # no policy yet: opens empty
            services.grant_create(organization=organization, actor=hr(org_a), tokens=50_000, reason="seed",
                                  member=member)
        big = services.policy_create(organization=organization, actor=hr(org_a), name="Big", monthly_tokens=3_000_000)
        small = services.policy_create(organization=organization, actor=hr(org_a), name="Small",
                                       monthly_tokens=1_200_000)
        before = {m.pk: balance(m) for m in members}

        first = services.policy_assign(organization=organization, actor=hr(org_a), policy=big, team=team,
                                       immediately=True, at=at1)
        f1 = remaining_fraction(organization, at1)
        up = prorate(3_000_000, f1) - prorate(0, f1)
        assert 0 < up < 3_000_000
        for member in members:
            [entry] = entries_for(member, reference=f"policy:{big.pk}")
            assert (entry.kind, entry.tokens, entry.granted_delta) == ("adjustment", up, up)
            assert entry.idempotency_key == f"assignment:{first.pk}"
            assert balance(member) == (before[member.pk][0] + up, 0, 0)
        assert first.effective_from == at1 and first.applied_immediately

        second = services.policy_assign(organization=organization, actor=hr(org_a), policy=small, team=team,
                                        immediately=True, at=at2)
        f2 = remaining_fraction(organization, at2)
        down = prorate(1_200_000, f2) - prorate(3_000_000, f2)
        assert down < 0
        for member in members:
            [entry] = entries_for(member, reference=f"policy:{small.pk}")
            assert (entry.kind, entry.tokens, entry.granted_delta) == ("adjustment", down, down)
            assert balance(member) == (before[member.pk][0] + up + down, 0, 0)
            assert policy_in_force(member=member, at=at2) == small
    logged = audit(org_a, "policy.assigned")[-2:]
    assert [e.object_id for e in logged] == [str(first.pk), str(second.pk)]
    assert all(e.data["applies"] == "immediately, pro rata" for e in logged)


def test_a_members_own_assignment_wins_over_the_teams(org_a):
    organization = org_a.organization
    team, (own, plain) = new_team(org_a, "Mixed", 2)
    at1, at2 = in_period(organization, days=3), in_period(organization, days=8)
    with scope(organization):
        for member in (own, plain):
            services.account_open(member=member, at=at1)
        personal = services.policy_create(organization=organization, actor=hr(org_a), name="Personal",
                                          monthly_tokens=2_000_000)
        team_policy = services.policy_create(organization=organization, actor=hr(org_a), name="Team wide",
                                             monthly_tokens=4_000_000)
        services.policy_assign(organization=organization, actor=hr(org_a), policy=personal, member=own,
                               immediately=True, at=at1)
        own_before, plain_before = balance(own), balance(plain)
        services.policy_assign(organization=organization, actor=hr(org_a), policy=team_policy, team=team,
                               immediately=True, at=at2)
        assert policy_in_force(member=own, at=at2) == personal
        assert policy_in_force(member=plain, at=at2) == team_policy
    assert balance(own) == own_before
    assert entries_for(own, reference=f"policy:{team_policy.pk}") == []
    [entry] = entries_for(plain, reference=f"policy:{team_policy.pk}")
    assert entry.tokens == prorate(4_000_000, remaining_fraction(organization, at2))
    assert balance(plain)[0] == plain_before[0] + entry.tokens


def test_reducing_never_takes_available_below_zero(org_a):
    organization = org_a.organization
    _team, (member,) = new_team(org_a, "Frugal", 1)
    at1, at2 = in_period(organization, days=2), in_period(organization, days=6)
    with scope(organization):
        services.account_open(member=member, at=at1)
        rich = services.policy_create(organization=organization, actor=hr(org_a), name="Rich", monthly_tokens=2_000_000)
        nothing = services.policy_create(organization=organization, actor=hr(org_a), name="Nothing", monthly_tokens=0,
                                         overage_rule="request_approval")
        services.policy_assign(organization=organization, actor=hr(org_a), policy=rich, member=member,
                               immediately=True, at=at1)
    use(member, available(member) - 100)
    with scope(organization):
        account = Account.objects.get(member=member)
        hold = ledger.authorize(account=account, tokens=60, idempotency_key="in-flight")
    assert available(member) == 40
    granted, held, used = balance(member)
    with scope(organization):
        services.policy_assign(organization=organization, actor=hr(org_a), policy=nothing, member=member,
                               immediately=True, at=at2)
    # The pro rata cut is far larger than 40: only what is available is taken back.
    assert prorate(2_000_000, remaining_fraction(organization, at2)) > 40
    [cut] = entries_for(member, reference=f"policy:{nothing.pk}")
    assert (cut.kind, cut.tokens, cut.granted_delta) == ("adjustment", -40, -40)
    assert balance(member) == (granted - 40, held, used)
    assert available(member) == 0
    # The hold in flight can still be settled in full.
    ledger.settle(hold=hold, used_tokens=60)
    assert balance(member) == (granted - 40, 0, used + 60)


def test_reducing_with_nothing_available_posts_nothing(org_a):
    organization = org_a.organization
    _team, (member,) = new_team(org_a, "Broke", 1)
    at1, at2 = in_period(organization, days=2), in_period(organization, days=6)
    with scope(organization):
        services.account_open(member=member, at=at1)
        rich = services.policy_create(organization=organization, actor=hr(org_a), name="Rich", monthly_tokens=900_000)
        poor = services.policy_create(organization=organization, actor=hr(org_a), name="Poor", monthly_tokens=10)
        services.policy_assign(organization=organization, actor=hr(org_a), policy=rich, member=member,
                               immediately=True, at=at1)
    use(member, available(member))
    before = balance(member)
    with scope(organization):
        services.policy_assign(organization=organization, actor=hr(org_a), policy=poor, member=member,
                               immediately=True, at=at2)
    assert balance(member) == before and available(member) == 0
    assert entries_for(member, reference=f"policy:{poor.pk}") == []


def test_assigning_to_a_member_of_another_organization_is_refused(org_a, org_b):
    before = snapshot()
    with scope(org_a.organization), pytest.raises(ValidationError) as caught:
        services.policy_assign(organization=org_a.organization, actor=hr(org_a), policy=org_a.policy,
                               member=org_b.members["employee"], immediately=True)
    assert set(caught.value.message_dict) == {"member"}
    assert snapshot() == before


def test_policy_update_immediately_adjusts_governed_members_and_next_period_does_not(org_a):
    organization = org_a.organization
    team, (m1, m2, own) = new_team(org_a, "Governed", 3)
    at1, at2, at3 = (in_period(organization, days=d) for d in (1, 5, 9))
    with scope(organization):
        for member in (m1, m2, own):
            services.account_open(member=member, at=at1)
        policy = services.policy_create(organization=organization, actor=hr(org_a), name="Flex", monthly_tokens=1_000_000)
        other = services.policy_create(organization=organization, actor=hr(org_a), name="Other", monthly_tokens=50_000)
        services.policy_assign(organization=organization, actor=hr(org_a), policy=policy, team=team, immediately=True,
                               at=at1)
        services.policy_assign(organization=organization, actor=hr(org_a), policy=other, member=own,
                               immediately=True, at=at1)
        before = {m.pk: balance(m) for m in (m1, m2, own)}
        outsiders = {m.pk: balance(m) for m in [org_a.members["employee"]]}

        services.policy_update(policy=policy, actor=hr(org_a), immediately=True, at=at2, monthly_tokens=2_500_000)
        f2 = remaining_fraction(organization, at2)
        delta = prorate(2_500_000, f2) - prorate(1_000_000, f2)
        assert delta > 0
        for member in (m1, m2):
            assert balance(member)[0] == before[member.pk][0] + delta
            change = [e for e in entries_for(member, reference=f"policy:{policy.pk}")
                      if e.idempotency_key.startswith("policy-change:")]
            assert [(e.kind, e.tokens) for e in change] == [("adjustment", delta)]
        assert balance(own) == before[own.pk]
        assert {m.pk: balance(m) for m in [org_a.members["employee"]]} == outsiders

        unchanged = snapshot()
        services.policy_update(policy=policy, actor=hr(org_a), immediately=False, at=at3, monthly_tokens=100_000)
        after = snapshot()
    assert after["accounts"] == unchanged["accounts"] and after["entries"] == unchanged["entries"]
    policy.refresh_from_db()
    assert policy.monthly_tokens == 100_000
    updated = audit(org_a, "policy.updated")
    assert [e.data["applies"] for e in updated] == ["immediately, pro rata", "from the next period"]
    assert updated[0].data["monthly_tokens"] == [1_000_000, 2_500_000]


# -- accounts opening pro rata ------------------------------------------------------------------------------------


def test_account_opens_pro_rata_for_a_mid_period_joiner_and_whole_for_a_late_opener(org_a):
    organization = org_a.organization
    begin, end = period_bounds(organization, period_start_for(organization))
    days = (end - begin).days
    team = TeamFactory(organization=organization, name="Openers")
    with scope(organization):
        policy = services.policy_create(organization=organization, actor=hr(org_a), name="Monthly",
                                        monthly_tokens=3_000_000)
        services.policy_assign(organization=organization, actor=hr(org_a), policy=policy, team=team,
                               immediately=True, at=begin)
    joiner = MemberFactory(organization=organization, team=team, joined_at=begin + timedelta(days=10),
                           user=UserFactory(email="joiner@a.example"))
    veteran = MemberFactory(organization=organization, team=team, joined_at=begin - timedelta(days=40),
                            user=UserFactory(email="veteran@a.example"))
    at = begin + timedelta(days=12, hours=3)
    with scope(organization):
        joiner_account = services.account_open(member=joiner, at=at)
        veteran_account = services.account_open(member=veteran, at=at)
        # Opening again returns the same account and grants nothing more.
        assert services.account_open(member=joiner, at=at + timedelta(days=1)).pk == joiner_account.pk
    assert joiner_account.granted == 3_000_000 * (days - 10) // days
    assert joiner_account.granted == prorate(3_000_000, remaining_fraction(organization, begin + timedelta(days=10)))
    assert veteran_account.granted == 3_000_000
    [grant] = entries_for(joiner)
    assert (grant.kind, grant.idempotency_key) == ("grant", f"grant:{begin.date()}")
    assert "pro rata" in grant.reason
    [whole] = entries_for(veteran)
    assert whole.tokens == 3_000_000 and "pro rata" not in whole.reason
    assert joiner_account.period_start == veteran_account.period_start == begin.date()


# -- catalog ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("multipliers, usage, expected", [
    (("1.5", "2", "0.5"), (1, 0, 0), 2),            # 1.5 -> 2
    (("1.5", "2", "0.5"), (2, 1, 1), 6),            # 3 + 2 + 0.5 = 5.5 -> 6
    (("1", "1", "0"), (1000, 500, 999), 1500),     # exact stays exact
    (("0.001", "0.001", "0"), (1, 0, 0), 1),        # any fraction of a token counts as one
    (("5", "5", "1"), (100, 100, 50), 1050),
    (("1", "1", "1"), (0, 0, 0), 0),
])
def test_weighted_tokens_rounds_up_to_a_whole_token(multipliers, usage, expected):
    model = CatalogModel(input_multiplier=Decimal(multipliers[0]), output_multiplier=Decimal(multipliers[1]),
                         cached_multiplier=Decimal(multipliers[2]))
    result = model.pricing.weighted(*usage)
    assert result == expected and isinstance(result, int)


GOOD_MODEL = {"model_id": "claude-test", "display_name": "Claude test",
              "input_multiplier": "1", "output_multiplier": "3", "cached_multiplier": "0.1",
              "input_price_per_million": "3", "output_price_per_million": "15", "cached_price_per_million": "0.3"}
BAD_MODELS = [
    ({"input_multiplier": "-1"}, "input_multiplier"),
    ({"output_multiplier": "abc"}, "output_multiplier"),
    ({"input_multiplier": "0"}, "input_multiplier"),
    ({"output_multiplier": "0"}, "output_multiplier"),
    ({"cached_multiplier": "-0.5"}, "cached_multiplier"),
    ({"input_multiplier": "10000"}, "input_multiplier"),
    ({"input_multiplier": "1e400"}, "input_multiplier"),
    ({"input_multiplier": "NaN"}, "input_multiplier"),
    ({"output_multiplier": "Infinity"}, "output_multiplier"),
    ({"input_price_per_million": "-3"}, "input_price_per_million"),
    ({"output_price_per_million": "abc"}, "output_price_per_million"),
    ({"cached_price_per_million": "100000000"}, "cached_price_per_million"),
    ({"model_id": "gpt-test"}, "model_id"),  # already in org a's catalog
    ({"model_id": "  "}, "model_id"),
    ({"connection": 999_999}, "connection"),
    ({"connection": None}, "connection"),
    ({"max_output_tokens": "0"}, "max_output_tokens"),
    ({"max_output_tokens": "many"}, "max_output_tokens"),
]


@pytest.mark.parametrize("overrides, field", BAD_MODELS, ids=repr)
def test_bad_catalog_model_is_a_field_error_and_changes_nothing(org_a, overrides, field):
    before = snapshot()
    with scope(org_a.organization), pytest.raises(ValidationError) as caught:
        services.catalog_model_create(organization=org_a.organization, actor=org_a.members["admin"].user,
                                      **(GOOD_MODEL | {"connection": org_a.provider_connection} | overrides))
    assert set(caught.value.message_dict) == {field}
    assert snapshot() == before


def test_the_same_model_id_is_fine_in_another_organization(org_a, org_b):
    with scope(org_b.organization):
        entry = services.catalog_model_create(organization=org_b.organization, actor=org_b.members["admin"].user,
                                              **(GOOD_MODEL | {"connection": org_b.provider_connection}))
    with scope(org_a.organization):
        other = services.catalog_model_create(organization=org_a.organization, actor=org_a.members["admin"].user,
                                              **(GOOD_MODEL | {"connection": org_a.provider_connection}))
    assert entry.model_id == other.model_id and entry.pk != other.pk
    assert other.output_multiplier == Decimal("3") and other.cached_price_per_million == Decimal("0.3")
    assert audit(org_a, "catalog_model.created")[-1].object_id == str(other.pk)


def test_catalog_update_to_a_taken_model_id_is_refused(org_a):
    with scope(org_a.organization):
        entry = services.catalog_model_create(organization=org_a.organization, actor=org_a.members["admin"].user,
                                              **(GOOD_MODEL | {"connection": org_a.provider_connection}))
        before = snapshot()
        with pytest.raises(ValidationError) as caught:
            services.catalog_model_update(catalog_model=entry, actor=org_a.members["admin"].user, model_id="gpt-test")
        assert set(caught.value.message_dict) == {"model_id"}
        assert snapshot() == before
        # Keeping its own id is not a duplicate.
        services.catalog_model_update(catalog_model=entry, actor=org_a.members["admin"].user, output_multiplier="4")
        entry.refresh_from_db()
    assert (entry.model_id, entry.output_multiplier) == ("claude-test", Decimal("4"))


# -- verify_ledger ----------------------------------------------------------------------------------------------


def test_verify_ledger_is_clean_after_normal_operations_and_names_a_corrupted_account(org_a, org_b):
    employee = org_a.members["employee"]
    with scope(org_a.organization):
        grant = services.grant_create(organization=org_a.organization, actor=hr(org_a), tokens=9_000,
                                      reason="x", team=org_a.team)
        services.grant_revoke(grant=grant, actor=hr(org_a))
        services.grant_batch_apply(batch=org_a.grant_batch, actor=hr(org_a))
        ledger.settle(hold=org_a.hold, used_tokens=700)
    use(employee, 1_200)
    with scope(org_a.organization):
        account = Account.objects.get(member=employee)
        stray = ledger.authorize(account=account, tokens=50, idempotency_key="stray")
        ledger.release(hold=stray)
    out, err = StringIO(), StringIO()
    call_command("verify_ledger", stdout=out, stderr=err)
    assert "ledger verified" in out.getvalue() and err.getvalue() == ""

    with connection.cursor() as cursor:
        cursor.execute(f"UPDATE {Account._meta.db_table} SET granted = granted + 7 WHERE id = %s", [account.pk])
    out, err = StringIO(), StringIO()
    with pytest.raises(CommandError) as caught:
        call_command("verify_ledger", stdout=out, stderr=err)
    assert "1 account(s)" in str(caught.value)
    lines = err.getvalue().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"account {account.pk} ")
    assert f"organization {org_a.organization.pk}" in lines[0]
    # The other organization's ledger is still clean on its own.
    call_command("verify_ledger", "--org", org_b.slug, stdout=StringIO(), stderr=StringIO())
    with pytest.raises(CommandError):
        call_command("verify_ledger", "--org", org_a.slug, stdout=StringIO(), stderr=StringIO())


@pytest.mark.parametrize("field, value, message", [
    ("input_multiplier", "9999.9999", "decimal places"),  # would round to 10000.000 and overflow the column
    ("output_price_per_million", "0.12345", "decimal places"),
    ("cached_multiplier", "NaN", "Enter a number"),
    ("input_multiplier", "10000", "below"),
])
def test_catalog_numbers_the_columns_cannot_hold_are_refused(org_a, field, value, message):
    before = snapshot()
    data = {"model_id": "precise", "connection": org_a.provider_connection, field: value}
    with scope(org_a.organization), pytest.raises(ValidationError) as error:
        services.catalog_model_create(organization=org_a.organization, actor=None, **data)
    assert message in error.value.message_dict[field][0]
    assert snapshot() == before


@pytest.mark.parametrize("field, value", [
    ("rollover_cap_percent", 1.5), ("rollover_cap_percent", True), ("rollover_lifetime_periods", 2.5),
    ("rollover_lifetime_periods", True),
])
def test_fractional_or_boolean_whole_numbers_are_refused_not_truncated(org_a, field, value):
    rules = {"rollover_rule": "capped_percent", "rollover_cap_percent": 10} | {field: value}
    before = snapshot()
    with scope(org_a.organization), pytest.raises(ValidationError) as error:
        services.policy_create(organization=org_a.organization, actor=None, name="Strict", monthly_tokens=1000, **rules)
    assert field in error.value.message_dict
    assert snapshot() == before


def test_bulk_grants_retried_with_one_key_grant_once_and_a_csv_name_cannot_collide(org_a):
    employee = org_a.members["employee"]
    rows = [{"email": employee.user.email, "tokens": 700, "reason": "retro"}]
    with scope(org_a.organization):
        services.grant_batch_preview(organization=org_a.organization, actor=None, upload=SimpleUploadedFile(
            "api:key-1", f"email,tokens,reason\n{employee.user.email},5,x\n".encode()))
        first = services.grant_bulk(organization=org_a.organization, actor=None, rows=rows, idempotency_key="key-1")
        before = balance(employee)
        again = services.grant_bulk(organization=org_a.organization, actor=None, rows=rows, idempotency_key="key-1")
    assert again.pk == first.pk and first.status == "applied"
    assert balance(employee) == before


def test_members_governed_by_agrees_with_the_per_member_rule(org_a):
    """Own assignment wins over the team's; the latest in force counts; deactivated members are out."""
    from allowances.selectors import members_governed_by

    at = timezone.now() + timedelta(days=400)  # after every assignment made below takes effect
    with scope(org_a.organization):
        other = services.policy_create(organization=org_a.organization, actor=None, name="Other", monthly_tokens=5)
        team_member, own_member, loner = (org_a.members[r] for r in ("hr", "approver", "employee"))
        services.policy_assign(organization=org_a.organization, actor=None, policy=other, member=own_member)
        loner.team = None
        loner.save()
        services.policy_assign(organization=org_a.organization, actor=None, policy=org_a.policy, member=loner)
        inactive = MemberFactory(organization=org_a.organization, team=org_a.team, is_active=False)
        members = Member.objects.filter(organization=org_a.organization)
        for policy in (org_a.policy, other):
            expected = {m.pk for m in members if m.is_active and (p := policy_in_force(member=m, at=at)) and p.pk == policy.pk}
            assert {m.pk for m in members_governed_by(policy=policy, at=at)} == expected
        governed = {m.pk for m in members_governed_by(policy=org_a.policy, at=at)}
    assert team_member.pk in governed and loner.pk in governed
    assert own_member.pk not in governed and inactive.pk not in governed
