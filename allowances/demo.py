"""The demo's allowances: a default model catalog, two policies assigned to the two teams, open accounts."""

from decimal import Decimal

from allowances.models import AllowancePolicy, CatalogModel, PolicyAssignment
from allowances.periods import period_bounds, period_start_for
from allowances.services import account_open, aliases_seed
from gateway.models import ProviderConnection
from portal.models import Member, Team

# Multipliers count a premium model's tokens several times against the allowance; prices are per
# million tokens in the organization's currency; the maximum output is the vendor's for the model.
DEFAULT_CATALOG = [
    ("gpt-4o-mini", "GPT-4o mini", 16_384, "1", "1", "0.5", "0.15", "0.60", "0.075"),
    ("gpt-4o", "GPT-4o", 16_384, "5", "5", "2.5", "2.50", "10.00", "1.25"),
    ("text-embedding-3-small", "Embeddings (small)", 1, "0.2", "0.2", "0.2", "0.02", "0.02", "0.02"),
    ("claude-haiku", "Claude Haiku", 64_000, "1", "1", "0.1", "0.80", "4.00", "0.08"),
    ("claude-sonnet", "Claude Sonnet", 64_000, "4", "4", "0.4", "3.00", "15.00", "0.30"),
]
# What coding agents and SDKs ask for by default, sent to the catalog's nearest model: Claude
# Code's main and background models (any Claude name and dated snapshot), Codex CLI's and the
# OpenAI SDKs' (any GPT, o-series or codex name), and the other embedding models.
DEFAULT_ALIASES = {
    "claude-opus-*": "claude-sonnet",
    "claude-sonnet-*": "claude-sonnet",
    "claude-3-5-sonnet-*": "claude-sonnet",
    "claude-3-7-sonnet-*": "claude-sonnet",
    "claude-haiku-*": "claude-haiku",
    "claude-3-5-haiku-*": "claude-haiku",
    "claude-3-haiku-*": "claude-haiku",
    "gpt-4o-mini-*": "gpt-4o-mini",
    "gpt-4.1-mini*": "gpt-4o-mini",
    "gpt-4.1-nano*": "gpt-4o-mini",
    "o4-mini*": "gpt-4o-mini",
    "gpt-4o-*": "gpt-4o",
    "chatgpt-4o-latest": "gpt-4o",
    "gpt-4.1*": "gpt-4o",
    "gpt-5*": "gpt-4o",
    "gpt-6*": "gpt-4o",
    "o3*": "gpt-4o",
    "codex-*": "gpt-4o",
    "text-embedding-3-large": "text-embedding-3-small",
    "text-embedding-ada-002": "text-embedding-3-small",
}
DEMO_POLICIES = {
    "Engineering": {"name": "Standard", "monthly_tokens": 5_000_000, "rollover_rule": "capped_percent",
                    "rollover_cap_percent": 20, "overage_rule": "request_approval"},
    "Research": {"name": "Research", "monthly_tokens": 20_000_000, "rollover_rule": "all",
                 "rollover_lifetime_periods": 2, "overage_rule": "auto_approve", "auto_approve_tokens": 2_000_000,
                 "auto_approve_requests": 3},
}


def seed_allowances(organization) -> None:
    # The demo works offline: every model is served by the built-in sandbox provider.
    sandbox, _ = ProviderConnection.objects.get_or_create(organization=organization, name="Sandbox",
                                                          defaults={"kind": ProviderConnection.Kind.SANDBOX})
    for model_id, name, most, m_in, m_out, m_cached, p_in, p_out, p_cached in DEFAULT_CATALOG:
        CatalogModel.objects.get_or_create(organization=organization, model_id=model_id, defaults={
            "display_name": name, "connection": sandbox, "max_output_tokens": most, "input_multiplier": Decimal(m_in),
            "output_multiplier": Decimal(m_out), "cached_multiplier": Decimal(m_cached),
            "input_price_per_million": Decimal(p_in), "output_price_per_million": Decimal(p_out),
            "cached_price_per_million": Decimal(p_cached),
        })
    aliases_seed(organization=organization, actor=None, aliases=DEFAULT_ALIASES)
    period_begin = period_bounds(organization, period_start_for(organization))[0]
    for team_name, spec in DEMO_POLICIES.items():
        policy, _ = AllowancePolicy.objects.get_or_create(organization=organization, name=spec["name"],
                                                          defaults={k: v for k, v in spec.items() if k != "name"})
        team = Team.objects.get(organization=organization, name=team_name)
        if not PolicyAssignment.objects.filter(team=team).exists():
            PolicyAssignment.objects.create(organization=organization, policy=policy, team=team,
                                            effective_from=period_begin)
    for member in Member.objects.filter(organization=organization).select_related("organization"):
        account_open(member=member)


# The demo's usage, so that the dashboards have days to show: (employee's position, share of the
# policy's monthly tokens used by now, {model: share of that usage}). The second Engineering
# employee is near the limit (the low-balance banner); usage is spread over the days of the
# period so far (today only on its first day), reported like an organization's own gateway would.
DEMO_USAGE = [
    (0, "0.45", {"gpt-4o-mini": "0.6", "gpt-4o": "0.4"}),
    (1, "0.86", {"gpt-4o-mini": "0.5", "claude-haiku": "0.3", "claude-sonnet": "0.2"}),
    (2, "0.3", {"claude-sonnet": "0.7", "claude-haiku": "0.2", "text-embedding-3-small": "0.1"}),
]


def seed_usage(organization, *, at=None) -> int:
    """Report the demo's usage through the usage ingest (records and ledger, counted once per day
    and event: a rerun on the same day adds nothing) and roll the days up; returns the events sent."""
    from datetime import datetime, time, timedelta
    from zoneinfo import ZoneInfo

    from django.utils import timezone

    from allowances.selectors import policy_in_force
    from gateway.rollups import rollup_day
    from gateway.services import usage_ingest

    at = at or timezone.now()
    zone = ZoneInfo(organization.time_zone)
    today = at.astimezone(zone).date()
    first = max(period_bounds(organization, period_start_for(organization, at))[0].date(), today - timedelta(days=13))
    days = [first + timedelta(days=offset) for offset in range((today - first).days + 1)]
    weights = [3 + (index * 7) % 5 for index in range(len(days))]  # a working pattern, not a flat line
    multipliers = {model_id: Decimal(m_in) for model_id, _name, _most, m_in, *_rest in DEFAULT_CATALOG}
    employees = [m for m in Member.objects.filter(organization=organization, is_active=True).select_related("user")
                 .order_by("pk") if m.roles == ["employee"]]
    admin = Member.objects.filter(organization=organization, is_owner=True).select_related("user").first()
    events = []
    for position, share, models in DEMO_USAGE:
        member = employees[position]
        policy = policy_in_force(member=member, at=at)
        if policy is None:
            continue
        total = Decimal(policy.monthly_tokens) * Decimal(share)
        for day, weight in zip(days, weights, strict=True):
            when = (datetime.combine(day, time(10), tzinfo=zone) if day < today
                    else max(datetime.combine(day, time.min, tzinfo=zone), at - timedelta(minutes=5)))
            for model, model_share in models.items():
                charged = total * weight / sum(weights) * Decimal(model_share)
                raw = int(charged / multipliers[model])  # input and output count alike in the demo catalog
                if raw <= 0:
                    continue
                events.append({"idempotency_key": f"demo:{member.pk}:{day}:{model}", "member": member.user.email,
                               "model": model, "input_tokens": raw * 4 // 5, "output_tokens": raw - raw * 4 // 5,
                               "timestamp": when.isoformat()})
    if events:
        usage_ingest(organization=organization, actor=admin.user if admin else None, events=events)
    for day in days:
        rollup_day(organization=organization, day=day)
    return len(events)
