"""Gateway tests run the real thing: the portal's ASGI app under uvicorn and a fake provider, both
on loopback in this process, against the PostgreSQL and Redis that `make test` starts."""

import socket
from types import SimpleNamespace

import pytest
from django.db import connection

from allowances import services as allowance_services
from gateway import services as gateway_services
from portal.tenancy import scope
from tests.support.fake_upstream import FakeUpstream, ServerThread


@pytest.fixture
def fake_upstream():
    fake = FakeUpstream()
    with ServerThread(fake) as thread:
        fake.port = thread.port
        yield fake


@pytest.fixture
def gateway_url():
    """The portal served by uvicorn (ASGI, as in production); the SDKs' base URL."""
    from portal.asgi import application

    with ServerThread(application) as thread:
        yield thread.url + "/v1"
    close_server_connections()


def close_server_connections():
    """The server's worker threads are gone but their database sessions linger until collected:
    end them, or the test database cannot be flushed or dropped."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                       "WHERE datname = current_database() AND pid <> pg_backend_pid()")


@pytest.fixture
def metered(org_a, fake_upstream, gateway_url):
    """Org A with models served by the fake provider: `fake-gpt` (OpenAI API; counts input x1, output
    x2, cached x0.5) and `fake-claude` (Anthropic API; x1, x3, x0.1). The fixture employee's key may
    call every endpoint; their account has 5,000 tokens granted and a 1,000 token hold open."""
    organization, admin = org_a.organization, org_a.members["admin"].user
    with scope(organization):
        openai_connection = gateway_services.provider_connection_create(
            organization=organization, actor=admin, name="Fake OpenAI", kind="openai", base_url=fake_upstream.base_url,
            secret="sk-fake-openai-secret-1234", connect_timeout=2, read_timeout=2)
        anthropic_connection = gateway_services.provider_connection_create(
            organization=organization, actor=admin, name="Fake Anthropic", kind="anthropic",
            base_url=fake_upstream.base_url, secret="sk-ant-fake-secret-5678", connect_timeout=2, read_timeout=2)
        gpt = allowance_services.catalog_model_create(
            organization=organization, actor=admin, model_id="fake-gpt", display_name="Fake GPT",
            connection=openai_connection, upstream_model="upstream-gpt", input_multiplier="1", output_multiplier="2",
            cached_multiplier="0.5", input_price_per_million="1", output_price_per_million="2",
            cached_price_per_million="0.5", max_output_tokens=100)
        claude = allowance_services.catalog_model_create(
            organization=organization, actor=admin, model_id="fake-claude", display_name="Fake Claude",
            connection=anthropic_connection, input_multiplier="1", output_multiplier="3", cached_multiplier="0.1",
            max_output_tokens=100)
    return SimpleNamespace(org=org_a, upstream=fake_upstream, url=gateway_url, key=org_a.api_key_secret,
                           member=org_a.members["employee"], gpt=gpt, claude=claude,
                           openai_connection=openai_connection, anthropic_connection=anthropic_connection)


@pytest.fixture
def fake_dns(monkeypatch):
    """Names the test maps to addresses, for socket.getaddrinfo (through which the save-time check
    and the standard library's event loop resolve); a name mapped to [] does not resolve, and every
    other name resolves as usual."""
    names: dict[str, list[str]] = {}
    real = socket.getaddrinfo

    def getaddrinfo(host, port, family=0, type=0, proto=0, flags=0):
        name = host.decode() if isinstance(host, bytes) else host
        if name not in names:
            return real(host, port, family, type, proto, flags)
        if not names[name]:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        port = int(port or 0)
        return [(socket.AF_INET6, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (address, port, 0, 0)) if ":" in address
                else (socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (address, port))
                for address in names[name]]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return names


@pytest.fixture
def chat_only(metered):
    """`fake-chat` (x1 in, x2 out, x0.5 cached) on an OpenAI-compatible server that has chat
    completions but no /responses (it answers 404 there)."""
    fake = FakeUpstream()
    fake.behaviour.chat_only = True
    with ServerThread(fake) as thread:
        fake.port = thread.port
        organization, admin = metered.org.organization, metered.org.members["admin"].user
        with scope(organization):
            connection = gateway_services.provider_connection_create(
                organization=organization, actor=admin, name="Fake compatible", kind="openai_compatible",
                base_url=fake.base_url, secret="sk-compatible-secret-9999", connect_timeout=2, read_timeout=2)
            allowance_services.catalog_model_create(
                organization=organization, actor=admin, model_id="fake-chat", display_name="Fake chat",
                connection=connection, upstream_model="upstream-chat", input_multiplier="1", output_multiplier="2",
                cached_multiplier="0.5", max_output_tokens=100)
        yield fake
