"""The audit file on disk: logrotate's rotated siblings, an append that follows rotation, reading back from the end."""

from __future__ import annotations

import gzip
import io
import logging
import math
import os
import re
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import orjson

log = logging.getLogger(__name__)

FILE_MODE = 0o640
_TAIL_BYTES = 1 << 16


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


def open_audit_file(path: Path) -> io.BufferedIOBase:
    """Open an audit file for reading, decompressing a rotated .gz."""
    return gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")


class AppendFile:
    """An O_APPEND descriptor that follows logrotate's rename + create, as WatchedFileHandler does.

    Only ever used from one worker thread at a time (the writer awaits each call).
    """

    def __init__(self, path: Path, create_dir: bool) -> None:
        self.path = path
        self.create_dir = create_dir
        self._fd: int | None = None
        self._id: tuple[int, int] | None = None
        self._torn_id: tuple[int, int] | None = None  # file whose last line a failed write cut short

    def open(self) -> None:
        self.close()
        if self.create_dir:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
        st = os.fstat(fd)
        self._fd, self._id = fd, (st.st_dev, st.st_ino)

    def reopen_if_needed(self) -> None:
        try:
            st = os.stat(self.path)
            moved = (st.st_dev, st.st_ino) != self._id
        except FileNotFoundError:
            moved = True
        if moved or self._fd is None:
            self.open()

    def append(self, data: bytes) -> tuple[int, OSError | None]:
        """Write all of data; return (bytes written, the error that stopped it)."""
        written = 0
        try:
            self.reopen_if_needed()
            assert self._fd is not None
            if self._torn_id == self._id:
                # Finish the cut-off line so the next events start on a line of their own.
                os.write(self._fd, b"\n")
                self._torn_id = None
            view = memoryview(data)
            while written < len(data):
                written += os.write(self._fd, view[written:])
        except OSError as exc:
            if written:
                self._torn_id = self._id
            return written, exc
        return written, None

    def close(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            try:
                os.close(fd)
            except OSError as exc:
                log.error("audit file %s: close failed: %s", self.path, exc)


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


def _last_event(path: Path, instance: str, at_most: float = math.inf) -> tuple[int, dict[str, Any]] | None:
    """Return (where the next line starts, event) for the last event of an instance's chain in a file with
    seq <= at_most, or None."""
    found = None
    with open_audit_file(path) as handle:
        backwards = not path.name.endswith(".gz")  # a .gz is read through, keeping the last match
        for after, raw in (_lines_backwards if backwards else _lines_forwards)(handle):
            event = _event_of(raw)
            if event is not None and event["seq"] <= at_most and event.get("instance", "") == instance:
                found = after, event
                if backwards:
                    break
    return found


def newest_event(current: Path, instance: str) -> tuple[int, str] | None:
    """Return (seq, hash) of the last event of an instance's chain in the audit file or, while it has none,
    in its newest rotated sibling (older files are not read: a crash loses only the newest lines, and a
    new instance's chain, found in none, must not cost a read of every file at each start)."""
    for path in list(reversed(rotation_order(audit_files(current))))[:2]:
        try:
            found = _last_event(path, instance)
        except (OSError, EOFError, zlib.error):
            continue
        if found is not None:
            return found[1]["seq"], found[1]["hash"]
    return None


def lines_after(current: Path, seq: int, instance: str) -> Iterator[tuple[str, bytes]]:
    """Yield (file, line) for every line after the last event of an instance's chain with seq <= `seq`,
    oldest first (the lines of other instances too: the caller picks its own).

    The audit file is read from its end backwards a block at a time; only if no event in it is that
    old are its rotated siblings read too (newest first, plain or .gz), so a file is never read
    whole to find its last few lines. Raises OSError (or a gzip error) if a file cannot be read.
    """
    starts: list[tuple[Path, int]] = []
    for path in reversed(rotation_order(audit_files(current))):
        found = _last_event(path, instance, at_most=seq)
        starts.append((path, 0 if found is None else found[0]))
        if found is not None:
            break
    for path, offset in reversed(starts):
        with open_audit_file(path) as handle:
            handle.seek(offset)
            for raw in handle:
                yield str(path), raw
