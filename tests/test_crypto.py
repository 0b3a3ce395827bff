"""Upstream keys at rest: AES-256-GCM under ENCRYPTION_KEY, and the previous keys still read, as properties."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from llm_proxy.crypto import DecryptionError, KeyRing


@given(st.text(max_size=200))
def test_encryption_round_trips_and_never_repeats_a_ciphertext(plaintext: str) -> None:
    ring = KeyRing(bytes(range(32)))
    first, second = ring.encrypt(plaintext), ring.encrypt(plaintext)
    assert first.startswith("enc:v1:") and first != second
    assert ring.decrypt(first) == plaintext


def test_previous_keys_decrypt_and_a_foreign_key_does_not() -> None:
    old, new, foreign = KeyRing(b"\x01" * 32), KeyRing(b"\x02" * 32, (b"\x01" * 32,)), KeyRing(b"\x03" * 32)
    sealed = old.encrypt("sk-secret")
    assert new.decrypt(sealed) == "sk-secret" and not new.is_current(sealed)
    with pytest.raises(DecryptionError) as caught:
        foreign.decrypt(sealed)
    assert "sk-secret" not in str(caught.value)
