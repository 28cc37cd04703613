"""Provider secrets are stored encrypted (see portal.crypto), never in plain text.

The key comes from settings.PROVIDER_SECRETS_KEY (a Fernet key); without one it is derived from
SECRET_KEY. Changing it makes stored secrets unreadable: re-enter them on the providers page.
"""

from portal.crypto import SecretCipher

_cipher = SecretCipher(setting="PROVIDER_SECRETS_KEY", purpose="provider-secrets", what="provider secret")
encrypt, decrypt = _cipher.encrypt, _cipher.decrypt
