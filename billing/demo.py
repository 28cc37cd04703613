"""The demo's billable overage: the first Engineering employee has used her month and part of the
overage approved for her (overage.demo), so the billing page shows consumption to settle. Posted
through the ledger as the gateway's usage would be; once per month."""

from allowances import ledger
from allowances.models import Account, LedgerEntry
from portal.models import Member

OVERAGE_LEFT = 200_000  # what she keeps of her approved overage, for the demo's own calls
MODEL = "gpt-4o"


def seed_billing(organization) -> int:
    """The billable tokens this adds (0 on a rerun in the same month)."""
    employees = [member for member in Member.objects.filter(organization=organization, is_active=True)
                 .select_related("organization").order_by("pk") if member.roles == ["employee"]]
    if not employees:
        return 0
    account = Account.objects.filter(member=employees[0]).first()
    if account is None:
        return 0
    key = f"demo:billing:{account.period_start}"
    overage = sum(LedgerEntry.objects.filter(account=account, period_start=account.period_start,
                                             kind=LedgerEntry.Kind.OVERAGE_GRANT).values_list("tokens", flat=True))
    tokens = account.available - OVERAGE_LEFT
    if overage <= OVERAGE_LEFT or tokens <= 0 or LedgerEntry.objects.filter(
            account=account, idempotency_key=f"hold:{key}").exists():
        return 0
    hold = ledger.authorize(account=account, tokens=tokens, idempotency_key=key, model=MODEL,
                            reference="demo usage")
    ledger.settle(hold=hold, used_tokens=tokens, model=MODEL, reference="demo usage")
    return overage - OVERAGE_LEFT
