"""Django's Redis cache, with connection pools and clients shared by the whole process.

Django keeps one cache object per thread and per async context, so under ASGI every request
built its own connection pool: a new TCP connection and Redis handshake per request (measured:
most of the gateway's time under load). Django also builds a `redis.Redis` object for every
cache call (about 0.1 ms each). Pools and clients are thread-safe, so one per server is enough.

Django's async cache methods run the sync ones in a thread; `aget_many` here is a real asyncio
MGET (the gateway reads a key's identity and its catalog on every request), with the same keys
and serialization as every other cache call.
"""

import asyncio
import threading
import weakref

import redis.asyncio
from django.core.cache.backends.redis import RedisCache as DjangoRedisCache
from django.core.cache.backends.redis import RedisCacheClient

_clients: dict = {}
_lock = threading.Lock()


class _SharedClient(RedisCacheClient):
    def get_client(self, key=None, *, write=False):
        index = self._get_connection_pool_index(write)
        shared = (self._servers[index], tuple(sorted(self._pool_options.items(), key=lambda item: item[0])))
        client = _clients.get(shared)
        if client is None:
            with _lock:
                client = _clients.get(shared)
                if client is None:
                    client = _clients[shared] = self._client(connection_pool=self._get_connection_pool(write))
        return client


class RedisCache(DjangoRedisCache):
    def __init__(self, server, params):
        super().__init__(server, params)
        self._class = _SharedClient

    async def aget_many(self, keys, version=None):
        names = {self.make_and_validate_key(key, version=version): key for key in keys}
        values = await _async_client(self._cache).mget(list(names))
        return {names[name]: self._cache._serializer.loads(value)
                for name, value in zip(names, values) if value is not None}


_async_clients: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # event loop -> {server: client}


def _async_client(client: RedisCacheClient) -> redis.asyncio.Redis:
    # An asyncio connection belongs to the event loop that opened it: one client per loop.
    server = client._servers[client._get_connection_pool_index(False)]
    clients = _async_clients.setdefault(asyncio.get_running_loop(), {})
    if server not in clients:
        options = {name: value for name, value in client._pool_options.items() if name != "parser_class"}  # sync
        clients[server] = redis.asyncio.Redis.from_url(server, **options)
    return clients[server]
