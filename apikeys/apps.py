from django.apps import AppConfig


class ApiKeysConfig(AppConfig):
    name = "apikeys"
    verbose_name = "API keys"

    def ready(self):
        from apikeys import signals  # noqa: F401  (a changed member or user ends their keys' cached identities)
