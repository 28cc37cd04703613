from django.apps import AppConfig


class AllowancesConfig(AppConfig):
    name = "allowances"
    verbose_name = "Allowances (policies, grants, token ledger)"
