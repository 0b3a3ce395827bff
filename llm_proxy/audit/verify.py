"""Verify the audit chain in the files and in the table; prune the table so that what is left still verifies."""

from __future__ import annotations

import zlib
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from pathlib import Path

from llm_proxy.audit.chain import TABLE, TIMESTAMP_FORMAT, ChainWalk, VerifyResult
from llm_proxy.audit.files import open_audit_file, rotation_order
from llm_proxy.storage.base import AuditStore, ChainHead, PruneResult

_PAGE = 2000


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
            with open_audit_file(path) as handle:
                for number, raw in enumerate(handle, 1):
                    if not walk.feed_text(str(path), number, raw):
                        return walk.finish()
        except (OSError, EOFError, zlib.error) as exc:
            walk.feed_invalid(str(path), number + 1, f"cannot be read: {exc}", kind="unreadable")
            return walk.finish()
    return walk.finish(head, growing=growing)


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
