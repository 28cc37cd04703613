"""Platform staff reach the Django admin only through allauth's login: its two-factor step and its
rate limits apply there too, and no other route of the portal logs anyone in with a password alone."""

import base64

import pytest
from allauth.mfa.totp.internal.auth import TOTP, generate_totp_secret
from django.contrib.auth import SESSION_KEY

from tests.factories import PASSWORD, UserFactory
from tests.support.mfa import current_totp_code
from tests.urlwalk import walk

pytestmark = pytest.mark.django_db

ADMIN_LOGIN = "/accounts/login/?next=%2Fadmin%2F"  # where the admin sends a visitor who is not logged in


def logged_in_user_id(client):
    return client.session.get(SESSION_KEY)


def admin_login_page(client) -> str:
    """The login page the admin sends a visitor to, found by following its redirects."""
    response = client.get("/admin/", follow=True)
    assert response.status_code == 200
    return f"{response.request['PATH_INFO']}?{response.request['QUERY_STRING']}"


def log_in(client, page: str, email: str, password: str):
    """Post the login form of `page`, whichever its field for the email is called."""
    return client.post(page, {"login": email, "username": email, "password": password})


@pytest.fixture
def staff():
    return UserFactory(email="staff@platform.example", is_staff=True, is_superuser=True)


@pytest.fixture
def staff_with_totp(staff):
    secret = generate_totp_secret()
    TOTP.activate(staff, secret)
    return staff, secret


def test_the_admin_sends_visitors_to_the_allauth_login_and_its_own_form_checks_no_password(client, staff):
    response = client.get("/admin/")
    assert (response.status_code, response["Location"]) == (302, "/admin/login/?next=/admin/")
    response = client.get("/admin/login/?next=/admin/")
    assert (response.status_code, response["Location"]) == (302, ADMIN_LOGIN)

    # The admin's own form, posted the right password, logs nobody in: it only redirects.
    response = client.post("/admin/login/?next=/admin/", {"username": staff.email, "password": PASSWORD})
    assert (response.status_code, response["Location"]) == (302, ADMIN_LOGIN)
    assert logged_in_user_id(client) is None


def test_staff_with_totp_need_the_code_to_reach_the_admin(client, staff_with_totp):
    staff, secret = staff_with_totp
    response = log_in(client, admin_login_page(client), staff.email, PASSWORD)
    assert logged_in_user_id(client) is None
    assert (response.status_code, response["Location"]) == (302, "/accounts/2fa/authenticate/")
    assert client.get("/admin/")["Location"] == "/admin/login/?next=/admin/"

    response = client.post("/accounts/2fa/authenticate/", {"code": current_totp_code(secret)})
    assert (response.status_code, response["Location"]) == (302, "/admin/")
    assert logged_in_user_id(client) == str(staff.pk)
    response = client.get("/admin/")
    assert response.status_code == 200
    assert "Site administration" in response.content.decode()


def test_wrong_passwords_on_the_admin_login_lock_it_like_the_member_login(client, settings, staff):
    """The issue's 30 wrong passwords: after five for the account even the right one is refused,
    and the address is stopped outright after the login limit."""
    assert settings.ACCOUNT_RATE_LIMITS["login_failed"] == "10/m/ip,5/5m/key"
    assert settings.ACCOUNT_RATE_LIMITS["login"] == "30/m/ip"
    page = admin_login_page(client)
    for _ in range(5):
        response = log_in(client, page, staff.email, "not-the-password")
        assert response.status_code == 200
        assert "not correct" in response.content.decode()

    response = log_in(client, page, staff.email, PASSWORD)
    assert "Too many failed login attempts" in response.content.decode()
    assert logged_in_user_id(client) is None
    assert client.get("/admin/").status_code == 302

    statuses = [log_in(client, page, staff.email, "not-the-password").status_code for _ in range(30 - 6)]
    assert 429 not in statuses  # 30 attempts a minute from one address are admitted (and refused) ...
    response = log_in(client, page, staff.email, PASSWORD)
    assert response.status_code == 429  # ... the 31st is not even looked at
    assert logged_in_user_id(client) is None


def test_a_logged_in_user_who_is_not_staff_is_refused_by_the_admin(client, org_a):
    employee = org_a.members["employee"].user
    response = log_in(client, admin_login_page(client), employee.email, PASSWORD)
    assert (response.status_code, response["Location"]) == (302, "/admin/")
    assert logged_in_user_id(client) == str(employee.pk)

    assert client.get("/admin/")["Location"] == "/admin/login/?next=/admin/"
    assert client.get("/admin/login/?next=/admin/").status_code == 403
    assert client.get("/admin/portal/user/").status_code == 302


def _paths():
    """A concrete path for every route of the project (kwargs filled with values of their type)."""
    values = {"org_slug": "org-a", "token": "x" * 20}
    for route in walk():
        path = route.build(**{name: values.get(name, 1) for name in route.kwarg_names})
        if path is not None:
            yield path


def test_no_route_logs_in_with_a_password_alone(client, org_a, staff_with_totp):
    """Every route, posted the staff member's right password in every field name a login form uses
    and as HTTP Basic credentials: none ends with a logged-in session (their TOTP code is never sent)."""
    staff, _secret = staff_with_totp
    client.raise_request_exception = False  # this test is about logins; a crash counts as no login
    credentials = {"username": staff.email, "login": staff.email, "email": staff.email, "password": PASSWORD,
                   "password1": PASSWORD}
    basic = "Basic " + base64.b64encode(f"{staff.email}:{PASSWORD}".encode()).decode()
    paths = sorted(set(_paths()))
    assert "/admin/login/" in paths and "/accounts/login/" in paths
    for path in paths:
        client.post(path, credentials)
        client.get(path, HTTP_AUTHORIZATION=basic)
        client.post(path, credentials, HTTP_AUTHORIZATION=basic)
        assert logged_in_user_id(client) is None, f"{path} logged the user in with a password alone"
