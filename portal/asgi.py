"""The ASGI application: the portal's pages and APIs, and the gateway under /v1/.

Gateway requests skip the page middleware (sessions, CSRF, messages, allauth: the gateway
authenticates API keys itself) and Django's per-request sync thread. Each of those middleware
hops through a thread, and Django starts a thread per request for them: measured, that was
5 ms of a 5.7 ms answer. The gateway's own database work already runs in a thread pool.
"""

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "portal.settings")
django_application = get_asgi_application()

from django.core.handlers.asgi import ASGIHandler  # noqa: E402  (after Django is set up)
from django.core.handlers.exception import convert_exception_to_response  # noqa: E402

GATEWAY_PREFIX = "/v1/"


class GatewayHandler(ASGIHandler):
    def load_middleware(self, is_async=False):
        self._view_middleware, self._template_response_middleware, self._exception_middleware = [], [], []
        self._middleware_chain = convert_exception_to_response(self._get_response_async)

    async def __call__(self, scope, receive, send):
        await self.handle(scope, receive, send)  # without a ThreadSensitiveContext: no thread per request


gateway_application = GatewayHandler()


async def application(scope, receive, send):
    if scope["type"] == "http" and scope["path"].startswith(GATEWAY_PREFIX):
        return await gateway_application(scope, receive, send)
    return await django_application(scope, receive, send)
