"""Obfuscation of token-like values (SPEC §5): examples, then the rule as properties."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from llm_proxy.audit.masking import KNOWN_PREFIXES, obfuscate


@pytest.mark.parametrize(("value", "shown"), [
    ("tok-1234567890abcdef", "tok-1234****cdef"),
    ("abcd1234efgh5678", "ab********78"),
    ("sk-proj-abcdefghijklmnop", "sk-proj****mnop"),
    ("api_abcdefghijklmnop", "api_abcd****mnop"),
    ("Bearer abcdefghijklmnop", "Bearer abcd****mnop"),
    ("ghp_abcdefghijklmnop", "ghp_abcd****mnop"),
    ("tok-abcdefghijkl", "tok-****"),  # remainder of exactly 12
    ("tok-abcdefghijklm", "tok-abcd****jklm"),  # 13
    ("tok-", "tok-****"),
    ("abcdefghijkl", "****"),  # unprefixed, exactly 12
    ("abcdefghijklm", "ab********lm"),  # 13
    ("short", "****"),
    ("", "****"),
    ("bearer abcdefghijklmnop", "be********op"),  # prefixes are case-sensitive
    ("ключ-секрет-значение", "кл********ие"),
    ("tok-秘密秘密秘密秘密秘密秘密秘", "tok-秘密秘密****密秘密秘"),
])
def test_obfuscate(value: str, shown: str) -> None:
    assert obfuscate(value) == shown


@pytest.mark.parametrize("prefix", KNOWN_PREFIXES)
def test_every_known_prefix_is_kept(prefix: str) -> None:
    secret = "0123456789ABCDEFGHIJ"
    assert obfuscate(prefix + secret) == f"{prefix}0123****GHIJ"
    assert obfuscate(prefix + secret[:12]) == f"{prefix}****"


@pytest.mark.parametrize("value", ["tok-1234567890abcdef", "sk-" + "x" * 48, "abcd1234efgh5678" * 3])
def test_obfuscated_value_never_contains_the_middle(value: str) -> None:
    shown = obfuscate(value)
    assert value[8:-4] not in shown
    assert len(shown) < len(value)


# ---- the rule as properties ----

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
