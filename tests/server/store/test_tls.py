"""rediss:// is verified TLS: a server whose certificate the client cannot trust is refused, and the refusal
names neither the user nor the password."""

from __future__ import annotations

import pytest

from server.store import StoreUnavailable, open_store


@pytest.mark.parametrize("drop", ["ssl_ca_certs", "password"])
async def test_an_untrusted_certificate_or_a_wrong_password_is_refused_without_leaking(redis_tls, drop):
    url = redis_tls.url
    if drop == "ssl_ca_certs":  # the system's CAs do not know the test CA
        url = url.split("?", 1)[0]
    else:
        url = url.replace(f":{redis_tls.password}@", ":not-the-password@")
    store = open_store(url)
    try:
        with pytest.raises(StoreUnavailable) as refused:
            await store.ping()
    finally:
        await store.close()
    text = f"{refused.value} {refused.value.detail}"
    assert "certificate" in text.lower() if drop == "ssl_ca_certs" else "password" in text.lower()
    assert redis_tls.password not in text and "not-the-password" not in text and "titans:" not in text


async def test_the_trusted_server_answers(redis_tls):
    store = open_store(redis_tls.url)
    try:
        await store.ping()
    finally:
        await store.close()
