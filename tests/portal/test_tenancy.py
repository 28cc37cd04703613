"""The fail-closed tenancy core: scopes, the tenant manager, roles, the middleware and the constraints."""

import contextvars
import threading

import pytest
from django.db import IntegrityError, transaction
from django.template import engines
from django.template.response import TemplateResponse
from django.test import RequestFactory
from django.urls import path

from portal.models import AuditLogEntry, Invitation, Member, Team
from portal.tenancy import ScopeError, TenancyMiddleware, current_organization, effective_roles, scope, unscoped
from portal.urls import urlpatterns as portal_urlpatterns
from tests.factories import MemberFactory, OrganizationFactory, TeamFactory, UserFactory

TENANT_MODELS = [Team, Member, Invitation, AuditLogEntry]


# -- a probe page answering with an unrendered TemplateResponse ------------------------------------
#
# Its template calls `members` only while the response renders, which Django does after the view has
# returned; the query must still run inside the organization's scope.

PROBE_RENDERS = []


def _probe(request):
    def members():
        PROBE_RENDERS.append(current_organization())
        return list(Member.objects.order_by("user__email").values_list("user__email", flat=True))

    template = engines["django"].from_string(
        "org={{ request.organization.slug }};member={{ request.member.user.email }};"
        "{% for email in members %}[{{ email }}]{% endfor %}"
    )
    return TemplateResponse(request, template, {"members": members})


urlpatterns = [path("o/<slug:org_slug>/_tenancy-probe/", _probe), *portal_urlpatterns]


def pks(queryset):
    return sorted(queryset.values_list("pk", flat=True))


def all_pks(model, organization):
    return sorted(model.all_objects.filter(organization=organization).values_list("pk", flat=True))


# -- fail closed -------------------------------------------------------------------------------------


@pytest.mark.parametrize("model", TENANT_MODELS, ids=lambda m: m.__name__)
def test_querying_a_tenant_model_without_a_scope_raises(org_a, model):
    assert current_organization() is None
    with pytest.raises(ScopeError):
        model.objects.all()
    with pytest.raises(ScopeError):
        model.objects.filter(organization=org_a.organization)
    with pytest.raises(ScopeError):
        model.objects.count()
    with pytest.raises(ScopeError):
        model.objects.get(pk=all_pks(model, org_a.organization)[0])


def test_reverse_relations_fail_closed_too(org_a):
    with pytest.raises(ScopeError):
        list(org_a.team.members.all())


def test_scope_needs_an_organization():
    with pytest.raises(ScopeError):
        with scope(None):
            pass  # pragma: no cover - never entered
    assert current_organization() is None


@pytest.mark.parametrize("model", TENANT_MODELS, ids=lambda m: m.__name__)
def test_inside_a_scope_the_default_manager_sees_only_that_organization(org_a, org_b, model):
    a_pks = all_pks(model, org_a.organization)
    b_pks = all_pks(model, org_b.organization)
    assert a_pks and b_pks

    with scope(org_a.organization):
        assert current_organization() == org_a.organization
        assert pks(model.objects.all()) == a_pks
        assert model.objects.count() == len(a_pks)
        # Asking for the other organization's rows explicitly still finds nothing.
        assert not model.objects.filter(organization=org_b.organization).exists()
        assert not model.objects.filter(pk__in=b_pks).exists()
        with pytest.raises(model.DoesNotExist):
            model.objects.get(pk=b_pks[0])
        assert model.objects.get(pk=a_pks[0]).organization_id == org_a.organization.pk

    with scope(org_b.organization):
        assert pks(model.objects.all()) == b_pks


@pytest.mark.parametrize("model", TENANT_MODELS, ids=lambda m: m.__name__)
def test_unscoped_sees_every_organization(org_a, org_b, model):
    expected = sorted(all_pks(model, org_a.organization) + all_pks(model, org_b.organization))
    with unscoped():
        assert current_organization() is None
        assert pks(model.objects.filter(organization__in=[org_a.organization, org_b.organization])) == expected
        assert set(model.objects.values_list("organization_id", flat=True)) >= {
            org_a.organization.pk, org_b.organization.pk,
        }


def test_scoped_member_lookup_by_user_does_not_cross_organizations(org_a, org_b):
    user = org_b.members["owner"].user
    MemberFactory(organization=org_a.organization, user=user, is_employee=True)
    with scope(org_b.organization):
        assert Member.objects.get(user=user).organization_id == org_b.organization.pk


# -- saving across organizations -----------------------------------------------------------------------


def test_creating_a_row_of_another_organization_inside_a_scope_raises(org_a, org_b):
    before = all_pks(Team, org_b.organization)
    with scope(org_a.organization):
        with pytest.raises(ScopeError):
            Team.objects.create(organization=org_b.organization, name="Smuggled")
        with pytest.raises(ScopeError):
            Member(organization=org_b.organization, user=UserFactory(), is_employee=True).save()
    assert all_pks(Team, org_b.organization) == before
    assert not Team.all_objects.filter(name="Smuggled").exists()


def test_updating_a_row_of_another_organization_inside_a_scope_raises(org_a, org_b):
    team_b = Team.all_objects.get(pk=org_b.team.pk)
    member_b = Member.all_objects.get(pk=org_b.members["employee"].pk)
    with scope(org_a.organization):
        team_b.name = "Renamed from A"
        with pytest.raises(ScopeError):
            team_b.save()
        member_b.is_active = False
        with pytest.raises(ScopeError):
            member_b.save()
    assert Team.all_objects.get(pk=team_b.pk).name == "Team b"
    assert Member.all_objects.get(pk=member_b.pk).is_active is True


def test_moving_a_row_into_another_organization_inside_a_scope_raises(org_a, org_b):
    with scope(org_a.organization):
        team = Team.objects.get(pk=org_a.team.pk)
        team.organization = org_b.organization
        with pytest.raises(ScopeError):
            team.save()
    assert Team.all_objects.get(pk=org_a.team.pk).organization_id == org_a.organization.pk


def test_saving_a_row_of_the_active_organization_works(org_a):
    with scope(org_a.organization):
        team = Team.objects.create(organization=org_a.organization, name="Research")
        team.cost_centre = "R-1"
        team.save()
    assert Team.all_objects.get(pk=team.pk).cost_centre == "R-1"


def test_saving_under_unscoped_may_write_any_organization(org_b):
    with unscoped():
        team = Team.objects.create(organization=org_b.organization, name="Platform made")
    assert Team.all_objects.get(pk=team.pk).organization_id == org_b.organization.pk


# -- nesting ----------------------------------------------------------------------------------------------


def test_scopes_nest_and_restore(org_a, org_b):
    a_pks, b_pks = all_pks(Team, org_a.organization), all_pks(Team, org_b.organization)
    with scope(org_a.organization):
        assert pks(Team.objects.all()) == a_pks
        with unscoped():
            assert pks(Team.objects.all()) == sorted(a_pks + b_pks)
            assert current_organization() is None
            with scope(org_b.organization):
                assert current_organization() == org_b.organization
                assert pks(Team.objects.all()) == b_pks
            assert pks(Team.objects.all()) == sorted(a_pks + b_pks)
        assert current_organization() == org_a.organization
        assert pks(Team.objects.all()) == a_pks
        with scope(org_b.organization):
            assert pks(Team.objects.all()) == b_pks
        assert pks(Team.objects.all()) == a_pks
    assert current_organization() is None
    with pytest.raises(ScopeError):
        Team.objects.all()


def test_scope_is_restored_when_the_block_raises(org_a, org_b):
    with scope(org_a.organization):
        with pytest.raises(ZeroDivisionError):
            with scope(org_b.organization):
                1 / 0
        assert current_organization() == org_a.organization
        with pytest.raises(KeyError):
            with unscoped():
                raise KeyError("boom")
        assert pks(Team.objects.all()) == all_pks(Team, org_a.organization)
    with pytest.raises(ScopeError):
        Team.objects.all()


# -- per thread / per context --------------------------------------------------------------------------


def test_a_thread_started_inside_a_scope_does_not_inherit_it(org_a):
    seen = {}

    def worker():
        seen["organization"] = current_organization()
        try:
            Member.objects.all()
        except ScopeError as error:
            seen["error"] = error

    with scope(org_a.organization):
        thread = threading.Thread(target=worker)
        thread.start()
        thread.join(timeout=10)
        assert not thread.is_alive()
        assert current_organization() == org_a.organization

    assert seen["organization"] is None
    assert isinstance(seen.get("error"), ScopeError)


def test_a_scope_entered_in_another_thread_does_not_leak_into_this_one(org_a, org_b):
    entered, release = threading.Event(), threading.Event()
    seen = {}

    def worker():
        with scope(org_b.organization):
            seen["inside"] = current_organization()
            entered.set()
            release.wait(timeout=10)
        seen["after"] = current_organization()

    with scope(org_a.organization):
        thread = threading.Thread(target=worker)
        thread.start()
        assert entered.wait(timeout=10)
        # The other thread is inside scope(org_b) right now; this one still works for org_a.
        assert current_organization() == org_a.organization
        assert pks(Team.objects.all()) == all_pks(Team, org_a.organization)
        release.set()
        thread.join(timeout=10)
    assert seen == {"inside": org_b.organization, "after": None}
    assert current_organization() is None


def test_a_copied_context_carries_the_scope_but_changes_in_it_do_not_leak_back(org_a, org_b):
    with scope(org_a.organization):
        context = contextvars.copy_context()
    assert current_organization() is None
    assert context.run(current_organization) == org_a.organization

    def enter_b():
        with scope(org_b.organization):
            inner = contextvars.copy_context()  # a task or thread started here would get this context
        return inner

    inner = contextvars.copy_context().run(enter_b)
    assert inner.run(current_organization) == org_b.organization
    assert current_organization() is None
    with scope(org_a.organization):
        assert inner.run(current_organization) == org_b.organization
        assert current_organization() == org_a.organization


# -- roles -------------------------------------------------------------------------------------------------


def test_effective_roles_implications():
    assert effective_roles(["owner"]) == {"owner", "admin", "hr", "approver"}
    assert effective_roles(["admin"]) == {"admin", "hr", "approver"}
    assert effective_roles(["hr"]) == {"hr"}
    assert effective_roles(["approver"]) == {"approver"}
    assert effective_roles(["employee"]) == {"employee"}
    assert effective_roles(["hr", "employee"]) == {"hr", "employee"}
    assert effective_roles([]) == frozenset()
    with pytest.raises(KeyError):
        effective_roles(["superuser"])


def test_roles_do_not_imply_upwards(org_a):
    members = org_a.members
    assert members["owner"].has_any_role(["admin"]) and members["owner"].has_any_role(["hr"])
    assert members["admin"].has_any_role(["hr"]) and members["admin"].has_any_role(["approver"])
    assert not members["admin"].has_any_role(["owner"])
    assert not members["hr"].has_any_role(["admin"])
    assert not members["hr"].has_any_role(["approver"])
    assert not members["approver"].has_any_role(["hr"])
    assert not members["employee"].has_any_role(["hr", "approver", "admin", "owner"])
    assert members["employee"].has_any_role(["employee"])


# -- middleware ----------------------------------------------------------------------------------------------


def _through_middleware(path_info, user):
    seen = {}

    def get_response(request):
        seen["organization"] = request.organization
        seen["member"] = request.member
        seen["scope"] = current_organization()
        seen["teams"] = pks(Team.objects.all())
        return "response"

    request = RequestFactory().get(path_info)
    request.user = user
    result = TenancyMiddleware(get_response)(request)
    return request, result, seen


def test_middleware_sets_organization_member_and_scope(org_a):
    hr = org_a.members["hr"]
    request, result, seen = _through_middleware(f"/o/{org_a.slug}/members/", hr.user)
    assert result == "response"
    assert request.organization == org_a.organization
    assert request.member == hr
    assert seen["organization"] == org_a.organization and seen["member"] == hr
    assert seen["scope"] == org_a.organization
    assert seen["teams"] == all_pks(Team, org_a.organization)
    # The scope ends with the request.
    assert current_organization() is None


def test_middleware_leaves_urls_without_an_organization_unscoped(org_a):
    seen = {}

    def get_response(request):
        seen["organization"], seen["member"] = request.organization, request.member
        seen["scope"] = current_organization()
        with pytest.raises(ScopeError):
            Team.objects.all()
        return "response"

    request = RequestFactory().get("/orgs/")
    request.user = org_a.members["hr"].user
    assert TenancyMiddleware(get_response)(request) == "response"
    assert seen == {"organization": None, "member": None, "scope": None}


def test_members_page_lists_only_the_organizations_members(client, login, org_a, org_b):
    login(org_a.members["hr"])
    response = client.get(f"/o/{org_a.slug}/members/")
    assert response.status_code == 200
    assert response.wsgi_request.organization == org_a.organization
    assert response.wsgi_request.member == org_a.members["hr"]
    content = response.content.decode()
    for member in org_a.members.values():
        assert member.user.email in content
    for member in org_b.members.values():
        assert member.user.email not in content
    assert "@b.example" not in content


def test_another_organizations_pages_answer_404(client, login, org_a, org_b):
    login(org_a.members["owner"])
    assert client.get(f"/o/{org_b.slug}/members/").status_code == 404
    assert client.get("/o/no-such-org/members/").status_code == 404


def test_deactivated_member_is_refused_like_a_stranger(client, login, org_a):
    hr = org_a.members["hr"]
    Member.all_objects.filter(pk=hr.pk).update(is_active=False)
    login(hr)
    assert client.get(f"/o/{org_a.slug}/members/").status_code == 404


def test_members_page_needs_the_declared_role(client, login, org_a):
    login(org_a.members["approver"])
    assert client.get(f"/o/{org_a.slug}/members/").status_code == 403


def test_anonymous_is_sent_to_login(client, org_a):
    response = client.get(f"/o/{org_a.slug}/members/")
    assert response.status_code == 302
    assert "/accounts/login/" in response["Location"]


@pytest.mark.urls(__name__)
def test_scope_stays_active_while_a_template_response_renders(client, login, org_a, org_b):
    PROBE_RENDERS.clear()
    login(org_a.members["hr"])
    response = client.get(f"/o/{org_a.slug}/_tenancy-probe/")
    assert response.status_code == 200
    assert PROBE_RENDERS == [org_a.organization]
    content = response.content.decode()
    assert content.startswith(f"org={org_a.slug};member=hr@a.example;")
    for member in org_a.members.values():
        assert f"[{member.user.email}]" in content
    assert "@b.example" not in content
    assert current_organization() is None


# -- database constraints ---------------------------------------------------------------------------------


def test_a_member_without_any_role_cannot_be_saved(org_a):
    user = UserFactory()
    with pytest.raises(IntegrityError), transaction.atomic():
        Member.all_objects.create(organization=org_a.organization, user=user)
    assert not Member.all_objects.filter(user=user).exists()


def test_a_user_is_a_member_of_an_organization_only_once(org_a):
    user = org_a.members["employee"].user
    with pytest.raises(IntegrityError), transaction.atomic():
        Member.all_objects.create(organization=org_a.organization, user=user, is_hr=True)
    assert Member.all_objects.filter(organization=org_a.organization, user=user).count() == 1


def test_the_same_user_may_be_a_member_of_two_organizations(org_a, org_b):
    user = org_a.members["employee"].user
    Member.all_objects.create(organization=org_b.organization, user=user, is_employee=True)
    assert Member.all_objects.filter(user=user).count() == 2


def test_team_names_are_unique_per_organization_ignoring_case(org_a, org_b):
    with pytest.raises(IntegrityError), transaction.atomic():
        Team.all_objects.create(organization=org_a.organization, name="TEAM A")
    assert Team.all_objects.filter(organization=org_a.organization, name__iexact="team a").count() == 1

    # The same name in another organization is fine.
    TeamFactory(organization=org_b.organization, name="Team a")
    other = OrganizationFactory()
    TeamFactory(organization=other, name="team a")
    assert Team.all_objects.filter(name__iexact="team a").count() == 3


def test_bulk_writes_cannot_move_or_create_rows_in_another_organization(org_a, org_b):
    with scope(org_a.organization):
        with pytest.raises(ScopeError):
            Team.objects.bulk_create([Team(organization=org_b.organization, name="smuggled")])
        with pytest.raises(ScopeError):
            Team.objects.update(organization=org_b.organization)
        with pytest.raises(ScopeError):
            Team.objects.filter(pk=org_a.team.pk).update(organization_id=org_b.organization.pk)
        Team.objects.bulk_create([Team(organization=org_a.organization, name="allowed")])
        assert Team.objects.filter(name="allowed").exists()
    with unscoped():
        assert Team.objects.filter(organization=org_b.organization).count() == 1
        assert Team.objects.get(pk=org_a.team.pk).organization_id == org_a.organization.pk
