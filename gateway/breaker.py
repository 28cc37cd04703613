"""The spend-velocity breaker's rates, on the gateway's hot path: the rolling charged (weighted)
tokens per minute and per hour of each key, member and organization, kept in Redis.

When a request is settled, one script call (one round trip) adds its charged tokens to the
current window of each of the six counters and returns their rolling rates. A rate is the
sliding-window estimate `current + previous * (share of the previous window still inside the
rolling one)`: two counters per window, exact while the rate is steady, and never a list of
events. The rates are compared with the organization's limits (gateway.models.BreakerSettings,
cached with its catalog) and the member's own normal hour (SpendNormal, cached with the key's
identity); what exceeds one is tripped by gateway.services.breaker_trip, which pauses the keys in
the database (their cached identities dropped), so the very next request is refused.

Counting after the settlement means the breaker trips on tokens really charged, not on the
worst cases held, so agents that ask for large outputs on every call do not trip it; requests
already in flight when it trips finish. With Redis unavailable (or without REDIS_URL) nothing
is counted and nothing trips: the gateway keeps serving, and keys already paused stay paused
(the pause is in the database).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from portal import shared_cache

WINDOWS = (("minute", 60), ("hour", 3600))
SCOPES = ("key", "member", "organization")
PREFIX = "breaker:"

# KEYS: (current window, previous window) pairs; ARGV[1]: the tokens to add, then per pair the
# current window's time-to-live and the previous window's weight in thousandths.
_COUNT = """
local tokens = tonumber(ARGV[1])
local rates = {}
for i = 1, #KEYS / 2 do
    local current = redis.call('INCRBY', KEYS[2 * i - 1], tokens)
    if current == tokens then
        redis.call('EXPIRE', KEYS[2 * i - 1], ARGV[2 * i])
    end
    local previous = tonumber(redis.call('GET', KEYS[2 * i]) or '0')
    rates[i] = current + math.floor(previous * tonumber(ARGV[2 * i + 1]) / 1000)
end
return rates"""


@dataclass(frozen=True)
class Limits:
    """An organization's breaker limits (None: off), as the gateway caches them."""

    key_per_minute: int | None = None
    key_per_hour: int | None = None
    member_per_minute: int | None = None
    member_per_hour: int | None = None
    organization_per_minute: int | None = None
    organization_per_hour: int | None = None
    member_normal_multiple: int | None = None

    def for_(self, scope: str, window: str, normal_hour: int | None) -> list[tuple[int, str]]:
        """The limits on one rate: (tokens, "absolute" or "relative")."""
        limits = []
        absolute = getattr(self, f"{scope}_per_{window}")
        if absolute is not None:
            limits.append((absolute, "absolute"))
        if scope == "member" and window == "hour" and self.member_normal_multiple and normal_hour:
            limits.append((self.member_normal_multiple * normal_hour, "relative"))
        return limits


@dataclass(frozen=True)
class Exceeded:
    scope: str
    subject_id: int  # the key's, member's or organization's id
    window: str
    rate: int
    limit: int
    limit_kind: str


def _keys(scope: str, subject_id: int, window: str, seconds: int, now: float) -> tuple[str, str]:
    bucket = int(now // seconds)
    return f"{PREFIX}{scope}:{subject_id}:{window}:{bucket}", f"{PREFIX}{scope}:{subject_id}:{window}:{bucket - 1}"


def _counters(subjects: dict[str, int], now: float):
    for scope in SCOPES:
        for window, seconds in WINDOWS:
            yield scope, window, seconds, _keys(scope, subjects[scope], window, seconds, now)


async def record(*, subjects: dict[str, int], limits: Limits, tokens: int, normal_hour: int | None = None,
                 now: float | None = None) -> Exceeded | None:
    """Add a settled request's charged tokens to the rates of its key, member and organization
    (`subjects`: scope -> id); the first limit a rate is now over, or None."""
    now = time.time() if now is None else now
    keys, args, names = [], [tokens], []
    for scope, window, seconds, pair in _counters(subjects, now):
        keys += pair
        args += [2 * seconds, int(1000 * (1 - (now % seconds) / seconds))]
        names.append((scope, window))
    rates = await shared_cache.aeval(_COUNT, keys, args)
    if rates is None:
        return None  # no Redis: nothing counted, nothing trips
    for (scope, window), rate in zip(names, rates):
        for limit, kind in limits.for_(scope, window, normal_hour):
            if rate > limit:
                return Exceeded(scope=scope, subject_id=subjects[scope], window=window, rate=int(rate), limit=limit,
                                limit_kind=kind)
    return None


def forget(*, scope: str, subject_id: int, now: float | None = None) -> None:
    """Drop a subject's rates (on resume: it starts again from nothing, instead of tripping on the
    spending that tripped it)."""
    now = time.time() if now is None else now
    keys = [key for window, seconds in WINDOWS for key in _keys(scope, subject_id, window, seconds, now)]
    shared_cache.eval("for i = 1, #KEYS do redis.call('DEL', KEYS[i]) end return 0", keys, [])
