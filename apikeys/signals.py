"""Keys are cached on the authentication path; any change to a key or its owner drops the cache
entry at once, so a revoked key or a deactivated member is refused from the very next request."""

from django.db.models.signals import post_save
from django.dispatch import receiver

from allowances.models import Account
from apikeys.models import ApiKey
from apikeys.services import invalidate
from portal.models import Member
from portal.tenancy import unscoped


@receiver(post_save, sender=ApiKey)
def _key_changed(sender, instance, **kwargs):
    invalidate([instance.public_id])


def _invalidate_keys_of(member_id: int) -> None:
    with unscoped():
        invalidate(list(ApiKey.objects.filter(member_id=member_id).values_list("public_id", flat=True)))


@receiver(post_save, sender=Member)
def _member_changed(sender, instance, **kwargs):
    _invalidate_keys_of(instance.pk)


@receiver(post_save, sender=Account)
def _account_opened(sender, instance, created, **kwargs):
    # Identities carry the owner's account id: a key minted before the account opened learns it now.
    if created:
        _invalidate_keys_of(instance.member_id)
