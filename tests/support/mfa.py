"""TOTP codes as an authenticator app computes them, from the secret (as allauth's own tests do)."""

import time

from allauth.mfa.app_settings import TOTP_PERIOD
from allauth.mfa.totp.internal.auth import format_hotp_value, hotp_value, yield_hotp_counters_from_time


def current_totp_codes(secret: str) -> set[str]:
    """Every code the server accepts right now (the current period and its tolerance window)."""
    return {format_hotp_value(hotp_value(secret, counter)) for counter in yield_hotp_counters_from_time()}


def current_totp_code(secret: str) -> str:
    """The code an authenticator app shows now, waiting out the last seconds of a period
    (the server accepts only the current period) so the code cannot expire before it is posted."""
    remaining = TOTP_PERIOD - time.time() % TOTP_PERIOD
    if remaining < 3:
        time.sleep(remaining + 0.1)
    return format_hotp_value(hotp_value(secret, int(time.time()) // TOTP_PERIOD))


def wrong_totp_code(secret: str) -> str:
    valid = current_totp_codes(secret)
    return next(code for code in (f"{n:06d}" for n in range(1_000_000)) if code not in valid)
