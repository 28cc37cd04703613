"""The token ledger: the only code that appends ledger entries or moves an account's buckets
(granted, held, used) or a key's spend counter.

A single post (`post`, and the gateway's `Statement`s) is one SQL statement, so one transaction
and one round trip:

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

A set of posts (`post_set_sql`: the period close, the usage ingest) is one statement too: it
appends every entry of a relation the caller builds and moves each account (and key counter)
once, by the sums of the entries that were new. Both forms are generated from one rule: `MOVES`
(which buckets an entry of each kind moves), `_account_move` and `_key_move` (how an account and
a key's counter move by an entry's deltas).

When a single post inserted nothing, the slow path says why: a retry (the existing entry is
returned), a closed hold, or not enough tokens. SQL is written by hand because this is the
gateway's hot path; the gateway runs the same statements (`Statement`) on its own async
connections.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import NamedTuple

import psycopg
from django.db import connection, transaction
from django.db.models import Q, Sum
from django.utils import timezone

from allowances.models import Account, KeySpend, LedgerEntry
from apikeys.models import ApiKey
from portal.tenancy import ScopeError, current_organization

HOLD_TTL = timedelta(minutes=15)
SWEEP_BATCH = 1000

Kind = LedgerEntry.Kind
BUCKETS = ("granted", "held", "used")  # each moved by the entry's <bucket>_delta
# How an entry of each kind moves the buckets, per token of the entry: (granted, held, used). An
# entry that closes a hold (a settlement, a release) also gives the hold's tokens back to held.
MOVES = {
    Kind.GRANT: (1, 0, 0), Kind.BONUS: (1, 0, 0), Kind.ROLLOVER_IN: (1, 0, 0), Kind.OVERAGE_GRANT: (1, 0, 0),
    Kind.ADJUSTMENT: (1, 0, 0),  # its tokens carry the sign
    Kind.ROLLOVER_OUT: (-1, 0, 0), Kind.EXPIRY: (-1, 0, 0), Kind.OVERAGE_LAPSE: (-1, 0, 0),
    Kind.HOLD: (0, 1, 0), Kind.RELEASE: (0, 0, 0), Kind.USAGE: (0, 0, 1),
    Kind.TRANSFER_OUT: (-1, 0, 0), Kind.TRANSFER_IN: (1, 0, 0),
    Kind.CLOSE: (1, 0, 0),  # its tokens carry the sign: the sum of its parts (LedgerEntry.CLOSING_PARTS, OPENING_PARTS)
}

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
_KEY = ApiKey._meta.db_table
_ENTRY_COLUMNS = ("organization_id, account_id, kind, tokens, granted_delta, held_delta, used_delta, period_start, "
                  "idempotency_key, closes_hold_id, expires_at, model, actor_id, api_key_id, reason, reference, "
                  "created_at")
_ENTRY_VALUES = ("%(org)s, %(account)s, %(kind)s, %(tokens)s, %(g)s, %(h)s, %(u)s, a.period_start, %(key)s, %(closes)s, "
                 "%(expires)s, %(model)s, %(actor)s, %(api_key)s, %(reason)s, %(reference)s, %(now)s")
_POSTED = "id, account_id, api_key_id, period_start, granted_delta, held_delta, used_delta"


def _account_move(target: str, source: str) -> str:
    """SET clause: each bucket of the account `target` moves by `source`'s delta for it (one new
    entry, or the sums of an account's new entries; none: no move)."""
    return ", ".join(f"{bucket} = {target}.{bucket} + COALESCE({source}.{bucket}_delta, 0)" for bucket in BUCKETS)


def _key_move(target: str, source: str) -> str:
    """SET clause: a key's spend counter `target` moves by `source`'s held and used deltas, in the
    period of `source`; a counter of an older period counts as zero (KeySpend.counted_sql), and
    held stays at zero or more (a hold of the last period closed in this one)."""
    period = f"{source}.period_start"

    def counted(bucket):
        return KeySpend.counted_sql(target, f"{target}.{bucket}", period)
    return (f"period_start = {period}, held = GREATEST({counted('held')} + {source}.held_delta, 0), "
            f"used = {counted('used')} + {source}.used_delta")


# An entry made with an API key also moves the key's spend counter (alias s), and a hold must fit
# the key's cap.
_KEY_JOIN = f" JOIN {_SPEND} s ON s.id = %(spend)s AND s.organization_id = a.organization_id"
_KEY_CAP = (f" AND (s.token_cap IS NULL OR {KeySpend.counted_sql('s', 's.held + s.used', 'a.period_start')}"
            " + %(h)s + %(u)s <= s.token_cap)")


def _hold_fits(tokens: str, keyed: bool) -> str:
    """A hold of `tokens` (an SQL expression) fits the account's (and the key's cap's) limit."""
    fits = GUARDS["overdraft"].replace("%(h)s", tokens)
    if keyed:
        fits += _KEY_CAP.replace("%(h)s", tokens)
    return f"({fits.removeprefix(' AND ')})"


def _near_limit(keyed: bool) -> str:
    """Less than %(below)s percent of the period's granted tokens is left (or of the key's cap)."""
    near = "(a.granted - a.used - a.held) * 100 < %(below)s * a.granted"
    if keyed:
        spent = KeySpend.counted_sql("s", "s.held + s.used", "a.period_start")
        near += f" OR (s.token_cap IS NOT NULL AND (s.token_cap - {spent}) * 100 < %(below)s * s.token_cap)"
    return f"({near})"


def _routed(keyed: bool) -> str:
    """Budget-aware routing, decided on the locked account row: the economy hold (%(economy)s
    tokens) is taken when it fits and the premium one (%(h)s) does not, or the account (or key)
    is near its limit."""
    return f"({_hold_fits('%(economy)s', keyed)} AND (NOT {_hold_fits('%(h)s', keyed)} OR {_near_limit(keyed)}))"


@functools.cache
def postgres_sql(guard: str | None, keyed: bool, with_entry: str = "") -> str:
    """A post as one statement, returning the new entry's id (no row: nothing was posted).

    `with_entry` adds a caller's own CTEs that read the new entry (alias `entry`): they write only
    when an entry was made, in the same transaction (the gateway's usage record).

    The guard "routed" is a hold with an economy alternative (see `hold_statement`): the entry is
    the economy hold or the premium one, as `_routed` decides, and the statement returns its model
    too.
    """
    join, cap = (_KEY_JOIN, _KEY_CAP if guard else "") if keyed else ("", "")
    values, where, posted = _ENTRY_VALUES, f"{GUARDS.get(guard, '')}{cap}", _POSTED
    if guard == "routed":
        routed = _routed(keyed)
        chosen = {"tokens": "economy", "h": "economy", "model": "economy_model"}  # premium parameter: economy's
        values = re.sub(r"%\((tokens|h|model)\)s",
                        lambda m: f"CASE WHEN {routed} THEN %({chosen[m[1]]})s ELSE {m[0]} END", values)
        where, posted = f" AND ({_hold_fits('%(h)s', keyed)} OR {routed})", f"{_POSTED}, model"
    insert = (f"INSERT INTO {_ENTRY} ({_ENTRY_COLUMNS}) SELECT {values} FROM {_ACCOUNT} a{join} "
              f"WHERE a.id = %(account)s AND a.organization_id = %(org)s{where} FOR UPDATE "
              f"ON CONFLICT DO NOTHING RETURNING {posted}")
    # Data-modifying CTEs always run, referenced or not: one statement moves entry, account and key.
    ctes = (f"WITH entry AS ({insert}), moved AS (UPDATE {_ACCOUNT} SET {_account_move(_ACCOUNT, 'entry')} "
            f"FROM entry WHERE {_ACCOUNT}.id = %(account)s)")
    if keyed:
        ctes += f", spent AS (UPDATE {_SPEND} SET {_key_move(_SPEND, 'entry')} FROM entry WHERE {_SPEND}.id = %(spend)s)"
    return f"{ctes}{with_entry} SELECT id{', model' if guard == 'routed' else ''} FROM entry"


# -- team pools ------------------------------------------------------------------------------------
#
# A member of a team with a pool holds from their own account first, then from the pool, in one
# statement: both account rows are locked in id order (as `lock` takes them), then the key's
# counter. The member's own part comes first out of their base allowance (what is left but the
# approved overage they still hold, allowances.consumption: exactly what they could give), then
# the pool pays, then their approved overage (and overdraft) last: overage is billed and pool
# tokens are not, so a pool is never left unused while the member runs up billable overage. The
# pool itself never goes below zero. A key's cap bounds the whole request.
#
# The hold is two hold entries: the member's (its `pool_hold` names the pool's; zero tokens when
# the pool covers all of it; its `base_tokens` says how much of it is base allowance) and the
# pool's. Settling or releasing it closes both in one statement, the usage charged in the same
# order: the member's base share, then the pool's part, then the rest of the member's part.

_OWN_AVAILABLE = "(a.granted - a.used - a.held)"
# The member's period's approved overage (consumption.OVERAGE_KINDS), through the partial index
# ledger_account_overage; only pooled holds read it.
_OVERAGE_GRANTED = (f"(SELECT COALESCE(SUM(o.granted_delta), 0) FROM {_ENTRY} o WHERE o.account_id = a.id "
                    f"AND o.period_start = a.period_start AND o.kind IN ({{overage_kinds}}))")


def _pool_parts(tokens: str, row: str = "f") -> tuple[str, str]:
    """The pool's part and the member's part of a hold of `tokens` (SQL, over the split row `row`)."""
    pool = f"LEAST(GREATEST({tokens} - {row}.own_base, 0), {row}.pool_available)"
    return pool, f"({tokens} - {pool})"


def _pool_fits(tokens: str, keyed: bool) -> str:
    """A pooled hold of `tokens` fits: the member's part within their own limit (or nothing of
    theirs is taken), and the whole within the key's cap."""
    own = _pool_parts(tokens)[1]
    fits = f"({own} = 0 OR f.own_available - {own} >= -f.overdraft_limit)"
    if keyed:
        fits += (f" AND (s.token_cap IS NULL OR {KeySpend.counted_sql('s', 's.held + s.used', 'f.period_start')}"
                 f" + {tokens} <= s.token_cap)")
    return f"({fits})"


@functools.cache
def pool_hold_sql(routed: bool, keyed: bool) -> str:
    """A pooled hold as one statement (see above), returning the member's entry's id, its model,
    its tokens, the pool's entry's id and its tokens, and the member's base share (no row: nothing
    was posted)."""
    from allowances.consumption import OVERAGE_KINDS, kinds_sql, unused_overage_sql

    overage = _OVERAGE_GRANTED.format(overage_kinds=kinds_sql(OVERAGE_KINDS))
    split = (f"SELECT a.id, a.period_start, a.overdraft_limit, {_OWN_AVAILABLE} AS own_available, "
             f"GREATEST({_OWN_AVAILABLE}, 0) - {unused_overage_sql(_OWN_AVAILABLE, overage)} AS own_base, "
             "COALESCE((SELECT GREATEST(p.granted - p.used - p.held, 0) FROM locked p WHERE p.id = %(pool)s "
             "AND p.period_start = a.period_start), 0) AS pool_available "
             "FROM locked a WHERE a.id = %(account)s")
    join = f" JOIN {_SPEND} s ON s.id = %(spend)s AND s.organization_id = %(org)s" if keyed else ""
    if routed:
        # Budget-aware routing as in `_routed`, near the limit of the member's own allowance, and
        # each hold fitting with the pool.
        near = "(f.own_available * 100 < %(below)s * a.granted"
        if keyed:
            spent = KeySpend.counted_sql("s", "s.held + s.used", "f.period_start")
            near += f" OR (s.token_cap IS NOT NULL AND (s.token_cap - {spent}) * 100 < %(below)s * s.token_cap)"
        near += ")"
        economy = f"({_pool_fits('%(economy)s', keyed)} AND (NOT {_pool_fits('%(h)s', keyed)} OR {near}))"
        choose = (f"CASE WHEN {economy} THEN %(economy)s ELSE %(h)s END AS tokens, "
                  f"CASE WHEN {economy} THEN %(economy_model)s ELSE %(model)s END AS model")
        where = f"{_pool_fits('%(h)s', keyed)} OR {economy}"
    else:
        choose, where = "%(h)s AS tokens, %(model)s AS model", _pool_fits("%(h)s", keyed)
    pool_part, own_part = _pool_parts("c.tokens", "c")
    # FOR UPDATE OF s: the key's counter is locked once the account rows are (the join waits for them).
    chosen = (f"SELECT f.*, {choose} FROM ({split}) f JOIN locked a ON a.id = f.id{join} WHERE {where}"
              f"{' FOR UPDATE OF s' if keyed else ''}")
    columns = f"{_ENTRY_COLUMNS}, pool_hold_id, base_tokens"
    own = (f"INSERT INTO {_ENTRY} ({columns}) SELECT %(org)s, %(account)s, 'hold', {own_part}, 0, {own_part}, 0, "
           "c.period_start, %(key)s, NULL, %(expires)s, c.model, %(actor)s, %(api_key)s, %(reason)s, %(reference)s, "
           f"%(now)s, CASE WHEN {pool_part} > 0 THEN nextval(pg_get_serial_sequence('{_ENTRY}', 'id')) END, "
           f"CASE WHEN {pool_part} > 0 THEN LEAST({own_part}, GREATEST(c.own_base, 0)) END FROM c "
           f"ON CONFLICT DO NOTHING RETURNING {_POSTED}, model, tokens, pool_hold_id, base_tokens")
    # Only with the member's entry (a retry posts neither), under the id that entry names.
    pooled = (f"INSERT INTO {_ENTRY} (id, {_ENTRY_COLUMNS}) SELECT m.pool_hold_id, %(org)s, %(pool)s, 'hold', "
              f"{pool_part}, 0, {pool_part}, 0, c.period_start, %(key)s || ':' || %(account)s, NULL, %(expires)s, "
              "c.model, %(actor)s, %(api_key)s, %(reason)s, %(reference)s, %(now)s FROM own m, c "
              f"WHERE m.pool_hold_id IS NOT NULL RETURNING {_POSTED}, tokens")
    return (f"WITH locked AS MATERIALIZED (SELECT id, granted, held, used, overdraft_limit, period_start FROM {_ACCOUNT} "
            "WHERE id IN (%(account)s, %(pool)s) AND organization_id = %(org)s ORDER BY id FOR UPDATE), "
            f"c AS MATERIALIZED ({chosen}), own AS ({own}), pooled AS ({pooled}), "
            f"{_pair_moves(keyed, 'own', 'pooled')} "
            "SELECT id, model, tokens, pool_hold_id, (SELECT tokens FROM pooled), base_tokens FROM own")


def _pair_moves(keyed: bool, own: str, pooled: str) -> str:
    """CTEs moving the two accounts by their new entries (`own`, `pooled`) and the key's counter by
    both, in the member's entry's period."""
    both = (f"(SELECT account_id, period_start, {', '.join(f'{b}_delta' for b in BUCKETS)} FROM {own} "
            f"UNION ALL SELECT account_id, period_start, {', '.join(f'{b}_delta' for b in BUCKETS)} FROM {pooled})")
    sums = (f"(SELECT account_id, {', '.join(f'SUM({b}_delta) AS {b}_delta' for b in BUCKETS)} FROM {both} x "
            "GROUP BY account_id) t")
    moves = f"moved AS (UPDATE {_ACCOUNT} SET {_account_move(_ACCOUNT, 't')} FROM {sums} WHERE {_ACCOUNT}.id = t.account_id)"
    if keyed:
        key_sums = (f"(SELECT (SELECT period_start FROM {own}) AS period_start, SUM(held_delta) AS held_delta, "
                    f"SUM(used_delta) AS used_delta FROM {both} x HAVING count(*) > 0) t")
        moves += f", spent AS (UPDATE {_SPEND} SET {_key_move(_SPEND, 't')} FROM {key_sums} WHERE {_SPEND}.id = %(spend)s)"
    return moves


def _as_pool(values: str) -> str:
    """An entry's values (`_ENTRY_VALUES`) with the pool entry's parameters (pool_*), the organization's the same."""
    return re.sub(r"%\((\w+)\)s", lambda m: m[0] if m[1] in ("org", "now") else f"%(pool_{m[1]})s", values)


@functools.cache
def pool_close_sql(keyed: bool, with_entry: str = "") -> str:
    """Closing a pooled hold (its settlement or release) as one statement: the member's closing
    entry (parameters as `_params`) and then, only if it was made, the pool's (the same, prefixed
    pool_), both accounts locked in id order, both moved, and the key's counter by both. Returns
    the member's entry's id; `with_entry` as in `postgres_sql` (alias `entry`: the member's entry)."""
    own = (f"INSERT INTO {_ENTRY} ({_ENTRY_COLUMNS}) SELECT {_ENTRY_VALUES} FROM locked a WHERE a.id = %(account)s "
           f"ON CONFLICT DO NOTHING RETURNING {_POSTED}")
    pooled = (f"INSERT INTO {_ENTRY} ({_ENTRY_COLUMNS}) SELECT {_as_pool(_ENTRY_VALUES)} FROM locked a, entry "
              f"WHERE a.id = %(pool_account)s RETURNING {_POSTED}")
    return (f"WITH locked AS MATERIALIZED (SELECT id, period_start FROM {_ACCOUNT} WHERE id IN (%(account)s, "
            "%(pool_account)s) AND organization_id = %(org)s ORDER BY id FOR UPDATE), "
            f"entry AS ({own}), pooled AS ({pooled}), "
            f"{_pair_moves(keyed, 'entry', 'pooled')}{with_entry} SELECT id FROM entry")


def _insert_and_move(statement: Statement) -> int | None:
    """Append the entry and move the buckets atomically; the new entry's id, or None if nothing happened."""
    # Django's own connection (and so its transaction), but psycopg's server-side binding with a
    # prepared plan: this statement runs on every gateway request, and binding its parameters
    # client-side was the largest cost of a call.
    connection.ensure_connection()
    with psycopg.Cursor(connection.connection) as cursor:
        cursor.execute(statement.sql(), statement.params, prepare=True)
        row = cursor.fetchone()
        return row[0] if row else None


# -- sets of posts ---------------------------------------------------------------------------------

# What a caller's relation of entries to post gives for each one; with keys, also model, actor_id
# and api_key_id. The ledger adds the organization, the deltas (by kind) and the time.
SET_COLUMNS = ("account_id", "kind", "tokens", "period_start", "idempotency_key", "reason", "reference")
_KEYED_COLUMNS = ("model", "actor_id", "api_key_id")


def _delta_sql(bucket: int, kind: str, tokens: str) -> str:
    """An entry's delta for one bucket in SQL, from its kind and tokens (by MOVES)."""
    kinds_by_sign: dict[int, list[str]] = {}
    for entry_kind, signs in MOVES.items():
        if signs[bucket]:
            kinds_by_sign.setdefault(signs[bucket], []).append(f"'{entry_kind}'")
    whens = " ".join(f"WHEN {kind} IN ({', '.join(kinds)}) THEN {sign} * {tokens}"
                     for sign, kinds in sorted(kinds_by_sign.items()))
    return f"CASE {whens} ELSE 0 END" if whens else "0"


@functools.cache
def post_set_sql(entries: str, *, order_by: str, keyed: bool, accounts: str = "", account_changes: str = "",
                 part_columns: tuple[str, ...] = ()) -> str:
    """A set of posts as CTEs `posted`, `moved` (and `spent`) that follow the caller's own in one
    WITH: every row of the relation `entries` (alias e; columns SET_COLUMNS, with `keyed` also
    _KEYED_COLUMNS) becomes an entry of organization %(org)s at %(now)s, in `order_by` order,
    unless its account has its idempotency key already; each account then moves once by the sums
    of its new entries, and with `keyed` each key's spend counter too. `posted` returns the new
    entries.

    `part_columns` are further entry columns the relation gives as they are (a close's parts).

    With `accounts` (a relation with an account_id column, alias p), every account in it is
    updated, with or without new entries, and `account_changes` are set in the same UPDATE (a row
    is updated only once in a statement): the period close moves the accounts' period with it.

    There is no guard: it is for entries no balance refuses (grants, expiries, usage), and none
    closes a hold. The caller locks the accounts (and counters) first, in id order (see `lock`).
    """
    # Without keys an entry names no model (a column that is never NULL), actor or key.
    names = SET_COLUMNS + (_KEYED_COLUMNS if keyed else ("model",)) + part_columns
    values = [f"e.{column}" for column in SET_COLUMNS] + ([f"e.{column}" for column in _KEYED_COLUMNS] if keyed else ["''"])
    values += [f"e.{column}" for column in part_columns]
    values += [_delta_sql(bucket, "e.kind", "e.tokens") for bucket in range(len(BUCKETS))]
    posted = (f"posted AS (INSERT INTO {_ENTRY} (organization_id, {', '.join(names)}, granted_delta, held_delta, "
              f"used_delta, created_at) SELECT %(org)s, {', '.join(values)}, %(now)s FROM {entries} e "
              f"ORDER BY {order_by} ON CONFLICT DO NOTHING RETURNING {_POSTED})")
    sums = (f"(SELECT account_id, {', '.join(f'SUM({bucket}_delta) AS {bucket}_delta' for bucket in BUCKETS)} "
            "FROM posted GROUP BY account_id) s")
    if accounts:
        moved = (f"moved AS (UPDATE {_ACCOUNT} a SET {_account_move('a', 's')}, {account_changes} "
                 f"FROM {accounts} p LEFT JOIN {sums} ON s.account_id = p.account_id WHERE a.id = p.account_id)")
    else:
        moved = f"moved AS (UPDATE {_ACCOUNT} a SET {_account_move('a', 's')} FROM {sums} WHERE a.id = s.account_id)"
    if not keyed:
        return f"{posted}, {moved}"
    # A key's entries are all of one account, so of one period.
    key_sums = (f"(SELECT k.spend_id, p.period_start, SUM(p.held_delta) AS held_delta, SUM(p.used_delta) AS used_delta "
                f"FROM posted p JOIN {_KEY} k ON k.id = p.api_key_id GROUP BY k.spend_id, p.period_start) s")
    spent = f"spent AS (UPDATE {_SPEND} c SET {_key_move('c', 's')} FROM {key_sums} WHERE c.id = s.spend_id)"
    return f"{posted}, {moved}, {spent}"


def lock(*, account_ids: Iterable[int], spend_ids: Iterable[int] = ()) -> None:
    """Lock accounts, then key spend counters, each in id order, for a set of posts in this
    transaction: the order single posts take them in, so the two wait for each other instead of
    deadlocking."""
    with connection.cursor() as cursor:
        for table, ids in ((_ACCOUNT, account_ids), (_SPEND, spend_ids)):
            ids = sorted(set(ids))
            if ids:
                cursor.execute(f"SELECT id FROM {table} WHERE id = ANY(%s) ORDER BY id FOR UPDATE", [ids])


def post_set(sql: str, params: dict, *, organization_id: int) -> list[tuple]:
    """Run a statement built around `post_set_sql` for one organization; its rows."""
    _check_scope(organization_id)
    with connection.cursor() as cursor:
        cursor.execute(sql, params | {"org": organization_id, "now": timezone.now()})
        return cursor.fetchall()


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
    # The team pool's part (see hold_statement): its hold entry, account and tokens. `tokens` is
    # the whole hold, what the request may use; the member's own part is `own_tokens`.
    pool_hold_id: int | None = None
    pool_account_id: int | None = None
    pool_tokens: int = 0
    base_tokens: int | None = None  # of a pooled hold's own part, the member's base allowance

    @property
    def own_tokens(self) -> int:
        return self.tokens - self.pool_tokens


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
    held_delta: int | None = None,
    used_delta: int | None = None,
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
    """Append one entry and move the account's stored buckets with it, atomically and idempotently.
    A delta not given is the kind's (MOVES)."""
    return _post(Statement(guard, _params(
        account=account, kind=kind, tokens=tokens, idempotency_key=idempotency_key, held_delta=held_delta,
        used_delta=used_delta, granted_delta=granted_delta, closes_hold_id=closes_hold_id, expires_at=expires_at,
        model=model, actor=actor, api_key_id=api_key_id, spend_id=spend_id, reason=reason, reference=reference)))


def _params(*, account: Account | AccountRef, kind: str, tokens: int, idempotency_key: str,
            held_delta: int | None = None, used_delta: int | None = None, granted_delta: int | None = None,
            closes_hold_id: int | None = None,
            expires_at: datetime | None = None, model: str = "", actor=None, api_key_id: int | None = None,
            spend_id: int | None = None, reason: str = "", reference: str = "") -> dict:
    _check_scope(account.organization_id)
    granted_sign, held_sign, used_sign = MOVES[kind]
    if granted_delta is None:
        granted_delta = granted_sign * tokens
    if held_delta is None:
        held_delta = held_sign * tokens
    if used_delta is None:
        used_delta = used_sign * tokens
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

    guard: str | None  # "pooled" / "pooled_routed": a hold with the pool; "pool_close": closing one
    params: dict

    def sql(self, with_entry: str = "") -> str:
        keyed = self.params["spend"] is not None
        if self.guard in ("pooled", "pooled_routed"):
            return pool_hold_sql(self.guard == "pooled_routed", keyed)
        if self.guard == "pool_close":
            return pool_close_sql(keyed, with_entry)
        return postgres_sql(self.guard, keyed, with_entry)


def _post(statement: Statement) -> Posted:
    params = statement.params
    entry_id = _insert_and_move(statement)
    if entry_id is not None:
        return Posted(entry_id=entry_id, created=True)
    # Nothing happened: find out why (only refusals and retries come here).
    existing = LedgerEntry.all_objects.filter(account_id=params["account"], idempotency_key=params["key"]).values_list(
        "id", flat=True).first()
    if existing is not None:
        return Posted(entry_id=existing, created=False)
    if params["closes"] is not None and LedgerEntry.all_objects.filter(closes_hold_id=params["closes"]).exists():
        raise _AlreadyPosted  # the hold was closed by another entry: the caller decides what that means
    held = min(params["h"], params.get("economy") or params["h"])  # routed: not even the economy hold fits
    raise _insufficient(AccountRef(pk=params["account"], organization_id=params["org"]),
                        requested=held + params["u"] - params["g"], spend_id=params["spend"], pool_id=params.get("pool"))


def _insufficient(account: Account | AccountRef, *, requested: int, spend_id: int | None,
                  pool_id: int | None = None) -> LedgerError:
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
    available = current["granted"] - current["used"] - current["held"]
    if pool_id is not None:  # what the team pool has counts too
        pool = Account.all_objects.filter(pk=pool_id, organization_id=account.organization_id).values(
            "granted", "held", "used").first()
        available += max(pool["granted"] - pool["used"] - pool["held"], 0) if pool else 0
    return InsufficientTokens(account_id=account.pk, requested=requested, available=available,
                              overdraft_limit=current["overdraft_limit"])


class Economy(NamedTuple):
    """A hold's economy alternative (budget-aware routing): `tokens` for `model` instead, when
    less than `below_percent` of the period's granted tokens (or of the key's cap) is left, or
    when only it fits."""

    tokens: int
    model: str
    below_percent: int


def hold_statement(*, account: Account | AccountRef, tokens: int, idempotency_key: str, ttl: timedelta = HOLD_TTL,
                   model: str = "", reference: str = "", actor=None, api_key_id: int | None = None,
                   spend_id: int | None = None, economy: Economy | None = None,
                   pool_account_id: int | None = None) -> Statement:
    """The post that takes a hold (see `authorize`); `hold_made` is the hold once it ran. With
    `pool_account_id` (the member's team pool) the hold is a pooled one (see "team pools")."""
    for amount in (tokens, *((economy.tokens,) if economy else ())):
        if not isinstance(amount, int) or isinstance(amount, bool) or amount <= 0:
            raise ValueError("a hold needs a positive whole number of tokens")
    params = _params(
        account=account, kind=Kind.HOLD, tokens=tokens, held_delta=tokens, idempotency_key=f"hold:{idempotency_key}",
        expires_at=timezone.now() + ttl, model=model, reference=reference, actor=actor, api_key_id=api_key_id,
        spend_id=spend_id)
    routing = {} if economy is None else {"economy": economy.tokens, "economy_model": economy.model[:100],
                                          "below": economy.below_percent}
    if pool_account_id is not None:
        return Statement("pooled_routed" if economy else "pooled", params | routing | {"pool": pool_account_id})
    return Statement("routed", params | routing) if economy else Statement("overdraft", params)


def hold_made(statement: Statement, entry_id: int, model: str | None = None, own_tokens: int | None = None,
              pool_hold_id: int | None = None, pool_tokens: int | None = None, base_tokens: int | None = None) -> Hold:
    """The hold a statement made, from the row it returned: with `model`, which hold a routed
    statement took; a pooled one returns its parts too."""
    params = statement.params
    routed = statement.guard in ("routed", "pooled_routed") and model == params["economy_model"] and (
        model != params["model"])
    hold = Hold(id=entry_id, account_id=params["account"], organization_id=params["org"],
                tokens=params["economy"] if routed else params["tokens"], expires_at=params["expires"],
                model=params["economy_model"] if routed else params["model"], api_key_id=params["api_key"],
                spend_id=params["spend"])
    if pool_hold_id is None:
        return hold
    return replace(hold, pool_hold_id=pool_hold_id, pool_account_id=params["pool"], pool_tokens=pool_tokens,
                   base_tokens=base_tokens)


def authorize(*, account: Account | AccountRef, tokens: int, idempotency_key: str, ttl: timedelta = HOLD_TTL,
              model: str = "", reference: str = "", actor=None, api_key_id: int | None = None,
              spend_id: int | None = None, economy: Economy | None = None,
              pool_account_id: int | None = None) -> Hold:
    """Reserve `tokens` for a request in flight, or raise InsufficientTokens (or KeyCapExceeded when
    made with a capped key). Safe to retry with the same key. With `economy`, the hold may be the
    economy one instead: the returned hold's model and tokens say which. With `pool_account_id`,
    the team pool covers what the member's own base allowance does not (see "team pools")."""
    statement = hold_statement(account=account, tokens=tokens, idempotency_key=idempotency_key, ttl=ttl, model=model,
                               reference=reference, actor=actor, api_key_id=api_key_id, spend_id=spend_id,
                               economy=economy, pool_account_id=pool_account_id)
    posted = _post(statement)
    if not posted.created or statement.guard != "overdraft":
        return hold_get(account=account, hold_id=posted.entry_id)
    return hold_made(statement, posted.entry_id)


def settle_statement(*, hold: Hold, used_tokens: int, model: str = "", reference: str = "") -> Statement:
    """The post that settles a hold (see `settle`): all of the hold is released and `used_tokens`
    recorded as used, at most the hold; of a pooled hold, the member's base share first, then the
    pool's part, then the rest of the member's part (see "team pools")."""
    if not isinstance(used_tokens, int) or used_tokens < 0:
        raise ValueError("usage is a whole number of tokens, zero or more")
    used_tokens = min(used_tokens, hold.tokens)
    # A hold made before base shares were kept: all of its own part counts as base.
    base = hold.own_tokens if hold.base_tokens is None else hold.base_tokens
    own = used_tokens - min(max(used_tokens - base, 0), hold.pool_tokens)
    params = _params(
        account=_account_ref(hold), kind=Kind.USAGE, tokens=own, used_delta=own,
        idempotency_key=f"settle:{hold.id}", model=model or hold.model, reference=reference,
        api_key_id=hold.api_key_id, spend_id=hold.spend_id, held_delta=-hold.own_tokens, closes_hold_id=hold.id)
    if hold.pool_hold_id is None:
        return Statement(None, params)
    if used_tokens > own:  # the member's history says what the pool paid
        params["reason"] = f"and {used_tokens - own:,} tokens from the team pool"
    pooled = _params(
        account=_pool_ref(hold), kind=Kind.USAGE, tokens=used_tokens - own, used_delta=used_tokens - own,
        idempotency_key=f"settle:{hold.pool_hold_id}", model=model or hold.model, reference=reference,
        api_key_id=hold.api_key_id, spend_id=hold.spend_id, held_delta=-hold.pool_tokens,
        closes_hold_id=hold.pool_hold_id)
    return _pool_close(params, pooled)


def _pool_close(params: dict, pooled: dict) -> Statement:
    return Statement("pool_close", params | {f"pool_{name}": value for name, value in pooled.items()})


def _pool_ref(hold: Hold) -> AccountRef:
    return AccountRef(pk=hold.pool_account_id, organization_id=hold.organization_id)


def settle(*, hold: Hold, used_tokens: int, model: str = "", reference: str = "") -> Posted:
    """Turn a hold into usage: release all of it and record what was used, at most the hold. What
    the hold does not cover is never charged: the caller records it as a fault (the gateway's
    usage records keep it as uncharged tokens), never a debit past the allowance's limit.

    A hold that the sweeper released first (its time-to-live passed) is settled all the same, but
    its tokens may have been used since: the usage is charged as far as the account (and the
    key's cap) can still bear, never below its limit (of a pooled hold: the member's base
    allowance first, then the pool, then the member's approved overage and overdraft). Either way
    once, whatever is retried. `settled_tokens` says how much was charged.
    """
    try:
        return _post(settle_statement(hold=hold, used_tokens=used_tokens, model=model, reference=reference))
    except _AlreadyPosted:
        pass
    parts = [(_account_ref(hold), hold.id)]
    if hold.pool_hold_id is not None:
        parts.append((_pool_ref(hold), hold.pool_hold_id))
    for _attempt in range(5):  # the balance may move under us; each try takes what fits then
        try:
            with transaction.atomic():
                lock(account_ids=[account.pk for account, _hold_id in parts])
                charges = _late_charges(hold, used_tokens)
                left, first = used_tokens - sum(charges), None
                for (account, hold_id), tokens in zip(parts, charges, strict=True):
                    posted = _post(Statement("overdraft", _params(
                        account=account, kind=Kind.USAGE, tokens=tokens, used_delta=tokens,
                        idempotency_key=f"settle:{hold_id}", model=model or hold.model, reference=reference,
                        api_key_id=hold.api_key_id, spend_id=hold.spend_id,
                        reason="usage after the hold was released" + (
                            f"; {left:,} beyond the limit not charged" if left and account.pk == parts[-1][0].pk
                            else ""))))
                    first = first or posted
                    if not posted.created:
                        break  # a retry: the first call posted every part
                return first
        except (InsufficientTokens, KeyCapExceeded):
            continue
    raise LedgerError(f"could not settle hold {hold.id}: its account kept changing")


def settled_tokens(*, hold: Hold) -> int:
    """The tokens a settlement of `hold` charged, over its parts."""
    parts = Q(account_id=hold.account_id, idempotency_key=f"settle:{hold.id}")
    if hold.pool_hold_id is not None:
        parts |= Q(account_id=hold.pool_account_id, idempotency_key=f"settle:{hold.pool_hold_id}")
    return LedgerEntry.all_objects.filter(parts).aggregate(total=Sum("used_delta"))["total"] or 0


def _late_charges(hold: Hold, used_tokens: int) -> list[int]:
    """What a settlement after the sweeper released `hold` charges to each of its parts (the
    member's, then the pool's), as far as the accounts and the key's cap can bear now: of a pooled
    hold, the member's base allowance first, then the pool, then the member's approved overage
    and overdraft, as a hold takes them (see "team pools"). The caller holds the accounts' locks."""
    from allowances.consumption import OVERAGE_KINDS, unused_overage

    member = Account.all_objects.values("granted", "held", "used", "overdraft_limit", "period_start").get(
        pk=hold.account_id)
    available = member["granted"] - member["used"] - member["held"]
    room = max(available + member["overdraft_limit"], 0)
    key = used_tokens  # what the key's cap still allows (it bounds the whole request)
    if hold.spend_id is not None:
        spend = KeySpend.all_objects.get(pk=hold.spend_id)
        if spend.token_cap is not None:
            key = max(spend.token_cap - spend.spent_in(member["period_start"]), 0)
    if hold.pool_hold_id is None:
        return [min(used_tokens, room, key)]
    overage = LedgerEntry.all_objects.filter(
        account_id=hold.account_id, period_start=member["period_start"], kind__in=OVERAGE_KINDS).aggregate(
        total=Sum("granted_delta"))["total"] or 0
    base_left = max(available, 0) - unused_overage(available=available, overage=overage)
    pool = Account.all_objects.values("granted", "held", "used").get(pk=hold.pool_account_id)
    base = min(used_tokens, base_left, room, key)
    from_pool = min(used_tokens - base, max(pool["granted"] - pool["used"] - pool["held"], 0), key - base)
    rest = min(used_tokens - base - from_pool, room - base, key - base - from_pool)
    return [base + rest, from_pool]


def release_statement(*, hold: Hold, reason: str = "") -> Statement:
    """The post that releases a hold (see `release`): of a pooled hold, both parts."""
    params = _params(
        account=_account_ref(hold), kind=Kind.RELEASE, tokens=hold.own_tokens, held_delta=-hold.own_tokens,
        idempotency_key=f"release:{hold.id}", closes_hold_id=hold.id, reason=reason, model=hold.model,
        api_key_id=hold.api_key_id, spend_id=hold.spend_id)
    if hold.pool_hold_id is None:
        return Statement(None, params)
    return _pool_close(params, _params(
        account=_pool_ref(hold), kind=Kind.RELEASE, tokens=hold.pool_tokens, held_delta=-hold.pool_tokens,
        idempotency_key=f"release:{hold.pool_hold_id}", closes_hold_id=hold.pool_hold_id, reason=reason,
        model=hold.model, api_key_id=hold.api_key_id, spend_id=hold.spend_id))


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
                "api_key__spend_id", "pool_hold_id", "pool_hold__account_id", "pool_hold__tokens", "base_tokens")


def _hold(row: dict) -> Hold:
    pool_tokens = row["pool_hold__tokens"] or 0
    return Hold(id=row["id"], account_id=row["account_id"], organization_id=row["organization_id"],
                tokens=row["tokens"] + pool_tokens, expires_at=row["expires_at"], model=row["model"],
                api_key_id=row["api_key_id"], spend_id=row["api_key__spend_id"], pool_hold_id=row["pool_hold_id"],
                pool_account_id=row["pool_hold__account_id"], pool_tokens=pool_tokens, base_tokens=row["base_tokens"])


# A hold is a member's: a team pool's part of one is closed only with it, never by its own id.
_MEMBER_HOLDS = Q(kind=Kind.HOLD, account__team__isnull=True)


def hold_get(*, account: Account | AccountRef, hold_id: int) -> Hold:
    return _hold(LedgerEntry.all_objects.filter(_MEMBER_HOLDS, account_id=account.pk).values(*_HOLD_FIELDS)
                 .get(pk=hold_id))


def hold_find(*, organization_id: int, hold_id: int) -> Hold | None:
    """A member's hold of the organization by id, or None (another organization's, or the pool's
    part of a hold, answers the same)."""
    row = LedgerEntry.all_objects.filter(_MEMBER_HOLDS, organization_id=organization_id, pk=hold_id).values(
        *_HOLD_FIELDS).first()
    return _hold(row) if row is not None else None


def hold_extension(*, hold: Hold, ttl: timedelta = HOLD_TTL) -> tuple[str, dict]:
    """The statement that keeps a hold of a request still running from the sweeper: its expiry moves
    to `ttl` from now. An entry's amounts never change; the expiry of an open hold is the one
    column that does (a long stream outlives any fixed time-to-live)."""
    return (f"UPDATE {_ENTRY} SET expires_at = %(until)s WHERE id = %(hold)s AND kind = 'hold' "
            "AND expires_at < %(until)s", {"hold": hold.id, "until": timezone.now() + ttl})


def release_expired_holds(*, now: datetime | None = None, limit: int = SWEEP_BATCH) -> int:
    """Release holds that outlived their time-to-live. Returns how many were released. A pool's
    part of a hold goes with the member's part (whose expiry the gateway moves on)."""
    now = now or timezone.now()
    expired = (LedgerEntry.all_objects.filter(_MEMBER_HOLDS, expires_at__lte=now, closed_by__isnull=True)
               .order_by("expires_at").values(*_HOLD_FIELDS)[:limit])
    released = 0
    for row in expired:
        result = release(hold=_hold(row), reason="time-to-live passed")
        if result is not None and result.created:
            released += 1
    return released


def verify(*, organization_id: int | None = None) -> list[dict]:
    """Recompute every account from its entries; return the accounts whose stored balance differs,
    and the holds and team pools that break the ledger's rules."""
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
    # A pooled hold's pool part: a hold on a team pool of the same organization, closed exactly
    # when the member's part is.
    bad_pool_holds = f"""
        SELECT h.account_id, h.id FROM {_ENTRY} h LEFT JOIN {_ENTRY} p ON p.id = h.pool_hold_id
        LEFT JOIN {_ACCOUNT} pa ON pa.id = p.account_id
        WHERE h.pool_hold_id IS NOT NULL {"AND h.organization_id = %s" if organization_id else ""}
          AND (p.id IS NULL OR p.kind <> 'hold' OR pa.team_id IS NULL OR p.organization_id <> h.organization_id
               OR EXISTS (SELECT 1 FROM {_ENTRY} c WHERE c.closes_hold_id = h.id)
                  <> EXISTS (SELECT 1 FROM {_ENTRY} c WHERE c.closes_hold_id = p.id))"""
    bad_tranches = f"""
        SELECT account_id, id, close_rolled_over FROM {_ENTRY}
        WHERE kind = '{Kind.CLOSE}' {"AND organization_id = %s" if organization_id else ""}
          AND close_rolled_over <> (SELECT COALESCE(SUM(t), 0) FROM unnest(close_rollover_tokens) t)"""
    # A pool's hold entry is only ever the part of a member's hold, and a pool never goes below zero.
    orphan_pool_holds = f"""
        SELECT p.account_id, p.id FROM {_ENTRY} p JOIN {_ACCOUNT} pa ON pa.id = p.account_id
        WHERE p.kind = 'hold' AND pa.team_id IS NOT NULL {"AND p.organization_id = %s" if organization_id else ""}
          AND NOT EXISTS (SELECT 1 FROM {_ENTRY} c WHERE c.closes_hold_id = p.id)
          AND NOT EXISTS (SELECT 1 FROM {_ENTRY} h WHERE h.pool_hold_id = p.id)"""
    pools_below_zero = f"""
        SELECT id, granted - used - held FROM {_ACCOUNT} WHERE team_id IS NOT NULL AND granted - used - held < 0
        {"AND organization_id = %s" if organization_id else ""} ORDER BY id"""
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
        cursor.execute(bad_pool_holds, params)
        for account_id, entry_id in cursor.fetchall():
            problems.append({"account_id": account_id, "entry_id": entry_id,
                             "problem": "the pool's part of this hold is missing, misplaced or closed apart from it"})
        cursor.execute(bad_tranches, params)
        for account_id, entry_id, rolled_over in cursor.fetchall():
            problems.append({"account_id": account_id, "entry_id": entry_id,
                             "problem": f"close entry rolls over {rolled_over} but its tranches sum to another amount"})
        cursor.execute(orphan_pool_holds, params)
        for account_id, entry_id in cursor.fetchall():
            problems.append({"account_id": account_id, "entry_id": entry_id,
                             "problem": "an open hold of the team pool that no member's hold is made of"})
        cursor.execute(pools_below_zero, params)
        for account_id, available in cursor.fetchall():
            problems.append({"account_id": account_id, "entry_id": None,
                             "problem": f"the team pool is below zero ({available:,} tokens available)"})
    return problems
