"""Recent-password checks for sensitive actions (minting and rotating API keys)."""

from urllib.parse import urlencode

from allauth.account.internal.flows.reauthentication import is_reauthentication_required
from django.contrib import messages
from django.forms import MultipleChoiceField
from django.shortcuts import redirect
from django.urls import reverse


KEPT_FORM = "portal_reauth_kept_form"


def confirm_password_first(request, *, then: str, keep: bool = False):
    """A redirect to the password prompt that comes back to the page `then`, or None if the login is recent.

    allauth's own decorator would replay the suspended POST by calling the view directly, outside
    the middleware that resolves the organization; coming back to a page instead keeps every
    request on the one path through TenancyMiddleware. With `keep`, what the member typed is kept
    in the session for that page to show again (`kept_form`), so they only submit it again.
    """
    if not is_reauthentication_required(request, app=""):
        return None
    if keep:
        request.session[KEPT_FORM] = {"then": then, "data": {
            name: request.POST.getlist(name) for name in request.POST if name != "csrfmiddlewaretoken"}}
    messages.info(request, "Confirm your password, then submit again.")
    return redirect(f"{reverse('account_reauthenticate')}?{urlencode({'next': then})}")


def kept_form(request, *, then: str, form_class) -> dict:
    """The initial values of `form_class` kept by confirm_password_first for the page `then` (once)."""
    kept = request.session.get(KEPT_FORM)
    if not kept or kept.get("then") != then:
        return {}
    del request.session[KEPT_FORM]
    fields = form_class.base_fields
    return {name: values if isinstance(fields[name], MultipleChoiceField) else values[-1]
            for name, values in kept["data"].items() if name in fields and values}
