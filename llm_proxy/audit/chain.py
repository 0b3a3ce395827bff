"""Hash-chain the audit trail: canonical JSON, verification of files and of the table, pruning."""

from __future__ import annotations

import gzip
import hashlib
import io
import math
import os
import re
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson

from llm_proxy.storage.base import AuditStore, ChainHead, PruneResult

ZERO_HASH = "0" * 64
TIMESTAMP_FORMAT = "%Y-%m-%dT%H:%M:%SZ"
TABLE = "audit_events"
_PAGE = 2000
_TAIL_BYTES = 1 << 16


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
        if not text.strip():
            return self.problem is None  # blank lines carry no event
        try:
            event = orjson.loads(text)
        except orjson.JSONDecodeError:
            return self.feed_invalid(source, line, "not valid JSON (torn or edited line)")
        return self.feed_event(source, line, event)

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


def verify_lines(lines: Iterable[tuple[str, int, str | bytes]], *, anchor: tuple[int, str] | None = None,
                 head: tuple[int, str] | None = None) -> VerifyResult:
    """Walk (source, line number, text) in order and report the first break of the chain.

    `anchor` = (seq, hash) the first event must continue from (pass (0, ZERO_HASH) to insist the
    chain starts at seq 1); without it a first event with seq > 1 is accepted on trust.
    """
    walk = ChainWalk(anchor)
    for source, number, text in lines:
        if not walk.feed_text(source, number, text):
            break
    return walk.finish(head)


# logrotate's names for a rotated file: NAME.N, or NAME-DATE with dateext; compressed, + .gz.
_ROTATED_SUFFIX = r"(?:\.(?P<n>\d+)|-(?P<date>\d{8,14}))?(?:\.gz)?"
_ROTATED = re.compile(r"(?P<base>.+?)" + _ROTATED_SUFFIX)


def rotation_order(paths: Iterable[Path]) -> list[Path]:
    """Sort logrotate's files oldest first: audit.log.N[.gz] (higher N older), dated by date, then the current."""
    def key(path: Path) -> tuple[int, int]:
        match = _ROTATED.fullmatch(path.name)
        if match and match.group("n"):
            return (0, -int(match.group("n")))
        if match and match.group("date"):
            return (1, int(match.group("date")))
        return (2, 0)
    return sorted(paths, key=key)


def audit_files(current: Path) -> list[Path]:
    """Return the audit file and logrotate's siblings of it (name.N, name-DATE, optionally .gz)."""
    # Only regular files: /dev/full or a FIFO would read forever or block.
    pattern = re.compile(re.escape(current.name) + _ROTATED_SUFFIX)
    try:
        return sorted(path for path in current.parent.iterdir() if pattern.fullmatch(path.name) and path.is_file())
    except OSError:
        return []


def _open(path: Path) -> io.BufferedIOBase:
    """Open an audit file for reading, decompressing a rotated .gz."""
    return gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")


def verify_files(paths: Iterable[Path], *, anchor: tuple[int, str] | None = None,
                 head: tuple[int, str] | None = None, growing: bool = False) -> VerifyResult:
    """Walk rotated (plain or .gz) and current audit files as one chain, oldest first.

    With `head` (the database's chain head, read before the files) the files must reach it: that is
    what reveals the newest lines being deleted. `growing`: a gateway may have appended past it since.
    """
    walk = ChainWalk(anchor)
    if head is not None and growing:
        walk.watch_seq = head[0]
    for path in rotation_order(paths):
        number = 0
        try:
            with _open(path) as handle:
                for number, raw in enumerate(handle, 1):
                    if not walk.feed_text(str(path), number, raw):
                        return walk.finish()
        except (OSError, EOFError, zlib.error) as exc:
            walk.feed_invalid(str(path), number + 1, f"cannot be read: {exc}", kind="unreadable")
            return walk.finish()
    return walk.finish(head, growing=growing)


# ---- reading files from their end ----

def _event_of(raw: bytes) -> dict[str, Any] | None:
    """Parse a line as an audit event (a JSON object with an integer seq and a hash), else None."""
    try:
        event = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    if isinstance(event, dict) and type(event.get("seq")) is int and isinstance(event.get("hash"), str):
        return event
    return None


def _lines_backwards(handle: io.BufferedIOBase) -> Iterator[tuple[int, bytes]]:
    """Yield (where the next line starts, line) from a file's last line to its first, one block at a time."""
    end = handle.seek(0, os.SEEK_END)
    carry = b""  # the start of a line that began in the block before
    while end > 0:
        start = max(0, end - _TAIL_BYTES)
        handle.seek(start)
        block = handle.read(end - start) + carry
        pieces = block.split(b"\n")
        carry = pieces.pop(0) if start > 0 else b""
        position = start + len(block)
        for piece in reversed(pieces):
            yield position + 1, piece
            position -= len(piece) + 1
        end = start


def _lines_forwards(handle: io.BufferedIOBase) -> Iterator[tuple[int, bytes]]:
    """Yield (where the next line starts, line) from first to last, for files that cannot seek back cheaply."""
    position = 0
    for raw in handle:
        position += len(raw)
        yield position, raw


def _last_event(path: Path, at_most: float = math.inf) -> tuple[int, dict[str, Any]] | None:
    """Return (where the next line starts, event) for the last event in a file with seq <= at_most, or None."""
    found = None
    with _open(path) as handle:
        backwards = not path.name.endswith(".gz")  # a .gz is read through, keeping the last match
        for after, raw in (_lines_backwards if backwards else _lines_forwards)(handle):
            event = _event_of(raw)
            if event is not None and event["seq"] <= at_most:
                found = after, event
                if backwards:
                    break
    return found


def newest_event(current: Path) -> tuple[int, str] | None:
    """Return (seq, hash) of the audit file's last event or, while it has none, of its newest rotated sibling's."""
    for path in reversed(rotation_order(audit_files(current))):
        try:
            found = _last_event(path)
        except (OSError, EOFError, zlib.error):
            continue
        if found is not None:
            return found[1]["seq"], found[1]["hash"]
    return None


def lines_after(current: Path, seq: int) -> Iterator[tuple[str, bytes]]:
    """Yield (file, line) for every line after the last event with seq <= `seq`, oldest first.

    The audit file is read from its end backwards a block at a time; only if no event in it is that
    old are its rotated siblings read too (newest first, plain or .gz), so a file is never read
    whole to find its last few lines. Raises OSError (or a gzip error) if a file cannot be read.
    """
    starts: list[tuple[Path, int]] = []
    for path in reversed(rotation_order(audit_files(current))):
        found = _last_event(path, at_most=seq)
        starts.append((path, 0 if found is None else found[0]))
        if found is not None:
            break
    for path, offset in reversed(starts):
        with _open(path) as handle:
            handle.seek(offset)
            for raw in handle:
                yield str(path), raw


def chained_events(lines: Iterator[tuple[str, bytes]], walk: ChainWalk,
                   count: int) -> list[tuple[str, dict[str, Any]]]:
    """Feed lines to the walk until it has taken `count` events; return them with their file.

    Fewer (none at the end) when the lines run out or the chain breaks.
    """
    events: list[tuple[str, dict[str, Any]]] = []
    for source, raw in lines:
        if not raw.strip():
            continue  # blank lines carry no event
        try:
            event = orjson.loads(raw)
        except orjson.JSONDecodeError:
            walk.feed_invalid(source, 0, "not valid JSON (torn or edited line)")
            break
        if not walk.feed_event(source, 0, event):
            break
        events.append((source, event))
        if len(events) == count:
            break
    return events


async def verify_table(store: AuditStore, *, anchor: ChainHead | None = None,
                       head: ChainHead | None = None, growing: bool = False) -> VerifyResult:
    """Walk the stored events in seq order; after a prune, check from the newest audit.prune event's anchor.

    Without any audit.prune event a first event with seq > 1 is accepted on trust. `line` in a
    Break is the event's position in seq order. With `head` the events must reach it; `growing`:
    the head was read before the walk and a writer may have appended since (accepted if they chain).
    """
    if anchor is None:
        anchor = await store.prune_anchor()
    walk = ChainWalk(anchor)
    if head is not None and growing:
        walk.watch_seq = head[0]
    position, after = 0, -1
    while True:
        page = await store.walk(after, _PAGE)
        for after, event in page:
            position += 1
            if event is None:
                walk.feed_invalid(TABLE, position, f"details of seq {after} is not valid JSON")
                return walk.finish()
            if not walk.feed_event(TABLE, position, event):
                return walk.finish()
        if len(page) < _PAGE:
            return walk.finish(head, growing=growing)


# ---- retention ----

async def prune(store: AuditStore, older_than_days: int, batch_size: int = 1000,
                now: datetime | None = None) -> PruneResult:
    """Delete stored events older than the cutoff, oldest first, one transaction per batch.

    Only a prefix of the chain is ever deleted, so what remains is one unbroken chain that
    verify_table checks from the last pruned hash.
    """
    if older_than_days < 0:
        raise ValueError("older_than_days must not be negative")
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    cutoff = ((now or datetime.now(UTC)) - timedelta(days=older_than_days)).astimezone(UTC)
    return await store.prune(cutoff.strftime(TIMESTAMP_FORMAT), batch_size)
