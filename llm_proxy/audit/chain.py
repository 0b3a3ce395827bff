"""The audit hash chain: canonical JSON, the link hash, and a walk that finds where the chain breaks."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Protocol

import orjson

ChainHead = tuple[int, str]

ZERO_HASH = "0" * 64
TIMESTAMP_FORMAT = "%Y-%m-%dT%H:%M:%SZ"
TABLE = "audit_events"


def canonical(event: dict[str, Any]) -> bytes:
    """Encode an event the one way its hash is computed: sorted keys, no spaces, UTF-8.

    Values JSON cannot hold are encoded as str(value), exactly as the writer puts them in the file.
    """
    return orjson.dumps(event, default=str, option=orjson.OPT_SORT_KEYS)


def chain_hash(prev_hash: str, event_without_hash: dict[str, Any]) -> str:
    """Return hex SHA-256 of the previous hash (hex text) followed by the event's canonical JSON."""
    return link_hash(prev_hash, canonical(event_without_hash))


def link_hash(prev_hash: str, body: bytes) -> str:
    """Return hex SHA-256 of the previous hash (hex text) followed by an event's canonical JSON (`body`)."""
    return hashlib.sha256(prev_hash.encode() + body).hexdigest()


# ---- verification ----

@dataclass(frozen=True, slots=True)
class Break:
    """The first place where the chain does not hold.

    kind: `altered` (seq as expected, hash wrong), `removed` (seq jumps ahead: events are missing
    before this line), `inserted` (seq repeats or goes back, or the line does not fit but the next
    one continues the chain from the line before it), `invalid` (not a JSON event with seq and
    hash), `unreadable` (the file cannot be read).
    """

    kind: str
    source: str
    line: int
    seq: int | None
    expected_seq: int | None
    message: str

    @property
    def where(self) -> str:
        if self.source == TABLE:
            return f"{TABLE} row {self.line} (seq {self.seq})"
        return f"{self.source}:{self.line}"


@dataclass(frozen=True, slots=True)
class VerifyResult:
    """Outcome of a walk: how far the chain holds and from what it starts.

    start: `genesis` (first event seq 1, chained from 64 zeros), `anchor` (checked from a given
    or audit.prune-recorded (seq, hash)), `assumed` (first event has seq > 1 and nothing to check
    it against: older events were rotated away or pruned, it is taken on trust), `empty`.
    """

    ok: bool
    events: int
    start: str
    first_seq: int | None
    last_seq: int | None
    last_hash: str | None
    anchor: tuple[int, str] | None = None
    problem: Break | None = None

    def describe(self) -> str:
        """Return one line for the operator."""
        if self.problem is not None:
            return f"BROKEN at {self.problem.where}: {self.problem.kind}: {self.problem.message}"
        if self.start == "empty":
            return "OK: no events"
        origin = {
            "genesis": "from the first event",
            "anchor": f"from the anchor seq {self.anchor[0] if self.anchor else '?'}",
            "assumed": f"from seq {self.first_seq}, taken on trust (earlier events are not present)",
        }[self.start]
        return f"OK: {self.events} events, seq {self.first_seq}..{self.last_seq}, chain verified {origin}"


class _Walk(Protocol):
    def feed_invalid(self, source: str, line: int, message: str, kind: str = ...) -> bool: ...
    def feed_event(self, source: str, line: int, event: Any) -> bool: ...


def feed_line(walk: _Walk, source: str, line: int, text: str | bytes, *, going: bool) -> bool:
    """Parse one line of a file and give it to the walk; a blank line carries no event (`going`: the
    walk's answer so far)."""
    if not text.strip():
        return going
    try:
        event = orjson.loads(text)
    except orjson.JSONDecodeError:
        return walk.feed_invalid(source, line, "not valid JSON (torn or edited line)")
    return walk.feed_event(source, line, event)


class ChainWalk:
    """Check events fed in order; stop at the first break.

    A hash mismatch at the expected seq is held for one more event: if the next event has the
    same seq and chains from the hash before the mismatch, the mismatching line was inserted,
    otherwise it was altered. An edit that also recomputes the line's own hash therefore shows up
    as `altered` on the following line; removing the newest events is only visible against a
    known head (pass `head`).
    """

    def __init__(self, anchor: tuple[int, str] | None = None) -> None:
        self.anchor = anchor
        self.events = 0
        self.start = "empty"
        self.first_seq: int | None = None
        self.prev_seq: int | None = None
        self.prev_hash: str | None = None
        self.problem: Break | None = None
        self._last_place: tuple[str, int] | None = None
        # finish(head, growing=True) compares the hash the walk saw at this seq with the head's
        self.watch_seq: int | None = None
        self.watched_hash: str | None = None
        # (source, line, seq, expected) of a hash mismatch waiting for the next event
        self._pending: tuple[str, int, int, int] | None = None

    def feed_text(self, source: str, line: int, text: str | bytes) -> bool:
        """Parse and check one line; return False once the chain is broken."""
        return feed_line(self, source, line, text, going=self.problem is None)

    def feed_invalid(self, source: str, line: int, message: str, kind: str = "invalid") -> bool:
        """Record a line that holds no readable event."""
        if self.problem is None:
            if self._pending is not None:
                self._resolve_pending(inserted=False)
            else:
                expected = None if self.prev_seq is None else self.prev_seq + 1
                self.problem = Break(kind, source, line, None, expected, message)
        return False

    def feed_event(self, source: str, line: int, event: Any) -> bool:
        """Check one parsed event; return False once the chain is broken."""
        if self.problem is not None:
            return False
        seq = event.get("seq") if isinstance(event, dict) else None
        stored = event.get("hash") if isinstance(event, dict) else None
        if type(seq) is not int or seq < 1 or not isinstance(stored, str):
            return self.feed_invalid(source, line, "not an audit event with an integer seq and a hash")
        body = {key: value for key, value in event.items() if key != "hash"}

        if self._pending is not None:
            _, _, pending_seq, _ = self._pending
            self._resolve_pending(inserted=seq == pending_seq and self._hash(body) == stored)
            return False

        if self.prev_seq is None:
            if self.anchor is not None:
                self.prev_seq, self.prev_hash = self.anchor
                self.start = "anchor"
            elif seq == 1:
                self.prev_seq, self.prev_hash = 0, ZERO_HASH
                self.start = "genesis"
            else:
                self.start = "assumed"
                self.anchor = (seq, stored)
                self._accept(source, line, seq, stored)
                return True

        expected = self.prev_seq + 1
        if seq > expected:
            missing = f"{expected}" if seq == expected + 1 else f"{expected}..{seq - 1}"
            self.problem = Break("removed", source, line, seq, expected,
                                 f"seq {seq} where {expected} was expected: "
                                 f"event(s) {missing} missing before this line")
            return False
        if seq < expected:
            self.problem = Break("inserted", source, line, seq, expected,
                                 f"seq {seq} repeats or goes back (expected {expected}): this line was inserted")
            return False
        if self._hash(body) != stored:
            self._pending = (source, line, seq, expected)
            return True
        self._accept(source, line, seq, stored)
        return True

    def finish(self, head: tuple[int, str] | None = None, *, growing: bool = False) -> VerifyResult:
        """Close the walk; with `head`, also require it to end exactly at that (seq, hash).

        growing: the input may have been appended to since `head` was read, so events past it are
        accepted (they chain), but the one at head's seq must carry head's hash (set watch_seq first).
        """
        if self._pending is not None:
            self._resolve_pending(inserted=False)
        if self.problem is None and head is not None:
            self._check_head(head, growing)
        return VerifyResult(ok=self.problem is None, events=self.events, start=self.start,
                            first_seq=self.first_seq, last_seq=self.prev_seq if self.events else None,
                            last_hash=self.prev_hash if self.events else None,
                            anchor=None if self.start == "genesis" else self.anchor, problem=self.problem)

    def _hash(self, body: dict[str, Any]) -> str:
        assert self.prev_hash is not None
        try:
            return chain_hash(self.prev_hash, body)
        except (TypeError, ValueError):  # e.g. an integer beyond 64 bits: cannot be ours
            return ""

    def _accept(self, source: str, line: int, seq: int, stored: str) -> None:
        if self.first_seq is None:
            self.first_seq = seq
        self.prev_seq, self.prev_hash = seq, stored
        if seq == self.watch_seq:
            self.watched_hash = stored
        self.events += 1
        self._last_place = (source, line)

    def _resolve_pending(self, *, inserted: bool) -> None:
        assert self._pending is not None
        source, line, seq, expected = self._pending
        self._pending = None
        if inserted:
            message = "does not fit the chain, and the next line continues it from the line before: inserted"
        else:
            message = "hash does not match the line's content and the previous hash: the line was altered"
        self.problem = Break("inserted" if inserted else "altered", source, line, seq, expected, message)

    def _check_head(self, head: tuple[int, str], growing: bool = False) -> None:
        head_seq, head_hash = head
        source, line = self._last_place if self._last_place else ("(input)", 0)
        last_seq: int | None
        if not self.events and self.anchor is not None:
            # Nothing past the anchor (a chain pruned whole): the head must be the anchor itself.
            self.prev_seq, self.prev_hash = self.anchor
            self.start = "anchor"
            last_seq = self.anchor[0]
            if last_seq == head_seq and self.prev_hash != head_hash:
                self.problem = Break("altered", source, line, last_seq, head_seq,
                                     "the last pruned hash differs from the recorded chain head")
                return
        else:
            last_seq = self.prev_seq if self.events else 0
        assert last_seq is not None
        if growing and last_seq > head_seq:
            # Appended after the head was read (a gateway still writing): fine if the head is in
            # the walk unchanged, or older than everything walked.
            if self.watched_hash is not None and self.watched_hash != head_hash:
                self.problem = Break("altered", source, line, last_seq, head_seq,
                                     f"the event at the chain head seq {head_seq} differs from the one "
                                     f"recorded in the database: the line was rewritten")
        elif last_seq < head_seq:
            self.problem = Break("removed", source, line + 1, None, last_seq + 1,
                                 f"ends at seq {last_seq} but the chain head is {head_seq}: "
                                 f"the newest event(s) {last_seq + 1}..{head_seq} are missing")
        elif last_seq > head_seq:
            self.problem = Break("inserted", source, line, last_seq, head_seq,
                                 f"goes past the chain head seq {head_seq}: events after it were added")
        elif self.events and self.prev_hash != head_hash:
            self.problem = Break("altered", source, line, last_seq, head_seq,
                                 "last hash differs from the recorded chain head: the line was rewritten")


# ---- several chains, one per instance ----

NO_INSTANCE = ""  # the chain of events that carry no `instance` (written before instances were named)


def chain_name(instance: str) -> str:
    """How a chain is named to the operator."""
    return f"instance {instance}" if instance else "events without an instance"


@dataclass(frozen=True, slots=True)
class ChainsResult:
    """Outcome of a walk over the chains of several instances.

    chains: each chain's own result, by instance. problem: a line that belongs to no chain (torn,
    not an event), which stops the walk. absent: chains the database has a head for that the input
    holds no event of (with head checks only; another host's files, or lines removed whole).
    """

    chains: dict[str, VerifyResult]
    problem_line: Break | None = None
    absent: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return self.problem_line is None and all(result.ok for result in self.chains.values())

    @property
    def events(self) -> int:
        return sum(result.events for result in self.chains.values())

    @property
    def problem(self) -> Break | None:
        """The unreadable line, else the first broken chain's break."""
        if self.problem_line is not None:
            return self.problem_line
        return next((result.problem for result in self.chains.values() if result.problem is not None), None)

    def broken(self) -> list[str]:
        """The instances whose chain is broken."""
        return [instance for instance, result in self.chains.items() if not result.ok]

    def describe(self) -> str:
        """Return one line for the operator: the first problem, or what holds."""
        if self.problem_line is not None:
            return f"BROKEN at {self.problem_line.where}: {self.problem_line.kind}: {self.problem_line.message}"
        if len(self.chains) == 1:
            [(instance, result)] = self.chains.items()
            return result.describe() + (f" ({chain_name(instance)})" if instance else "")
        if not self.chains:
            return "OK: no events"
        broken = self.broken()
        if broken:
            first = self.chains[broken[0]]
            return (f"{first.describe()} ({chain_name(broken[0])}); {len(broken)} of {len(self.chains)} chains "
                    "broken")
        return f"OK: {len(self.chains)} chains, {self.events} events, every chain verified"

    def chain_lines(self) -> list[str]:
        """One line per chain (several chains only), for the operator."""
        if len(self.chains) < 2:
            return []
        return [f"{chain_name(instance)}: {result.describe()}" for instance, result in sorted(self.chains.items())]


class ChainsWalk:
    """Check lines of several instances' chains, interleaved as processes sharing a file write them.

    Each event goes to its instance's ChainWalk; a broken chain stops only itself. A line that is not
    an event stops everything: which chain lost it cannot be told.
    """

    def __init__(self, anchors: dict[str, ChainHead] | None = None, heads: dict[str, ChainHead] | None = None,
                 *, growing: bool = False) -> None:
        self.anchors = anchors or {}
        self.heads = heads
        self.growing = growing
        self.walks: dict[str, ChainWalk] = {}
        self.problem_line: Break | None = None

    def walk(self, instance: str) -> ChainWalk:
        walk = self.walks.get(instance)
        if walk is None:
            walk = self.walks[instance] = ChainWalk(self.anchors.get(instance))
            if self.heads is not None and self.growing and instance in self.heads:
                walk.watch_seq = self.heads[instance][0]
        return walk

    def feed_text(self, source: str, line: int, text: str | bytes) -> bool:
        """Parse and check one line; return False once the walk must stop (a line of no chain)."""
        return feed_line(self, source, line, text, going=self.problem_line is None)

    def feed_invalid(self, source: str, line: int, message: str, kind: str = "invalid") -> bool:
        if self.problem_line is None:
            self.problem_line = Break(kind, source, line, None, None, message)
        return False

    def feed_event(self, source: str, line: int, event: Any) -> bool:
        if self.problem_line is not None:
            return False
        instance = event.get("instance", NO_INSTANCE) if isinstance(event, dict) else None
        if not isinstance(instance, str):
            return self.feed_invalid(source, line, "not an audit event with an instance, an integer seq and a hash")
        self.walk(instance).feed_event(source, line, event)
        return True

    def finish(self) -> ChainsResult:
        """Close every chain's walk; with heads, check each chain walked against its head."""
        heads = self.heads or {}
        absent: list[str] = []
        if self.heads is not None and self.problem_line is None:
            any_events = bool(self.walks)
            for instance, head in heads.items():
                if instance in self.walks or head[0] == 0 or self.anchors.get(instance) == head:
                    continue  # walked, empty, or pruned whole up to its head
                if any_events:
                    absent.append(instance)
                else:  # no event at all: the input's every line was removed
                    self.walk(instance)
        results = {instance: walk.finish(None if self.problem_line else heads.get(instance), growing=self.growing)
                   for instance, walk in sorted(self.walks.items())}
        return ChainsResult(results, self.problem_line, tuple(sorted(absent)))
