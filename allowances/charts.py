"""The dashboards' charts, drawn on the server as SVG by pygal: axes, dates and a tooltip per bar
(the SVG's own <title>, so they work without JavaScript); nothing is fetched from a CDN. Each chart
is an image with a text label; the pages put a table of the same numbers beside it."""

from __future__ import annotations

from datetime import date

import pygal
from django.utils.safestring import SafeString, mark_safe
from lxml import etree
from pygal.style import Style

from allowances.templatetags.tokens import humanize_tokens

FONT = 'system-ui, -apple-system, "Segoe UI", sans-serif'
ACCENT, PROJECTED, DANGER = "#2856c7", "#b9c8ef", "#b42318"
PALETTE = (ACCENT, "#1d7a46", "#c2410c", "#7c3aed", "#0e7490", "#a16207", "#be185d", "#4b5563")

def _style(colors=PALETTE) -> Style:
    return Style(
    background="transparent", plot_background="#ffffff", foreground="#1d2330", foreground_strong="#1d2330",
    foreground_subtle="#5b6475", colors=colors, font_family=FONT, label_font_family=FONT,
    major_label_font_family=FONT, title_font_family=FONT, legend_font_family=FONT, value_font_family=FONT,
    tooltip_font_family=FONT, no_data_font_family=FONT, label_font_size=12, major_label_font_size=12,
    legend_font_size=12, title_font_size=13, no_data_font_size=16, opacity=".9", opacity_hover="1",
    guide_stroke_color="#dfe3ea", major_guide_stroke_color="#c4cad4",
    )


def _config(**options) -> dict:
    return {"style": _style(), "js": [], "disable_xml_declaration": True, "explicit_size": False,
            "value_formatter": humanize_tokens, "legend_at_bottom": True, "margin": 12, "spacing": 8,
            "truncate_label": -1, "truncate_legend": -1, **options}


def _svg(chart, *, label: str, marks: dict[str, str] | None = None) -> SafeString:
    """The chart's SVG with its script removed, its label as title, a native tooltip per bar from
    the bar's label, and the x guides named in `marks` ({x label: text}) drawn as markers."""
    tree = chart.render_tree()
    for script in list(tree.iter("script")):
        script.getparent().remove(script)
    tree.set("role", "img")
    tree.set("aria-label", label)
    tree.find("title").text = label
    for described in tree.iter("desc"):
        if described.get("class") == "label":  # pygal's tooltip text, read by its JavaScript: a <title> instead
            etree.SubElement(described.getparent(), "title").text = described.text
    for guide in list(tree.iterfind(".//g[@class='axis x']/g[@class='guides']")):
        text = guide.find("text")
        if text is not None and text.text in (marks or {}):
            guide.set("class", "guides marked")
            plot = guide.getparent().getparent()
            plot.append(guide)  # over the bars, not under them (out of the axis: its text styled here)
            text.set("style", "font-size:12px;text-anchor:middle")
            line = guide.find("path")
            line.set("style", f"stroke:{DANGER};stroke-width:2;stroke-dasharray:none")
            mark = etree.SubElement(guide, "text", x=text.get("x"), y="-2")
            mark.set("style", f"fill:{DANGER};font-size:12px;font-weight:600;text-anchor:middle")
            mark.set("class", "mark")
            mark.text = marks[text.text]
    return mark_safe(etree.tostring(tree, encoding="unicode"))


def day_label(day: date) -> str:
    return f"{day:%b} {day.day}"


def daily_usage_chart(daily: list[tuple[date, int]], *, today: date, burn_per_day: int = 0,
                      run_out_on: date | None = None) -> SafeString:
    """A bar per day of the period (used so far), the days ahead at the current pace as lighter
    bars up to the projected run-out date, which is marked on the date axis."""
    if not daily:
        return mark_safe("")
    days = [day for day, _tokens in daily]
    marked = {today: "today"} if days[0] <= today <= days[-1] else {}
    if run_out_on is not None and days[0] <= run_out_on <= days[-1]:
        marked[run_out_on] = "runs out"  # the same day as today: running out wins
    marks = {day_label(day): text for day, text in marked.items()}
    weekly = {day_label(day) for index, day in enumerate(days)
              if index % 7 == 0 and all(abs((day - other).days) > 2 for other in marked)}
    chart = pygal.StackedBar(**_config(
        style=_style((ACCENT, PROJECTED)),
        height=260, show_legend=bool(burn_per_day), x_title="Day of the period", y_title="Tokens",
        x_labels_major=sorted(weekly | set(marks)), show_minor_x_labels=False, x_label_rotation=0))
    chart.x_labels = [day_label(day) for day in days]
    chart.add("Used", [{"value": tokens, "label": f"{day:%a %b} {day.day}: {tokens:,} tokens used"}
                       if day <= today else None for day, tokens in daily])
    if burn_per_day:
        last = run_out_on or days[-1]
        chart.add("At this pace", [
            {"value": burn_per_day, "label": f"{day:%a %b} {day.day}: about {burn_per_day:,} tokens at this pace"}
            if today < day <= last else None for day in days])
    peak = max(tokens for _day, tokens in daily)
    summary = f"Tokens used per day from {day_label(days[0])} to {day_label(days[-1])}, peak {peak:,} a day"
    if run_out_on is not None:
        summary += f"; at this pace the allowance runs out on {day_label(run_out_on)}"
    return _svg(chart, label=summary, marks=marks)


def breakdown_chart(rows: list[tuple[str, int]], *, what: str) -> SafeString:
    """Horizontal bars, one per row (a model, a team), largest first."""
    if not rows:
        return mark_safe("")
    chart = pygal.HorizontalBar(**_config(height=max(120, 44 * len(rows) + 60), show_legend=False,
                                          x_title="Tokens", print_labels=False))
    chart.x_labels = [name for name, _tokens in reversed(rows)]
    chart.add("Tokens", [{"value": tokens, "label": f"{name}: {tokens:,} tokens"} for name, tokens in reversed(rows)])
    return _svg(chart, label=f"Tokens by {what}: " + ", ".join(f"{name} {tokens:,}" for name, tokens in rows))


def spend_over_time_chart(days: list[date], series: dict[str, list[int]], *, what: str) -> SafeString:
    """Tokens per day, a stacked bar per day with a colour per team (or model)."""
    if not days:
        return mark_safe("")
    weekly = [day_label(day) for index, day in enumerate(days) if index % 7 == 0 and (days[-1] - day).days > 2]
    chart = pygal.StackedBar(**_config(height=280, show_legend=True, x_title="Day", y_title="Tokens",
                                       x_labels_major=weekly + [day_label(days[-1])], show_minor_x_labels=False))
    chart.x_labels = [day_label(day) for day in days]
    for name, values in series.items():
        chart.add(name, [{"value": tokens, "label": f"{day_label(day)} · {name}: {tokens:,} tokens"} if tokens else None
                         for day, tokens in zip(days, values, strict=True)])
    total = sum(sum(values) for values in series.values())
    return _svg(chart, label=f"Tokens used per day by {what} from {day_label(days[0])} to {day_label(days[-1])}, "
                             f"{total:,} in all")
