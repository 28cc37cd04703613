"""Keys are cached on the authentication path; any change to a key or its owner drops the cache
entry at once, so a revoked key or a deactivated member is refused from the very next request."""

from django.db.models.signals import post_save
from django.dispatch import receiver

from apikeys.models import ApiKey
from apikeys.services import invalidate
from portal.models import Member
from portal.tenancy import unscoped


@receiver(post_save, sender=ApiKey)
def _key_changed(sender, instance, **kwargs):
    invalidate([instance.public_id])


@receiver(post_save, sender=Member)
def _member_changed(sender, instance, **kwargs):
    with unscoped():
        invalidate(list(ApiKey.objects.filter(member_id=instance.pk).values_list("public_id", flat=True)))
