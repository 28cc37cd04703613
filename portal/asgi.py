"""The ASGI application: the gateway under /v1/, and everything else through Django's WSGI handler.

- `/v1/` is the gateway (gateway.endpoints): async code on Starlette's request and response
  types, with its hot statements on the event loop (portal.async_db). It needs none of the page
  middleware (sessions, CSRF, messages, allauth): it authenticates API keys itself.
- Pages and the REST API are Django's WSGI handler run by a2wsgi in a pool of threads, as a WSGI
  server would: each thread keeps its database connection across requests, and Django's request
  signals run in the thread that serves the request (under Django's own ASGI handler every request
  got a thread, and so a database connection, of its own).

On shutdown the settlements still running are awaited and the gateway's pools closed.
"""

import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "portal.settings")
django_application = get_wsgi_application()

from a2wsgi import WSGIMiddleware  # noqa: E402
from django.conf import settings  # noqa: E402

from gateway import endpoints, upstream  # noqa: E402  (after Django is set up)
from portal import async_db, links  # noqa: E402

GATEWAY_PREFIX = "/v1/"
portal_application = WSGIMiddleware(django_application, workers=settings.WEB_THREADS)


async def _lifespan(receive, send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await endpoints.settle_pending()
            await upstream.close_session()
            await async_db.close()
            await send({"type": "lifespan.shutdown.complete"})
            return


async def application(scope, receive, send):
    if scope["type"] == "lifespan":
        return await _lifespan(receive, send)
    if scope["type"] == "http" and scope["path"].startswith(GATEWAY_PREFIX):
        with links.serving(scope):  # the 429's link to request more points where the request came in
            return await endpoints.application(scope, receive, send)
    if scope["type"] == "websocket":  # none are served (e.g. the Responses API's WebSocket mode)
        return await endpoints.refuse_websocket(scope, receive, send)
    return await portal_application(scope, receive, send)
