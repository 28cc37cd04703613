"""The transfers card of the member's dashboard, self-contained: what they gave and received this period."""

from django import template

from allowances import selectors

register = template.Library()


@register.inclusion_tag("allowances/_transfers.html")
def transfers_entry(board):
    mine = selectors.transfers_of(member=board.account.member, period=board.account.period_start)
    return {"mine": mine, "period": board.account.period_start}


@register.inclusion_tag("allowances/_team_pool.html")
def team_pool_entry(board):
    """The member's team pool, when there is one to show (pools on, or a pool left from before)."""
    pool = selectors.team_pool(member=board.account.member)
    return {"pool": pool if pool and (pool["enabled"] or pool["account"]) else None}
