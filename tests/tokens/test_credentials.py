"""Token and secret generation, digests, and the obfuscation rule, as properties."""

from __future__ import annotations

import base64
import hashlib
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from llm_proxy.credentials import (
    generate_encryption_key,
    generate_secret,
    generate_token,
    hash_token,
    is_token_shaped,
)
from llm_proxy.crypto import DecryptionError, KeyRing
from llm_proxy.obfuscation import KNOWN_PREFIXES, obfuscate


def test_tokens_are_tok_plus_43_base64url_of_32_random_bytes() -> None:
    tokens = {generate_token() for _ in range(200)}
    assert len(tokens) == 200
    for token in tokens:
        assert re.fullmatch(r"tok-[A-Za-z0-9_-]{43}", token) and is_token_shaped(token)
        assert len(base64.urlsafe_b64decode(token[4:] + "=")) == 32


def test_secrets_meet_the_configuration_rules() -> None:
    assert len(generate_secret()) >= 32
    assert len(base64.b64decode(generate_encryption_key(), validate=True)) == 32


@given(st.text())
def test_only_exact_token_shapes_are_accepted(value: str) -> None:
    assert is_token_shaped(value) == bool(re.fullmatch(r"tok-[A-Za-z0-9_-]{43}", value))


@given(st.text())
def test_digest_is_sha256_hex_and_never_contains_the_token(value: str) -> None:
    digest = hash_token(value)
    assert re.fullmatch(r"[0-9a-f]{64}", digest)
    assert digest == hashlib.sha256(value.encode("utf-8", "surrogateescape")).hexdigest()


@given(prefix=st.sampled_from(KNOWN_PREFIXES), rest=st.text(min_size=13))
def test_prefixed_values_keep_prefix_and_four_plus_four(prefix: str, rest: str) -> None:
    assert obfuscate(prefix + rest) == f"{prefix}{rest[:4]}****{rest[-4:]}"


@given(prefix=st.sampled_from(KNOWN_PREFIXES), rest=st.text(max_size=12))
def test_short_prefixed_values_show_only_the_prefix(prefix: str, rest: str) -> None:
    assert obfuscate(prefix + rest) == prefix + "****"


@given(st.text())
def test_unprefixed_values_show_two_plus_two_and_never_the_middle(value: str) -> None:
    if value.startswith(KNOWN_PREFIXES):
        return
    masked = obfuscate(value)
    if len(value) <= 12:
        assert masked == "****"
    else:
        assert masked == f"{value[:2]}********{value[-2:]}"


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
