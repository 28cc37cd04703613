from drf_spectacular.extensions import OpenApiAuthenticationExtension
from rest_framework.authentication import BaseAuthentication


class ApiKeyAuthentication(BaseAuthentication):
    """The key `TenancyMiddleware` already checked: its owner is the user, the key the auth."""

    def authenticate(self, request):
        identity = getattr(request._request, "api_key", None)
        if identity is None:
            return None
        return request._request.member.user, identity

    def authenticate_header(self, request):
        return "Bearer"


class ApiKeyScheme(OpenApiAuthenticationExtension):
    target_class = ApiKeyAuthentication
    name = "apiKey"

    def get_security_definition(self, auto_schema):
        return {"type": "http", "scheme": "bearer", "description": "A member's API key (tap_...), also accepted as x-api-key."}
