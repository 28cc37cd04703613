"""The cache the gateway reads on every request: API key identities and organizations' catalogs.

In Redis when `REDIS_URL` is set, so that every server process sees a revocation on its very next
request; in this process's memory otherwise (the embedded default serves from one process). The
gateway reads it on its event loop (`aget_many`: one MGET for a key's identity and its catalog,
no worker thread); the portal writes and drops entries from sync code. Only the portal writes
these entries, so they are pickled like Django's own cache values.

Django's cache API has no native async reads (its async methods run the sync ones in a thread),
so this is redis-py's own sync and asyncio clients rather than `django.core.cache`.

With Redis down, reads miss and writes are skipped (the gateway loads from the database, so it
keeps metering), but dropping an entry raises: a change that cannot reach the cache (a key
revoked) must fail rather than leave a stale identity behind.

Every drop also moves the entry's generation on. A loader takes the generation (`token`) before it
reads the database and writes only if it is unchanged (`set(..., token=...)`): a load that read a
row just before a revocation committed cannot cache what it read after the revocation dropped it.
"""

from __future__ import annotations

import asyncio
import logging
import pickle
import threading
import time
import weakref

import redis
import redis.asyncio
from django.conf import settings

PREFIX = "portal:shared:"
GENERATION_TTL = 86400  # seconds a generation is remembered: far longer than any load takes
# An event loop's connections to Redis. Requests beyond them wait for one (a read takes well under
# a millisecond) instead of failing with "Too many connections" and loading from the database,
# which under a burst of thousands of requests piles them onto the database and its few threads.
ASYNC_CONNECTIONS = 32
ASYNC_WAIT_SECONDS = 2  # for a free connection: then the read misses, as with Redis down
log = logging.getLogger(__name__)
# SET the entry only if its generation is still the one the loader took.
_SET_IF_UNCHANGED = """
if (redis.call('GET', KEYS[2]) or '0') == ARGV[2] then
    redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[3])
    return 1
end
return 0"""


class _Memory:
    def __init__(self):
        self._entries: dict[str, tuple[float, object]] = {}
        self._generations: dict[str, int] = {}
        self._lock = threading.Lock()

    def get_many(self, keys: list[str]) -> dict:
        now, found = time.monotonic(), {}
        with self._lock:
            for key in keys:
                entry = self._entries.get(key)
                if entry is not None and entry[0] > now:
                    found[key] = entry[1]
        return found

    async def aget_many(self, keys: list[str]) -> dict:
        return self.get_many(keys)

    def token(self, key: str) -> int:
        with self._lock:
            return self._generations.get(key, 0)

    def set(self, key: str, value, timeout: int, token: int | None) -> None:
        with self._lock:
            if token is None or self._generations.get(key, 0) == token:
                self._entries[key] = (time.monotonic() + timeout, value)

    def delete_many(self, keys: list[str]) -> None:
        with self._lock:
            for key in keys:
                self._entries.pop(key, None)
                self._generations[key] = self._generations.get(key, 0) + 1

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    async def aeval(self, script: str, keys: list[str], args: list) -> None:
        return None  # scripts need Redis (the breaker's rates): none without it

    def eval(self, script: str, keys: list[str], args: list) -> None:
        return None


class _Redis:
    def __init__(self, url: str):
        self.url = url
        self.client = redis.Redis.from_url(url)  # thread-safe, pooled
        # An asyncio connection belongs to the event loop that opened it: one client per loop.
        self._async: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._scripts: dict = {}

    def _async_client(self) -> redis.asyncio.Redis:
        loop = asyncio.get_running_loop()
        client = self._async.get(loop)
        if client is None:
            pool = redis.asyncio.BlockingConnectionPool.from_url(self.url, max_connections=ASYNC_CONNECTIONS,
                                                                 timeout=ASYNC_WAIT_SECONDS)
            client = self._async[loop] = redis.asyncio.Redis(connection_pool=pool)
        return client

    @staticmethod
    def _decoded(keys: list[str], values: list) -> dict:
        return {key: pickle.loads(value) for key, value in zip(keys, values) if value is not None}

    def get_many(self, keys: list[str]) -> dict:
        try:
            return self._decoded(keys, self.client.mget([PREFIX + key for key in keys]))
        except redis.RedisError as error:
            log.warning("shared cache unavailable, reading from the database: %s", error)
            return {}

    async def aget_many(self, keys: list[str]) -> dict:
        try:
            return self._decoded(keys, await self._async_client().mget([PREFIX + key for key in keys]))
        except redis.RedisError as error:
            log.warning("shared cache unavailable, reading from the database: %s", error)
            return {}

    async def aeval(self, script: str, keys: list[str], args: list) -> list | None:
        try:
            client = self._async_client()
            found = self._scripts.get(script)
            if found is None:  # EVALSHA, and EVAL when the server does not know the script yet
                found = self._scripts[script] = client.register_script(script)
            return await found(keys=[PREFIX + key for key in keys], args=args, client=client)
        except redis.RedisError as error:
            log.warning("shared cache unavailable, script not run: %s", error)
            return None

    def eval(self, script: str, keys: list[str], args: list) -> list | None:
        try:
            return self.client.eval(script, len(keys), *(PREFIX + key for key in keys), *args)
        except redis.RedisError as error:
            log.warning("shared cache unavailable, script not run: %s", error)
            return None

    def token(self, key: str) -> int | None:
        try:
            return int(self.client.get(_generation(key)) or 0)
        except redis.RedisError:
            return None  # nothing will be cached meanwhile anyway

    def set(self, key: str, value, timeout: int, token: int | None) -> None:
        payload = pickle.dumps(value, pickle.HIGHEST_PROTOCOL)
        try:
            if token is None:
                self.client.set(PREFIX + key, payload, ex=timeout)
            else:
                self.client.eval(_SET_IF_UNCHANGED, 2, PREFIX + key, _generation(key), payload, str(token), timeout)
        except redis.RedisError as error:
            log.warning("shared cache unavailable, not caching %s: %s", key, error)

    def delete_many(self, keys: list[str]) -> None:
        if not keys:
            return
        with self.client.pipeline() as pipe:
            pipe.delete(*(PREFIX + key for key in keys))
            for key in keys:
                pipe.incr(_generation(key))
                pipe.expire(_generation(key), GENERATION_TTL)
            pipe.execute()

    def clear(self) -> None:
        names = list(self.client.scan_iter(match=PREFIX + "*", count=1000))
        if names:
            self.client.delete(*names)


def _generation(key: str) -> str:
    return f"{PREFIX}generation:{key}"


_backends: dict[str, _Memory | _Redis] = {}


def _backend() -> _Memory | _Redis:
    # By the URL of the moment: tests point the portal at another Redis, or at none.
    url = settings.REDIS_URL
    found = _backends.get(url)
    if found is None:
        found = _backends[url] = _Redis(url) if url else _Memory()
    return found


def get(key: str):
    return _backend().get_many([key]).get(key)


def get_many(keys: list[str]) -> dict:
    return _backend().get_many(keys)


async def aget_many(keys: list[str]) -> dict:
    return await _backend().aget_many(keys)


def token(key: str) -> int | None:
    """The entry's generation, to pass to `set` after reading what it caches."""
    return _backend().token(key)


def set(key: str, value, *, timeout: int, token: int | None = None) -> None:  # noqa: A001  (the cache's own verb)
    """Cache `value`; with the `token` taken before it was read, only if nothing dropped it since."""
    _backend().set(key, value, timeout, token)


def delete_many(keys: list[str]) -> None:
    _backend().delete_many(keys)


async def aeval(script: str, keys: list[str], args: list) -> list | None:
    """Run a Lua script on Redis in one round trip (its keys get this cache's prefix); None when
    there is no Redis or it is unavailable."""
    return await _backend().aeval(script, keys, args)


def eval(script: str, keys: list[str], args: list) -> list | None:  # noqa: A001  (Redis's own verb)
    """`aeval` from sync code."""
    return _backend().eval(script, keys, args)


def clear() -> None:
    _backend().clear()
