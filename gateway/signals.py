"""The gateway caches each organization's catalog (models, aliases, multipliers, provider connections);
and its breaker limits; any change drops it at once, so a price, a switched-off model, a new
provider secret or a breaker limit applies from the very next request."""

from django.db.models.signals import post_delete, post_save
from django.dispatch import receiver

from allowances.models import CatalogModel, ModelAlias
from gateway.metering import invalidate_config
from gateway.models import BreakerSettings, ProviderConnection
from portal.models import Organization


@receiver([post_save, post_delete], sender=CatalogModel)
@receiver([post_save, post_delete], sender=ModelAlias)
@receiver([post_save, post_delete], sender=ProviderConnection)
@receiver([post_save, post_delete], sender=BreakerSettings)
def _catalog_changed(sender, instance, **kwargs):
    invalidate_config(instance.organization_id)


@receiver(post_save, sender=Organization)
def _organization_changed(sender, instance, **kwargs):
    invalidate_config(instance.pk)
