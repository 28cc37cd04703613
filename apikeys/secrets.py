"""The key format, checked without the database.

    tap_<public id: 12>_<secret: 32><checksum: 6>      e.g. tap_3f9KqL0aZx2B_...

`tap_` lets secret scanners recognise a leaked key; the public id finds the key's row; only a
keyed hash (HMAC-SHA256) of the high-entropy secret is stored; the CRC32 checksum refuses a
mistyped or truncated key before any database look-up.

Other secrets the portal issues and only ever checks (an organization's SCIM tokens) have the same
form under a prefix of their own: `SecretFormat` is the one definition, `API_KEY` the API keys'.
"""

import hashlib
import hmac
import secrets as random
import string
import zlib
from dataclasses import dataclass

from django.conf import settings

ALPHABET = string.ascii_letters + string.digits
_CHARACTERS = frozenset(ALPHABET)
PUBLIC_ID_LENGTH, SECRET_LENGTH, CHECKSUM_LENGTH = 12, 32, 6


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


@dataclass(frozen=True)
class SecretFormat:
    """`<prefix><public id>_<secret><checksum>`; `what` names the secret in refusals."""

    prefix: str
    what: str

    @property
    def length(self) -> int:
        return len(self.prefix) + PUBLIC_ID_LENGTH + 1 + SECRET_LENGTH + CHECKSUM_LENGTH

    def new(self) -> tuple[str, ParsedKey]:
        """A fresh secret as shown to its owner once, and its parts."""
        public_id, secret = _random(PUBLIC_ID_LENGTH), _random(SECRET_LENGTH)
        body = f"{self.prefix}{public_id}_{secret}"
        return body + _checksum(body), ParsedKey(public_id, secret)

    def parse(self, key: str) -> ParsedKey:
        """Split a presented secret, or say precisely what is wrong with it (no database involved)."""
        what = self.what
        a = "an" if what[0].lower() in "aeiou" else "a"
        if not key.startswith(self.prefix):
            raise MalformedKey(f"{what}s start with {self.prefix!r}")
        if len(key) != self.length:
            raise MalformedKey(f"{a} {what} is {self.length} characters; this one has {len(key)} (truncated or padded?)")
        body, checksum = key[:-CHECKSUM_LENGTH], key[-CHECKSUM_LENGTH:]
        public_id, separator, secret = body[len(self.prefix):].partition("_")
        if separator != "_" or len(public_id) != PUBLIC_ID_LENGTH or not _CHARACTERS.issuperset(
                public_id + secret + checksum):
            raise MalformedKey(f"{a} {what} is letters and digits in the form {self.prefix}<12>_<38>; this one is not")
        if not hmac.compare_digest(checksum, _checksum(body)):
            raise MalformedKey(f"the {what}'s checksum does not match (mistyped or altered)")
        return ParsedKey(public_id, secret)


API_KEY = SecretFormat(prefix="tap_", what="API key")
PREFIX, KEY_LENGTH = API_KEY.prefix, API_KEY.length
new_key, parse = API_KEY.new, API_KEY.parse


def hash_secret(secret: str) -> str:
    """The keyed hash stored for a secret: fast, and useless without the server's key."""
    pepper = (settings.API_KEY_HASH_KEY or settings.SECRET_KEY).encode()
    return hmac.new(pepper, secret.encode(), hashlib.sha256).hexdigest()


def secret_matches(secret: str, stored_hash: str) -> bool:
    return hmac.compare_digest(hash_secret(secret), stored_hash)
