"""PostgreSQL connections for async code: the gateway's per-request statements without a thread.

Django's ORM is synchronous, so every query from an async view costs a hop to a worker thread
and back (and under load, a wait for a free thread). The gateway's hot statements (the hold,
the settlement with its usage record) run instead on psycopg AsyncConnections to Django's
default database, in autocommit: each of them is one statement, so one transaction. A
connection belongs to the event loop that opened it, so each loop keeps its own few.
"""

import asyncio
import functools
import weakref
from contextlib import asynccontextmanager

import psycopg
from django.db import connections
from psycopg.pq import TransactionStatus

MAX_CONNECTIONS = 16  # per event loop, i.e. per server process


class _Pool:
    def __init__(self):
        self.idle: list[psycopg.AsyncConnection] = []
        self.slots = asyncio.Semaphore(MAX_CONNECTIONS)


_pools: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # event loop -> _Pool


@functools.cache
def available() -> bool:
    # Once: connections["default"] builds a new connection object in every request's context.
    return connections["default"].vendor == "postgresql"


async def _connect() -> psycopg.AsyncConnection:
    params = connections["default"].get_connection_params()  # the same database, types and time zone
    params.pop("cursor_factory")  # Django's cursors bind client-side; the statements here are prepared
    return await psycopg.AsyncConnection.connect(**params, autocommit=True)


@asynccontextmanager
async def connection():
    """An idle connection of this event loop, or a new one. It goes back for reuse only when its
    statement ended normally: one that failed or was cancelled half way is closed."""
    loop = asyncio.get_running_loop()
    pool = _pools.get(loop)
    if pool is None:
        pool = _pools[loop] = _Pool()
    async with pool.slots:
        conn = pool.idle.pop() if pool.idle else await _connect()
        done = False
        try:
            yield conn
            done = True
        finally:
            if done and not conn.closed and conn.info.transaction_status == TransactionStatus.IDLE:
                pool.idle.append(conn)
            else:
                await conn.close()
