from rest_framework.permissions import BasePermission

from apikeys.services import KeyIdentity
from portal.tenancy import ROLES

ANY_MEMBER = ROLES


class OrganizationPermission(BasePermission):
    """Membership in the URL's organization plus the roles the view declares per HTTP method.

    Views declare `required_roles = {"GET": ("hr",), "POST": ("hr",)}`; a method the map does not
    name is refused, so a new method on a view fails closed until someone decides who may use it.
    """

    message = "Your role in this organization does not allow this."

    def has_permission(self, request, view):
        member = request.member
        if member is None:
            return False
        if request.method not in view.allowed_methods:
            return True  # nothing to protect: DRF answers 405 Method Not Allowed
        key = request.auth if isinstance(request.auth, KeyIdentity) else None
        if key is not None:
            # A key reaches only the endpoints its scopes name (views declare `key_scope`).
            scope = getattr(view, "key_scope", None)
            if scope is None or scope not in key.endpoints:
                self.message = f"This API key's scopes do not include {scope or 'this endpoint'}."
                return False
        method = "GET" if request.method in ("HEAD", "OPTIONS") else request.method
        roles = getattr(view, "required_roles", {}).get(method)
        self.message = OrganizationPermission.message
        return bool(roles) and member.has_any_role(roles)
