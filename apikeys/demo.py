"""One ready API key per demo employee, minted through the same service as the browser."""

from apikeys.models import ENDPOINT_ROLES, ENDPOINTS, ApiKey
from apikeys.services import api_key_create, api_key_revoke
from portal.models import Member

MEMBER_ENDPOINTS = [e for e in ENDPOINTS if e not in ENDPOINT_ROLES]

DEMO_KEY_NAME = "demo key"


def seed_keys(organization) -> list[str]:
    """Revoke the previous run's demo keys (their secrets were printed, not stored) and mint fresh ones."""
    lines = []
    for member in Member.objects.filter(organization=organization, is_employee=True, is_active=True).select_related("user"):
        for old in ApiKey.objects.filter(member=member, name=DEMO_KEY_NAME, revoked_at__isnull=True):
            api_key_revoke(key=old, actor=None)
        _key, secret = api_key_create(member=member, actor=member.user, name=DEMO_KEY_NAME, endpoints=MEMBER_ENDPOINTS)
        lines.append(f"api key for {member.user.email}: {secret}")
    return lines
