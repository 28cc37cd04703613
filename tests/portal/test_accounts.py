"""Account journeys through django-allauth and the portal's own invitation pages.

Every test drives the real URLs with Django's test client, the way a browser would: sign-up with
mandatory email verification, invitation acceptance, login with TOTP and recovery codes, password
reset, the organization switcher and the failed-login rate limit.
"""

import re
from datetime import timedelta
from html.parser import HTMLParser
from urllib.parse import urlsplit

import pytest
from allauth.mfa.recovery_codes.internal.auth import RecoveryCodes
from allauth.mfa.totp.internal.auth import TOTP, generate_totp_secret
from django.contrib.sessions.models import Session
from django.utils import timezone

from portal.models import AuditLogEntry, Invitation, Member, Organization, User
from portal.tenancy import unscoped
from tests.factories import PASSWORD, InvitationFactory, MemberFactory, UserFactory
from tests.support.mfa import current_totp_code, current_totp_codes, wrong_totp_code

pytestmark = pytest.mark.django_db

NEW_PASSWORD = "a-brand-new-passphrase-42"
AUTH_SESSION_KEY = "_auth_user_id"


# -- helpers -----------------------------------------------------------------------------------


def link_in(message, pattern: str) -> str:
    """The path of the first URL in an email whose path matches `pattern`."""
    for url in re.findall(r"https?://\S+", message.body):
        path = urlsplit(url).path
        if re.search(pattern, path):
            return path
    raise AssertionError(f"no link matching {pattern!r} in email:\n{message.body}")


def logged_in_user_id(client):
    return client.session.get(AUTH_SESSION_KEY)


def memberships(user) -> dict[str, Member]:
    with unscoped():
        return {m.organization.slug: m for m in Member.objects.filter(user=user).select_related("organization", "team")}


def password_login(client, email: str, password: str = PASSWORD):
    return client.post("/accounts/login/", {"login": email, "password": password})


class _SwitcherParser(HTMLParser):
    """Collect the hrefs inside the <details> whose <summary> carries data-testid="org-switcher"."""

    def __init__(self):
        super().__init__()
        self.stack: list[dict] = []
        self.hrefs: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "details":
            self.stack.append({"switcher": False, "hrefs": []})
        elif tag == "summary" and attrs.get("data-testid") == "org-switcher" and self.stack:
            self.stack[-1]["switcher"] = True
        elif tag == "a" and self.stack and "href" in attrs:
            self.stack[-1]["hrefs"].append(attrs["href"])

    def handle_endtag(self, tag):
        if tag == "details" and self.stack:
            details = self.stack.pop()
            if details["switcher"]:
                self.hrefs = details["hrefs"]


def switcher_links(html: str) -> list[str]:
    parser = _SwitcherParser()
    parser.feed(html)
    assert parser.hrefs is not None, "the page has no organization switcher"
    return parser.hrefs


# -- 1. sign-up ---------------------------------------------------------------------------------


def test_signup_creates_owned_organization_and_requires_email_confirmation(client, mailoutbox):
    """Sign-up makes the person owner of a new organization, but only a confirmed email lets them in."""
    response = client.post("/accounts/signup/", {
        "email": "Founder@Startup.example", "password1": NEW_PASSWORD, "password2": NEW_PASSWORD,
        "organization_name": "  Acme Robotics  ", "time_zone": "Europe/Berlin", "currency": "EUR",
    })
    assert response.status_code == 302
    assert response["Location"] == "/accounts/confirm-email/"

    user = User.objects.get(email__iexact="founder@startup.example")
    organization = Organization.objects.get()
    assert (organization.name, organization.slug) == ("Acme Robotics", "acme-robotics")
    assert (organization.time_zone, organization.currency) == ("Europe/Berlin", "EUR")
    member = memberships(user)["acme-robotics"]
    assert member.is_owner and member.is_active
    with unscoped():
        created = AuditLogEntry.objects.get(organization=organization, action="organization.created")
    assert created.actor == user
    assert created.data["name"] == "Acme Robotics"

    # Not logged in yet: the organization sends the person to the login page ...
    assert logged_in_user_id(client) is None
    response = client.get(f"/o/{organization.slug}/")
    assert response.status_code == 302
    assert response["Location"].startswith("/accounts/login/")
    # ... and the right password alone does not get them in before the address is confirmed.
    response = password_login(client, "founder@startup.example", NEW_PASSWORD)
    assert response.status_code == 302
    assert response["Location"] == "/accounts/confirm-email/"
    assert logged_in_user_id(client) is None
    assert client.get(f"/o/{organization.slug}/").status_code == 302

    assert mailoutbox, "no verification email was sent"
    assert all(message.to == [user.email] for message in mailoutbox)
    confirm_path = link_in(mailoutbox[-1], r"^/accounts/confirm-email/[^/]+/$")

    # GET only shows the confirmation page (ACCOUNT_CONFIRM_EMAIL_ON_GET is off) ...
    response = client.get(confirm_path)
    assert response.status_code == 200
    assert response.context["confirmation"] is not None
    assert logged_in_user_id(client) is None
    assert not user.emailaddress_set.get().verified

    # ... POST confirms and logs in.
    response = client.post(confirm_path)
    assert response.status_code == 302
    assert user.emailaddress_set.get().verified
    assert logged_in_user_id(client) == str(user.pk)

    response = client.get("/")
    assert response.status_code == 302
    assert response["Location"] == f"/o/{organization.slug}/"
    assert client.get(response["Location"]).status_code == 200


@pytest.mark.parametrize("name", ["", "    "])
def test_signup_with_blank_organization_name_creates_nothing(client, mailoutbox, name):
    """Every account belongs to an organization; without a name neither is created."""
    response = client.post("/accounts/signup/", {
        "email": "founder@startup.example", "password1": NEW_PASSWORD, "password2": NEW_PASSWORD,
        "organization_name": name, "time_zone": "UTC", "currency": "USD",
    })
    assert response.status_code == 200
    assert "organization_name" in response.context["form"].errors
    assert not User.objects.exists()
    assert not Organization.objects.exists()
    assert mailoutbox == []


# -- 2. invitations ------------------------------------------------------------------------------


def test_invited_newcomer_creates_account_and_joins_with_invited_roles(
    client, login, org_a, mailoutbox, django_capture_on_commit_callbacks
):
    """HR invites by email; the link alone lets the newcomer create an account and join, once."""
    login(org_a.members["hr"])
    with django_capture_on_commit_callbacks(execute=True):
        response = client.post(f"/o/{org_a.slug}/invitations/", {
            "email": "Newbie@A.example", "roles": ["employee", "hr"], "team": org_a.team.pk,
        })
    assert response.status_code == 302
    assert len(mailoutbox) == 1
    assert mailoutbox[0].to == ["newbie@a.example"]
    accept_path = link_in(mailoutbox[0], r"^/invitations/[^/]+/$")

    client.logout()
    response = client.get(accept_path)
    assert response.status_code == 200
    assert "password1" in response.context["signup_form"].fields

    response = client.post(accept_path, {"password1": NEW_PASSWORD, "password2": NEW_PASSWORD})
    assert response.status_code == 302
    assert response["Location"] == f"/o/{org_a.slug}/"

    user = User.objects.get(email="newbie@a.example")
    assert logged_in_user_id(client) == str(user.pk)
    assert user.check_password(NEW_PASSWORD)
    member = memberships(user)[org_a.slug]
    assert set(member.roles) == {"hr", "employee"}
    assert member.team == org_a.team
    with unscoped():
        invitation = Invitation.objects.get(email="newbie@a.example")
    assert invitation.status == "accepted"
    assert invitation.accepted_by == user
    assert client.get(response["Location"]).status_code == 200

    # The link is spent.
    client.logout()
    assert client.get(accept_path).status_code == 410
    assert client.post(accept_path, {"password1": NEW_PASSWORD, "password2": NEW_PASSWORD}).status_code == 410


def test_existing_user_logs_in_and_accepts_invitation_to_a_second_organization(client, org_a, org_b):
    """Someone already on the portal (in org B) accepts an invitation to org A with the same account."""
    user = org_b.members["employee"].user
    with unscoped():
        InvitationFactory(organization=org_a.organization, email=user.email, token="second-org-token",
                          is_employee=False, is_approver=True, team=org_a.team)

    # Anonymous visitors with an existing account are asked to log in, not to sign up.
    response = client.get("/invitations/second-org-token/")
    assert response.status_code == 200
    assert response.context["signup_form"] is None
    assert client.post("/invitations/second-org-token/", {"password1": "x", "password2": "x"}).status_code == 200
    assert set(memberships(user)) == {org_b.slug}

    response = password_login(client, user.email)
    assert response.status_code == 302
    assert logged_in_user_id(client) == str(user.pk)

    response = client.post("/invitations/second-org-token/")
    assert response.status_code == 302
    assert response["Location"] == f"/o/{org_a.slug}/"
    joined = memberships(user)
    assert set(joined) == {org_a.slug, org_b.slug}
    assert joined[org_a.slug].roles == ["approver"]
    assert joined[org_a.slug].team == org_a.team
    assert client.get(f"/o/{org_a.slug}/").status_code == 200
    assert client.get(f"/o/{org_b.slug}/").status_code == 200


def test_invitation_for_another_email_is_forbidden_to_a_logged_in_user(client, login, org_a, org_b):
    """The token is not enough when someone else is logged in: the invited address must match."""
    intruder = org_b.members["employee"].user
    login(intruder)
    path = f"/invitations/{org_a.invitation_token}/"
    assert client.get(path).status_code == 403
    assert client.post(path).status_code == 403
    assert set(memberships(intruder)) == {org_b.slug}
    with unscoped():
        assert Invitation.objects.get(pk=org_a.invitation.pk).status == "open"


@pytest.mark.parametrize("state", ["expired", "revoked"])
def test_expired_or_revoked_invitation_is_refused(client, login, org_a, state):
    """A dead invitation link answers 410 Gone and creates neither an account nor a membership."""
    invitation = org_a.invitation
    if state == "expired":
        with unscoped():
            Invitation.objects.filter(pk=invitation.pk).update(expires_at=timezone.now() - timedelta(minutes=1))
    else:
        login(org_a.members["hr"])
        response = client.post(f"/o/{org_a.slug}/invitations/{invitation.pk}/revoke/")
        assert response.status_code == 302
        client.logout()
    with unscoped():
        assert Invitation.objects.get(pk=invitation.pk).status == state

    path = f"/invitations/{org_a.invitation_token}/"
    assert client.get(path).status_code == 410
    response = client.post(path, {"password1": NEW_PASSWORD, "password2": NEW_PASSWORD})
    assert response.status_code == 410
    assert not User.objects.filter(email__iexact=invitation.email).exists()
    assert logged_in_user_id(client) is None


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"email": "not-an-email", "roles": ["employee"]}, "email"),
        ({"email": "someone@a.example"}, "roles"),
        ({"email": "someone@a.example", "roles": []}, "roles"),
    ],
)
def test_invitation_form_rejects_bad_email_or_missing_roles(
    client, login, org_a, mailoutbox, django_capture_on_commit_callbacks, data, field
):
    """A broken invitation form shows the error on its field and sends nothing."""
    login(org_a.members["hr"])
    with unscoped():
        before = Invitation.objects.count()
    with django_capture_on_commit_callbacks(execute=True):
        response = client.post(f"/o/{org_a.slug}/invitations/", data)
    assert response.status_code == 200
    assert field in response.context["form"].errors
    with unscoped():
        assert Invitation.objects.count() == before
    assert mailoutbox == []


@pytest.mark.parametrize("role", ["owner", "admin"])
def test_hr_cannot_invite_owner_or_admin(client, login, org_a, mailoutbox, django_capture_on_commit_callbacks, role):
    """HR hands out employee (and HR) access, never the roles above its own."""
    login(org_a.members["hr"])
    with django_capture_on_commit_callbacks(execute=True):
        response = client.post(f"/o/{org_a.slug}/invitations/", {"email": "boss@a.example", "roles": [role]})
    assert response.status_code == 200
    assert role in " ".join(response.context["form"].errors["roles"])
    with unscoped():
        assert not Invitation.objects.filter(email="boss@a.example").exists()
    assert mailoutbox == []


# -- 3. two-factor login ---------------------------------------------------------------------------


@pytest.fixture
def mfa_user(org_a):
    """The org A employee with TOTP and recovery codes activated."""
    user = org_a.members["employee"].user
    secret = generate_totp_secret()
    TOTP.activate(user, secret)
    codes = RecoveryCodes.activate(user).generate_codes()
    return user, secret, codes


def test_login_with_totp_needs_the_current_code(client, org_a, mfa_user):
    """A right password only reaches the 2FA stage; a wrong code is refused, the current one logs in."""
    user, secret, _codes = mfa_user
    response = password_login(client, user.email)
    assert response.status_code == 302
    assert response["Location"] == "/accounts/2fa/authenticate/"
    assert logged_in_user_id(client) is None
    response = client.get(f"/o/{org_a.slug}/")
    assert response.status_code == 302
    assert response["Location"].startswith("/accounts/login/")

    response = client.post("/accounts/2fa/authenticate/", {"code": wrong_totp_code(secret)})
    assert response.status_code == 200
    assert "code" in response.context["form"].errors
    assert logged_in_user_id(client) is None

    code = current_totp_code(secret)
    assert code in current_totp_codes(secret)
    response = client.post("/accounts/2fa/authenticate/", {"code": code})
    assert response.status_code == 302
    assert logged_in_user_id(client) == str(user.pk)
    assert client.get(f"/o/{org_a.slug}/").status_code == 200


def test_recovery_code_logs_in_once(client, org_a, mfa_user):
    """A recovery code replaces the TOTP code exactly once."""
    user, _secret, codes = mfa_user
    recovery_code = codes[0]

    assert password_login(client, user.email)["Location"] == "/accounts/2fa/authenticate/"
    response = client.post("/accounts/2fa/authenticate/", {"code": recovery_code})
    assert response.status_code == 302
    assert logged_in_user_id(client) == str(user.pk)
    assert recovery_code not in RecoveryCodes.activate(user).get_unused_codes()

    client.post("/accounts/logout/")
    assert logged_in_user_id(client) is None

    assert password_login(client, user.email)["Location"] == "/accounts/2fa/authenticate/"
    response = client.post("/accounts/2fa/authenticate/", {"code": recovery_code})
    assert response.status_code == 200
    assert "code" in response.context["form"].errors
    assert logged_in_user_id(client) is None
    assert client.get(f"/o/{org_a.slug}/").status_code == 302


# -- 4. password reset -------------------------------------------------------------------------------


def test_password_reset_by_email_link(client, org_a, mailoutbox):
    """The emailed link sets a new password: the old one stops working, the new one logs in."""
    user = org_a.members["employee"].user
    response = client.post("/accounts/password/reset/", {"email": user.email})
    assert response.status_code == 302
    assert response["Location"] == "/accounts/password/reset/done/"
    assert len(mailoutbox) == 1
    assert mailoutbox[0].to == [user.email]
    reset_path = link_in(mailoutbox[0], r"^/accounts/password/reset/key/[^/]+/$")

    # allauth moves the key into the session and redirects to a token-less URL.
    response = client.get(reset_path, follow=True)
    assert response.status_code == 200
    set_password_path = response.redirect_chain[-1][0]
    assert set_password_path.endswith("-set-password/")
    assert "password1" in response.context["form"].fields

    response = client.post(set_password_path, {"password1": NEW_PASSWORD, "password2": NEW_PASSWORD})
    assert response.status_code == 302
    user.refresh_from_db()
    assert user.check_password(NEW_PASSWORD)

    client.logout()
    response = password_login(client, user.email, PASSWORD)
    assert response.status_code == 200
    assert logged_in_user_id(client) is None
    response = password_login(client, user.email, NEW_PASSWORD)
    assert response.status_code == 302
    assert logged_in_user_id(client) == str(user.pk)


def test_password_reset_for_unknown_email_sends_no_reset_link(client, org_a, mailoutbox):
    """Asking for a reset of an address nobody uses reveals nothing and gives no reset link."""
    response = client.post("/accounts/password/reset/", {"email": "nobody@nowhere.example"})
    assert response.status_code == 302
    assert response["Location"] == "/accounts/password/reset/done/"  # same answer as for a known address
    for message in mailoutbox:
        assert message.to == ["nobody@nowhere.example"]
        assert "/accounts/password/reset/key/" not in message.body


# -- 5. organization switcher -----------------------------------------------------------------------


def test_switcher_lists_memberships_and_home_remembers_the_last_organization(client, login, org_a, org_b):
    """A member of two organizations switches between them; `/` returns to the last one visited."""
    user = org_a.members["employee"].user
    MemberFactory(organization=org_b.organization, user=user)
    login(user)

    # Two memberships and none visited yet: `/` asks which one.
    response = client.get("/")
    assert response["Location"] == "/orgs/"

    response = client.get(f"/o/{org_a.slug}/")
    assert response.status_code == 200
    links = switcher_links(response.content.decode())
    assert f"/o/{org_a.slug}/" in links
    assert f"/o/{org_b.slug}/" in links
    assert client.get("/")["Location"] == f"/o/{org_a.slug}/"

    assert client.get(f"/o/{org_b.slug}/").status_code == 200
    assert client.get("/")["Location"] == f"/o/{org_b.slug}/"


def test_switcher_of_a_single_org_member_lists_only_that_org(client, login, org_a, org_b):
    """The switcher lists the user's own organizations, never another tenant's."""
    login(org_a.members["employee"])
    links = switcher_links(client.get(f"/o/{org_a.slug}/").content.decode())
    assert f"/o/{org_a.slug}/" in links
    assert f"/o/{org_b.slug}/" not in links


def test_user_without_membership_lands_on_organization_list(client, login, db):
    """Someone with no organization is offered the list (to create one), not an error."""
    login(UserFactory())
    response = client.get("/")
    assert response.status_code == 302
    assert response["Location"] == "/orgs/"
    response = client.get("/orgs/")
    assert response.status_code == 200
    assert response.context["memberships"] == []


# -- 6. rate limit -------------------------------------------------------------------------------------


def authenticated_sessions_of(user) -> list[Session]:
    return [s for s in Session.objects.all() if s.get_decoded().get(AUTH_SESSION_KEY) == str(user.pk)]


def test_failed_logins_lock_the_account_even_for_the_right_password(client, settings, org_a):
    """After five failed logins for one email, even the right password is refused for a while."""
    assert settings.ACCOUNT_RATE_LIMITS["login_failed"] == "10/m/ip,5/5m/key"
    user = org_a.members["employee"].user
    for _ in range(5):
        response = password_login(client, user.email, "not-the-password")
        assert response.status_code == 200
        assert "not correct" in response.content.decode()

    response = password_login(client, user.email, PASSWORD)
    assert response.status_code in {200, 429}
    assert "Too many failed login attempts" in response.content.decode()
    assert logged_in_user_id(client) is None
    assert authenticated_sessions_of(user) == []
    assert client.get(f"/o/{org_a.slug}/").status_code == 302

    # The lock is per account: another person on the same network still logs in.
    other = org_a.members["hr"].user
    assert password_login(client, other.email)["Location"] == "/"
    assert logged_in_user_id(client) == str(other.pk)
    assert authenticated_sessions_of(user) == []
