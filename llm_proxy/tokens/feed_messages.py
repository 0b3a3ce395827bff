"""The change feed's messages: one compact JSON object per change, the records in full, and their checks.

    {"instance": <INSTANCE_ID>, "feed": <the sending feed's random id>, "kind": "token" | "revoked" |
     "deactivated" | "project" | "lost", ...}

`token` carries the TokenRecord and the Project (or null) in full, `project` the Project,
`revoked`/`deactivated` the `token_ids`, `lost` the `count` of changes its sender dropped unsent.
What crosses is what the database holds: the token's SHA-256 digest and the project's AES-GCM
ciphertext, never a plaintext token or key. A message is read strictly (every field, exact JSON
types): what does not fit is MalformedMessage, never a half-built record.
"""

from __future__ import annotations

import typing
from typing import Any

import orjson

from llm_proxy.models import Project, TokenRecord
from llm_proxy.tokens.feed import Change, ProjectChanged, TokenChanged, TokensDeactivated, TokensRevoked


class MalformedMessage(ValueError):
    """A message on the channel that is not a change this version can apply."""


_Record = typing.TypeVar("_Record", TokenRecord, Project)
_FIELDS = {cls: typing.get_type_hints(cls) for cls in (TokenRecord, Project)}


def encode(sender: dict[str, str], change: Change) -> bytes:
    """Return the message carrying `change`, from `sender` (its instance and feed ids)."""
    body: dict[str, Any]
    if isinstance(change, TokenChanged):
        body = {"kind": "token", "token": change.token, "project": change.project}
    elif isinstance(change, TokensRevoked):
        body = {"kind": "revoked", "token_ids": change.token_ids}
    elif isinstance(change, TokensDeactivated):
        body = {"kind": "deactivated", "token_ids": change.token_ids}
    else:
        body = {"kind": "project", "project": change.project}
    return orjson.dumps({**sender, **body})


def encode_lost(sender: dict[str, str], count: int) -> bytes:
    """Return the message saying that `sender` dropped `count` changes unsent."""
    return orjson.dumps({**sender, "kind": "lost", "count": count})


def decode(message: bytes) -> tuple[str, Change | None]:
    """Return the sender's feed id and the change in a message (None: changes were lost); raise MalformedMessage."""
    try:
        document = orjson.loads(message)
    except orjson.JSONDecodeError as exc:
        raise MalformedMessage("not JSON") from exc
    if not isinstance(document, dict) or not isinstance(document.get("feed"), str):
        raise MalformedMessage("not an object with a feed id")
    kind, feed = document.get("kind"), document["feed"]
    if kind == "token":
        project = document.get("project")
        return feed, TokenChanged(_record(TokenRecord, document.get("token")),
                                  None if project is None else _record(Project, project))
    if kind in ("revoked", "deactivated"):
        ids = document.get("token_ids")
        if not isinstance(ids, list) or not all(isinstance(token_id, str) for token_id in ids):
            raise MalformedMessage(f"{kind}: token_ids is not a list of strings")
        return feed, (TokensRevoked if kind == "revoked" else TokensDeactivated)(tuple(ids))
    if kind == "project":
        return feed, ProjectChanged(_record(Project, document.get("project")))
    if kind == "lost":
        return feed, None
    raise MalformedMessage(f"unknown kind {str(kind)[:40]!r}")


def _record(cls: type[_Record], value: object) -> _Record:
    fields = _FIELDS[cls]
    if not isinstance(value, dict) or value.keys() != fields.keys():
        raise MalformedMessage(f"not a {cls.__name__} (its fields differ)")
    for name, hint in fields.items():
        allowed = typing.get_args(hint) or (hint,)
        # Exact types: JSON's true is no int, and a count is never a string.
        if not any(value[name] is None if kind is type(None) else type(value[name]) is kind for kind in allowed):
            raise MalformedMessage(f"{cls.__name__}.{name} is not {hint}")
    return cls(**value)
