"""The token ledger: every change to an account's balance goes through `post`.

On PostgreSQL one call is one SQL statement, so one transaction and one round trip:

    WITH entry AS (INSERT INTO ledger entry SELECT ... FROM account WHERE <the balance allows it>
                   FOR UPDATE ON CONFLICT DO NOTHING RETURNING ...),
         moved AS (UPDATE account SET <buckets moved by the entry> FROM entry ...)
    SELECT id FROM entry

- The account row is locked and the balance condition is checked on its newest version in the
  same statement that writes, so concurrent holds can never take the available balance below the
  approved overdraft (no check-then-write).
- The unique (account, idempotency key) and the unique `closes_hold` make retries and races
  harmless: a conflicting entry is not inserted, and then nothing moves.
- The entry and the balance change commit together or not at all.

SQLite (the embedded default) has no data-modifying CTEs: there the same INSERT and UPDATE run
as two statements in one transaction (SQLite admits one writer at a time).

When nothing was inserted, the slow path says why: a retry (the existing entry is returned), a
closed hold, or not enough tokens. SQL is written by hand because this is the gateway's hot path;
the gateway runs the same statements (`Statement`) on its own async connections.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import NamedTuple

import psycopg
from django.db import connection, transaction
from django.utils import timezone

from allowances.models import Account, KeySpend, LedgerEntry
from portal.tenancy import ScopeError, current_organization

HOLD_TTL = timedelta(minutes=15)
SWEEP_BATCH = 1000

Kind = LedgerEntry.Kind
# Which bucket an entry of each kind moves: +1 adds its tokens, -1 subtracts them.
GRANTED_SIGN = {Kind.GRANT: 1, Kind.BONUS: 1, Kind.ROLLOVER_IN: 1, Kind.OVERAGE_GRANT: 1, Kind.ADJUSTMENT: 1,
                Kind.ROLLOVER_OUT: -1, Kind.EXPIRY: -1}

# Guards: how low the account's (alias a) available balance may go after the entry. None: no limit
# (usage is a fact and is recorded whatever it costs); "overdraft": down to minus the approved
# overdraft (holds); "zero": not below zero (revoking or reducing grants).
_AVAILABLE_AFTER = "a.granted + %(g)s - a.used - %(u)s - a.held - %(h)s"
GUARDS = {
    None: "",
    "overdraft": f" AND {_AVAILABLE_AFTER} >= -a.overdraft_limit",
    "zero": f" AND {_AVAILABLE_AFTER} >= 0",
}
_ACCOUNT = Account._meta.db_table
_ENTRY = LedgerEntry._meta.db_table
_SPEND = KeySpend._meta.db_table
_ENTRY_COLUMNS = ("organization_id, account_id, kind, tokens, granted_delta, held_delta, used_delta, period_start, "
                  "idempotency_key, closes_hold_id, expires_at, model, actor_id, api_key_id, reason, reference, "
                  "created_at")
_ENTRY_VALUES = ("%(org)s, %(account)s, %(kind)s, %(tokens)s, %(g)s, %(h)s, %(u)s, a.period_start, %(key)s, %(closes)s, "
                 "%(expires)s, %(model)s, %(actor)s, %(api_key)s, %(reason)s, %(reference)s, %(now)s")
_MOVE = "granted = {t}.granted + %(g)s, held = {t}.held + %(h)s, used = {t}.used + %(u)s"

# An entry made with an API key also moves the key's spend counter (alias s), and a hold must fit
# the key's cap. Counters of an older period count as zero (see KeySpend).
_KEY_SPENT = "CASE WHEN s.period_start = a.period_start THEN s.held + s.used ELSE 0 END"
_KEY_JOIN = f" JOIN {_SPEND} s ON s.id = %(spend)s AND s.organization_id = a.organization_id"
_KEY_CAP = f" AND (s.token_cap IS NULL OR {_KEY_SPENT} + %(h)s + %(u)s <= s.token_cap)"
_KEY_MOVE = ("period_start = {p}, "
             "held = {greatest}(CASE WHEN {t}.period_start = {p} THEN {t}.held ELSE 0 END + %(h)s, 0), "
             "used = CASE WHEN {t}.period_start = {p} THEN {t}.used ELSE 0 END + %(u)s")


def _insert_entry(guard: str | None, keyed: bool, lock: str) -> str:
    join, cap = (_KEY_JOIN, _KEY_CAP if guard else "") if keyed else ("", "")
    return (f"INSERT INTO {_ENTRY} ({_ENTRY_COLUMNS}) SELECT {_ENTRY_VALUES} FROM {_ACCOUNT} a{join} "
            f"WHERE a.id = %(account)s AND a.organization_id = %(org)s{GUARDS[guard]}{cap}{lock} "
            "ON CONFLICT DO NOTHING RETURNING id, period_start")


@functools.cache
def postgres_sql(guard: str | None, keyed: bool, with_entry: str = "") -> str:
    """A post as one statement, returning the new entry's id (no row: nothing was posted).

    `with_entry` adds a caller's own CTEs that read the new entry (alias `entry`): they write only
    when an entry was made, in the same transaction (the gateway's usage record).
    """
    insert = _insert_entry(guard, keyed, " FOR UPDATE")
    # Data-modifying CTEs always run, referenced or not: one statement moves entry, account and key.
    ctes = f"WITH entry AS ({insert}), moved AS (UPDATE {_ACCOUNT} SET {_MOVE.format(t=_ACCOUNT)} FROM entry " \
           f"WHERE {_ACCOUNT}.id = %(account)s)"
    if keyed:
        ctes += (f", spent AS (UPDATE {_SPEND} SET "
                 f"{_KEY_MOVE.format(t=_SPEND, p='entry.period_start', greatest='GREATEST')} FROM entry "
                 f"WHERE {_SPEND}.id = %(spend)s)")
    return f"{ctes}{with_entry} SELECT id FROM entry"


_SQLITE_SQL = {(guard, keyed): _insert_entry(guard, keyed, "") for guard in GUARDS for keyed in (False, True)}
_SQLITE_MOVE = f"UPDATE {_ACCOUNT} SET {_MOVE.format(t=_ACCOUNT)} WHERE id = %(account)s"
_SQLITE_KEY_MOVE = f"UPDATE {_SPEND} SET {_KEY_MOVE.format(t=_SPEND, p='%(period)s', greatest='MAX')} WHERE id = %(spend)s"


def _insert_and_move(guard: str | None, params: dict) -> int | None:
    """Append the entry and move the buckets atomically; the new entry's id, or None if nothing happened."""
    keyed = params["spend"] is not None
    if connection.vendor == "postgresql":
        # Django's own connection (and so its transaction), but psycopg's server-side binding with a
        # prepared plan: this statement runs on every gateway request, and binding its parameters
        # client-side was the largest cost of a call.
        connection.ensure_connection()
        with psycopg.Cursor(connection.connection) as cursor:
            cursor.execute(postgres_sql(guard, keyed), params, prepare=True)
            row = cursor.fetchone()
            return row[0] if row else None
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute(_SQLITE_SQL[guard, keyed], params)
        row = cursor.fetchone()
        if row is None:
            return None
        cursor.execute(_SQLITE_MOVE, params)
        if keyed:
            cursor.execute(_SQLITE_KEY_MOVE, params | {"period": row[1]})
        return row[0]


class LedgerError(Exception):
    pass


class InsufficientTokens(LedgerError):
    def __init__(self, *, account_id: int, requested: int, available: int, overdraft_limit: int):
        self.account_id, self.requested = account_id, requested
        self.available, self.overdraft_limit = available, overdraft_limit
        super().__init__(
            f"{requested:,} tokens requested but only {max(available + overdraft_limit, 0):,} available"
            + (f" (including {overdraft_limit:,} approved overage)" if overdraft_limit else "")
        )


class KeyCapExceeded(LedgerError):
    def __init__(self, *, requested: int, cap: int, spent: int):
        self.requested, self.cap, self.spent = requested, cap, spent
        super().__init__(f"{requested:,} tokens requested but this API key's cap of {cap:,} tokens per period "
                         f"has {max(cap - spent, 0):,} left")


class AccountRef(NamedTuple):
    """An account by its ids, which is all a post needs: no row to load, and no model instance to
    build (on the gateway's hot path that cost more than the rest of a post's Python)."""

    pk: int
    organization_id: int


@dataclass(frozen=True)
class Hold:
    """A reservation of tokens for a request in flight (a ledger entry of kind hold)."""

    id: int
    account_id: int
    organization_id: int
    tokens: int
    expires_at: datetime
    model: str = ""
    api_key_id: int | None = None
    spend_id: int | None = None  # the key's spend counter (KeySpend), moved with the account


@dataclass(frozen=True)
class Posted:
    entry_id: int
    created: bool  # False when the call was a retry and the entry already existed


class _AlreadyPosted(Exception):
    pass


def _check_scope(organization_id: int) -> None:
    active = current_organization()
    if active is not None and active.pk != organization_id:
        raise ScopeError("ledger call for an account of another organization")


def post(
    *,
    account: Account,
    kind: str,
    tokens: int,
    idempotency_key: str,
    held_delta: int = 0,
    used_delta: int = 0,
    granted_delta: int | None = None,
    guard: str | None = None,
    closes_hold_id: int | None = None,
    expires_at: datetime | None = None,
    model: str = "",
    actor=None,
    api_key_id: int | None = None,
    spend_id: int | None = None,
    reason: str = "",
    reference: str = "",
) -> Posted:
    """Append one entry and move the account's stored buckets with it, atomically and idempotently."""
    return _post(Statement(guard, _params(
        account=account, kind=kind, tokens=tokens, idempotency_key=idempotency_key, held_delta=held_delta,
        used_delta=used_delta, granted_delta=granted_delta, closes_hold_id=closes_hold_id, expires_at=expires_at,
        model=model, actor=actor, api_key_id=api_key_id, spend_id=spend_id, reason=reason, reference=reference)))


def _params(*, account: Account | AccountRef, kind: str, tokens: int, idempotency_key: str, held_delta: int = 0,
            used_delta: int = 0, granted_delta: int | None = None, closes_hold_id: int | None = None,
            expires_at: datetime | None = None, model: str = "", actor=None, api_key_id: int | None = None,
            spend_id: int | None = None, reason: str = "", reference: str = "") -> dict:
    _check_scope(account.organization_id)
    if granted_delta is None:
        granted_delta = GRANTED_SIGN.get(kind, 0) * tokens
    return {
        "org": account.organization_id, "account": account.pk, "kind": kind, "tokens": tokens,
        "g": granted_delta, "h": held_delta, "u": used_delta, "key": idempotency_key, "closes": closes_hold_id,
        "expires": expires_at, "model": model, "actor": getattr(actor, "pk", None), "api_key": api_key_id,
        "spend": spend_id, "reason": reason[:500], "reference": reference[:100], "now": timezone.now(),
    }


@dataclass(frozen=True)
class Statement:
    """One post, ready to run: through `post` here, or as one PostgreSQL statement on a connection
    of the caller's (the gateway's async connections, see `postgres_sql`). There, no row back means
    nothing was posted, and the caller makes the same call through authorize, settle or release,
    which say why (a retry, a closed hold, a refusal)."""

    guard: str | None
    params: dict

    def sql(self, with_entry: str = "") -> str:
        return postgres_sql(self.guard, self.params["spend"] is not None, with_entry)


def _post(statement: Statement) -> Posted:
    params = statement.params
    entry_id = _insert_and_move(statement.guard, params)
    if entry_id is not None:
        return Posted(entry_id=entry_id, created=True)
    # Nothing happened: find out why (only refusals and retries come here).
    existing = LedgerEntry.all_objects.filter(account_id=params["account"], idempotency_key=params["key"]).values_list(
        "id", flat=True).first()
    if existing is not None:
        return Posted(entry_id=existing, created=False)
    if params["closes"] is not None and LedgerEntry.all_objects.filter(closes_hold_id=params["closes"]).exists():
        raise _AlreadyPosted  # the hold was closed by another entry: the caller decides what that means
    raise _insufficient(AccountRef(pk=params["account"], organization_id=params["org"]),
                        requested=params["h"] + params["u"] - params["g"], spend_id=params["spend"])


def _insufficient(account: Account | AccountRef, *, requested: int, spend_id: int | None) -> LedgerError:
    if spend_id is not None:
        spend = KeySpend.all_objects.filter(pk=spend_id, organization_id=account.organization_id).first()
        period = Account.all_objects.filter(pk=account.pk).values_list("period_start", flat=True).first()
        if spend is None:
            return LedgerError(f"no key spend counter {spend_id} in organization {account.organization_id}")
        if spend.token_cap is not None and spend.spent_in(period) + requested > spend.token_cap:
            return KeyCapExceeded(requested=requested, cap=spend.token_cap, spent=spend.spent_in(period))
    current = Account.all_objects.filter(pk=account.pk, organization_id=account.organization_id).values(
        "granted", "held", "used", "overdraft_limit").first()
    if current is None:
        return LedgerError(f"no account {account.pk} in organization {account.organization_id}")
    return InsufficientTokens(account_id=account.pk, requested=requested,
                              available=current["granted"] - current["used"] - current["held"],
                              overdraft_limit=current["overdraft_limit"])


def hold_statement(*, account: Account | AccountRef, tokens: int, idempotency_key: str, ttl: timedelta = HOLD_TTL,
                   model: str = "", reference: str = "", actor=None, api_key_id: int | None = None,
                   spend_id: int | None = None) -> Statement:
    """The post that takes a hold (see `authorize`); `hold_made` is the hold once it ran."""
    if not isinstance(tokens, int) or tokens <= 0:
        raise ValueError("a hold needs a positive whole number of tokens")
    return Statement("overdraft", _params(
        account=account, kind=Kind.HOLD, tokens=tokens, held_delta=tokens, idempotency_key=f"hold:{idempotency_key}",
        expires_at=timezone.now() + ttl, model=model, reference=reference, actor=actor, api_key_id=api_key_id,
        spend_id=spend_id))


def hold_made(statement: Statement, entry_id: int) -> Hold:
    params = statement.params
    return Hold(id=entry_id, account_id=params["account"], organization_id=params["org"], tokens=params["tokens"],
                expires_at=params["expires"], model=params["model"], api_key_id=params["api_key"],
                spend_id=params["spend"])


def authorize(*, account: Account | AccountRef, tokens: int, idempotency_key: str, ttl: timedelta = HOLD_TTL,
              model: str = "", reference: str = "", actor=None, api_key_id: int | None = None,
              spend_id: int | None = None) -> Hold:
    """Reserve `tokens` for a request in flight, or raise InsufficientTokens (or KeyCapExceeded when
    made with a capped key). Safe to retry with the same key."""
    statement = hold_statement(account=account, tokens=tokens, idempotency_key=idempotency_key, ttl=ttl, model=model,
                               reference=reference, actor=actor, api_key_id=api_key_id, spend_id=spend_id)
    posted = _post(statement)
    if not posted.created:
        return hold_get(account=account, hold_id=posted.entry_id)
    return hold_made(statement, posted.entry_id)


def settle_statement(*, hold: Hold, used_tokens: int, model: str = "", reference: str = "") -> Statement:
    """The post that settles a hold (see `settle`): all of the hold is released and `used_tokens`
    recorded as used, at most the hold."""
    if not isinstance(used_tokens, int) or used_tokens < 0:
        raise ValueError("usage is a whole number of tokens, zero or more")
    used_tokens = min(used_tokens, hold.tokens)
    return Statement(None, _params(
        account=_account_ref(hold), kind=Kind.USAGE, tokens=used_tokens, used_delta=used_tokens,
        idempotency_key=f"settle:{hold.id}", model=model or hold.model, reference=reference,
        api_key_id=hold.api_key_id, spend_id=hold.spend_id, held_delta=-hold.tokens, closes_hold_id=hold.id))


def settle(*, hold: Hold, used_tokens: int, model: str = "", reference: str = "") -> Posted:
    """Turn a hold into usage: release all of it and record what was used, at most the hold. What
    the hold does not cover is never charged: the caller records it as a fault (the gateway's
    usage records keep it as uncharged tokens), never a debit past the allowance's limit.

    A hold that the sweeper released first (its time-to-live passed) is settled all the same, but
    its tokens may have been used since: the usage is charged as far as the account (and the
    key's cap) can still bear, never below its limit. Either way once, whatever is retried.
    """
    try:
        return _post(settle_statement(hold=hold, used_tokens=used_tokens, model=model, reference=reference))
    except _AlreadyPosted:
        pass
    for _attempt in range(5):  # the balance may move under us; each try takes what fits then
        tokens = min(used_tokens, _room(hold))
        try:
            return _post(Statement("overdraft", _params(
                account=_account_ref(hold), kind=Kind.USAGE, tokens=tokens, used_delta=tokens,
                idempotency_key=f"settle:{hold.id}", model=model or hold.model, reference=reference,
                api_key_id=hold.api_key_id, spend_id=hold.spend_id,
                reason="usage after the hold was released" + (
                    "" if tokens == used_tokens else f"; {used_tokens - tokens:,} beyond the limit not charged"))))
        except (InsufficientTokens, KeyCapExceeded):
            continue
    raise LedgerError(f"could not settle hold {hold.id}: its account kept changing")


def _room(hold: Hold) -> int:
    """How many tokens the hold's account (and key cap) can still take before their limits."""
    account = Account.all_objects.values("granted", "held", "used", "overdraft_limit", "period_start").get(
        pk=hold.account_id)
    room = account["granted"] - account["used"] - account["held"] + account["overdraft_limit"]
    if hold.spend_id is not None:
        spend = KeySpend.all_objects.get(pk=hold.spend_id)
        if spend.token_cap is not None:
            room = min(room, spend.token_cap - spend.spent_in(account["period_start"]))
    return max(room, 0)


def release_statement(*, hold: Hold, reason: str = "") -> Statement:
    """The post that releases a hold (see `release`)."""
    return Statement(None, _params(
        account=_account_ref(hold), kind=Kind.RELEASE, tokens=hold.tokens, held_delta=-hold.tokens,
        idempotency_key=f"release:{hold.id}", closes_hold_id=hold.id, reason=reason, model=hold.model,
        api_key_id=hold.api_key_id, spend_id=hold.spend_id))


def release(*, hold: Hold, reason: str = "") -> Posted | None:
    """Give a hold's tokens back. Returns None when the hold was already settled (or released by
    another caller); a retry of this same release returns the existing entry with created=False."""
    try:
        return _post(release_statement(hold=hold, reason=reason))
    except _AlreadyPosted:
        return None


def _account_ref(hold: Hold) -> AccountRef:
    return AccountRef(pk=hold.account_id, organization_id=hold.organization_id)


_HOLD_FIELDS = ("id", "account_id", "organization_id", "tokens", "expires_at", "model", "api_key_id",
                "api_key__spend_id")


def _hold(row: dict) -> Hold:
    return Hold(id=row["id"], account_id=row["account_id"], organization_id=row["organization_id"],
                tokens=row["tokens"], expires_at=row["expires_at"], model=row["model"], api_key_id=row["api_key_id"],
                spend_id=row["api_key__spend_id"])


def hold_get(*, account: Account | AccountRef, hold_id: int) -> Hold:
    return _hold(LedgerEntry.all_objects.filter(account_id=account.pk, kind=Kind.HOLD).values(*_HOLD_FIELDS)
                 .get(pk=hold_id))


def hold_find(*, organization_id: int, hold_id: int) -> Hold | None:
    """A hold of the organization by id, or None (another organization's answers the same)."""
    row = LedgerEntry.all_objects.filter(organization_id=organization_id, kind=Kind.HOLD, pk=hold_id).values(
        *_HOLD_FIELDS).first()
    return _hold(row) if row is not None else None


def hold_is_open(hold_id: int) -> bool:
    return not LedgerEntry.all_objects.filter(closes_hold_id=hold_id).exists()


def release_expired_holds(*, now: datetime | None = None, limit: int = SWEEP_BATCH) -> int:
    """Release holds that outlived their time-to-live. Returns how many were released."""
    now = now or timezone.now()
    expired = (LedgerEntry.all_objects.filter(kind=Kind.HOLD, expires_at__lte=now, closed_by__isnull=True)
               .order_by("expires_at").values(*_HOLD_FIELDS)[:limit])
    released = 0
    for row in expired:
        result = release(hold=_hold(row), reason="time-to-live passed")
        if result is not None and result.created:
            released += 1
    return released


def verify(*, organization_id: int | None = None) -> list[dict]:
    """Recompute every account from its entries; return the accounts whose stored balance differs."""
    where = "WHERE a.organization_id = %s" if organization_id else ""
    sql = f"""
        SELECT a.id, a.organization_id, a.granted, a.held, a.used,
               COALESCE(SUM(e.granted_delta), 0), COALESCE(SUM(e.held_delta), 0), COALESCE(SUM(e.used_delta), 0)
        FROM {_ACCOUNT} a LEFT JOIN {_ENTRY} e ON e.account_id = a.id
        {where}
        GROUP BY a.id, a.organization_id, a.granted, a.held, a.used
        HAVING a.granted <> COALESCE(SUM(e.granted_delta), 0) OR a.held <> COALESCE(SUM(e.held_delta), 0)
            OR a.used <> COALESCE(SUM(e.used_delta), 0)
        ORDER BY a.id"""
    bad_closings = f"""
        SELECT c.account_id, c.id, c.held_delta, h.tokens FROM {_ENTRY} c JOIN {_ENTRY} h ON h.id = c.closes_hold_id
        WHERE (c.held_delta <> -h.tokens OR c.account_id <> h.account_id OR h.kind <> 'hold')
        {"AND c.organization_id = %s" if organization_id else ""}"""
    params = [organization_id] if organization_id else []
    problems = []
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        for account_id, org_id, granted, held, used, sum_granted, sum_held, sum_used in cursor.fetchall():
            problems.append({
                "account_id": account_id, "organization_id": org_id,
                "stored": {"granted": granted, "held": held, "used": used},
                "from_entries": {"granted": sum_granted, "held": sum_held, "used": sum_used},
            })
        cursor.execute(bad_closings, params)
        for account_id, entry_id, held_delta, hold_tokens in cursor.fetchall():
            problems.append({"account_id": account_id, "entry_id": entry_id,
                             "problem": f"closing entry moves held by {held_delta}, the hold was {hold_tokens}"})
    return problems
