"""Chain batches of audit events and commit them: rows and head in one transaction, the file appended inside it."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import orjson

from llm_proxy.audit.chain import canonical, link_hash
from llm_proxy.audit.events import sanitized, scrub
from llm_proxy.storage.base import AuditStore, ChainHead, InsertEvents
from llm_proxy.storage.errors import DuplicateKey, StorageError

log = logging.getLogger(__name__)

_TEXT_KEYS = ("timestamp", "action", "actor", "project_id", "request_id", "client_ip", "result")


@dataclass(slots=True)
class Chained:
    """A batch given its seqs and hashes: its lines for the file, its rows and the head after it."""

    lines: list[bytes]
    events: list[dict[str, Any]]  # to store in the database (none when AUDIT_STORE_IN_DB is off)
    seq: int
    hash: str


class BatchCommitter:
    """The writer task's side of its instance's chain: the head it continues from and the rows the database
    has not taken yet. Every event it chains carries `instance` (none when it is '', as in tests of the chain).

    `append` gives the audit file a batch's lines (None: there is no file). It runs inside the
    transaction, while the database's write lock is held, so every process's lines reach the file
    in seq order. `retry_delays` are the waits between tries of a failed transaction.
    """

    def __init__(self, store: AuditStore, append: Callable[[Chained], Awaitable[None]] | None, *,
                 instance: str, store_in_db: bool, max_unsaved: int) -> None:
        self._events = store
        self._append = append
        self.instance = instance
        self._store_in_db = store_in_db
        self._max_unsaved = max_unsaved
        self.seq = 0
        self.hash = ""
        self.unsaved: list[dict[str, Any]] = []
        self.db_errors = 0
        self.written = 0

    async def retry_unsaved(self, retry_delays: tuple[float, ...]) -> None:
        """Store the rows the database refused before, alone."""
        try:
            await self._store([], retry_delays)
        except Exception:
            log.exception("audit writer could not retry %d unsaved rows", len(self.unsaved))

    async def write(self, batch: list[dict[str, Any]], retry_delays: tuple[float, ...]) -> None:
        """Chain and store a batch, then give it to the file unless the transaction already did."""
        for event in batch:
            for key in _TEXT_KEYS:
                value = event.get(key)
                if value is not None and type(value) is not str:
                    # audit_events stores these as TEXT; keep file and table identical.
                    event[key] = str(value)
            scrub(event)
        chained, in_file = await self._store(batch, retry_delays)
        if chained is None:
            # The database is unavailable: chain from the head in memory so the file still gets
            # the batch; the rows are retried with the next batch.
            chained = self._chain(batch, self.seq, self.hash)
            self.unsaved = (self.unsaved + chained.events)[-self._max_unsaved:]
        self.seq, self.hash = chained.seq, chained.hash
        self.written += len(batch)
        if not in_file and self._append is not None:
            await self._append(chained)

    def _chain(self, batch: list[dict[str, Any]], seq: int, prev: str) -> Chained:
        """Give each event its seq and hash after (seq, prev); also encode its line and row."""
        chained = Chained([], [], seq, prev)
        for index, event in enumerate(batch):
            event.pop("hash", None)  # chained again after another process moved the head
            if self.instance:
                event["instance"] = self.instance
            event["seq"] = seq + 1
            try:
                body = canonical(event)
            except TypeError:
                log.error("audit event %r has values that cannot be encoded; storing a sanitized copy",
                          event.get("action"))
                event = batch[index] = sanitized(event)
                body = canonical(event)
            seq += 1
            prev = event["hash"] = link_hash(prev, body)
            chained.lines.append(orjson.dumps(event, default=str))
            if self._store_in_db:
                chained.events.append(event)
        chained.seq, chained.hash = seq, prev
        return chained

    async def _store(self, batch: list[dict[str, Any]],
                     retry_delays: tuple[float, ...]) -> tuple[Chained | None, bool]:
        """Chain the batch in one transaction with its rows and the head, and append it to the file there.

        Returns the chained batch (None if the database failed before the file got it) and whether
        the file has it. Chaining under BEGIN IMMEDIATE from the stored head keeps seq unique even
        when another process (a CLI command) appended to the chain since we last wrote; appending
        before COMMIT, while this transaction holds the database's write lock, puts every
        process's lines into the file in seq order (another writer waits for the lock).
        """
        appended: list[Chained] = []

        done: list[Chained] = []

        async def step(stored: ChainHead, insert: InsertEvents) -> ChainHead:
            seq, prev = self.seq, self.hash
            if stored[0] > seq:
                log.warning("audit chain was extended by another process (seq %d..%d); continuing after it",
                            seq + 1, stored[0])
                seq, prev = stored
                if self.unsaved:
                    log.error("audit events %d..%d collide with that process's events and are not stored "
                              "in the database", self.unsaved[0]["seq"], self.unsaved[-1]["seq"])
                    self.unsaved = []
            chained = self._chain(batch, seq, prev)
            await insert(self.unsaved + chained.events)
            if self._append is not None and chained.lines:
                await self._append(chained)
                appended.append(chained)
            done.append(chained)
            return chained.seq, chained.hash

        for delay in (*retry_delays, None):
            try:
                await self._events.extend(self.instance, step)
                chained = done[-1]
            except DuplicateKey as exc:
                # A seq already in the table: retrying cannot help, and carrying the rows on
                # would block every later batch. The file still gets them.
                self.db_errors += 1
                log.error("audit events not stored in the database: %s", exc)
                self.unsaved = []
                return self._chain(batch, self.seq, self.hash), False
            except (StorageError, OSError) as exc:
                if appended:
                    # COMMIT failed after the file got the batch: another try would append it
                    # twice. Its rows wait for the next batch, like those of a failed database.
                    self.db_errors += 1
                    log.error("audit database commit failed (%s); the events are in the file and kept to "
                              "retry with the next batch", exc)
                    self.unsaved = (self.unsaved + appended[0].events)[-self._max_unsaved:]
                    return appended[0], True
                if delay is not None:
                    log.warning("audit database write failed (%s); retrying in %.2fs", exc, delay)
                    await asyncio.sleep(delay)
                    continue
                self.db_errors += 1
                log.error("audit database write failed after retries (%s); the events are kept to retry "
                          "with the next batch", exc)
                return None, False
            self.unsaved = []
            return chained, True
        return None, False  # not reached: the last delay is None
