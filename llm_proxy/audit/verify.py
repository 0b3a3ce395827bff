"""Verify the audit chain in the files and in the table; prune the table so that what is left still verifies."""

from __future__ import annotations

import zlib
from collections.abc import Iterable
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

from llm_proxy.audit.chain import TABLE, TIMESTAMP_FORMAT, ChainsResult, ChainsWalk, ChainWalk, VerifyResult
from llm_proxy.audit.files import open_audit_file, rotation_order
from llm_proxy.storage.base import AuditStore, ChainHead, PruneResult

_PAGE = 2000


def verify_lines(lines: Iterable[tuple[str, int, str | bytes]], *, anchors: dict[str, ChainHead] | None = None,
                 heads: dict[str, ChainHead] | None = None) -> ChainsResult:
    """Walk (source, line number, text) in order and report the first break of each instance's chain.

    `anchors` = (seq, hash) by instance a chain's first event must continue from (pass
    {instance: (0, ZERO_HASH)} to insist a chain starts at seq 1); without one a first event with
    seq > 1 is accepted on trust.
    """
    walk = ChainsWalk(anchors, heads)
    for source, number, text in lines:
        if not walk.feed_text(source, number, text):
            break
    return walk.finish()


def verify_files(paths: Iterable[Path], *, anchors: dict[str, ChainHead] | None = None,
                 heads: dict[str, ChainHead] | None = None, growing: bool = False) -> ChainsResult:
    """Walk rotated (plain or .gz) and current audit files, oldest first: each instance's lines as one chain.

    With `heads` (the database's chain heads, read before the files) each chain in the files must
    reach its head: that is what reveals the newest lines being deleted. `growing`: a gateway may
    have appended past them since.
    """
    walk = ChainsWalk(anchors, heads, growing=growing)
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
    return walk.finish()


async def verify_table(store: AuditStore, *, anchors: dict[str, ChainHead] | None = None,
                       heads: dict[str, ChainHead] | None = None, growing: bool = False) -> ChainsResult:
    """Walk each instance's stored events in seq order, from the anchor the newest audit.prune event records.

    A chain with no such anchor whose first event has seq > 1 is accepted on trust. `line` in a
    Break is the event's position in its chain's seq order. With `heads` every chain must reach its
    head; `growing`: the heads were read before the walk and writers may have appended since
    (accepted if they chain).
    """
    if anchors is None:
        anchors = await store.prune_anchors()
    instances = sorted(set(await store.heads()) | set(heads or {}))
    results: dict[str, VerifyResult] = {}
    for instance in instances:
        results[instance] = await _verify_chain(store, instance, anchors.get(instance),
                                                None if heads is None else heads.get(instance), growing)
    return ChainsResult(results)


async def _verify_chain(store: AuditStore, instance: str, anchor: ChainHead | None, head: ChainHead | None,
                        growing: bool) -> VerifyResult:
    walk = ChainWalk(anchor)
    if head is not None and growing:
        walk.watch_seq = head[0]
    position, after = 0, -1
    while True:
        page = await store.walk(instance, after, _PAGE)
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
    """Delete stored events older than the cutoff, oldest first in each chain, one transaction per batch.

    Only a prefix of each chain is ever deleted, so what remains of it is one unbroken chain that
    verify_table checks from its last pruned hash. The result's anchors are every chain's, those of
    earlier prunes included: the audit.prune event recording them is then the only one verify needs.
    """
    if older_than_days < 0:
        raise ValueError("older_than_days must not be negative")
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    cutoff = ((now or datetime.now(UTC)) - timedelta(days=older_than_days)).astimezone(UTC)
    earlier = await store.prune_anchors()
    result = await store.prune(cutoff.strftime(TIMESTAMP_FORMAT), batch_size)
    return replace(result, anchors={**earlier, **result.pruned})
