from django.apps import AppConfig


class GatewayConfig(AppConfig):
    name = "gateway"
    verbose_name = "Metering gateway"

    def ready(self):
        from gateway import signals  # noqa: F401  (cache invalidation)
