from django.apps import AppConfig


class OverageConfig(AppConfig):
    name = "overage"
    verbose_name = "Overage requests and approvals"
