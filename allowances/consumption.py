"""Which of a period's tokens its usage consumes, and so which usage is billable overage.

The rule, once: a period's tokens are used in this order: what was still held for requests in
flight when the period opened (`carried`), then its base allowance (everything granted into the
period but overage: the monthly grant, bonuses, rolled-over tokens, adjustments), then its
overage (approved overage requests, and what its close books for usage recorded past the
balance); the usage recorded in the period beyond the first two, up to the overage, is billable,
to the model of each usage entry in the order the entries were recorded. What the period's
balance still has when it closes is therefore its overage first: that much of the overage
lapses, unbilled.

So, with nothing in flight at the close, billable plus lapsed is exactly the overage granted;
tokens in flight at the close are neither (if they come back, they come back as base allowance of
the next period, as the close says of every hold it carries).

A close entry (kind close, in the period it closes) counts in two periods: its billed overage in
the period it closes, its opening parts (rolled over, the monthly grant) in the base of the next
(`base_of`, `overage_of`). Closes before it wrote those as entries of their own kinds in each
period, which the kinds above still count.

`billable_usage` and `unused_overage` are the definitions; the selectors and the set-based close
use their SQL forms, held equal to them by tests/allowances/test_rules_in_sql.py.
"""

from __future__ import annotations

from collections.abc import Iterable

from allowances.models import LedgerEntry
from allowances.periods import periods_after

Kind = LedgerEntry.Kind
# Transfers move base allowance between members (never overage): the giver's base is smaller by
# what they gave, the receiver's larger by it, so neither makes any usage billable that was not.
BASE_KINDS = (Kind.GRANT, Kind.BONUS, Kind.ROLLOVER_IN, Kind.ADJUSTMENT, Kind.TRANSFER_OUT, Kind.TRANSFER_IN)
OVERAGE_KINDS = (Kind.OVERAGE_GRANT,)
_OPENING = LedgerEntry.parts_sql("{e}", LedgerEntry.OPENING_PARTS)


def _beyond(used: int, funds: int, overage: int) -> int:
    return min(max(used - funds, 0), max(overage, 0))


def billable_usage(*, carried: int, base: int, overage: int, usage: Iterable[tuple[str, int]]) -> dict[str, int]:
    """The billable tokens of a period by model: `usage` is the period's (model, used tokens) in
    the order recorded; `carried`, `base` and `overage` as the rule says."""
    funds, used, billable = carried + base, 0, {}
    for model, tokens in usage:
        before, used = used, used + tokens
        part = _beyond(used, funds, overage) - _beyond(before, funds, overage)
        if part:
            billable[model] = billable.get(model, 0) + part
    return billable


def _parts(entry: LedgerEntry, parts: dict) -> int:
    return sum(sign * getattr(entry, column) for column, sign in parts.items())


def base_of(entry: LedgerEntry, period) -> int:
    """What `entry` adds to the base allowance of `period`."""
    if entry.kind == Kind.CLOSE:
        return _parts(entry, LedgerEntry.OPENING_PARTS) if periods_after(entry.period_start, 1) == period else 0
    return entry.granted_delta if entry.period_start == period and entry.kind in BASE_KINDS else 0


def overage_of(entry: LedgerEntry, period) -> int:
    """What `entry` adds to the overage of `period`."""
    if entry.period_start != period:
        return 0
    if entry.kind == Kind.CLOSE:
        return entry.close_overage_billed
    return entry.granted_delta if entry.kind in OVERAGE_KINDS else 0


def unused_overage(*, available: int, overage: int) -> int:
    """How much of the period's overage its balance still has: what lapses at its close."""
    return min(max(available, 0), max(overage, 0))


# -- the same rules in SQL -----------------------------------------------------------------------


def unused_overage_sql(available: str, overage: str) -> str:
    return f"LEAST(GREATEST({available}, 0), GREATEST({overage}, 0))"


def _beyond_sql(used: str, funds: str, overage: str) -> str:
    return f"LEAST(GREATEST({used} - ({funds}), 0), GREATEST({overage}, 0))"


def billable_part_sql(*, through: str, tokens: str, funds: str, overage: str) -> str:
    """The billable part of one usage entry of `tokens`, the period's usage `through` it (a
    running sum in the order recorded, this entry included), with the period's carried plus base
    `funds` and its `overage`: `billable_usage`'s step, summed by model by the caller."""
    return f"({_beyond_sql(through, funds, overage)} - {_beyond_sql(f'{through} - {tokens}', funds, overage)})"


def kinds_sql(kinds) -> str:
    return ", ".join(f"'{kind}'" for kind in kinds)


def base_sql(entry: str, period: str, previous: str) -> str:
    """`base_of`: what the entry `entry` adds to the base allowance of `period` (`previous`: the period before
    it), for entries of those two periods."""
    return (f"CASE WHEN {entry}.period_start = {period} AND {entry}.kind IN ({kinds_sql(BASE_KINDS)}) "
            f"THEN {entry}.granted_delta WHEN {entry}.period_start = {previous} AND {entry}.kind = '{Kind.CLOSE}' "
            f"THEN {_OPENING.format(e=entry)} ELSE 0 END")


def overage_sql(entry: str, period: str) -> str:
    """`overage_of`: what the entry `entry` adds to the overage of `period`."""
    return (f"CASE WHEN {entry}.period_start <> {period} THEN 0 WHEN {entry}.kind IN ({kinds_sql(OVERAGE_KINDS)}) "
            f"THEN {entry}.granted_delta WHEN {entry}.kind = '{Kind.CLOSE}' THEN {entry}.close_overage_billed ELSE 0 END")
