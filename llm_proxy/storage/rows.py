"""How audit events and usage bounds map to rows: the same for every backend, so that none can drift."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import orjson

from llm_proxy.storage.base import ChainHead

ZERO_HEAD: ChainHead = (0, "0" * 64)
# Column order = key order of an event in the file; NULL columns are keys left out, and so is an
# instance of '' (the chain of events written before instances were named).
COLUMNS = ("timestamp", "action", "actor", "project_id", "request_id", "client_ip", "result", "details", "instance",
           "seq", "hash")


def newest(rows: Iterable[Sequence[Any] | None]) -> ChainHead:
    """Return the (seq, hash) row with the highest seq; ZERO_HEAD when there is none."""
    head = ZERO_HEAD
    for row in rows:
        if row is not None and row[0] > head[0]:
            head = (row[0], row[1])
    return head


def newest_per_chain(rows: Iterable[Sequence[Any]]) -> dict[str, ChainHead]:
    """Return the highest (seq, hash) of each instance among (instance, seq, hash) rows."""
    heads: dict[str, ChainHead] = {}
    for instance, seq, digest in rows:
        if seq > heads.get(instance, ZERO_HEAD)[0]:
            heads[instance] = (seq, digest)
    return heads


def event_row(event: Mapping[str, Any]) -> tuple[Any, ...]:
    """Return the values of an event's row, in COLUMNS' order.

    The details are stored as the JSON text the event carries them as, byte for byte what the chain
    hashes (a JSON type that reorders keys would break verification).
    """
    details = event.get("details")
    text = None if details is None else orjson.dumps(details, default=str).decode()
    return (event["timestamp"], event["action"], event["actor"], event.get("project_id"), event.get("request_id"),
            event.get("client_ip"), event["result"], text, event.get("instance", ""), event["seq"], event["hash"])


def event_from_row(row: Sequence[Any]) -> dict[str, Any]:
    """Rebuild the event of an audit_events row (COLUMNS order) with the file's key order and omissions.

    Raises orjson.JSONDecodeError when its details are not JSON.
    """
    event: dict[str, Any] = {}
    for key, value in zip(COLUMNS, row, strict=True):
        if value is None or (key == "instance" and value == ""):
            continue
        event[key] = orjson.loads(value) if key == "details" else value
    return event


def listed_event(row: Sequence[Any]) -> dict[str, Any]:
    """The event of a row for a listing: one with unreadable details is shown without them, and says so."""
    try:
        return event_from_row(row)
    except orjson.JSONDecodeError:
        kept = tuple(None if key == "details" else value for key, value in zip(COLUMNS, row, strict=True))
        event = event_from_row(kept)
        event["details_unreadable"] = True
        return event


def walked_event(row: Sequence[Any]) -> tuple[int, dict[str, Any] | None]:
    """The (seq, event) of a row for a walk; None for an event whose details are unreadable."""
    try:
        event = event_from_row(row)
    except orjson.JSONDecodeError:
        return row[COLUMNS.index("seq")], None
    return event["seq"], event


def _anchor(recorded: Any) -> ChainHead | None:
    if isinstance(recorded, dict):
        seq, digest = recorded.get("last_pruned_seq"), recorded.get("last_pruned_hash")
        if type(seq) is int and isinstance(digest, str):
            return seq, digest
    return None


def prune_anchors(details: Iterable[str | None]) -> dict[str, ChainHead]:
    """Return the last pruned (seq, hash) of each chain, from the first readable audit.prune details
    (newest first) that records any.

    An audit.prune event records every chain's anchor, those it pruned and those an earlier prune
    did ({"chains": {instance: {"last_pruned_seq", "last_pruned_hash"}}}), so the newest one is
    enough. One written before instances were named records the anchor of the chain of '' alone,
    at the top of its details.
    """
    for text in details:
        try:
            parsed = orjson.loads(text) if text else None
        except orjson.JSONDecodeError:
            continue
        if not isinstance(parsed, dict):
            continue
        chains = parsed.get("chains")
        if isinstance(chains, dict):
            anchors = {name: anchor for name, recorded in chains.items() if (anchor := _anchor(recorded))}
            if anchors:
                return anchors
        if (anchor := _anchor(parsed)) is not None:
            return {"": anchor}
    return {}


def usage_days(since: str | None, until: str | None) -> tuple[str | None, str | None, bool]:
    """Turn [since, until) into whole UTC days: (first day, last day, whether the last day is included).

    Each bound is a date (YYYY-MM-DD, meaning its midnight) or a timestamp (YYYY-MM-DDTHH:MM:SSZ). An
    `until` within a day keeps that day, since part of it is before `until`; at midnight it is left out.
    """
    if until is None:
        return (None if since is None else since[:10]), None, False
    at_midnight = len(until) == 10 or until.endswith("T00:00:00Z")
    return (None if since is None else since[:10]), until[:10], not at_midnight
