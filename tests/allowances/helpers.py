"""Shared checks for the allowances tests."""

from allowances.models import Account, AllowancePolicy, CatalogModel, Grant, GrantBatch, LedgerEntry, PolicyAssignment
from portal.models import AuditLogEntry
from portal.tenancy import unscoped


def snapshot() -> dict:
    """Everything a refused allowances call must leave alone, across all organizations."""
    with unscoped():
        return {
            "grants": Grant.all_objects.count(),
            "entries": LedgerEntry.all_objects.count(),
            "policies": sorted(AllowancePolicy.all_objects.values_list(
                "id", "name", "monthly_tokens", "rollover_rule", "rollover_cap_tokens", "rollover_cap_percent",
                "rollover_lifetime_periods", "overage_rule", "auto_approve_tokens")),
            "assignments": PolicyAssignment.all_objects.count(),
            "batches": GrantBatch.all_objects.count(),
            "catalog": sorted(CatalogModel.all_objects.values_list("id", "model_id", "input_multiplier")),
            "accounts": sorted(Account.all_objects.values_list("id", "granted", "held", "used", "overdraft_limit")),
            "revoked": sorted(Grant.all_objects.exclude(revoked_at=None).values_list("id", flat=True)),
            "audit": AuditLogEntry.all_objects.count(),
        }


def balance(member) -> tuple[int, int, int]:
    """(granted, held, used) of the member's account."""
    with unscoped():
        account = Account.all_objects.get(member=member)
    return account.granted, account.held, account.used


def hold_is_open(hold_id: int) -> bool:
    with unscoped():
        return not LedgerEntry.all_objects.filter(closes_hold_id=hold_id).exists()
