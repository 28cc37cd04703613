"""The directory's SCIM token, authenticated here: `Authorization: Bearer tas_...`.

The token is parsed without the database (apikeys.secrets' format, its own prefix), found by its
public id, and its secret checked against the stored HMAC. It acts as the active admin or owner who
created it; a token whose creator no longer is one is refused.
"""

from datetime import timedelta

from django.utils import timezone
from rest_framework.authentication import BaseAuthentication
from rest_framework.exceptions import AuthenticationFailed

from apikeys.secrets import MalformedKey, secret_matches
from identity.models import ScimToken
from identity.services import SCIM_TOKEN
from portal.tenancy import unscoped

LAST_USED_RESOLUTION = timedelta(minutes=1)


class ScimTokenAuthentication(BaseAuthentication):
    def authenticate(self, request):
        header = request.headers.get("Authorization", "")
        if header[:7].lower() != "bearer ":
            return None  # the permission check answers 401
        try:
            parts = SCIM_TOKEN.parse(header[7:].strip())
        except MalformedKey as error:
            raise AuthenticationFailed(f"Invalid SCIM token: {error}.") from None
        with unscoped():
            token = ScimToken.objects.select_related("organization", "created_by__user", "created_by__organization"
                                                     ).filter(public_id=parts.public_id).first()
        if token is None or not secret_matches(parts.secret, token.secret_hash):
            raise AuthenticationFailed("Invalid SCIM token: no such token.")
        if token.revoked_at is not None:
            raise AuthenticationFailed("SCIM token refused: it was revoked.")
        creator = token.created_by
        if not (creator.is_active and creator.user.is_active and creator.has_any_role(["admin"])):
            raise AuthenticationFailed("SCIM token refused: the admin who created it is no longer an active admin "
                                       "of the organization.")
        now = timezone.now()
        if token.last_used_at is None or token.last_used_at < now - LAST_USED_RESOLUTION:
            with unscoped():
                ScimToken.objects.filter(pk=token.pk).update(last_used_at=now)
        return creator.user, token

    def authenticate_header(self, request):
        return 'Bearer realm="SCIM"'
