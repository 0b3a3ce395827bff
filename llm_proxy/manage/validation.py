"""Validate management request bodies and query strings strictly, naming the offending field."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson

from llm_proxy.errors import BadRequest
from llm_proxy.gateway.bodies import refusing_deep_nesting

MAX_GRACE_SECONDS = 86_400
# Bounds of the management bodies; the OpenAPI document (openapi.py) states the same ones from here.
NAME_MAX_LENGTH = 200
API_KEY_MAX_LENGTH = 4096
LIMIT_MAX = 2**53


@dataclass(frozen=True, slots=True)
class Field:
    kind: type
    required: bool = False
    nullable: bool = False
    minimum: int | None = None
    maximum: int | None = None
    max_length: int | None = None


_KIND_NAMES = {str: "a string", int: "an integer", bool: "a boolean"}
# What must never be in a name or key a person will read in a terminal, a table or a log: Unicode's
# control characters (C0, DEL and C1: U+009B is the 8-bit CSI, a terminal escape in one character),
# line and paragraph separators, and the bidirectional marks, embeddings, overrides and isolates
# that make text display in another order than it is stored ("Trojan Source").
# (A regular-expression class, also the OpenAPI document's.)
UNPRINTABLE = r"\x00-\x1f\x7f-\x9f\u2028\u2029\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069"
_UNPRINTABLE = re.compile(f"[{UNPRINTABLE}]")


def parse_json_object(raw: bytes) -> dict[str, Any]:
    """Decode a body that must be one JSON object."""
    if not raw.strip():
        return {}
    try:
        document = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise BadRequest("request body is not valid JSON") from None
    if not isinstance(document, dict):
        raise BadRequest("request body must be a JSON object")
    # orjson keeps the last of repeated keys; other parsers keep the first. `{"is_active": false,
    # "is_active": true}` must not mean one thing to a proxy in front and another here.
    with refusing_deep_nesting():
        json.loads(raw, object_pairs_hook=_refuse_repeated_keys)
    return document


def _refuse_repeated_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise BadRequest(f"`{key}` is given more than once", param=key)
        seen[key] = value
    return seen


def validate(document: Mapping[str, Any], fields: Mapping[str, Field], *, require_any: bool = False) -> dict[str, Any]:
    """Check every key against `fields`: no unknown keys, right types, within bounds, required ones present."""
    for name in document:
        if name not in fields:
            raise BadRequest(f"unknown field `{name}`", param=name)
    for name, spec in fields.items():
        if spec.required and name not in document:
            raise BadRequest(f"`{name}` is required", param=name)
    if require_any and not document:
        raise BadRequest(f"give at least one of: {', '.join(fields)}")
    clean: dict[str, Any] = {}
    for name, value in document.items():
        clean[name] = _check(name, value, fields[name])
    return clean


def _check(name: str, value: Any, spec: Field) -> Any:
    if value is None:
        if spec.nullable:
            return None
        raise BadRequest(f"`{name}` must not be null", param=name)
    # JSON has one number type: 60.0 is the integer 60 (as JSON Schema and the OpenAPI document say).
    if spec.kind is int and type(value) is float and value.is_integer():
        value = int(value)
    # bool is a subclass of int: an int field must not accept true/false, nor a bool field 0/1.
    if type(value) is not spec.kind:
        raise BadRequest(f"`{name}` must be {_KIND_NAMES[spec.kind]}", param=name)
    if isinstance(value, str):
        value = value.strip()
        if not value:
            raise BadRequest(f"`{name}` must not be empty", param=name)
        if spec.max_length is not None and len(value) > spec.max_length:
            raise BadRequest(f"`{name}` must be at most {spec.max_length} characters", param=name)
        if _UNPRINTABLE.search(value):
            raise BadRequest(f"`{name}` must not contain control characters, line separators or "
                             "bidirectional overrides", param=name)
    if isinstance(value, int):
        if spec.minimum is not None and value < spec.minimum:
            raise BadRequest(f"`{name}` must be at least {spec.minimum}", param=name)
        if spec.maximum is not None and value > spec.maximum:
            raise BadRequest(f"`{name}` must be at most {spec.maximum}", param=name)
    return value


def query_bool(query: Mapping[str, str], name: str) -> bool | None:
    """Read an optional `true`/`false` query parameter."""
    raw = query.get(name)
    if raw is None or raw == "":
        return None
    if raw.lower() in ("true", "1"):
        return True
    if raw.lower() in ("false", "0"):
        return False
    raise BadRequest(f"query parameter `{name}` must be true or false", param=name)


# [0-9], not \d: \d matches any Unicode digit, which strptime and int() would then accept.
_DAY = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")
_INSTANT = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}Z")
_WHOLE_NUMBER = re.compile(r"[0-9]{1,19}")


def query_timestamp(query: Mapping[str, str], name: str) -> str | None:
    """Read an optional `YYYY-MM-DD` or `YYYY-MM-DDTHH:MM:SSZ` query parameter as a UTC timestamp."""
    raw = query.get(name)
    if not raw:
        return None
    text = raw + "T00:00:00Z" if _DAY.fullmatch(raw) else raw
    try:
        if not _INSTANT.fullmatch(text):
            raise ValueError
        datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ")
    except ValueError:
        raise BadRequest(f"query parameter `{name}` must be YYYY-MM-DD or YYYY-MM-DDTHH:MM:SSZ",
                         param=name) from None
    return text


def query_int(query: Mapping[str, str], name: str, *, default: int | None, minimum: int, maximum: int) -> int | None:
    """Read an optional integer query parameter within bounds."""
    raw = query.get(name)
    if not raw:
        return default
    return whole_number(raw, name, minimum=minimum, maximum=maximum)


def whole_number(raw: str, name: str, *, minimum: int, maximum: int, kind: str = "query parameter") -> int:
    """Read a whole number written in ASCII digits (at most 19 of them) within bounds; BadRequest otherwise."""
    if not _WHOLE_NUMBER.fullmatch(raw) or not minimum <= int(raw) <= maximum:
        raise BadRequest(f"{kind} `{name}` must be a whole number from {minimum} to {maximum}", param=name)
    return int(raw)
