"""The ASGI application: the portal's pages and APIs, and the gateway under /v1/.

Gateway requests skip the page middleware (sessions, CSRF, messages, allauth: the gateway
authenticates API keys itself) and Django's per-request sync thread. Each of those middleware
hops through a thread, and Django starts a thread per request for them: measured, that was
5 ms of a 5.7 ms answer. They also skip the request_started and request_finished signals: their
receivers reset and close the database connections of the context serving the request, where a
gateway request opens none (its statements run on portal.async_db's connections; its rare slow
paths run in worker threads, whose connections those signals never reached anyway), and sending
them took two hops to Django's one sync thread per request (measured 0.6 ms at one connection,
and a queue for that one thread under load).

REST API requests (/api/) keep every middleware, but run their whole sync chain in one call to
a thread of a pool, as a WSGI server would: a thread started per request opens a new database
connection per request (a new PostgreSQL backend with cold caches), measured at a third of a
1,000-event usage batch's time.
"""

import asyncio
import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "portal.settings")
django_application = get_asgi_application()

from asgiref.sync import sync_to_async  # noqa: E402
from django.core.exceptions import RequestAborted  # noqa: E402
from django.core.handlers.asgi import ASGIHandler, get_script_prefix  # noqa: E402  (after Django is set up)
from django.core.handlers.exception import convert_exception_to_response  # noqa: E402
from django.db import close_old_connections  # noqa: E402
from django.urls import get_resolver, set_script_prefix  # noqa: E402

GATEWAY_PREFIX, API_PREFIX = "/v1/", "/api/"


class GatewayHandler(ASGIHandler):
    def load_middleware(self, is_async=False):
        self._view_middleware, self._template_response_middleware, self._exception_middleware = [], [], []
        self._middleware_chain = convert_exception_to_response(self._get_response_async)

    async def __call__(self, scope, receive, send):
        await self.handle(scope, receive, send)  # without a ThreadSensitiveContext: no thread per request

    def resolve_request(self, request):
        # Only gateway paths come here: match them against the gateway's patterns alone, not after
        # every portal pattern. The portal's URLs stay the ones reverse() uses.
        request.resolver_match = get_resolver("gateway.urls").resolve(request.path_info)
        return request.resolver_match

    async def handle(self, scope, receive, send):
        """Serve one request the way ASGIHandler.handle does, less the request signals and so less
        response.close(), which sends request_finished (gateway responses hold no files or other
        resources to close). A client that disconnects still cancels the view. Check it against
        ASGIHandler.handle when upgrading Django."""
        try:
            body_file = await self.read_body(receive)
        except RequestAborted:
            return
        set_script_prefix(get_script_prefix(scope))
        request, error_response = self.create_request(scope, body_file)
        if request is None:
            body_file.close()
            await self.send_response(error_response, send)
            return

        async def process_request():
            response = await self.run_get_response(request)
            try:
                await self.send_response(response, send)
            except asyncio.CancelledError:
                pass  # the client went away while the response was sent
            return response

        disconnect = asyncio.create_task(self.listen_for_disconnect(receive))
        processing = asyncio.create_task(process_request())
        try:
            await asyncio.wait([disconnect, processing], return_when=asyncio.FIRST_COMPLETED)
            for task in (disconnect, processing):
                if not task.done():
                    task.cancel()
                try:
                    await task
                except (asyncio.CancelledError, RequestAborted):
                    pass
        finally:
            body_file.close()


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
