"""A request that reads a key while its revocation is still uncommitted must not keep it alive."""

import threading

import pytest
from django.db import connection, transaction

from apikeys import services
from apikeys.authentication import ApiKeyAuthentication
from apikeys.models import ApiKey
from portal.tenancy import scope

pytestmark = pytest.mark.transactional


def test_a_key_cached_during_its_revocation_is_refused_after_the_commit(org_a):
    secret = org_a.api_key_secret
    ApiKeyAuthentication.identify(secret, ip="127.0.0.1")  # warm the cache
    revoked_but_uncommitted, read_done = threading.Event(), threading.Event()

    def revoke_slowly():
        try:
            with transaction.atomic(), scope(org_a.organization):
                services.api_key_revoke(key=ApiKey.objects.get(pk=org_a.api_key.pk), actor=None)
                revoked_but_uncommitted.set()
                read_done.wait(10)  # hold the commit until the other request has cached what it read
        finally:
            connection.close()

    revoker = threading.Thread(target=revoke_slowly)
    revoker.start()
    assert revoked_but_uncommitted.wait(10)
    # This request sees the committed (not yet revoked) row and caches it.
    assert ApiKeyAuthentication.identify(secret, ip="127.0.0.1").id == org_a.api_key.pk
    read_done.set()
    revoker.join(10)
    with pytest.raises(services.KeyRefused, match="revoked"):
        ApiKeyAuthentication.identify(secret, ip="127.0.0.1")
