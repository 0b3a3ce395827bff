"""The words of an audit event (SPEC §5) as types, and the values a client put in one made safe to store."""

from __future__ import annotations

from typing import Any, Literal

from llm_proxy.audit.masking import mask_request_id, mask_secrets_cached

Action = Literal[
    "project.create", "project.read", "project.list", "project.update", "project.delete",
    "token.create", "token.read", "token.list", "token.update", "token.revoke", "token.revoke_batch",
    "token.refresh", "token.validate", "token.access", "token.expire", "token.anomaly", "token.suspend",
    "auth.failure", "audit.list", "audit.prune", "key.rotate", "system.degraded", "system.recovered",
    "admin.login", "admin.logout",
]
# management: the management API; client: proxied requests; system: jobs and the CLI.
Actor = Literal["management", "client", "system"]
# failure: bad credentials or invalid input; denied: a policy said no; error: ours or the upstream's fault.
Result = Literal["success", "failure", "denied", "error"]


# ---- values a client chose ----

def sanitized(event: dict[str, Any]) -> dict[str, Any]:
    """Return a copy of an event orjson could not encode, every part repaired, nothing dropped."""
    return {key: _encodable(value) for key, value in event.items()}


def _encodable(value: Any) -> Any:
    """`value` as JSON can hold it: lone surrogates (undecodable header bytes) become `?`, integers
    beyond 64 bits and other objects their text, mapping keys text. A client sending a bad byte in
    its User-Agent must not be able to wipe the rest of its own event."""
    if isinstance(value, str):
        return value.encode("utf-8", "replace").decode("utf-8")
    if value is None or isinstance(value, bool | float):
        return value
    if isinstance(value, int):
        return value if -(2**63) <= value < 2**64 else str(value)
    if isinstance(value, dict):
        return {_encodable(str(key)): _encodable(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_encodable(item) for item in value]
    return _encodable(str(value))


# Values in an event that a client chose: its path, User-Agent and X-Request-ID, the model it
# named, a management URL's id. They may carry a secret, pasted by mistake or sent to see whether
# it gets stored, so every string of an event is masked the way log lines are, except those the
# gateway made itself (already obfuscated token hints, and hashes that must stay exact).
_GATEWAY_MADE = frozenset({"timestamp", "action", "actor", "result", "token_id", "old_token_id",
                           "last_pruned_hash"})


def _masked(value: Any) -> Any:
    if type(value) is str:
        return mask_secrets_cached(value)
    if isinstance(value, dict):
        for key, item in value.items():
            if key not in _GATEWAY_MADE and type(item) is not int:
                value[key] = _masked(item)
        return value
    if isinstance(value, list):
        return [_masked(item) for item in value]
    return value


def scrub(event: dict[str, Any]) -> None:
    """Mask secrets in the client-chosen strings of an event, in place (its details included)."""
    for key, value in event.items():
        if key in _GATEWAY_MADE or value is None:
            continue
        if key == "request_id":
            event[key] = mask_request_id(value)  # unique per request: not worth remembering
        else:
            event[key] = _masked(value)
