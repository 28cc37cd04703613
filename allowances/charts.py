"""Charts rendered on the server as SVG: no JavaScript library, nothing fetched from a CDN."""

from datetime import date

from django.utils.html import format_html, format_html_join

from allowances.templatetags.tokens import humanize_tokens

WIDTH, HEIGHT, GUTTER = 640, 160, 2


def daily_usage_svg(daily: list[tuple[date, int]]) -> str:
    """A bar per day of the period; each bar's tooltip gives the date and the exact tokens."""
    if not daily:
        return ""
    peak = max(tokens for _day, tokens in daily) or 1
    bar = WIDTH / len(daily)
    bars = format_html_join("", (
        '<rect x="{}" y="{}" width="{}" height="{}" class="bar" data-day="{}" data-tokens="{}">'
        "<title>{}: {} tokens</title></rect>"
    ), (
        (f"{index * bar + GUTTER / 2:.1f}", f"{HEIGHT - tokens / peak * (HEIGHT - 20):.1f}", f"{max(bar - GUTTER, 1):.1f}",
         f"{tokens / peak * (HEIGHT - 20):.1f}", day.isoformat(), tokens, day.strftime("%b %d"), f"{tokens:,}")
        for index, (day, tokens) in enumerate(daily)
    ))
    return format_html(
        '<svg class="chart" viewBox="0 0 {} {}" role="img" aria-label="Tokens used per day this period, peak {}">'
        '<line x1="0" y1="{}" x2="{}" y2="{}" class="axis"/>{}'
        '<text x="0" y="12" class="label">peak {} / day</text></svg>',
        WIDTH, HEIGHT, humanize_tokens(peak), HEIGHT, WIDTH, HEIGHT, bars, humanize_tokens(peak),
    )
