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
