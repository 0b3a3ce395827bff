"""The server's TLS context from TLS_CERT_FILE/TLS_KEY_FILE, refusing a key that asks for a passphrase."""

from __future__ import annotations

import ssl

from llm_proxy.ops.command_errors import UsageError
from llm_proxy.settings import Settings


class _EncryptedKey(Exception):
    """TLS_KEY_FILE asked for a passphrase."""


def _refuse_passphrase() -> bytes:
    raise _EncryptedKey


def build_ssl_context(settings: Settings) -> ssl.SSLContext | None:
    """Return the server TLS context for TLS_CERT_FILE/TLS_KEY_FILE with TLS_MIN_VERSION, or None for plain HTTP."""
    if settings.tls_cert_file is None or settings.tls_key_file is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_3 if settings.tls_min_version == "1.3" else ssl.TLSVersion.TLSv1_2
    for variable, path in (("TLS_CERT_FILE", settings.tls_cert_file), ("TLS_KEY_FILE", settings.tls_key_file)):
        if not path.is_file():
            raise UsageError(f"configuration error: {variable}: no file at {path}")
    try:
        # Without a password callback OpenSSL would prompt on the terminal for an encrypted key,
        # and a service under a supervisor would hang there.
        context.load_cert_chain(settings.tls_cert_file, settings.tls_key_file, password=_refuse_passphrase)
    except _EncryptedKey:
        raise UsageError(f"configuration error: TLS_KEY_FILE: {settings.tls_key_file} is encrypted with a "
                         f"passphrase, which is not supported; give an unencrypted key (readable only by "
                         f"the gateway's user)") from None
    except (OSError, ssl.SSLError) as exc:
        raise UsageError(f"configuration error: TLS_CERT_FILE/TLS_KEY_FILE: cannot load the certificate and key "
                         f"({type(exc).__name__})") from None
    return context
