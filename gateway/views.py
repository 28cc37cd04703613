"""Pages: the organization's provider connections and spend-velocity breaker (admins) and usage records
(everyone, their own)."""

from django.contrib import messages
from django.core.exceptions import ValidationError
from django.core.paginator import Paginator
from django.shortcuts import redirect, render
from django.views.decorators.http import require_GET, require_http_methods, require_POST

from gateway import selectors, services
from gateway.forms import BreakerSettingsForm, ProviderConnectionEditForm, ProviderConnectionForm
from gateway.services import CONNECTION_FIELDS
from portal.forms import apply_service_error
from portal.tenancy import require_roles
from portal.views import org_url


@require_roles("admin")
@require_http_methods(["GET", "POST"])
def provider_list(request):
    form = ProviderConnectionForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        try:
            connection = services.provider_connection_create(organization=request.organization, actor=request.user,
                                                             **form.cleaned_data)
        except ValidationError as error:
            apply_service_error(form, error)
        else:
            messages.success(request, f"Provider connection “{connection.name}” added.")
            return redirect(org_url(request, "provider_list"))
    return render(request, "gateway/providers.html", {
        "form": form, "connections": selectors.connections_of(organization=request.organization).prefetch_related("models"),
    })


@require_roles("admin")
@require_http_methods(["GET", "POST"])
def provider_edit(request, provider_connection_id):
    connection = selectors.connection_get(organization=request.organization,
                                          connection_id=provider_connection_id)
    form = ProviderConnectionEditForm(request.POST or None,
                                      initial={field: getattr(connection, field) for field in CONNECTION_FIELDS})
    if request.method == "POST" and form.is_valid():
        data = dict(form.cleaned_data)
        clear, secret = data.pop("clear_secret"), data.pop("secret")
        try:
            services.provider_connection_update(connection=connection, actor=request.user,
                                                secret="" if clear else (secret or None), **data)
        except ValidationError as error:
            apply_service_error(form, error)
        else:
            messages.success(request, f"“{connection.name}” saved.")
            return redirect(org_url(request, "provider_list"))
    return render(request, "gateway/provider_edit.html", {"form": form, "connection": connection})


@require_GET
def usage_list(request):
    """Request by request: what the gateway and the ingest API recorded. HR and admins see everyone's."""
    sees_everyone = request.member.has_any_role(("hr",))
    records = selectors.usage_records(organization=request.organization,
                                      member=None if sees_everyone else request.member)
    query = request.GET.get("q", "").replace("\x00", "").strip()
    if sees_everyone and query:
        records = records.filter(member__user__email__icontains=query)
    page = Paginator(records, 50).get_page(request.GET.get("page"))
    summary = selectors.usage_summary(organization=request.organization) if sees_everyone else []
    faults = selectors.uncharged_usage(organization=request.organization) if sees_everyone else None
    return render(request, "gateway/usage.html", {"page": page, "sees_everyone": sees_everyone, "query": query,
                                                  "currency": request.organization.currency, "summary": summary,
                                                  "faults": faults})


@require_roles("admin")
@require_http_methods(["GET", "POST"])
def breaker_settings(request):
    """The spend-velocity breaker: its limits, and the trips with their paused keys to resume."""
    current = services.breaker_settings_get(organization=request.organization)
    form = BreakerSettingsForm(request.POST if request.method == "POST" else None,
                               initial={field: getattr(current, field) for field in services.BREAKER_FIELDS})
    if request.method == "POST" and form.is_valid():
        try:
            services.breaker_settings_save(organization=request.organization, actor=request.user, **form.cleaned_data)
        except ValidationError as error:
            apply_service_error(form, error)
        else:
            messages.success(request, "Breaker limits saved; they apply from the next request.")
            return redirect(org_url(request, "breaker_settings"))
    trips = Paginator(services.breaker_trips(organization=request.organization).prefetch_related("paused_keys"),
                      25).get_page(request.GET.get("page"))
    return render(request, "gateway/breaker.html", {"form": form, "trips": trips},
                  status=400 if form.errors else 200)


@require_roles("admin")
@require_POST
def breaker_trip_resume(request, breaker_trip_id):
    trip = selectors.breaker_trip_get(organization=request.organization, breaker_trip_id=breaker_trip_id)
    try:
        resumed = services.breaker_resume(trip=trip, actor=request.user)
    except ValidationError as error:
        messages.error(request, " ".join(error.messages))
    else:
        messages.success(request, f"Resumed: {resumed} key{'s' if resumed != 1 else ''} work again.")
    return redirect(org_url(request, "breaker_settings"))
