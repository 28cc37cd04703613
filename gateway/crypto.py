"""Provider secrets are stored encrypted (Fernet: AES-128-CBC with an HMAC), never in plain text.

The key comes from settings.PROVIDER_SECRETS_KEY (a Fernet key); without one it is derived from
SECRET_KEY, so a development database is still encrypted. Changing it makes stored secrets
unreadable: re-enter them on the providers page.
"""

import base64
import hashlib
from functools import cache

from cryptography.fernet import Fernet, InvalidToken
from django.conf import settings


@cache
def _fernet() -> Fernet:
    key = settings.PROVIDER_SECRETS_KEY
    if not key:
        key = base64.urlsafe_b64encode(hashlib.sha256(b"provider-secrets:" + settings.SECRET_KEY.encode()).digest())
    return Fernet(key)


def encrypt(secret: str) -> str:
    return _fernet().encrypt(secret.encode()).decode() if secret else ""


def decrypt(ciphertext: str) -> str:
    if not ciphertext:
        return ""
    try:
        return _fernet().decrypt(ciphertext.encode()).decode()
    except InvalidToken:
        raise ValueError("the provider secret cannot be decrypted with this PROVIDER_SECRETS_KEY") from None
