"""Recent-password checks for sensitive actions (minting and rotating API keys)."""

from urllib.parse import urlencode

from allauth.account.internal.flows.reauthentication import is_reauthentication_required
from django.contrib import messages
from django.shortcuts import redirect
from django.urls import reverse


def confirm_password_first(request, *, then: str):
    """A redirect to the password prompt that comes back to the page `then`, or None if the login is recent.

    allauth's own decorator would replay the suspended POST by calling the view directly, outside
    the middleware that resolves the organization; coming back to a page instead keeps every
    request on the one path through TenancyMiddleware.
    """
    if not is_reauthentication_required(request, app=""):
        return None
    messages.info(request, "Confirm your password, then submit again.")
    return redirect(f"{reverse('account_reauthenticate')}?{urlencode({'next': then})}")
