"""PostgreSQL connections for the gateway's event loop: its per-request statements without a thread.

Django's ORM is synchronous, so every query from async code costs a hop to a worker thread and
back (and under load, a wait for a free one). The gateway's hot statements (the hold, the
settlement with its usage record) run instead on psycopg's async connections to Django's default
database, pooled by psycopg_pool, in autocommit: a statement alone is its own transaction, and
statements of requests that come together are one (gateway.batching). A connection belongs to the
event loop that opened it, so each loop has its own pool.
"""

import asyncio
import time
import weakref

from asgiref.sync import sync_to_async
from django.db import close_old_connections, connections
from psycopg_pool import AsyncConnectionPool

MAX_CONNECTIONS = 16  # per event loop, i.e. per server process
FRESH_SECONDS = 1.0  # a connection that ran a statement this recently is handed out unchecked
MAX_LIFETIME = 30 * 60  # seconds: connections are renewed, so a server's memory per backend stays bounded
WAIT_SECONDS = 5  # for a free connection: with the database down a request fails in seconds, not minutes

_pools: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # event loop -> Task opening its pool
_last_ok: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # connection -> when a statement last succeeded


def _connection_kwargs() -> dict:
    params = connections["default"].get_connection_params()  # the same database, types and time zone
    params.pop("cursor_factory", None)  # Django's cursors bind client-side; the statements here are prepared
    return params | {"autocommit": True}


async def _open() -> AsyncConnectionPool:
    pool = AsyncConnectionPool(kwargs=_connection_kwargs(), min_size=2, max_size=MAX_CONNECTIONS,
                               max_lifetime=MAX_LIFETIME, timeout=WAIT_SECONDS, check=_check, open=False,
                               name="gateway")
    await pool.open()
    return pool


async def _check(conn) -> None:
    """A connection that sat idle is checked (one round trip) before it is handed out, so that one
    that died with a database restart is replaced instead of failing a request. One in constant use
    is not, which would cost a round trip per statement: a statement that meets a dead connection
    all the same is run once more (gateway.batching) after every connection is marked for a check
    (statement_failed), and the broken one is dropped."""
    if time.monotonic() - _last_ok.get(conn, float("-inf")) > FRESH_SECONDS:
        await AsyncConnectionPool.check_connection(conn)


def statement_succeeded(conn) -> None:
    """Note that `conn` just ran a statement to its end (it is fresh: see _check)."""
    _last_ok[conn] = time.monotonic()


def statement_failed() -> None:
    """A connection died under a statement: the others likely did too (the database restarted), so
    every connection is checked before its next use."""
    _last_ok.clear()


async def pool() -> AsyncConnectionPool:
    """The running event loop's pool, opened on first use."""
    loop = asyncio.get_running_loop()
    opening = _pools.get(loop)
    if opening is None or (opening.done() and (opening.cancelled() or opening.exception() is not None)):
        opening = _pools[loop] = asyncio.ensure_future(_open())
    return await asyncio.shield(opening)


async def close() -> None:
    """Close the running loop's pool (a server shutting down)."""
    opening = _pools.pop(asyncio.get_running_loop(), None)
    if opening is not None:
        await (await opening).close()


def in_thread(function):
    """`function` (sync code using Django's ORM) made awaitable in a worker thread.

    Not thread-sensitive: requests run their rare database work side by side in a pool of threads,
    each with its own persistent connection, instead of queueing for one thread. Each call first
    drops a connection that broke or expired (the database restarted), as Django does per request.
    """
    def call(*args, **kwargs):
        close_old_connections()
        return function(*args, **kwargs)

    return sync_to_async(call, thread_sensitive=False)
