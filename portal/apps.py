import os

from django.apps import AppConfig


class PortalConfig(AppConfig):
    name = "portal"
    verbose_name = "Portal (organizations, members, audit log)"

    def ready(self):
        if os.environ.get("PORTAL_EMBEDDED_SCHEDULER") == "1":  # `make run`: no beat process
            from portal import scheduler

            scheduler.start()
