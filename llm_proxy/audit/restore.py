"""At start, put into the database the audit events the file holds past its chain head (a crash before COMMIT)."""

from __future__ import annotations

import asyncio
import functools
import logging
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson

from llm_proxy.audit.chain import ChainWalk, VerifyResult
from llm_proxy.audit.files import lines_after, newest_event
from llm_proxy.storage.base import AuditStore, ChainHead, InsertEvents
from llm_proxy.storage.errors import StorageError

log = logging.getLogger(__name__)

# Lines read and stored at a time when restoring events the database lost: bounds the memory a
# long stretch of them (a database put back from an old backup) takes.
RESTORE_CHUNK = 2000


class _Unchained(Exception):
    """The file's events past the database's head do not chain from it (raised to roll the restore back)."""

    def __init__(self, result: VerifyResult) -> None:
        super().__init__(result.describe())
        self.result = result


async def catch_up_with_file(store: AuditStore, path: Path, head: ChainHead, *, instance: str,
                             store_in_db: bool) -> ChainHead:
    """Return the head to continue the instance's chain after: its last event in the file, restoring to the
    database the events of it the database lacks."""
    file_head = await asyncio.to_thread(newest_event, path, instance)
    if file_head is None or file_head[0] <= head[0]:
        return head
    # The file got events the database never committed: a crash between the append and the
    # COMMIT, an outage, a database put back from a backup.
    await _restore_from_file(store, path, instance, store_in_db)
    head = await store.head(instance)
    if file_head[0] > head[0]:
        # They could not be restored: continue after them all the same, so that no seq is ever
        # written twice to the file.
        log.warning("audit file %s is ahead of the database (seq %d > %d); continuing its chain",
                    path, file_head[0], head[0])
        return file_head
    return head


async def _restore_from_file(store: AuditStore, path: Path, instance: str, store_in_db: bool) -> None:
    """Put the events of the instance's chain the file holds past the database's head into it, if their
    hashes chain from it."""
    try:
        restored: list[tuple[VerifyResult, list[str]]] = []
        await store.extend(instance, functools.partial(_restore, path, instance, store_in_db, restored))
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
    if store_in_db:
        log.warning("restored %d audit events (seq %d..%d) from %s into the database", result.events,
                    result.first_seq, result.last_seq, " and ".join(sources))
    else:
        log.warning("audit chain head advanced to seq %d after %d events in %s that the database had not "
                    "recorded (AUDIT_STORE_IN_DB is off: no rows)", result.last_seq, result.events,
                    " and ".join(sources))


async def _restore(path: Path, instance: str, store_in_db: bool, restored: list[tuple[VerifyResult, list[str]]],
                   head: ChainHead, insert: InsertEvents) -> ChainHead | None:
    """Store the file's events past the stored head (a step of AuditStore.extend); note them and their files.

    Raises _Unchained, rolling every row back, unless they form one chain from the head.
    """
    walk = ChainWalk(anchor=head)
    sources: dict[str, None] = {}  # an ordered set
    lines = lines_after(path, head[0], instance)
    while events := await asyncio.to_thread(chained_events, lines, walk, instance, RESTORE_CHUNK):
        sources.update(dict.fromkeys(source for source, _ in events))
        if store_in_db:
            await insert([event for _, event in events])
    result = walk.finish()
    if not result.ok:
        raise _Unchained(result)
    restored.append((result, list(sources)))
    if not result.events:
        return None
    assert result.last_seq is not None and result.last_hash is not None
    return result.last_seq, result.last_hash


def chained_events(lines: Iterator[tuple[str, bytes]], walk: ChainWalk, instance: str,
                   count: int) -> list[tuple[str, dict[str, Any]]]:
    """Feed the instance's lines to the walk until it has taken `count` events; return them with their file.

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
        if isinstance(event, dict) and event.get("instance", "") != instance:
            continue  # another instance's chain, sharing the file
        if not walk.feed_event(source, 0, event):
            break
        events.append((source, event))
        if len(events) == count:
            break
    return events
