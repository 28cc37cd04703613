"""Group commit: the ledger statements that concurrent requests of one server process post at once
are written in one round trip and one transaction.

A request hands its statement (the ledger's own: `ledger.Statement`'s SQL) to its event loop's
batcher. With no batch in flight it goes at once, alone, as it would without batching (one
statement in autocommit; no timer waits). While a batch is in flight, arrivals queue and become the
next batch, so under load batches grow by themselves and a process commits once per round trip
instead of once per statement.

A batch of several runs on one connection in pipeline mode: BEGIN, its statements, COMMIT, one
sync. Its statements go in the ledger's lock order (account, then key spend counter: the order of
`ledger.lock`), so batches of two processes and the ledger's single and set posts wait for each
other instead of deadlocking. Each statement is the ledger's single post, run after the batch's
earlier ones in the same transaction: a hold's guard is evaluated on the newest row of its
account, holds earlier in the batch included. Each request gets its own row back.

- A statement that fails (a constraint, a value out of range) rolls the batch back; its
  statements then run again alone, so only the failing one's request fails.
- A connection that dies under a batch (the database restarted): the batch runs once more on
  another connection. What did commit before its answer was lost posts nothing the second time
  (idempotency keys), and each caller's slow path finds what was posted.
- A requester cancelled while its batch is in flight: the batch runs on (it is no requester's
  task), and what it posted for nobody is undone at once by the requester's `orphan` statement
  (a hold is released), not left to the sweeper.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import psycopg
from django.conf import settings
from psycopg import pq
from psycopg_pool import PoolTimeout

from portal import async_db

log = logging.getLogger(__name__)
BATCH_MAX = 64  # statements per batch: a batch's locks are held until its one commit
# Batches in flight per event loop: one, so that everything that arrives meanwhile is the next
# batch (the fewest commits, and the least CPU per request, which the gateway is short of first).
IN_FLIGHT = 1


@dataclass(frozen=True)
class Post:
    """A statement to run: its SQL and parameters, and its place in the lock order."""

    sql: str
    params: dict
    order: tuple


def post_of(statement, with_entry: str = "", params: dict | None = None) -> Post:
    """A ledger.Statement as a Post (with a caller's CTEs `with_entry` and their parameters)."""
    values = statement.params | params if params else statement.params
    return Post(statement.sql(with_entry), values, (values["account"], values["spend"] or 0))


@dataclass(eq=False)
class _Item:
    post: Post
    future: asyncio.Future
    orphan: Callable[[tuple], Post] | None  # what undoes a row posted for a requester gone


class Batcher:
    """One event loop's queue of statements, and the task that posts them batch after batch."""

    def __init__(self):
        self._queue: list[_Item] = []
        self._posting: set[asyncio.Task] = set()

    async def run(self, post: Post, *, orphan: Callable[[tuple], Post] | None = None) -> tuple | None:
        """The row the statement returned (None: no row), or its error."""
        item = self._submit(post, orphan)
        try:
            return await item.future  # cancelling the requester cancels this future, not the batch
        except asyncio.CancelledError:
            # Cancelled after its row came back but before it ran again: nobody has the row either.
            if item.future.done() and not item.future.cancelled() and item.future.exception() is None:
                self._orphaned(item, item.future.result())
            raise

    def _submit(self, post: Post, orphan: Callable[[tuple], Post] | None) -> _Item:
        loop = asyncio.get_running_loop()
        item = _Item(post, loop.create_future(), orphan)
        self._queue.append(item)
        if len(self._posting) < IN_FLIGHT:
            # In a context of its own: nothing of the request that happened to start it (an
            # organization's scope) applies to the others' statements.
            self._posting.add(loop.create_task(self._post_all(), context=contextvars.Context()))
        return item

    def _orphaned(self, item: _Item, row: tuple | None) -> None:
        if item.orphan is not None and row is not None:
            self._submit(item.orphan(row), None).future.add_done_callback(_undone)

    async def _post_all(self) -> None:
        try:
            while self._queue:
                batch = [item for item in self._queue[:BATCH_MAX] if not item.future.cancelled()]
                del self._queue[:BATCH_MAX]
                if batch:
                    await self._post(batch)
        finally:
            # Gone from the set as the queue is found empty (not a loop turn later): a statement
            # queued after this always finds fewer than IN_FLIGHT posting and starts one.
            self._posting.discard(asyncio.current_task())

    async def _post(self, batch: list[_Item]) -> None:
        try:
            outcomes = await _outcomes([item.post for item in batch])
        except Exception as error:  # whatever it is, every request of the batch hears it
            outcomes = [error] * len(batch)
        for item, outcome in zip(batch, outcomes):
            if not item.future.cancelled():
                if isinstance(outcome, BaseException):
                    item.future.set_exception(outcome)
                else:
                    item.future.set_result(outcome)
            elif not isinstance(outcome, BaseException):
                self._orphaned(item, outcome)


def _undone(future: asyncio.Future) -> None:
    if not future.cancelled() and future.exception() is not None:  # the sweeper undoes it later
        log.warning("could not undo a post of a cancelled request: %s", future.exception())


_batchers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # event loop -> its Batcher


async def run(post: Post, *, orphan: Callable[[tuple], Post] | None = None) -> tuple | None:
    """Run `post` on the running loop's pool, with other requests' statements when they come
    together (GATEWAY_GROUP_COMMIT): the row it returned, or None. `orphan(row)`: the statement
    that undoes what it posted, if the caller is cancelled before it gets the row."""
    if not settings.GATEWAY_GROUP_COMMIT:
        return await _attempts(_alone, post)
    loop = asyncio.get_running_loop()
    batcher = _batchers.get(loop)
    if batcher is None:
        batcher = _batchers[loop] = Batcher()
    return await batcher.run(post, orphan=orphan)


async def _outcomes(posts: list[Post]) -> list:
    """Each statement's row (or None) or error."""
    if len(posts) > 1:
        try:
            return await _attempts(_together, posts)
        except psycopg.OperationalError as error:  # the database is away: every request hears it
            return [error] * len(posts)
        except psycopg.Error:
            pass  # a statement failed: each runs alone, so that only its own request fails
    outcomes = []
    for post in posts:
        try:
            outcomes.append(await _attempts(_alone, post))
        except Exception as error:
            outcomes.append(error)
    return outcomes


async def _attempts(run_on_pool, what):
    """`run_on_pool(what)`, once more if the connection died under it: running a ledger statement
    again is safe, as a post that did commit posts nothing the second time (its idempotency key),
    and the caller's slow path finds it."""
    for attempt in (1, 2):
        try:
            return await run_on_pool(what)
        except PoolTimeout:
            raise  # no connection at all: the database is down, not one connection
        except psycopg.OperationalError:
            async_db.statement_failed()
            if attempt == 2:
                raise


async def _alone(post: Post) -> tuple | None:
    async with (await async_db.pool()).connection() as conn, conn.cursor() as cursor:
        await cursor.execute(post.sql, post.params, prepare=True)
        row = await cursor.fetchone()
        async_db.statement_succeeded(conn)
    return tuple(row) if row else None


async def _together(posts: list[Post]) -> list[tuple | None]:
    """The statements in one transaction and one round trip, in lock order; their rows in their own order."""
    ordered = sorted(range(len(posts)), key=lambda number: posts[number].order)
    async with (await async_db.pool()).connection() as conn:
        cursors = {}
        try:
            async with conn.pipeline(), conn.transaction():
                for number in ordered:
                    cursors[number] = cursor = conn.cursor()
                    await cursor.execute(posts[number].sql, posts[number].params, prepare=True)
            rows = [await cursors[number].fetchone() for number in range(len(posts))]
        except psycopg.Error:
            if conn.info.transaction_status in (pq.TransactionStatus.INTRANS, pq.TransactionStatus.INERROR):
                await conn.rollback()  # a statement failed after the COMMIT was queued
            raise
        async_db.statement_succeeded(conn)
    return [tuple(row) if row else None for row in rows]
