"""Obfuscate token-like values the one way SPEC §5 prescribes (audit, logs and API responses)."""

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
