from types import SimpleNamespace

import pytest
from django.core.cache import cache
from django.db import connection

from portal.audit import log_action
from portal.tenancy import ROLES, unscoped
from tests.factories import PASSWORD, InvitationFactory, MemberFactory, OrganizationFactory, TeamFactory, UserFactory

SERVICE_MARKERS = {"postgres", "services"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if SERVICE_MARKERS & {mark.name for mark in item.iter_markers()}:
            # Real-service tests share rows across threads and processes: they need real transactions.
            item.add_marker(pytest.mark.django_db(transaction=True))


@pytest.fixture(autouse=True)
def _service_tests_need_services(request):
    """A real-service test run without the services fails loudly; it is never silently skipped."""
    if SERVICE_MARKERS & {mark.name for mark in request.node.iter_markers()} and connection.vendor != "postgresql":
        pytest.fail(f"{request.node.nodeid} needs PostgreSQL and Redis: run it with `make test`")


@pytest.fixture(autouse=True)
def _fast_and_clean(settings):
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
    yield
    cache.clear()


def make_org(label: str):
    """One organization with a member per role, a team, an open invitation and an audit entry."""
    organization = OrganizationFactory(name=f"Org {label}", slug=f"org-{label}")
    team = TeamFactory(organization=organization, name=f"Team {label}")
    members = {}
    for role in ROLES:
        flags = {f"is_{r}": r == role for r in ROLES}
        members[role] = MemberFactory(organization=organization, team=team,
                                      user=UserFactory(email=f"{role}@{label}.example"), **flags)
    invitation = InvitationFactory(organization=organization, team=team, token=f"token-of-{label}",
                                   email=f"newcomer@{label}.example")
    with unscoped():
        log_action(actor=members["owner"].user, organization=organization, action="test.seeded", obj=team)
    return SimpleNamespace(organization=organization, slug=organization.slug, team=team, members=members,
                           invitation=invitation, invitation_token=f"token-of-{label}", password=PASSWORD)


@pytest.fixture
def org_a(db):
    return make_org("a")


@pytest.fixture
def org_b(db):
    return make_org("b")


@pytest.fixture
def login(client):
    """Log the test client in as a member or user: login(member)."""

    def _login(who):
        user = getattr(who, "user", who)
        client.force_login(user, backend="django.contrib.auth.backends.ModelBackend")
        return client

    return _login
