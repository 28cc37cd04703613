from django.apps import AppConfig


class IdentityConfig(AppConfig):
    name = "identity"
    verbose_name = "Company identity (single sign-on, SCIM provisioning)"

    def ready(self):
        from identity import signals  # noqa: F401  (an SSO login marks its session with the organization)
