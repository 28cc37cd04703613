"""The overage parts of other apps' pages, each self-contained: the dashboard's "Request more
tokens" entry (prominent when the balance is low or used up) and the approvals count in the menu."""

from django import template

from overage import selectors

register = template.Library()


@register.inclusion_tag("overage/_dashboard_entry.html", takes_context=True)
def overage_entry(context, board):
    return {"status": selectors.overage_status(account=board.account), "request": context["request"], "board": board,
            "csrf_token": context.get("csrf_token")}


@register.simple_tag(takes_context=True)
def pending_approvals(context) -> int:
    member = getattr(context["request"], "member", None)
    return selectors.approval_queue(member=member).count() if member is not None else 0
