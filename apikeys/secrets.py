"""The key format, checked without the database.

    tap_<public id: 12>_<secret: 32><checksum: 6>      e.g. tap_3f9KqL0aZx2B_...

`tap_` lets secret scanners recognise a leaked key; the public id finds the key's row; only a
keyed hash (HMAC-SHA256) of the high-entropy secret is stored; the CRC32 checksum refuses a
mistyped or truncated key before any database look-up.
"""

import hashlib
import hmac
import secrets as random
import string
import zlib
from dataclasses import dataclass

from django.conf import settings

PREFIX = "tap_"
ALPHABET = string.ascii_letters + string.digits
_CHARACTERS = frozenset(ALPHABET)
PUBLIC_ID_LENGTH, SECRET_LENGTH, CHECKSUM_LENGTH = 12, 32, 6
KEY_LENGTH = len(PREFIX) + PUBLIC_ID_LENGTH + 1 + SECRET_LENGTH + CHECKSUM_LENGTH


class MalformedKey(ValueError):
    pass


@dataclass(frozen=True)
class ParsedKey:
    public_id: str
    secret: str


def _base62(number: int, length: int) -> str:
    chars = []
    for _ in range(length):
        number, digit = divmod(number, len(ALPHABET))
        chars.append(ALPHABET[digit])
    return "".join(reversed(chars))


def _checksum(body: str) -> str:
    return _base62(zlib.crc32(body.encode()), CHECKSUM_LENGTH)


def _random(length: int) -> str:
    return "".join(random.choice(ALPHABET) for _ in range(length))


def new_key() -> tuple[str, ParsedKey]:
    """A fresh key as shown to its owner once, and its parts."""
    public_id, secret = _random(PUBLIC_ID_LENGTH), _random(SECRET_LENGTH)
    body = f"{PREFIX}{public_id}_{secret}"
    return body + _checksum(body), ParsedKey(public_id, secret)


def parse(key: str) -> ParsedKey:
    """Split a presented key, or say precisely what is wrong with it (no database involved)."""
    if not key.startswith(PREFIX):
        raise MalformedKey(f"API keys start with {PREFIX!r}")
    if len(key) != KEY_LENGTH:
        raise MalformedKey(f"an API key is {KEY_LENGTH} characters; this one has {len(key)} (truncated or padded?)")
    body, checksum = key[:-CHECKSUM_LENGTH], key[-CHECKSUM_LENGTH:]
    public_id, separator, secret = body[len(PREFIX):].partition("_")
    if separator != "_" or len(public_id) != PUBLIC_ID_LENGTH or not _CHARACTERS.issuperset(
            public_id + secret + checksum):
        raise MalformedKey("an API key is letters and digits in the form tap_<12>_<38>; this one is not")
    if not hmac.compare_digest(checksum, _checksum(body)):
        raise MalformedKey("the API key's checksum does not match (mistyped or altered)")
    return ParsedKey(public_id, secret)


def hash_secret(secret: str) -> str:
    """The keyed hash stored for a secret: fast, and useless without the server's key."""
    pepper = (settings.API_KEY_HASH_KEY or settings.SECRET_KEY).encode()
    return hmac.new(pepper, secret.encode(), hashlib.sha256).hexdigest()


def secret_matches(secret: str, stored_hash: str) -> bool:
    return hmac.compare_digest(hash_secret(secret), stored_hash)
