"""Encrypt upstream API keys at rest with AES-256-GCM under the current key, decrypt under any known key."""

from __future__ import annotations

import base64
import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

PREFIX = "enc:v1:"
_NONCE_BYTES = 12
# Binds each ciphertext to its purpose, so a blob cannot be replayed as some other encrypted field.
_AAD = b"llm-proxy:project.api_key:v1"


class DecryptionError(Exception):
    """No configured key opens this value (wrong key, or the stored value was altered)."""


class KeyRing:
    """The current encryption key plus previous ones still accepted for decryption."""

    def __init__(self, current: bytes, previous: tuple[bytes, ...] = ()) -> None:
        self._current = AESGCM(current)
        self._all = (self._current, *(AESGCM(key) for key in previous))

    def encrypt(self, plaintext: str) -> str:
        """Return `enc:v1:` + base64(nonce || ciphertext || tag) under the current key."""
        nonce = os.urandom(_NONCE_BYTES)
        sealed = self._current.encrypt(nonce, plaintext.encode(), _AAD)
        return PREFIX + base64.b64encode(nonce + sealed).decode("ascii")

    def decrypt(self, stored: str) -> str:
        """Open a value written by encrypt(), trying the current key first."""
        if not stored.startswith(PREFIX):
            raise DecryptionError("value is not in the enc:v1 format")
        try:
            blob = base64.b64decode(stored[len(PREFIX):], validate=True)
        except ValueError:
            raise DecryptionError("value is not valid base64") from None
        nonce, sealed = blob[:_NONCE_BYTES], blob[_NONCE_BYTES:]
        for aead in self._all:
            try:
                return aead.decrypt(nonce, sealed, _AAD).decode()
            except InvalidTag:
                continue
        raise DecryptionError("no configured ENCRYPTION_KEY or ENCRYPTION_KEY_PREVIOUS opens this value")

    def is_current(self, stored: str) -> bool:
        """Tell whether the current key opens this value (rotate-key skips those)."""
        try:
            blob = base64.b64decode(stored[len(PREFIX):], validate=True)
            self._current.decrypt(blob[:_NONCE_BYTES], blob[_NONCE_BYTES:], _AAD)
        except (InvalidTag, ValueError):
            return False
        return stored.startswith(PREFIX)
