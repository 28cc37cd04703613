"""Keys are cached on the authentication path; any change to a key or its owner drops the cache
entry at once, so a revoked key, a deactivated member or a disabled user is refused from the very
next request."""

from django.db.models.signals import post_save
from django.dispatch import receiver

from allowances.models import Account, AllowancePolicy, PolicyAssignment, TransferSettings
from allowances.services import account_holds_release
from apikeys.models import ApiKey
from apikeys.services import invalidate
from portal.models import Member, User
from portal.services import user_sessions_end
from portal.tenancy import unscoped


@receiver(post_save, sender=ApiKey)
def _key_changed(sender, instance, **kwargs):
    invalidate([instance.public_id])


def _invalidate_keys_of(member_ids) -> None:
    with unscoped():
        invalidate(list(ApiKey.objects.filter(member_id__in=list(member_ids)).values_list("public_id", flat=True)))


@receiver(post_save, sender=Member)
def _member_changed(sender, instance, **kwargs):
    _invalidate_keys_of([instance.pk])


@receiver(post_save, sender=User)
def _user_changed(sender, instance, created, update_fields, **kwargs):
    """A user disabled (is_active false), however that was saved (the Django admin, a shell): their
    keys, sessions and holds in every organization end now. Enabled again, the keys work again, as
    a re-activated member's do; sessions and holds stay ended."""
    if created or (update_fields is not None and "is_active" not in update_fields):
        return  # e.g. last_login, written at every login
    with unscoped():
        member_ids = list(Member.objects.filter(user=instance).values_list("pk", flat=True))
    _invalidate_keys_of(member_ids)
    if not instance.is_active:
        user_sessions_end(user=instance)
        account_holds_release(member_ids=member_ids, reason="the user account was disabled")


@receiver(post_save, sender=AllowancePolicy)
@receiver(post_save, sender=PolicyAssignment)
@receiver(post_save, sender=TransferSettings)
def _policy_changed(sender, instance, **kwargs):
    # Identities carry the routing threshold of their owner's policy, and their team pool while pools are on.
    with unscoped():
        invalidate(list(ApiKey.objects.filter(organization_id=instance.organization_id)
                        .values_list("public_id", flat=True)))


@receiver(post_save, sender=Account)
def _account_opened(sender, instance, created, **kwargs):
    # Identities carry the owner's account id (and their team pool's): a key minted before the
    # account opened learns it now.
    if created and instance.member_id is not None:
        _invalidate_keys_of([instance.member_id])
    elif created:
        with unscoped():
            _invalidate_keys_of(list(Member.objects.filter(team_id=instance.team_id).values_list("pk", flat=True)))
