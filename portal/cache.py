"""Django's Redis cache, with connection pools and clients shared by the whole process.

Django keeps one cache object per thread and per async context, so under ASGI every request
built its own connection pool: a new TCP connection and Redis handshake per request (measured:
most of the gateway's time under load). Django also builds a `redis.Redis` object for every
cache call (about 0.1 ms each). Pools and clients are thread-safe, so one per server is enough.
"""

import threading

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
