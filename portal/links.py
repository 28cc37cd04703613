"""Absolute links to the portal (key snippets, emails, the gateway's 429), built in one place.

The public address is `PORTAL_BASE_URL` when it is configured; otherwise the address the request
being served came in on (its scheme, host and port, as Django validates them against
`ALLOWED_HOSTS`); otherwise, with no request at all (a Celery task), the address `make run`
serves on, `HOST_PORT`. So a portal run on another port or host links to where it runs.
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar

from django.conf import settings
from django.http.request import split_domain_port, validate_host

# The request being served in this context: a Django HttpRequest, or an ASGI scope (the gateway).
_serving: ContextVar = ContextVar("portal_links_serving", default=None)


def public_base() -> str:
    """The portal's public address without a trailing slash, e.g. `http://127.0.0.1:8123`."""
    if settings.PORTAL_BASE_URL:
        return settings.PORTAL_BASE_URL
    serving = _serving.get()
    if isinstance(serving, dict):
        base = _base_of_scope(serving)
        if base:
            return base
    elif serving is not None:
        return serving.build_absolute_uri("/").rstrip("/")
    return f"http://{settings.HOST_PORT}"


def public_url(path: str) -> str:
    """`path` (from `reverse`, starting with /) as an absolute link."""
    return public_base() + path


@contextmanager
def serving(request):
    """Links built inside point at the host and port `request` came in on."""
    token = _serving.set(request)
    try:
        yield
    finally:
        _serving.reset(token)


class PublicBaseMiddleware:
    """Remembers the page's request for the links built while it is served (services send emails
    from inside a request, without it as an argument)."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        with serving(request):
            return self.get_response(request)


def _allowed_hosts() -> list[str]:
    # What Django's HttpRequest.get_host allows: with DEBUG and no ALLOWED_HOSTS, local names.
    if settings.DEBUG and not settings.ALLOWED_HOSTS:
        return [".localhost", "127.0.0.1", "[::1]"]
    return settings.ALLOWED_HOSTS


def _base_of_scope(scope: dict) -> str:
    """An ASGI request's own address, if its Host header is one Django would accept."""
    headers = {name.decode("latin-1").lower(): value.decode("latin-1") for name, value in scope.get("headers", ())}
    host = headers.get("host", "")
    domain, _port = split_domain_port(host)
    if not domain or not validate_host(domain, _allowed_hosts()):
        return ""
    scheme = scope.get("scheme", "http")
    proxy_header = settings.SECURE_PROXY_SSL_HEADER
    if proxy_header:
        name, secure_value = proxy_header
        forwarded = headers.get(name.removeprefix("HTTP_").replace("_", "-").lower(), "")
        if forwarded.split(",")[0].strip() == secure_value:
            scheme = "https"
    return f"{'https' if scheme in ('https', 'wss') else 'http'}://{host}"
