"""Queue audit events off the request path; one writer task chains them and appends them to file and table."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import logging
import os
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from llm_proxy.audit.chain import (
    TIMESTAMP_FORMAT,
    ChainWalk,
    VerifyResult,
    canonical,
    chained_events,
    lines_after,
    link_hash,
    newest_event,
)
from llm_proxy.audit.events import Action, Actor, Result
from llm_proxy.audit.masking import mask_request_id, mask_secrets_cached
from llm_proxy.storage.base import AuditStore, ChainHead, InsertEvents
from llm_proxy.storage.errors import DuplicateKey, StorageError

log = logging.getLogger(__name__)

BATCH_SIZE = 500
# The writer gathers events this long before a batch (unless BATCH_SIZE are waiting or someone
# flushes): one transaction costs about ten hand-offs to the database thread, so writing every
# event as it came cost ~100 µs of the event loop's time per request under load.
BATCH_INTERVAL = 0.05
UNSAVED_RETRY_INTERVAL = 1.0
FILE_MODE = 0o640
_TEXT_KEYS = ("timestamp", "action", "actor", "project_id", "request_id", "client_ip", "result")
# Lines read and stored at a time when restoring events the database lost: bounds the memory a
# long stretch of them (a database put back from an old backup) takes.
RESTORE_CHUNK = 2000


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


class _Throttle:
    """Let a log line through at most once per interval, counting what it held back."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.held = 0
        self._next = 0.0

    def ready(self) -> bool:
        now = time.monotonic()
        if now < self._next:
            self.held += 1
            return False
        self._next = now + self.interval
        return True

    def take_held(self) -> int:
        held, self.held = self.held, 0
        return held


class _AppendFile:
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


@dataclass(slots=True)
class _Chained:
    lines: list[bytes]
    events: list[dict[str, Any]]  # to store in the database (none when AUDIT_STORE_IN_DB is off)
    seq: int
    hash: str


class _Unchained(Exception):
    """The file's events past the database's head do not chain from it (raised to roll the restore back)."""

    def __init__(self, result: VerifyResult) -> None:
        super().__init__(result.describe())
        self.result = result


def _sanitized(event: dict[str, Any]) -> dict[str, Any]:
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


def _scrub(event: dict[str, Any]) -> None:
    """Mask secrets in the client-chosen strings of an event, in place (its details included)."""
    for key, value in event.items():
        if key in _GATEWAY_MADE or value is None:
            continue
        if key == "request_id":
            event[key] = mask_request_id(value)  # unique per request: not worth remembering
        else:
            event[key] = _masked(value)


class AuditWriter:
    """Take audit events from the hot path without blocking; one task chains and writes them.

    The chain head (seq, hash) lives in audit_chain and is updated in the same transaction as the
    rows, so seq continues across restarts whether or not events are stored in the database.

    Durability: emit() only enqueues. The writer waits BATCH_INTERVAL after the first event for
    more to gather, takes whatever is queued (up to BATCH_SIZE events), commits it to SQLite (rows
    and chain head in one transaction), then gives the file its lines in one write(2). An event
    therefore reaches the database and the OS within about BATCH_INTERVAL plus one transaction of
    emit() and survives a process crash from then on.
    Nothing is fsynced per event: the file relies on the kernel's writeback (Linux: up to ~30 s)
    and SQLite runs WAL with synchronous=NORMAL, so an OS crash or power loss can lose the last
    seconds. Events still queued when the process is killed (SIGKILL, OOM) are lost; close()
    drains the queue.
    """

    DB_RETRY_DELAYS: tuple[float, ...] = (0.05, 0.2, 1.0)

    def __init__(self, store: AuditStore, *, enabled: bool, file_path: Path | None, create_dir: bool,
                 store_in_db: bool, mask_client_ip: bool, queue_size: int = 10000,
                 clock: Callable[[], datetime] | None = None, batch_interval: float = BATCH_INTERVAL) -> None:
        self._events = store
        self.enabled = enabled
        self.file_path = file_path
        self._store_in_db = store_in_db
        self._mask = mask_client_ip
        self._clock = clock  # None = the system clock, read through the cheaper time.time()
        self._queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue(queue_size)
        self._max_unsaved = queue_size
        self._file = _AppendFile(file_path, create_dir) if file_path is not None else None
        self._task: asyncio.Task[None] | None = None
        self._batch_interval = batch_interval
        self._hurry = asyncio.Event()  # set while someone waits in flush() or close(): no gathering
        self._flushers = 0
        self._accepting = enabled
        self._seq = 0
        self._hash = ""
        self._unsaved: list[dict[str, Any]] = []
        self._ts_second = -1
        self._ts_text = ""
        self._drop_log = _Throttle(1.0)
        self._file_log = _Throttle(10.0)
        self._dropped = 0
        self._file_errors = 0
        self._db_errors = 0
        self._written = 0

    # ---- metrics ----

    @property
    def queue_depth(self) -> int:
        """Events waiting for the writer."""
        return self._queue.qsize()

    @property
    def dropped(self) -> int:
        """Events lost before being chained: queue full, writer closed, or emit() misuse."""
        return self._dropped

    @property
    def file_errors(self) -> int:
        """Chained events that did not reach the file (still in the table when store_in_db is on)."""
        return self._file_errors

    @property
    def db_errors(self) -> int:
        """Batches whose transaction failed after every retry (their rows are retried with the next)."""
        return self._db_errors

    @property
    def written(self) -> int:
        """Events given a seq and hash and handed to the file and/or the database."""
        return self._written

    # ---- lifecycle ----

    async def start(self) -> None:
        """Load the chain head, open the file (raising OSError if it cannot be) and start the writer task.

        Events the file holds past the database's head (a crash between the append and the COMMIT)
        are first put into the database, if their hashes chain from its head.
        """
        if not self.enabled or self._task is not None:
            return
        self._seq, self._hash = await self._events.head()
        if self._file is not None:
            await self._catch_up_with_file(self._file.path)
            await asyncio.to_thread(self._file.open)
        self._task = asyncio.create_task(self._run(), name="audit-writer")

    async def _catch_up_with_file(self, path: Path) -> None:
        """Continue the chain after the file's last event, restoring to the database the events it lacks."""
        file_head = await asyncio.to_thread(newest_event, path)
        if file_head is None or file_head[0] <= self._seq:
            return
        # The file got events the database never committed: a crash between the append and the
        # COMMIT, an outage, a database put back from a backup.
        await self._restore_from_file(path)
        self._seq, self._hash = await self._events.head()
        if file_head[0] > self._seq:
            # They could not be restored: continue after them all the same, so that no seq is ever
            # written twice to the file.
            log.warning("audit file %s is ahead of the database (seq %d > %d); continuing its chain",
                        path, file_head[0], self._seq)
            self._seq, self._hash = file_head

    async def _restore_from_file(self, path: Path) -> None:
        """Put the events the file holds past the database's chain head into it, if their hashes chain from it."""
        try:
            restored: list[tuple[VerifyResult, list[str]]] = []
            await self._events.extend(functools.partial(self._restore, path, restored))
            result, sources = restored[0]
        except _Unchained as exc:
            problem = exc.result.problem
            assert problem is not None
            log.error("audit file %s has events past the database's chain head that do not chain from it "
                      "(%s at seq %s: %s); none restored, `llm-proxy audit verify` names the line",
                      path, problem.kind, problem.seq or problem.expected_seq, problem.message)
            return
        except (StorageError, OSError, EOFError, zlib.error) as exc:
            log.error("audit file %s: events past the database's chain head could not be restored: %s", path, exc)
            return
        if not result.events:
            return
        if self._store_in_db:
            log.warning("restored %d audit events (seq %d..%d) from %s into the database", result.events,
                        result.first_seq, result.last_seq, " and ".join(sources))
        else:
            log.warning("audit chain head advanced to seq %d after %d events in %s that the database had not "
                        "recorded (AUDIT_STORE_IN_DB is off: no rows)", result.last_seq, result.events,
                        " and ".join(sources))

    async def _restore(self, path: Path, restored: list[tuple[VerifyResult, list[str]]], head: ChainHead,
                       insert: InsertEvents) -> ChainHead | None:
        """Store the file's events past the stored head (a step of AuditStore.extend); note them and their files.

        Raises _Unchained, rolling every row back, unless they form one chain from the head.
        """
        walk = ChainWalk(anchor=head)
        sources: dict[str, None] = {}  # an ordered set
        lines = lines_after(path, head[0])
        while events := await asyncio.to_thread(chained_events, lines, walk, RESTORE_CHUNK):
            sources.update(dict.fromkeys(source for source, _ in events))
            if self._store_in_db:
                await insert([event for _, event in events])
        result = walk.finish()
        if not result.ok:
            raise _Unchained(result)
        restored.append((result, list(sources)))
        if not result.events:
            return None
        assert result.last_seq is not None and result.last_hash is not None
        return result.last_seq, result.last_hash

    async def flush(self) -> None:
        """Wait until every event emitted so far has been written (no-op when the writer is not running)."""
        task = self._task
        if task is None or task.done():
            return
        joined = asyncio.ensure_future(self._queue.join())
        self._flushers += 1
        self._hurry.set()
        try:
            await asyncio.wait({joined, task}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            joined.cancel()
            self._flushers -= 1
            if not self._flushers and self._accepting:
                self._hurry.clear()

    async def close(self) -> None:
        """Stop accepting events, write everything already queued, stop the task and close the file."""
        self._accepting = False
        self._hurry.set()
        task = self._task
        if task is not None and not task.done():
            await self._queue.put(None)  # FIFO: lands after every event emitted before close()
            await asyncio.wait({task})
        if self._file is not None:
            await asyncio.to_thread(self._file.close)

    # ---- hot path ----

    def emit(self, action: Action, *, actor: Actor, result: Result, project_id: str | None = None,
             request_id: str | None = None, client_ip: str | None = None,
             details: dict[str, Any] | None = None) -> None:
        """Queue one event; never blocks, never raises (a full queue drops it and counts it).

        Call from the event loop thread. Keys without a value (None) are left out, also inside details.
        """
        if not self._accepting:
            if self.enabled:
                self._drop("audit writer is closed")
            return
        try:
            event: dict[str, Any] = {"timestamp": self._timestamp(), "action": action, "actor": actor}
            if project_id is not None:
                event["project_id"] = project_id
            if request_id is not None:
                event["request_id"] = request_id
            if client_ip is not None:
                event["client_ip"] = mask_ip(client_ip) if self._mask else client_ip
            event["result"] = result
            if details:
                kept = {key: value for key, value in details.items() if value is not None}
                if kept:
                    event["details"] = kept
            self._queue.put_nowait(event)
        except asyncio.QueueFull:
            self._drop("audit queue is full")
        # A caller's bad argument (details not a dict, an unhashable IP) or a queue bound to
        # another loop must not break the request being audited.
        except (AttributeError, TypeError, ValueError, RuntimeError):
            self._drop(f"audit event {action!r} could not be queued", exc_info=True)

    def _drop(self, reason: str, exc_info: bool = False) -> None:
        self._dropped += 1
        if self._drop_log.ready():  # a flood of drops must not become a flood of log lines
            log.error("%s: audit event dropped (%d dropped in total, %d since the last report)",
                      reason, self._dropped, self._drop_log.take_held() + 1, exc_info=exc_info)

    def _timestamp(self) -> str:
        if self._clock is None:
            second = int(time.time())
            if second != self._ts_second:  # format once per second, not per event
                self._ts_second = second
                self._ts_text = time.strftime(TIMESTAMP_FORMAT, time.gmtime(second))
            return self._ts_text
        now = self._clock()
        if now.tzinfo is not None:
            now = now.astimezone(UTC)
        return now.strftime(TIMESTAMP_FORMAT)

    # ---- writer task ----

    async def _run(self) -> None:
        queue = self._queue
        while True:
            if self._unsaved:
                # Rows the database refused are retried even while no new event arrives.
                try:
                    item = await asyncio.wait_for(queue.get(), timeout=UNSAVED_RETRY_INTERVAL)
                except TimeoutError:
                    await self._retry_unsaved()
                    continue
            else:
                item = await queue.get()
            if item is not None:
                await self._gather()
            taken, batch, stop = 1, [], item is None
            if item is not None:
                batch.append(item)
            while not stop and len(batch) < BATCH_SIZE:
                try:
                    item = queue.get_nowait()
                except asyncio.QueueEmpty:
                    break
                taken += 1
                if item is None:
                    stop = True
                else:
                    batch.append(item)
            try:
                if batch:
                    await self._write_batch(batch)
            except Exception:
                log.exception("audit writer failed on a batch of %d events", len(batch))
            finally:
                for _ in range(taken):
                    queue.task_done()
            if stop:
                if self._unsaved:
                    await self._retry_unsaved()
                return

    async def _gather(self) -> None:
        """Give more events BATCH_INTERVAL to arrive, unless a batch is full or someone is flushing."""
        if self._batch_interval <= 0 or self._hurry.is_set() or self._queue.qsize() >= BATCH_SIZE - 1:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._hurry.wait(), self._batch_interval)

    async def _retry_unsaved(self) -> None:
        try:
            await self._store([])
        except Exception:
            log.exception("audit writer could not retry %d unsaved rows", len(self._unsaved))

    async def _write_batch(self, batch: list[dict[str, Any]]) -> None:
        for event in batch:
            for key in _TEXT_KEYS:
                value = event.get(key)
                if value is not None and type(value) is not str:
                    # audit_events stores these as TEXT; keep file and table identical.
                    event[key] = str(value)
            _scrub(event)
        chained, in_file = await self._store(batch)
        if chained is None:
            # The database is unavailable: chain from the head in memory so the file still gets
            # the batch; the rows are retried with the next batch.
            chained = self._chain(batch, self._seq, self._hash)
            self._unsaved = (self._unsaved + chained.events)[-self._max_unsaved:]
        self._seq, self._hash = chained.seq, chained.hash
        self._written += len(batch)
        if not in_file:
            await self._append_lines(chained)

    def _chain(self, batch: list[dict[str, Any]], seq: int, prev: str) -> _Chained:
        """Give each event its seq and hash after (seq, prev); also encode its line and row."""
        chained = _Chained([], [], seq, prev)
        for index, event in enumerate(batch):
            event.pop("hash", None)  # chained again after another process moved the head
            event["seq"] = seq + 1
            try:
                body = canonical(event)
            except TypeError:
                log.error("audit event %r has values that cannot be encoded; storing a sanitized copy",
                          event.get("action"))
                event = batch[index] = _sanitized(event)
                body = canonical(event)
            seq += 1
            prev = event["hash"] = link_hash(prev, body)
            chained.lines.append(orjson.dumps(event, default=str))
            if self._store_in_db:
                chained.events.append(event)
        chained.seq, chained.hash = seq, prev
        return chained

    async def _store(self, batch: list[dict[str, Any]]) -> tuple[_Chained | None, bool]:
        """Chain the batch in one transaction with its rows and the head, and append it to the file there.

        Returns the chained batch (None if the database failed before the file got it) and whether
        the file has it. Chaining under BEGIN IMMEDIATE from the stored head keeps seq unique even
        when another process (a CLI command) appended to the chain since we last wrote; appending
        before COMMIT, while this transaction holds the database's write lock, puts every
        process's lines into the file in seq order (another writer waits for the lock).
        """
        appended: list[_Chained] = []

        done: list[_Chained] = []

        async def step(stored: ChainHead, insert: InsertEvents) -> ChainHead:
            seq, prev = self._seq, self._hash
            if stored[0] > seq:
                log.warning("audit chain was extended by another process (seq %d..%d); continuing after it",
                            seq + 1, stored[0])
                seq, prev = stored
                if self._unsaved:
                    log.error("audit events %d..%d collide with that process's events and are not stored "
                              "in the database", self._unsaved[0]["seq"], self._unsaved[-1]["seq"])
                    self._unsaved = []
            chained = self._chain(batch, seq, prev)
            await insert(self._unsaved + chained.events)
            if self._file is not None and chained.lines:
                await self._append_lines(chained)
                appended.append(chained)
            done.append(chained)
            return chained.seq, chained.hash

        for delay in (*self.DB_RETRY_DELAYS, None):
            try:
                await self._events.extend(step)
                chained = done[-1]
            except DuplicateKey as exc:
                # A seq already in the table: retrying cannot help, and carrying the rows on
                # would block every later batch. The file still gets them.
                self._db_errors += 1
                log.error("audit events not stored in the database: %s", exc)
                self._unsaved = []
                return self._chain(batch, self._seq, self._hash), False
            except (StorageError, OSError) as exc:
                if appended:
                    # COMMIT failed after the file got the batch: another try would append it
                    # twice. Its rows wait for the next batch, like those of a failed database.
                    self._db_errors += 1
                    log.error("audit database commit failed (%s); the events are in the file and kept to "
                              "retry with the next batch", exc)
                    self._unsaved = (self._unsaved + appended[0].events)[-self._max_unsaved:]
                    return appended[0], True
                if delay is not None:
                    log.warning("audit database write failed (%s); retrying in %.2fs", exc, delay)
                    await asyncio.sleep(delay)
                    continue
                self._db_errors += 1
                log.error("audit database write failed after retries (%s); the events are kept to retry "
                          "with the next batch", exc)
                return None, False
            self._unsaved = []
            return chained, True
        return None, False  # not reached: the last delay is None

    async def _append_lines(self, chained: _Chained) -> None:
        if self._file is None or not chained.lines:
            return
        data, count = b"\n".join(chained.lines) + b"\n", len(chained.lines)
        written, error = await asyncio.to_thread(self._file.append, data)
        if error is None:
            return
        lost = count - data.count(b"\n", 0, written)
        self._file_errors += lost
        if self._file_log.ready():
            where = "they are in the database" if self._store_in_db else "AUDIT_STORE_IN_DB is off: they are lost"
            log.error("audit file %s: write failed (%s); %d events missing from the file, %s "
                      "(%d file errors in total)", self._file.path, error, lost, where, self._file_errors)

