"""API key pages: members mint and manage their own keys; admins see and revoke every key."""

from django.contrib import messages
from django.core.exceptions import ValidationError
from django.shortcuts import redirect, render
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET, require_POST

from allowances.selectors import catalog
from apikeys import selectors, services
from apikeys.forms import ApiKeyForm, RotateForm
from gateway.services import api_key_breaker_exempt_set, breaker_resume
from portal.forms import apply_service_error
from portal.links import public_base
from portal.reauth import confirm_password_first, kept_form
from portal.tenancy import require_roles
from portal.views import org_url


def _form(request, data=None, initial=None):
    return ApiKeyForm(data, catalog=catalog(organization=request.organization, active_only=True).order_by("display_name"),
                      member=request.member, initial=initial or {})


def _show_secret_once(request, key, secret, status=201):
    """The only response that ever carries the secret: not cached, not stored, not logged."""
    return render(request, "apikeys/created.html", {"key": key, "secret": secret, "base_url": public_base()},
                  status=status)


@require_GET
def key_list(request):
    typed = kept_form(request, then=org_url(request, "key_list"), form_class=ApiKeyForm)  # before the password check
    return render(request, "apikeys/key_list.html", {
        "form": _form(request, initial=typed), "keys": selectors.keys_of(member=request.member),
        "rotate_form": RotateForm(), "base_url": public_base(),
    })


@never_cache
@require_POST
def key_create(request):
    if prompt := confirm_password_first(request, then=org_url(request, "key_list"), keep=True):
        return prompt
    form = _form(request, request.POST)
    if form.is_valid():
        try:
            key, secret = services.api_key_create(member=request.member, actor=request.user, **form.cleaned_data)
        except ValidationError as error:
            apply_service_error(form, error)
        else:
            return _show_secret_once(request, key, secret)
    return render(request, "apikeys/key_list.html", {
        "form": form, "keys": selectors.keys_of(member=request.member), "rotate_form": RotateForm(),
        "base_url": public_base(),
    }, status=400)


@never_cache
@require_POST
def key_rotate(request, api_key_id):
    # Find the key first: someone else's key answers 404 before any password prompt.
    key = selectors.key_get(organization=request.organization, api_key_id=api_key_id, member=request.member)
    if prompt := confirm_password_first(request, then=org_url(request, "key_list"), keep=True):
        return prompt
    form = RotateForm(request.POST)
    if form.is_valid():
        try:
            new_key, secret = services.api_key_rotate(key=key, actor=request.user, grace_hours=form.cleaned_data["grace_hours"])
        except ValidationError as error:
            messages.error(request, " ".join(error.messages))
        else:
            return _show_secret_once(request, new_key, secret)
    else:
        messages.error(request, "The grace period is a whole number of hours from 0 to 24.")
    return redirect(org_url(request, "key_list"))


@require_POST
def key_revoke(request, api_key_id):
    # Members revoke their own keys; admins any key of the organization.
    owner = None if request.member.has_any_role(["admin"]) else request.member
    key = selectors.key_get(organization=request.organization, api_key_id=api_key_id, member=owner)
    try:
        services.api_key_revoke(key=key, actor=request.user)
    except ValidationError as error:
        messages.error(request, " ".join(error.messages))
    else:
        messages.success(request, f"Key {key.name} revoked; it is refused from the next request on.")
    back_to_all = owner is None and request.POST.get("next") == "all"
    return redirect(org_url(request, "key_admin" if back_to_all else "key_list"))


@require_roles("admin")
@require_GET
def key_admin(request):
    return render(request, "apikeys/key_admin.html", {"keys": selectors.keys_of_organization(organization=request.organization)})


@never_cache
@require_POST
def key_resume(request, api_key_id):
    """Resume a key a spend-velocity breaker paused: its owner, after a password check, when the
    key's own breaker tripped; an administrator whatever tripped (every key the trip paused)."""
    is_admin = request.member.has_any_role(["admin"])
    key = selectors.key_get(organization=request.organization, api_key_id=api_key_id,
                            member=None if is_admin else request.member)
    back = org_url(request, "key_admin" if is_admin and request.POST.get("next") == "all" else "key_list")
    trip = key.paused_by
    if key.paused_at is None or trip is None:
        messages.error(request, f"Key {key.name} is not paused.")
        return redirect(back)
    if not is_admin and trip.scope != trip.Scope.KEY:
        messages.error(request, f"Key {key.name} was paused with every key of the {trip.get_scope_display().lower()}; "
                                "an administrator resumes it.")
        return redirect(back)
    if not is_admin and (prompt := confirm_password_first(request, then=org_url(request, "key_list"))):
        return prompt
    try:
        resumed = breaker_resume(trip=trip, actor=request.user)
    except ValidationError as error:
        messages.error(request, " ".join(error.messages))
    else:
        messages.success(request, f"Resumed: {resumed} key{'s' if resumed != 1 else ''} work again from the next request.")
    return redirect(back)


@require_roles("admin")
@require_POST
def key_breaker_exempt(request, api_key_id):
    key = selectors.key_get(organization=request.organization, api_key_id=api_key_id, member=None)
    key = api_key_breaker_exempt_set(key=key, actor=request.user, exempt=request.POST.get("exempt") == "1")
    messages.success(request, f"Key {key.name} is {'now exempt from' if key.breaker_exempt else 'no longer exempt from'} "
                              "the organization-wide breaker.")
    return redirect(org_url(request, "key_admin"))
