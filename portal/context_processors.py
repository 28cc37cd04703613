from portal.selectors import memberships_for_user


def tenancy(request):
    """The active organization and member, and the user's other organizations for the switcher."""
    user = getattr(request, "user", None)
    return {
        "organization": getattr(request, "organization", None),
        "member": getattr(request, "member", None),
        "memberships": (lambda: memberships_for_user(user)) if user is not None else list,
    }
