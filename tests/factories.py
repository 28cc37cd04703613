"""Factories for tests. Tenant rows are created outside any request scope, so creation is unscoped."""

from datetime import timedelta

import factory
from django.utils import timezone
from allauth.account.models import EmailAddress

from allowances.periods import period_start_for
from overage.models import OverageRequest
from portal.models import Invitation, Member, Organization, Team, User, hash_token
from portal.tenancy import unscoped

PASSWORD = "correct-horse-battery-staple"


class TenantFactory(factory.django.DjangoModelFactory):
    class Meta:
        abstract = True

    @classmethod
    def _create(cls, model_class, *args, **kwargs):
        with unscoped():
            return super()._create(model_class, *args, **kwargs)


class UserFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = User
        skip_postgeneration_save = True

    email = factory.Sequence(lambda n: f"person{n}@example.com")
    first_name = "Test"
    last_name = factory.Sequence(lambda n: f"Person{n}")

    @factory.post_generation
    def password(user, create, extracted, **kwargs):
        user.set_password(extracted or PASSWORD)
        if create:
            user.save(update_fields=["password"])
            EmailAddress.objects.get_or_create(user=user, email=user.email, defaults={"verified": True, "primary": True})


class OrganizationFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Organization

    name = factory.Sequence(lambda n: f"Company {n}")
    slug = factory.Sequence(lambda n: f"company-{n}")
    time_zone = "UTC"
    currency = "USD"


class TeamFactory(TenantFactory):
    class Meta:
        model = Team

    organization = factory.SubFactory(OrganizationFactory)
    name = factory.Sequence(lambda n: f"Team {n}")


class MemberFactory(TenantFactory):
    class Meta:
        model = Member

    organization = factory.SubFactory(OrganizationFactory)
    user = factory.SubFactory(UserFactory)
    is_employee = True


class InvitationFactory(TenantFactory):
    class Meta:
        model = Invitation
        exclude = ["token"]

    organization = factory.SubFactory(OrganizationFactory)
    email = factory.Sequence(lambda n: f"invitee{n}@example.com")
    is_employee = True
    token = factory.Sequence(lambda n: f"invitation-token-{n}")
    token_hash = factory.LazyAttribute(lambda o: hash_token(o.token))
    expires_at = factory.LazyFunction(lambda: timezone.now() + timedelta(days=14))


class OverageRequestFactory(TenantFactory):
    """A pending request as a row (tests of the services make theirs through them)."""

    class Meta:
        model = OverageRequest

    member = factory.SubFactory(MemberFactory)
    organization = factory.LazyAttribute(lambda o: o.member.organization)
    period_start = factory.LazyAttribute(lambda o: period_start_for(o.member.organization))
    tokens = 50_000
    reason = "A bigger evaluation run"
