"""Two-factor authentication (django-allauth's MFA): TOTP secrets and recovery-code seeds are
stored encrypted with MFA_SECRETS_KEY (see portal.crypto)."""

from allauth.mfa.adapter import DefaultMFAAdapter

from portal.crypto import SecretCipher

cipher = SecretCipher(setting="MFA_SECRETS_KEY", purpose="mfa-secrets", what="two-factor secret")


class MFAAdapter(DefaultMFAAdapter):
    def encrypt(self, text: str) -> str:
        return cipher.encrypt(text)

    def decrypt(self, encrypted_text: str) -> str:
        return cipher.decrypt(encrypted_text)
