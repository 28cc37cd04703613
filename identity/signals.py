"""A login through an organization's identity provider joins that organization (the membership the
person has, or one made just in time) and marks its session with the organization: deactivating
the member ends that session (portal.services.member_access_end), and a session so marked is the
one kind an organization that requires single sign-on keeps."""

from allauth.account.signals import user_logged_in
from allauth.socialaccount.signals import social_account_added
from django.dispatch import receiver

from identity import services
from identity.adapter import identity_provider_of
from portal.services import SIGNED_IN_THROUGH
from portal.views import LAST_ORGANIZATION_KEY


@receiver(user_logged_in)
def _signed_in(sender, request, user, sociallogin=None, **kwargs):
    if sociallogin is None:
        return
    provider = identity_provider_of(sociallogin)
    if provider is None:
        return
    services.sso_member_join(provider=provider, user=user)
    request.session[SIGNED_IN_THROUGH] = provider.organization_id
    request.session[LAST_ORGANIZATION_KEY] = provider.organization.slug


@receiver(social_account_added)
def _account_linked(sender, request, sociallogin, **kwargs):
    provider = identity_provider_of(sociallogin)
    if provider is not None:
        services.sso_account_link_record(provider=provider, user=sociallogin.user, uid=sociallogin.account.uid)
