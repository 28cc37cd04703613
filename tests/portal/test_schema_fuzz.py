"""Schemathesis against the live `/api/schema/` of the portal served by uvicorn: every answer must be
one the schema declares, in the shape it declares; no request makes a server error; a request the
schema calls valid is accepted and one it calls invalid is refused.

It runs three times, as the three kinds of caller: an owner's API key (usage_read and usage_write),
an employee's key (usage_read) and an owner's session (cookie, and the CSRF token for writes).
The CLI runs in a subprocess against the server in this process (the test database is shared
through real transactions); its report is the assertion message.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from django.middleware.csrf import get_token
from django.test import Client, RequestFactory

from apikeys import services as api_key_services
from portal.tenancy import scope
from tests.gateway.conftest import close_server_connections
from tests.support.fake_upstream import ServerThread

pytestmark = pytest.mark.transactional

SCHEMATHESIS = Path(sys.executable).with_name("schemathesis")
# Bounded so that the three runs fit in a couple of minutes on the shared cores; deterministic so
# that a run is repeatable (the same cases, the same order).
MAX_EXAMPLES = 25

# All checks on (here, not with --checks on the command line, which would override the operation's
# own settings below). A schema-violating request may be refused with any 4xx, never a 5xx. A 400 to a request the schema allows passes positive_data_acceptance only if it
# names a business rule (tests/support/schemathesis_hooks.py fails one that names the shape).
# The usage ingest answers a batch with events the schema refuses with 200 and the refusals
# inside (each event on its own): its event check is held to the schema by test_ingest_schema.
CONFIG = """
[checks]
enabled = true
positive_data_acceptance.expected-statuses = ["2xx", "400", "401", "403", "404", "409", "429"]
negative_data_rejection.expected-statuses = ["400", "401", "403", "404", "405", "406", "409", "413", "415", "422",
                                             "428", "429"]

[parameters]
"path.org_slug" = "{slug}"

[[operations]]
include-path = "/api/v1/usage"
checks.negative_data_rejection.enabled = false
"""


@pytest.fixture
def portal_url():
    from portal.asgi import application

    with ServerThread(application) as thread:
        yield thread.url
    close_server_connections()


def owner_key(org):
    owner = org.members["owner"]
    with scope(org.organization):
        _key, secret = api_key_services.api_key_create(member=owner, actor=owner.user, name="fuzz",
                                                       endpoints=["usage_read", "usage_write"])
    return secret


def session_headers(member) -> list[str]:
    client = Client()
    client.force_login(member.user, backend="django.contrib.auth.backends.ModelBackend")
    request = RequestFactory().get("/")
    token = get_token(request)
    cookie = f"sessionid={client.cookies['sessionid'].value}; csrftoken={request.META['CSRF_COOKIE']}"
    return ["Cookie: " + cookie, "X-CSRFToken: " + token]


def run_schemathesis(url: str, headers: list[str], tmp_path: Path, slug: str) -> subprocess.CompletedProcess:
    config = tmp_path / "schemathesis.toml"
    config.write_text(CONFIG.format(slug=slug))
    command = [str(SCHEMATHESIS), "--config-file", str(config), "--no-color", "run", f"{url}/api/schema/?format=json",
               "--max-examples", str(MAX_EXAMPLES), "--seed", "1", "--generation-deterministic",
               # The callers' own credentials, not ones generated from the security schemes.
               "--generation-with-security-parameters", "false",
               "--workers", "1", "--request-timeout", "30"]
    for header in headers:
        command += ["-H", header]
    environment = os.environ | {"SCHEMATHESIS_HOOKS": "tests.support.schemathesis_hooks",
                                "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    return subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path, env=environment)


@pytest.mark.parametrize("caller", ["owner key", "employee key", "owner session"])
def test_the_api_does_what_its_schema_says(org_a, org_b, portal_url, tmp_path, caller):
    if caller == "owner key":
        headers = [f"Authorization: Bearer {owner_key(org_a)}"]
    elif caller == "employee key":
        headers = [f"Authorization: Bearer {org_a.api_key_secret}"]
    else:
        headers = session_headers(org_a.members["owner"])
    result = run_schemathesis(portal_url, headers, tmp_path, org_a.slug)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
