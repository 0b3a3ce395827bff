"""Generate client tokens and management secrets, and digest tokens for storage and lookup."""

from __future__ import annotations

import base64
import hashlib
import re
import secrets

TOKEN_PREFIX = "tok-"  # noqa: S105 - a public prefix, not a secret
# 32 random bytes in unpadded base64url are exactly 43 characters.
TOKEN_PATTERN = re.compile(r"tok-[A-Za-z0-9_-]{43}")


def generate_token() -> str:
    """Return a fresh client token: `tok-` + 43 base64url characters of 32 random bytes."""
    return TOKEN_PREFIX + base64.urlsafe_b64encode(secrets.token_bytes(32)).rstrip(b"=").decode("ascii")


def hash_token(token: str) -> str:
    """Return the hex SHA-256 digest under which a token is stored."""
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).hexdigest()


def is_token_shaped(value: str) -> bool:
    """Tell whether a presented credential has the exact shape of one of our tokens."""
    return TOKEN_PATTERN.fullmatch(value) is not None


def generate_secret() -> str:
    """Return a management token: 48 characters of base64url from 36 random bytes."""
    return base64.urlsafe_b64encode(secrets.token_bytes(36)).decode("ascii")


def generate_encryption_key() -> str:
    """Return an ENCRYPTION_KEY value: base64 of 32 random bytes."""
    return base64.b64encode(secrets.token_bytes(32)).decode("ascii")
