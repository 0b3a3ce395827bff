"""Obfuscate token-like values the one way SPEC §5 prescribes (audit, logs and API responses), and mask IPs."""

import functools
import ipaddress
import re

KNOWN_PREFIXES = ("tok-", "sk-", "api_", "Bearer ", "ghp_")


def obfuscate(value: str) -> str:
    """Keep a known prefix, then first 4 + `****` + last 4; unknown prefix: first 2 + `********` + last 2."""
    for prefix in KNOWN_PREFIXES:
        if value.startswith(prefix):
            rest = value[len(prefix):]
            if len(rest) <= 12:
                return prefix + "****"
            return f"{prefix}{rest[:4]}****{rest[-4:]}"
    if len(value) <= 12:
        return "****"
    return f"{value[:2]}********{value[-2:]}"


# Prefixed credentials. Possessive quantifiers plus (?!\*) leave an already obfuscated value
# (`tok-abcd****wxyz`) alone instead of masking it a second time.
_PREFIXED = re.compile(r"(?<![A-Za-z0-9])(?:(?:tok-|sk-)[A-Za-z0-9_-]{6,}+|(?:api_|ghp_)[A-Za-z0-9_-]{16,}+)(?!\*)")
_AUTH_SCHEME = re.compile(r"\b([Bb]earer|BEARER|Basic)(\s+)([^\s\"',;]{8,}+)")
# Credentials in query strings (aiohttp's own access log prints the whole request line).
_QUERY_SECRET = re.compile(r"(?i)([?&](?:api[_-]?key|key|token|access_token|secret|password|sig)=)([^&\s\"']+)")
# Long runs of the base64 / base64url / hex alphabet (management tokens, ENCRYPTION_KEY, hex keys).
_LONG_RUN = re.compile(r"(?<![A-Za-z0-9+/_*-])[A-Za-z0-9+/_-]{32,}+=*(?![*])")
_HEX = re.compile(r"[0-9a-fA-F]+")
_UUID = re.compile(r"[0-9a-fA-F]{8}-(?:[0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}")
_UPPER, _LOWER, _DIGIT = re.compile(r"[A-Z]"), re.compile(r"[a-z]"), re.compile(r"[0-9]")


def _mask_auth(match: re.Match[str]) -> str:
    value = match.group(3)
    return match.group(0) if "****" in value else f"{match.group(1)}{match.group(2)}{obfuscate(value)}"


def _mask_query(match: re.Match[str]) -> str:
    value = match.group(2)
    return match.group(0) if "****" in value else match.group(1) + obfuscate(value)


def _mask_run(match: re.Match[str]) -> str:
    value = match.group(0)
    core = value.rstrip("=")
    # A secret is hex, or mixes upper, lower and digits (random base64 practically always does);
    # paths, UUIDs and words do not, and are kept readable.
    if _UUID.fullmatch(core):
        return value
    if _HEX.fullmatch(core) or (_UPPER.search(core) and _LOWER.search(core) and _DIGIT.search(core)):
        return obfuscate(value)
    return value


def mask_secrets(text: str) -> str:
    """Replace every token- or key-shaped part of `text` by its obfuscated form."""
    text = _AUTH_SCHEME.sub(_mask_auth, text)
    text = _QUERY_SECRET.sub(_mask_query, text)
    text = _PREFIXED.sub(lambda match: obfuscate(match.group(0)), text)
    return _LONG_RUN.sub(_mask_run, text)


# Texts mask_secrets() left unchanged: paths, User-Agents and model names repeat, and their next
# occurrence skips the regular expressions. A text that held a secret is never remembered. Shared
# by the event loop and the log sink's thread (set operations are atomic); bounded by clearing, as
# it is only a shortcut.
_CLEAN: set[str] = set()
_CLEAN_MAX = 8192


def mask_secrets_cached(text: str) -> str:
    """mask_secrets() for values that repeat."""
    if text in _CLEAN:
        return text
    masked = mask_secrets(text)
    if masked == text:
        if len(_CLEAN) >= _CLEAN_MAX:
            _CLEAN.clear()
        _CLEAN.add(text)
    return masked


_OWN_REQUEST_ID = re.compile(r"[0-9a-f]{32}")  # the shape of the ids the gateway makes


def mask_request_id(value: str) -> str:
    """Mask a request id like any text (a client may send a secret as X-Request-ID), except ids of
    the gateway's own shape (32 hex digits), which are kept whole so that they stay greppable."""
    return value if _OWN_REQUEST_ID.fullmatch(value) else mask_secrets(value)


@functools.lru_cache(maxsize=4096)
def mask_ip(value: str) -> str:
    """Mask an IP for storage: IPv4 to its /24 (last octet 0), IPv6 to its /48; anything else to `****`."""
    try:
        address = ipaddress.ip_address(value)
    except ValueError:
        # Not an address we can mask (e.g. "host:port"): storing it raw could leak the full IP.
        return "****"
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        else:
            return str(ipaddress.IPv6Address(int(address) & ~((1 << 80) - 1)))
    return str(ipaddress.IPv4Address(int(address) & ~0xFF))
