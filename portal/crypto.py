"""Secrets the portal must read back (provider secrets, TOTP secrets) are stored encrypted with
Fernet (AES-128-CBC with an HMAC), never in plain text.

Each kind of secret has its own key setting (a Fernet key); without one the key is derived from
SECRET_KEY and the kind's name, so a development database is still encrypted and the kinds never
share a key. Changing a key makes the secrets stored under it unreadable.
"""

import base64
import binascii
import hashlib
from functools import cached_property

from cryptography.fernet import Fernet, InvalidToken
from django.conf import settings

_FERNET_VERSION = 0x80


class SecretCipher:
    def __init__(self, *, setting: str, purpose: str, what: str):
        self.setting, self.purpose, self.what = setting, purpose, what

    @cached_property
    def _fernet(self) -> Fernet:
        key = getattr(settings, self.setting)
        if not key:
            key = base64.urlsafe_b64encode(hashlib.sha256(f"{self.purpose}:{settings.SECRET_KEY}".encode()).digest())
        return Fernet(key)

    def encrypt(self, secret: str) -> str:
        return self._fernet.encrypt(secret.encode()).decode() if secret else ""

    def decrypt(self, ciphertext: str) -> str:
        if not ciphertext:
            return ""
        try:
            return self._fernet.decrypt(ciphertext.encode()).decode()
        except InvalidToken:
            raise ValueError(f"the {self.what} cannot be decrypted with this {self.setting}") from None

    @staticmethod
    def looks_encrypted(text: str) -> bool:
        """Whether `text` has the form of a Fernet token (whatever its key). Base32 TOTP secrets, hex
        seeds and digit codes never do: a token's base64 starts with the version byte, `g`."""
        try:
            raw = base64.urlsafe_b64decode(text.encode())
        except (binascii.Error, ValueError):
            return False
        # version (1 byte), timestamp (8), IV (16), AES blocks (16 each, at least one), HMAC (32)
        return raw[:1] == bytes([_FERNET_VERSION]) and len(raw) >= 73 and (len(raw) - 57) % 16 == 0
