"""The ASGI application: the portal's pages and APIs, and the gateway under /v1/.

Gateway requests skip the page middleware (sessions, CSRF, messages, allauth: the gateway
authenticates API keys itself) and Django's per-request sync thread. Each of those middleware
hops through a thread, and Django starts a thread per request for them: measured, that was
5 ms of a 5.7 ms answer. The gateway's own database work already runs in a thread pool.

REST API requests (/api/) keep every middleware, but run their whole sync chain in one call to
a thread of a pool, as a WSGI server would: a thread started per request opens a new database
connection per request (a new PostgreSQL backend with cold caches), measured at a third of a
1,000-event usage batch's time.
"""

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "portal.settings")
django_application = get_asgi_application()

from asgiref.sync import sync_to_async  # noqa: E402
from django.core.handlers.asgi import ASGIHandler  # noqa: E402  (after Django is set up)
from django.core.handlers.exception import convert_exception_to_response  # noqa: E402
from django.db import close_old_connections  # noqa: E402

GATEWAY_PREFIX, API_PREFIX = "/v1/", "/api/"


class GatewayHandler(ASGIHandler):
    def load_middleware(self, is_async=False):
        self._view_middleware, self._template_response_middleware, self._exception_middleware = [], [], []
        self._middleware_chain = convert_exception_to_response(self._get_response_async)

    async def __call__(self, scope, receive, send):
        await self.handle(scope, receive, send)  # without a ThreadSensitiveContext: no thread per request


gateway_application = GatewayHandler()


class PooledThreadHandler(ASGIHandler):
    """The sync middleware chain and view in one pooled thread, whose connection persists."""

    def load_middleware(self, is_async=False):
        super().load_middleware(is_async=False)

    async def get_response_async(self, request):
        return await sync_to_async(self._get_response_in_thread, thread_sensitive=False)(request)

    def _get_response_in_thread(self, request):
        # Django's request_started signal drops a broken or expired connection in the thread it
        # runs in, not in this one: do it here, as it does under WSGI.
        close_old_connections()
        return self.get_response(request)

    async def __call__(self, scope, receive, send):
        await self.handle(scope, receive, send)  # without a ThreadSensitiveContext: no thread per request


api_application = PooledThreadHandler()


async def application(scope, receive, send):
    if scope["type"] == "http" and scope["path"].startswith(GATEWAY_PREFIX):
        return await gateway_application(scope, receive, send)
    if scope["type"] == "http" and scope["path"].startswith(API_PREFIX):
        return await api_application(scope, receive, send)
    return await django_application(scope, receive, send)
