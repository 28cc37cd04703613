"""DNS rebinding: a provider name that resolved to a public address when its connection was saved
and resolves to an internal one when the gateway connects is refused then, and the fake provider
behind the internal address never sees the organization's secret."""

import socket

import pytest

from gateway import services as gateway_services
from portal.tenancy import scope
from tests.gateway.conftest import close_server_connections
from tests.gateway.test_failures import call
from tests.gateway.test_provider_addresses import (
    assert_refused_when_connecting,
    assert_secret_arrived,
    connection_of,
    switch_on,
)
from tests.support.fake_upstream import ServerThread

pytestmark = pytest.mark.transactional

NAME = "models.provider.example"


@pytest.fixture
def gateway_url():
    """The portal under uvicorn on the standard library's event loop, which resolves names through
    socket.getaddrinfo where `fake_dns` maps them (uvloop, the default, resolves inside libuv)."""
    from portal.asgi import application

    with ServerThread(application, loop="asyncio") as thread:
        yield thread.url + "/v1"
    close_server_connections()


def save_with_name(metered, endpoint):
    """Point the endpoint's connection at NAME through the service, with its save-time check."""
    with scope(metered.org.organization):
        gateway_services.provider_connection_update(
            connection=connection_of(metered, endpoint), actor=metered.org.members["admin"].user,
            base_url=f"http://{NAME}:{metered.upstream.port}/v1")


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize("endpoint", ["chat", "messages"])
def test_name_rebound_to_the_loopback_is_refused_when_connecting(metered, settings, fake_dns, endpoint, stream):
    switch_on(settings)
    fake_dns[NAME] = ["93.184.216.34"]  # public when saved
    save_with_name(metered, endpoint)
    fake_dns[NAME] = ["10.0.0.9", "127.0.0.1"]  # the second is the fake provider's, when the gateway connects
    message, detail = assert_refused_when_connecting(metered, endpoint, stream)
    assert "internal network address" in message
    assert detail == (f"ProviderAddressRefused: {NAME} resolves only to internal addresses: 10.0.0.9 is a private "
                      "address; 127.0.0.1 is a loopback address")

    switch_on(settings, "127.0.0.0/8")  # the operator allows the network: the same request goes through
    response = call(metered, endpoint, stream=stream)
    assert response.status_code == 200, response.text
    [request] = metered.upstream.requests
    assert_secret_arrived(request, endpoint)


def test_internal_addresses_of_a_name_are_dropped_and_a_permitted_one_used(metered, settings, fake_dns):
    """The name's first address is internal and not allowed: a listening socket there is never
    connected to, and the request goes to the allowed address that follows it."""
    with socket.socket() as trap:
        trap.bind(("127.0.0.2", metered.upstream.port))
        trap.listen()
        trap.setblocking(False)
        switch_on(settings, "127.0.0.1/32")
        fake_dns[NAME] = ["127.0.0.1"]
        save_with_name(metered, "chat")
        fake_dns[NAME] = ["127.0.0.2", "127.0.0.1"]
        response = call(metered, "chat")
        assert response.status_code == 200, response.text
        assert len(metered.upstream.requests) == 1
        with pytest.raises(BlockingIOError):
            trap.accept()  # nothing ever knocked
