"""Pages of the tenancy core. Views stay thin: parse the form, call a service or selector, render.

Views under /o/<org_slug>/ get `request.organization` and `request.member` from
`TenancyMiddleware`; their roles are declared with `require_roles`.
"""

from datetime import datetime, time, timedelta

from django.contrib import messages
from django.contrib.auth import login
from django.contrib.auth.decorators import login_required
from django.core.exceptions import ValidationError
from django.core.paginator import Paginator
from django.db import transaction
from django.shortcuts import redirect, render
from django.urls import reverse
from django.utils import timezone
from django.views.decorators.http import require_GET, require_http_methods, require_POST

from portal import selectors, services
from portal.forms import (
    AuditFilterForm,
    InvitationForm,
    InvitationSignupForm,
    MemberForm,
    OrganizationCreateForm,
    OrganizationForm,
    TeamForm,
    apply_service_error,
)
from portal.tenancy import require_roles

LAST_ORGANIZATION_KEY = "portal_last_organization"


def org_url(request, name: str, **kwargs) -> str:
    return reverse(name, kwargs={"org_slug": request.organization.slug, **kwargs})


# -- outside any organization ------------------------------------------------------------


@require_GET
def home(request):
    if not request.user.is_authenticated:
        return redirect("account_login")
    memberships = selectors.memberships_for_user(request.user)
    slugs = [m.organization.slug for m in memberships]
    last = request.session.get(LAST_ORGANIZATION_KEY)
    if last in slugs:
        return redirect("dashboard", org_slug=last)
    if len(slugs) == 1:
        return redirect("dashboard", org_slug=slugs[0])
    return redirect("organization_list")


@login_required
@require_GET
def organization_list(request):
    return render(request, "portal/organization_list.html", {"memberships": selectors.memberships_for_user(request.user)})


@login_required
@require_http_methods(["GET", "POST"])
def organization_create(request):
    form = OrganizationCreateForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        try:
            organization = services.organization_create(owner=request.user, **form.cleaned_data)
        except ValidationError as error:
            apply_service_error(form, error)
        else:
            messages.success(request, f"{organization.name} is ready.")
            return redirect("dashboard", org_slug=organization.slug)
    return render(request, "portal/organization_create.html", {"form": form})


@require_http_methods(["GET", "POST"])
def invitation_accept(request, token):
    invitation = selectors.invitation_by_token(token)
    if invitation is None:
        return render(request, "portal/invitation_invalid.html", {"reason": "This invitation link is not valid."}, status=404)
    if invitation.status != "open":
        return render(request, "portal/invitation_invalid.html", {"reason": f"This invitation is {invitation.status}."}, status=410)

    signup_form = None
    if request.user.is_authenticated:
        if request.user.email.lower() != invitation.email.lower():
            return render(request, "portal/invitation_invalid.html", {
                "reason": f"This invitation was sent to another address than {request.user.email}; "
                          f"log out and open the link again to accept it as {invitation.email}.",
            }, status=403)
        if request.method == "POST":
            try:
                member = services.invitation_accept(invitation=invitation, user=request.user)
            except ValidationError as error:
                messages.error(request, " ".join(error.messages))
            else:
                messages.success(request, f"Welcome to {member.organization.name}.")
                return redirect("dashboard", org_slug=member.organization.slug)
    else:
        from portal.models import User

        if not User.objects.filter(email__iexact=invitation.email).exists():
            signup_form = InvitationSignupForm(request.POST or None, email=invitation.email)
            if request.method == "POST" and signup_form.is_valid():
                try:
                    with transaction.atomic():
                        user = services.user_create_from_invitation(
                            invitation=invitation, password=signup_form.cleaned_data["password1"],
                            first_name=signup_form.cleaned_data["first_name"], last_name=signup_form.cleaned_data["last_name"],
                        )
                        member = services.invitation_accept(invitation=invitation, user=user)
                except ValidationError as error:
                    apply_service_error(signup_form, error)
                else:
                    login(request, user, backend="allauth.account.auth_backends.AuthenticationBackend")
                    messages.success(request, f"Welcome to {member.organization.name}.")
                    return redirect("dashboard", org_slug=member.organization.slug)
    return render(request, "portal/invitation_accept.html", {
        "invitation": invitation, "signup_form": signup_form,
        "login_url": reverse("account_login") + "?next=" + request.path,
    })


# -- inside an organization ---------------------------------------------------------------


@require_roles("hr")
@require_GET
def member_list(request):
    team_id = request.GET.get("team") or None
    members = selectors.member_list(
        organization=request.organization,
        # ASCII digits only ("²".isdigit() is true) and within a 64-bit id, else it answered 500.
        team_id=int(team_id) if team_id and team_id.isascii() and team_id.isdigit() and len(team_id) <= 18 else None,
        search=request.GET.get("q", ""),
    )
    page = Paginator(members, 50).get_page(request.GET.get("page"))
    template = "portal/_member_rows.html" if request.htmx else "portal/member_list.html"
    return render(request, template, {
        "page": page, "teams": selectors.team_list(organization=request.organization),
        "q": request.GET.get("q", ""), "team_id": team_id,
    })


@require_roles("hr")
@require_http_methods(["GET", "POST"])
def member_edit(request, member_id):
    member = selectors.member_get(organization=request.organization, member_id=member_id)
    can_edit_roles = request.member.has_any_role(["admin"])
    initial = {"team": member.team, "roles": member.roles, "is_active": member.is_active}
    form = MemberForm(request.POST or None, initial=initial, teams=selectors.team_list(organization=request.organization),
                      can_edit_roles=can_edit_roles)
    if request.method == "POST" and form.is_valid():
        try:
            services.member_update(member=member, actor_member=request.member, team=form.cleaned_data["team"],
                                   roles=form.cleaned_data.get("roles") if can_edit_roles else None,
                                   is_active=form.cleaned_data["is_active"])
        except ValidationError as error:
            apply_service_error(form, error)
        else:
            messages.success(request, f"Saved {member.user.email}.")
            return redirect(org_url(request, "member_list"))
    return render(request, "portal/member_edit.html", {"form": form, "subject": member})


@require_roles("hr")
@require_http_methods(["GET", "POST"])
def team_list(request):
    form = TeamForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        try:
            team = services.team_create(organization=request.organization, actor=request.user, **form.cleaned_data)
        except ValidationError as error:
            apply_service_error(form, error)
        else:
            messages.success(request, f"Team {team.name} created.")
            return redirect(org_url(request, "team_list"))
    return render(request, "portal/team_list.html", {"form": form, "teams": selectors.team_list(organization=request.organization)})


@require_roles("hr")
@require_http_methods(["GET", "POST"])
def team_edit(request, team_id):
    team = selectors.team_get(organization=request.organization, team_id=team_id)
    form = TeamForm(request.POST or None, initial={"name": team.name, "cost_centre": team.cost_centre})
    if request.method == "POST" and form.is_valid():
        try:
            services.team_update(team=team, actor=request.user, **form.cleaned_data)
        except ValidationError as error:
            apply_service_error(form, error)
        else:
            messages.success(request, f"Team {team.name} saved.")
            return redirect(org_url(request, "team_list"))
    return render(request, "portal/team_edit.html", {"form": form, "team": team})


@require_roles("hr")
@require_http_methods(["GET", "POST"])
def invitation_list(request):
    form = InvitationForm(request.POST or None, teams=selectors.team_list(organization=request.organization))
    if request.method == "POST" and form.is_valid():
        try:
            invitation, _token = services.invitation_create(organization=request.organization, actor_member=request.member,
                                                            **form.cleaned_data)
        except ValidationError as error:
            apply_service_error(form, error)
        else:
            messages.success(request, f"Invitation sent to {invitation.email}.")
            return redirect(org_url(request, "invitation_list"))
    invitations = selectors.invitation_list(organization=request.organization)
    return render(request, "portal/invitation_list.html", {"form": form, "invitations": invitations})


@require_roles("hr")
@require_POST
def invitation_revoke(request, invitation_id):
    invitation = selectors.invitation_get(organization=request.organization, invitation_id=invitation_id)
    try:
        services.invitation_revoke(invitation=invitation, actor=request.user)
    except ValidationError as error:
        messages.error(request, " ".join(error.messages))
    else:
        messages.success(request, f"Invitation for {invitation.email} revoked.")
    return redirect(org_url(request, "invitation_list"))


@require_roles("admin")
@require_GET
def audit_log(request):
    form = AuditFilterForm(request.GET or None)
    filters = {}
    if form.is_valid():
        data = form.cleaned_data
        tz = timezone.get_current_timezone()
        filters = {
            "action": data["action"], "actor_email": data["actor"], "object_type": data["object_type"],
            "since": datetime.combine(data["since"], time.min, tzinfo=tz) if data["since"] else None,
            "until": datetime.combine(data["until"] + timedelta(days=1), time.min, tzinfo=tz) if data["until"] else None,
        }
    entries = selectors.audit_log(organization=request.organization, **filters)
    page = Paginator(entries, 50).get_page(request.GET.get("page"))
    return render(request, "portal/audit_log.html", {
        "form": form, "page": page, "actions": selectors.audit_actions(organization=request.organization),
    }, status=form.status)


@require_roles("admin")
@require_http_methods(["GET", "POST"])
def organization_settings(request):
    organization = request.organization
    form = OrganizationForm(request.POST or None, initial={
        "name": organization.name, "time_zone": organization.time_zone, "currency": organization.currency,
        "leaver_allowance": organization.leaver_allowance,
    })
    if request.method == "POST" and form.is_valid():
        try:
            services.organization_update(organization=organization, actor=request.user, **form.cleaned_data)
        except ValidationError as error:
            apply_service_error(form, error)
        else:
            messages.success(request, "Organization settings saved.")
            return redirect(org_url(request, "organization_settings"))
    return render(request, "portal/organization_settings.html", {"form": form})
