"""Token and secret generation and token digests, as properties."""

from __future__ import annotations

import base64
import hashlib
import re

from hypothesis import given
from hypothesis import strategies as st

from llm_proxy.tokens.credentials import (
    generate_encryption_key,
    generate_secret,
    generate_token,
    hash_token,
    is_token_shaped,
)


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
