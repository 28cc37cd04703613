"""The budget-aware routing line of the member's dashboard, self-contained: how many of the open
period's requests were served by economy models, and since when."""

from django import template

from gateway import selectors

register = template.Library()


@register.inclusion_tag("gateway/_routed_to_economy.html")
def routed_to_economy(board):
    return {"routed": selectors.routed_to_economy(account=board.account)}
