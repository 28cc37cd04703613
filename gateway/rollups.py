"""Daily usage roll-ups by member and model (with the member's team), from the usage records.

A day is a calendar day in the organization's time zone. Rolling a day up again recomputes it
from the records, so the hourly job can keep today and yesterday fresh and a rerun is harmless.
Besides the sums, a roll-up counts how the requests ended, the retries, and the successful
requests small enough for the economy model (the organization's thresholds): what the insights
(reports/) read instead of every record. One statement per day.
"""

from __future__ import annotations

from datetime import date, datetime, time, timedelta
from zoneinfo import ZoneInfo

from django.db import connection, transaction
from django.utils import timezone

from gateway.models import SUMMED, UsageRecord, UsageRollup, UsageTeamRollup
from portal.models import Member, Organization, Team
from portal.tenancy import scope, unscoped

Status = UsageRecord.Status
# Which statuses count as which outcome of a request.
OUTCOMES = {
    "ok": (Status.OK,),
    "refused": (Status.REFUSED,),
    "error": (Status.UPSTREAM_ERROR, Status.TIMEOUT, Status.CLIENT_DISCONNECT),
    "no_usage": (Status.NO_USAGE_REPORTED,),
}
FAILED = OUTCOMES["refused"] + OUTCOMES["error"] + OUTCOMES["no_usage"]
# A request is a retry when the same member sent the same model a request that failed at most this
# long before it (also across midnight: the records of the window before the day are read).
RETRY_WINDOW = timedelta(seconds=60)


def _statuses(outcome: str) -> str:
    return ", ".join(f"'{status}'" for status in OUTCOMES[outcome])


_SMALL = "r.status = 'ok' AND r.input_tokens + r.cached_tokens <= %(small_prompt)s AND r.output_tokens <= %(small_reply)s"
_ROLLUP_SQL = f"""
WITH r AS (
    SELECT u.member_id, u.model, u.status, u.input_tokens, u.output_tokens, u.cached_tokens, u.charged_tokens,
           u.cost, u.occurred_at,
           LAG(u.status) OVER w AS previous_status, LAG(u.occurred_at) OVER w AS previous_at
    FROM {UsageRecord._meta.db_table} u
    WHERE u.organization_id = %(org)s AND u.occurred_at >= %(lookback)s AND u.occurred_at < %(end)s
    WINDOW w AS (PARTITION BY u.member_id, u.model ORDER BY u.occurred_at, u.id)
)
INSERT INTO {UsageRollup._meta.db_table} (
    organization_id, day, member_id, team_name, model, requests, input_tokens, output_tokens, cached_tokens,
    charged_tokens, cost, ok_requests, ok_cost, refused_requests, error_requests, no_usage_requests,
    retried_requests, small_requests, small_input_tokens, small_output_tokens, small_cached_tokens, small_cost)
SELECT %(org)s, %(day)s, r.member_id, COALESCE(t.name, ''), r.model, COUNT(*), SUM(r.input_tokens),
       SUM(r.output_tokens), SUM(r.cached_tokens), SUM(r.charged_tokens), SUM(r.cost),
       COUNT(*) FILTER (WHERE r.status IN ({_statuses("ok")})),
       COALESCE(SUM(r.cost) FILTER (WHERE r.status IN ({_statuses("ok")})), 0),
       COUNT(*) FILTER (WHERE r.status IN ({_statuses("refused")})),
       COUNT(*) FILTER (WHERE r.status IN ({_statuses("error")})),
       COUNT(*) FILTER (WHERE r.status IN ({_statuses("no_usage")})),
       COUNT(*) FILTER (WHERE r.previous_status IN ({", ".join(f"'{s}'" for s in FAILED)})
                        AND r.occurred_at - r.previous_at <= %(retry_window)s),
       COUNT(*) FILTER (WHERE {_SMALL}),
       COALESCE(SUM(r.input_tokens) FILTER (WHERE {_SMALL}), 0),
       COALESCE(SUM(r.output_tokens) FILTER (WHERE {_SMALL}), 0),
       COALESCE(SUM(r.cached_tokens) FILTER (WHERE {_SMALL}), 0),
       COALESCE(SUM(r.cost) FILTER (WHERE {_SMALL}), 0)
FROM r
JOIN {Member._meta.db_table} m ON m.id = r.member_id
LEFT JOIN {Team._meta.db_table} t ON t.id = m.team_id
WHERE r.occurred_at >= %(begin)s
GROUP BY r.member_id, t.name, r.model
"""
_TEAM_SQL = f"""
INSERT INTO {UsageTeamRollup._meta.db_table} (organization_id, day, team_name, model, {", ".join(SUMMED)})
SELECT organization_id, day, team_name, model, {", ".join(f"SUM({name})" for name in SUMMED)}
FROM {UsageRollup._meta.db_table} WHERE organization_id = %(org)s AND day = %(day)s
GROUP BY organization_id, day, team_name, model
"""


def rollup_day(*, organization: Organization, day: date) -> int:
    """Recompute one day of one organization; returns the number of roll-up rows."""
    from reports.selectors import report_settings

    zone = ZoneInfo(organization.time_zone)
    begin = datetime.combine(day, time.min, tzinfo=zone)
    end = datetime.combine(day + timedelta(days=1), time.min, tzinfo=zone)
    with scope(organization), transaction.atomic():
        thresholds = report_settings(organization=organization)
        UsageRollup.objects.filter(organization=organization, day=day).delete()
        UsageTeamRollup.objects.filter(organization=organization, day=day).delete()
        with connection.cursor() as cursor:
            cursor.execute(_ROLLUP_SQL, {
                "org": organization.pk, "day": day, "begin": begin, "end": end, "lookback": begin - RETRY_WINDOW,
                "retry_window": RETRY_WINDOW, "small_prompt": thresholds.small_prompt_tokens,
                "small_reply": thresholds.small_reply_tokens})
            rows = cursor.rowcount
            cursor.execute(_TEAM_SQL, {"org": organization.pk, "day": day})
        return rows


def rollup_recent(*, at: datetime | None = None, days: int = 2) -> int:
    """Yesterday and today (so far) in every organization's zone (or the last `days` days)."""
    at = at or timezone.now()
    rows = 0
    with unscoped():
        organizations = list(Organization.objects.order_by("pk"))
    for organization in organizations:
        rows += rollup_days(organization=organization, at=at, days=days)
    return rows


def rollup_days(*, organization: Organization, at: datetime | None = None, days: int = 2) -> int:
    """The last `days` days of one organization, today included."""
    today = (at or timezone.now()).astimezone(ZoneInfo(organization.time_zone)).date()
    return sum(rollup_day(organization=organization, day=today - timedelta(days=back)) for back in range(days))
