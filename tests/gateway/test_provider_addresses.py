"""Provider connections cannot point at internal addresses (issue 11, item 4): the gateway would send
the organization's provider secret there and relay the answer to an employee. With the check on
(the production default) an internal address is refused when a connection is saved and again when
the gateway connects, unless the platform's operator allows its network; redirects are never
followed. DNS rebinding, which needs names resolved by the test: test_provider_dns.py."""

import pytest
from django.core.exceptions import ValidationError

from gateway import services as gateway_services
from gateway.models import ProviderConnection, UsageRecord
from portal.tenancy import scope, unscoped
from tests.allowances.helpers import balance
from tests.gateway.records import last_record_id
from tests.gateway.test_failures import APIS, assert_error_shape, assert_nothing_charged, assert_not_html, call
from tests.support.fake_upstream import ServerThread

# Each kind of internal address as a base URL, with a network that allows it.
INTERNAL = {
    "http://169.254.169.254/latest/meta-data": "169.254.0.0/16",  # cloud metadata
    "http://127.0.0.1:8000/v1": "127.0.0.0/8",
    "http://localhost:8000/v1": "127.0.0.0/8",  # resolved as the gateway resolves it
    "http://LOCALHOST:8000/v1": "127.0.0.0/8",
    "http://[::1]:8000/v1": "::1/128",
    "http://10.1.2.3/v1": "10.0.0.0/8",
    "http://192.168.1.10/v1": "192.168.0.0/16",
    "http://172.16.0.1/v1": "172.16.0.0/12",
    "http://100.64.0.1/v1": "100.64.0.0/10",  # shared address space
    "http://0.0.0.0:8000/v1": "0.0.0.0/32",
    "http://224.0.0.1/v1": "224.0.0.0/4",  # multicast
    "http://240.0.0.1/v1": "240.0.0.0/4",  # reserved
    "http://[::]:8000/v1": "::/128",
    "http://[fd00::1]/v1": "fd00::/8",  # unique local
    "http://[fe80::1]/v1": "fe80::/10",  # link-local
    "http://[fec0::1]/v1": "fec0::/10",  # site-local
    "http://[::ffff:127.0.0.1]:8000/v1": "127.0.0.0/8",  # IPv4-mapped
    "http://[::ffff:a9fe:a9fe]/v1": "169.254.0.0/16",  # IPv4-mapped, in hex
    "http://[64:ff9b::a9fe:a9fe]/v1": "169.254.0.0/16",  # NAT64 of 169.254.169.254
    "http://[2002:7f00:1::]/v1": "127.0.0.0/8",  # 6to4 of 127.0.0.1
}
# Legacy numeric forms of 127.0.0.1, which getaddrinfo would still map onto the loopback.
NUMERIC = ["http://2130706433/v1", "http://0x7f000001/v1", "http://0177.0.0.1/v1", "http://127.1/v1", "http://0/v1"]
PUBLIC = ["https://8.8.8.8/v1", "https://[2606:4700:4700::1111]/v1", "http://[::ffff:8.8.8.8]/v1",
          "http://[64:ff9b::808:808]/v1"]


def switch_on(settings, *allowed_networks):
    settings.GATEWAY_REFUSE_PRIVATE_PROVIDERS = True
    settings.GATEWAY_PROVIDER_ALLOWED_NETWORKS = list(allowed_networks)


@pytest.fixture
def refusing(settings):
    switch_on(settings)
    return settings


def create(org, base_url, *, name="Provider"):
    with scope(org.organization):
        return gateway_services.provider_connection_create(
            organization=org.organization, actor=org.members["admin"].user, name=name, kind="openai_compatible",
            base_url=base_url, secret="sk-the-organizations-secret", connect_timeout=5, read_timeout=60)


def assert_refused_on_save(org, base_url):
    with pytest.raises(ValidationError) as refused:
        create(org, base_url)
    assert set(refused.value.message_dict) == {"base_url"}
    with unscoped():
        assert not ProviderConnection.all_objects.filter(organization=org.organization, name="Provider").exists()
    return refused.value.message_dict["base_url"][0]


# -- when a connection is saved ------------------------------------------------------------------


@pytest.mark.parametrize("base_url", INTERNAL)
def test_internal_address_is_refused_when_saved(org_a, refusing, base_url):
    message = assert_refused_on_save(org_a, base_url)
    assert message.startswith("Provider addresses must be public: ")
    assert " address" in message and "operator" in message


@pytest.mark.parametrize(("base_url", "network"), INTERNAL.items())
def test_internal_address_in_an_allowed_network_is_saved(org_a, refusing, base_url, network):
    refusing.GATEWAY_PROVIDER_ALLOWED_NETWORKS = ["192.0.2.0/24", network]
    assert create(org_a, base_url).base_url == base_url


def test_allowing_one_network_does_not_allow_another(org_a, refusing):
    refusing.GATEWAY_PROVIDER_ALLOWED_NETWORKS = ["10.0.0.0/8", "fd00::/8"]
    create(org_a, "http://10.20.30.40:8000/v1", name="vLLM")
    assert "127.0.0.1 is a loopback address" in assert_refused_on_save(org_a, "http://127.0.0.1:8000/v1")
    assert "169.254.169.254 is a link-local" in assert_refused_on_save(org_a, "http://169.254.169.254/")


@pytest.mark.parametrize("base_url", NUMERIC)
def test_numeric_forms_of_an_address_are_refused_when_saved(org_a, refusing, base_url):
    assert assert_refused_on_save(org_a, base_url) == "Enter an http(s) address."  # Django's URL validator


@pytest.mark.parametrize("base_url", PUBLIC)
def test_public_address_is_saved(org_a, refusing, base_url):
    assert create(org_a, base_url).base_url == base_url


def test_name_is_refused_when_it_resolves_to_internal_addresses_only(org_a, refusing, fake_dns):
    fake_dns["models.corp.example"] = ["10.0.0.7", "fd00::7"]
    message = assert_refused_on_save(org_a, "https://models.corp.example/v1")
    assert "models.corp.example resolves only to internal addresses: 10.0.0.7 is a private address; fd00::7" in message
    refusing.GATEWAY_PROVIDER_ALLOWED_NETWORKS = ["10.0.0.0/8"]
    create(org_a, "https://models.corp.example/v1")


def test_name_that_resolves_to_a_public_address_or_not_at_all_is_saved(org_a, refusing, fake_dns):
    fake_dns["api.provider.example"] = ["93.184.216.34"]
    fake_dns["not-yet.provider.example"] = []  # checked again on every connection
    create(org_a, "https://api.provider.example/v1", name="Public")
    create(org_a, "https://not-yet.provider.example/v1", name="Not yet")


def test_updating_a_connection_checks_its_address(org_a, refusing):
    connection = create(org_a, "https://8.8.8.8/v1")
    with scope(org_a.organization), pytest.raises(ValidationError) as refused:
        gateway_services.provider_connection_update(connection=connection, actor=org_a.members["admin"].user,
                                                    base_url="http://169.254.169.254/latest")
    assert set(refused.value.message_dict) == {"base_url"}
    with unscoped():
        assert ProviderConnection.all_objects.get(pk=connection.pk).base_url == "https://8.8.8.8/v1"


def test_check_is_off_unless_switched_on(org_a, settings):
    """Outside production (the tests, the demo) loopback providers are allowed by default."""
    assert settings.GATEWAY_REFUSE_PRIVATE_PROVIDERS is False
    assert create(org_a, "http://127.0.0.1:8000/v1").base_url == "http://127.0.0.1:8000/v1"


def test_provider_form_shows_the_refusal_on_the_base_url_field(org_a, refusing, as_admin):
    response = as_admin.post(f"/o/{org_a.slug}/providers/", {
        "name": "Metadata", "kind": "openai", "base_url": "http://169.254.169.254/latest/meta-data",
        "secret": "sk-the-organizations-secret", "connect_timeout": 5, "read_timeout": 60, "is_active": "on"})
    assert response.status_code == 200
    errors = response.context["form"].errors
    assert list(errors) == ["base_url"]
    assert "169.254.169.254 is a link-local address" in errors["base_url"][0]
    with unscoped():
        assert not ProviderConnection.all_objects.filter(name="Metadata").exists()


# -- when the gateway connects ------------------------------------------------------------------


SENT_SECRET = {"chat": ("authorization", "Bearer sk-fake-openai-secret-1234"),  # the `metered` connections'
               "messages": ("x-api-key", "sk-ant-fake-secret-5678")}


def assert_secret_arrived(request, endpoint):
    header, value = SENT_SECRET[endpoint]
    assert request["headers"][header] == value


def connection_of(metered, endpoint):
    return metered.openai_connection if endpoint == "chat" else metered.anthropic_connection


def point(metered, endpoint, base_url):
    """Point the endpoint's connection elsewhere, past the save-time check (as saved before it was on)."""
    connection = connection_of(metered, endpoint)
    with scope(metered.org.organization):
        connection.base_url = base_url
        connection.save()  # the saved signal refreshes the gateway's routes


def assert_refused_when_connecting(metered, endpoint, stream=False):
    before, record_id = balance(metered.member), last_record_id()
    response = call(metered, endpoint, stream=stream)
    assert_not_html(response)
    error = assert_error_shape(response, endpoint, 502)
    assert metered.upstream.requests == []  # the secret never left
    record = assert_nothing_charged(metered, before, record_id, UsageRecord.Status.UPSTREAM_ERROR)
    return error["message"], record.detail


@pytest.mark.transactional
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize("endpoint", ["chat", "messages"])
def test_ip_address_of_a_saved_connection_is_refused_when_connecting(metered, settings, endpoint, stream):
    """The fixture's connections were saved with the check off: aiohttp does not resolve an IP
    address, so it is the socket the gateway opens that is refused."""
    switch_on(settings)
    message, detail = assert_refused_when_connecting(metered, endpoint, stream)
    assert "internal network address" in message and "nothing was charged" in message
    assert detail == "ProviderAddressRefused: 127.0.0.1 is a loopback address"


@pytest.mark.transactional
@pytest.mark.parametrize("endpoint", ["chat", "messages"])
def test_ipv4_mapped_loopback_is_refused_when_connecting_and_reaches_it_when_allowed(metered, settings, endpoint):
    switch_on(settings)
    point(metered, endpoint, f"http://[::ffff:127.0.0.1]:{metered.upstream.port}/v1")
    _message, detail = assert_refused_when_connecting(metered, endpoint)
    # The address as aiohttp's URL writes it.
    assert detail == "ProviderAddressRefused: ::ffff:7f00:1 is a loopback address (it reaches 127.0.0.1)"
    switch_on(settings, "127.0.0.0/8")
    assert call(metered, endpoint).status_code == 200  # the form does lead to the loopback
    assert len(metered.upstream.requests) == 1


@pytest.mark.transactional
@pytest.mark.parametrize("base_url", ["http://2130706433:{port}/v1", "http://127.1:{port}/v1"])
def test_numeric_address_stored_by_other_means_is_refused_when_connecting(metered, settings, base_url):
    switch_on(settings)
    point(metered, "chat", base_url.format(port=metered.upstream.port))
    assert_refused_when_connecting(metered, "chat")


@pytest.mark.transactional
@pytest.mark.parametrize("endpoint", ["chat", "messages"])
def test_allowed_network_reaches_a_self_hosted_provider(metered, settings, endpoint):
    switch_on(settings, "10.0.0.0/8", "127.0.0.0/8")
    response = call(metered, endpoint)
    assert response.status_code == 200, response.text
    [request] = metered.upstream.requests
    assert_secret_arrived(request, endpoint)


class Redirector:
    """A provider address that redirects every request to the same API path under `base_url`."""

    def __init__(self, status, base_url):
        self.status, self.base_url, self.requests = status, base_url, 0

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return
        while (await receive()).get("more_body"):
            pass
        self.requests += 1
        location = self.base_url + scope["path"].removeprefix("/v1")
        await send({"type": "http.response.start", "status": self.status,
                    "headers": [(b"location", location.encode()), (b"content-length", b"0")]})
        await send({"type": "http.response.body", "body": b""})


@pytest.mark.transactional
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize("status", [302, 307, 308])
@pytest.mark.parametrize("endpoint", ["chat", "messages"])
def test_redirect_is_not_followed(metered, endpoint, status, stream):
    """With the check off, so that only the redirect rule stands between the provider and the
    address it redirects to (here the fake provider, on loopback)."""
    redirector = Redirector(status, metered.upstream.base_url)
    with ServerThread(redirector) as server:
        point(metered, endpoint, server.url + "/v1")
        message, detail = assert_refused_when_connecting(metered, endpoint, stream)
    assert redirector.requests == 1
    assert "redirect" in message and "nothing was charged" in message
    path = APIS[endpoint][0]
    assert detail == (f"ProviderRedirected: the provider answered {status} (to '{metered.upstream.base_url}{path}'); "
                      "redirects are not followed")
