"""Queue audit events off the request path; one writer task chains them and appends them to file and table."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from llm_proxy.audit.chain import TIMESTAMP_FORMAT
from llm_proxy.audit.committer import BatchCommitter, Chained
from llm_proxy.audit.events import Action, Actor, Result
from llm_proxy.audit.files import AppendFile
from llm_proxy.audit.masking import mask_ip
from llm_proxy.audit.restore import catch_up_with_file
from llm_proxy.storage.base import AuditStore

log = logging.getLogger(__name__)

BATCH_SIZE = 500
# The writer gathers events this long before a batch (unless BATCH_SIZE are waiting or someone
# flushes): one transaction costs about ten hand-offs to the database thread, so writing every
# event as it came cost ~100 µs of the event loop's time per request under load.
BATCH_INTERVAL = 0.05
UNSAVED_RETRY_INTERVAL = 1.0


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


class AuditWriter:
    """Take audit events from the hot path without blocking; one task chains and writes them.

    Its events form the chain of its `instance` (INSTANCE_ID; each process writes its own, SPEC §7),
    and carry it. The chain head (seq, hash) lives in audit_chain and is updated in the same
    transaction as the rows, so seq continues across restarts whether or not events are stored in
    the database. An instance of '' writes events without `instance` (the chain of events written
    before instances were named; tests of the chain alone).

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
                 store_in_db: bool, mask_client_ip: bool, instance: str = "", queue_size: int = 10000,
                 clock: Callable[[], datetime] | None = None, batch_interval: float = BATCH_INTERVAL) -> None:
        self._events = store
        self.enabled = enabled
        self.file_path = file_path
        self._store_in_db = store_in_db
        self._mask = mask_client_ip
        self._clock = clock  # None = the system clock, read through the cheaper time.time()
        self._queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue(queue_size)
        self._file = AppendFile(file_path, create_dir) if file_path is not None else None
        self._committer = BatchCommitter(store, self._append_lines if self._file is not None else None,
                                         instance=instance, store_in_db=store_in_db, max_unsaved=queue_size)
        self._task: asyncio.Task[None] | None = None
        self._batch_interval = batch_interval
        self._hurry = asyncio.Event()  # set while someone waits in flush() or close(): no gathering
        self._flushers = 0
        self._accepting = enabled
        self._ts_second = -1
        self._ts_text = ""
        self._drop_log = _Throttle(1.0)
        self._file_log = _Throttle(10.0)
        self._dropped = 0
        self._file_errors = 0

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
        return self._committer.db_errors

    @property
    def written(self) -> int:
        """Events given a seq and hash and handed to the file and/or the database."""
        return self._committer.written

    # ---- lifecycle ----

    async def start(self) -> None:
        """Load the chain head, open the file (raising OSError if it cannot be) and start the writer task.

        Events the file holds past the database's head (a crash between the append and the COMMIT)
        are first put into the database, if their hashes chain from its head.
        """
        if not self.enabled or self._task is not None:
            return
        instance = self._committer.instance
        head = await self._events.head(instance)
        if self._file is not None:
            head = await catch_up_with_file(self._events, self._file.path, head, instance=instance,
                                            store_in_db=self._store_in_db)
            await asyncio.to_thread(self._file.open)
        self._committer.seq, self._committer.hash = head
        self._task = asyncio.create_task(self._run(), name="audit-writer")

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
            if self._committer.unsaved:
                # Rows the database refused are retried even while no new event arrives.
                try:
                    item = await asyncio.wait_for(queue.get(), timeout=UNSAVED_RETRY_INTERVAL)
                except TimeoutError:
                    await self._committer.retry_unsaved(self.DB_RETRY_DELAYS)
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
                    await self._committer.write(batch, self.DB_RETRY_DELAYS)
            except Exception:
                log.exception("audit writer failed on a batch of %d events", len(batch))
            finally:
                for _ in range(taken):
                    queue.task_done()
            if stop:
                if self._committer.unsaved:
                    await self._committer.retry_unsaved(self.DB_RETRY_DELAYS)
                return

    async def _gather(self) -> None:
        """Give more events BATCH_INTERVAL to arrive, unless a batch is full or someone is flushing."""
        if self._batch_interval <= 0 or self._hurry.is_set() or self._queue.qsize() >= BATCH_SIZE - 1:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._hurry.wait(), self._batch_interval)

    async def _append_lines(self, chained: Chained) -> None:
        """Give the file a batch's lines in one write(2); count, and report now and then, the events it lost."""
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
