"""Absolute links (snippets, emails, the gateway's 429) point where the portal runs: the configured
address when set, else the request's own host and port, else HOST_PORT (no request: Celery).

The gateway's 429 under uvicorn on a free port is tests/gateway/test_overage_link.py; the key
snippets under a real server on a free port, tests/browser/test_key_minting.py."""

import pytest

from portal import links

pytestmark = pytest.mark.django_db


def keys_page(org):
    return f"/o/{org.slug}/keys/"


def test_without_a_configured_address_the_snippets_use_the_requests_host_and_port(login, org_a, settings):
    settings.PORTAL_BASE_URL = ""
    client = login(org_a.members["employee"])
    body = client.get(keys_page(org_a), HTTP_HOST="localhost:8123").content.decode()
    assert "http://localhost:8123/v1" in body and ":8000" not in body


def test_a_configured_address_wins_over_the_request(login, org_a, settings):
    settings.PORTAL_BASE_URL = "https://tokens.example.com"
    body = login(org_a.members["employee"]).get(keys_page(org_a), HTTP_HOST="localhost:8123").content.decode()
    assert "https://tokens.example.com/v1" in body and "localhost:8123" not in body


def test_an_email_sent_while_serving_a_page_links_to_that_page_s_host(login, org_a, settings, mailoutbox,
                                                                       django_capture_on_commit_callbacks):
    settings.PORTAL_BASE_URL = ""
    client = login(org_a.members["hr"])
    with django_capture_on_commit_callbacks(execute=True):
        response = client.post(f"/o/{org_a.slug}/invitations/", {"email": "new@a.example", "roles": ["employee"]},
                               HTTP_HOST="127.0.0.1:8765")
    assert response.status_code in (200, 302), response.content[:500]
    (mail,) = [m for m in mailoutbox if m.to == ["new@a.example"]]
    assert "http://127.0.0.1:8765/invitations/" in mail.body


def test_outside_any_request_the_address_make_run_serves_on(settings):
    settings.PORTAL_BASE_URL = ""
    settings.HOST_PORT = "0.0.0.0:9001"
    assert links.public_url("/o/acme/") == "http://0.0.0.0:9001/o/acme/"


def scope_with(host: bytes, scheme="http", **headers):
    return {"type": "http", "scheme": scheme,
            "headers": [(b"host", host)] + [(k.encode(), v.encode()) for k, v in headers.items()]}


def test_the_gateway_uses_its_requests_host_only_when_django_would_accept_it(settings):
    settings.PORTAL_BASE_URL = ""
    settings.HOST_PORT = "127.0.0.1:8000"
    settings.ALLOWED_HOSTS = ["portal.internal", "127.0.0.1"]
    with links.serving(scope_with(b"portal.internal:8443", scheme="https")):
        assert links.public_base() == "https://portal.internal:8443"
    with links.serving(scope_with(b"evil.example:80")):  # a forged Host header is not echoed back
        assert links.public_base() == "http://127.0.0.1:8000"
    settings.SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    with links.serving(scope_with(b"127.0.0.1:8080", **{"x-forwarded-proto": "https"})):
        assert links.public_base() == "https://127.0.0.1:8080"
    assert links.public_base() == "http://127.0.0.1:8000"  # the request's address ends with it
