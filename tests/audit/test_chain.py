"""Tests for the audit hash chain: canonical form, verification of files and of the table, pruning."""

from __future__ import annotations

import gzip
import hashlib
import random
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llm_proxy.audit.chain import ZERO_HASH, canonical, chain_hash
from llm_proxy.audit.files import lines_after, newest_event, rotation_order
from llm_proxy.audit.verify import prune, verify_files, verify_lines, verify_table
from llm_proxy.audit.writer import AuditWriter
from llm_proxy.storage.sqlite.audit import SqliteAudit
from llm_proxy.storage.sqlite.database import Database

START = datetime(2024, 1, 1, tzinfo=UTC)


def build_chain(count: int, first_seq: int = 1, prev: str = ZERO_HASH) -> list[dict[str, Any]]:
    events = []
    for seq in range(first_seq, first_seq + count):
        event: dict[str, Any] = {"timestamp": "2024-01-01T00:00:00Z", "action": "token.access", "actor": "client",
                                 "request_id": f"req-{seq}", "result": "success", "details": {"n": seq}, "seq": seq}
        prev = event["hash"] = chain_hash(prev, event)
        events.append(event)
    return events


def as_lines(events: list[dict[str, Any]]) -> list[bytes]:
    return [orjson.dumps(event) for event in events]


def numbered(lines: list[bytes], source: str = "audit.log") -> list[tuple[str, int, bytes]]:
    return [(source, number, line) for number, line in enumerate(lines, 1)]


def forged(seq: int) -> bytes:
    return orjson.dumps({"timestamp": "2024-01-01T00:00:00Z", "action": "token.create", "actor": "management",
                         "result": "success", "seq": seq, "hash": "f" * 64})


# ---- canonical form and hash ----

def test_canonical_is_sorted_compact_utf8() -> None:
    assert canonical({"b": 1, "a": {"d": "é", "c": None}}) == '{"a":{"c":null,"d":"é"},"b":1}'.encode()


def test_chain_hash_is_sha256_of_previous_hash_and_canonical_json() -> None:
    event = {"timestamp": "2023-12-01T10:00:00Z", "action": "token.create", "actor": "management",
             "result": "success", "seq": 1}
    expected = hashlib.sha256(
        b"0" * 64 + b'{"action":"token.create","actor":"management","result":"success",'
                    b'"seq":1,"timestamp":"2023-12-01T10:00:00Z"}').hexdigest()
    assert chain_hash(ZERO_HASH, event) == expected


# ---- verify: where and what the first break is ----

def test_good_chain_verifies() -> None:
    result = verify_lines(numbered(as_lines(build_chain(10))))
    chain = result.chains[""]
    assert result.ok and chain.start == "genesis"
    assert (result.events, chain.first_seq, chain.last_seq) == (10, 1, 10)
    assert result.describe().startswith("OK: 10 events")


def _alter(lines: list[bytes]) -> None:
    event = orjson.loads(lines[4])
    event["result"] = "failure"
    lines[4] = orjson.dumps(event)


def _alter_and_rehash(lines: list[bytes]) -> None:
    event = orjson.loads(lines[4])
    event["result"] = "failure"
    del event["hash"]
    event["hash"] = chain_hash(orjson.loads(lines[3])["hash"], event)
    lines[4] = orjson.dumps(event)


@pytest.mark.parametrize(("tamper", "kind", "line", "seq"), [
    pytest.param(_alter, "altered", 5, 5, id="edited"),
    pytest.param(_alter_and_rehash, "altered", 6, 6, id="edited-and-rehashed-shows-on-next-line"),
    pytest.param(lambda lines: lines.pop(4), "removed", 5, 6, id="deleted"),
    pytest.param(lambda lines: lines.insert(4, lines[2]), "inserted", 5, 3, id="duplicated"),
    pytest.param(lambda lines: lines.insert(4, forged(5)), "inserted", 5, 5, id="forged-with-next-seq"),
    pytest.param(lambda lines: lines.insert(4, forged(99)), "removed", 5, 99, id="forged-with-far-seq"),
    pytest.param(lambda lines: lines.__setitem__(4, lines[4][:40]), "invalid", 5, None, id="torn"),
    pytest.param(lambda lines: lines.__setitem__(4, b'["not", "an", "event"]'), "invalid", 5, None, id="not-event"),
])
def test_verify_names_the_first_break(tmp_path: Path, tamper: Any, kind: str, line: int, seq: int | None) -> None:
    lines = as_lines(build_chain(10))
    tamper(lines)
    path = tmp_path / "audit.log"
    path.write_bytes(b"\n".join(lines) + b"\n")
    result = verify_files([path])
    assert not result.ok and result.problem is not None
    assert (result.problem.kind, result.problem.source, result.problem.line, result.problem.seq) == (
        kind, str(path), line, seq)
    assert result.describe().startswith(f"BROKEN at {path}:{line}: {kind}")


def test_removed_newest_lines_show_only_against_head() -> None:
    events = build_chain(10)
    lines = numbered(as_lines(events[:8]))
    assert verify_lines(lines).ok
    result = verify_lines(lines, heads={"": (10, events[-1]["hash"])})
    assert result.problem is not None
    assert (result.problem.kind, result.problem.line, result.problem.expected_seq) == ("removed", 9, 9)
    assert verify_lines(numbered(as_lines(events)), heads={"": (10, events[-1]["hash"])}).ok


def test_chain_starting_after_seq_one_is_taken_on_trust_unless_anchored() -> None:
    events = build_chain(20)
    tail = numbered(as_lines(events[10:]))
    result = verify_lines(tail)
    assert result.ok and result.chains[""].start == "assumed" and result.chains[""].anchor == (11, events[10]["hash"])
    assert "taken on trust" in result.describe()

    anchored = verify_lines(tail, anchors={"": (10, events[9]["hash"])})
    assert anchored.ok and anchored.chains[""].start == "anchor" and anchored.events == 10

    genesis_required = verify_lines(tail, anchors={"": (0, ZERO_HASH)})
    assert genesis_required.problem is not None and genesis_required.problem.kind == "removed"

    wrong_anchor = verify_lines(tail, anchors={"": (10, "e" * 64)})
    assert wrong_anchor.problem is not None and (wrong_anchor.problem.kind, wrong_anchor.problem.line) == ("altered", 1)


def test_rotation_order_is_oldest_first() -> None:
    names = ["audit.log", "audit.log.1", "audit.log.10.gz", "audit.log.2.gz", "audit.log.3.gz"]
    shuffled = [Path("/var/log/llm-proxy") / name for name in random.Random(7).sample(names, len(names))]
    assert [path.name for path in rotation_order(shuffled)] == [
        "audit.log.10.gz", "audit.log.3.gz", "audit.log.2.gz", "audit.log.1", "audit.log"]
    dated = [Path("audit.log"), Path("audit.log-20240103.gz"), Path("audit.log-20240102")]
    assert [path.name for path in rotation_order(dated)] == ["audit.log-20240102", "audit.log-20240103.gz", "audit.log"]


def write_rotated(directory: Path, events: list[dict[str, Any]]) -> list[Path]:
    """Lay out 30 events the way logrotate with delaycompress leaves them."""
    lines = as_lines(events)
    oldest, rotated, current = directory / "audit.log.2.gz", directory / "audit.log.1", directory / "audit.log"
    with gzip.open(oldest, "wb") as handle:
        handle.write(b"\n".join(lines[:10]) + b"\n")
    rotated.write_bytes(b"\n".join(lines[10:20]) + b"\n")
    current.write_bytes(b"\n".join(lines[20:]) + b"\n")
    return [current, oldest, rotated]


def test_rotated_and_gzipped_files_verify_as_one_chain(tmp_path: Path) -> None:
    result = verify_files(write_rotated(tmp_path, build_chain(30)))
    assert result.ok and (result.events, result.chains[""].start) == (30, "genesis")


def test_break_inside_gzipped_file_is_named(tmp_path: Path) -> None:
    paths = write_rotated(tmp_path, build_chain(30))
    oldest = tmp_path / "audit.log.2.gz"
    lines = gzip.decompress(oldest.read_bytes()).splitlines()
    lines[3] = lines[3].replace(b'"success"', b'"failure"')
    oldest.write_bytes(gzip.compress(b"\n".join(lines) + b"\n"))
    problem = verify_files(paths).problem
    assert problem is not None and (problem.kind, problem.source, problem.line) == ("altered", str(oldest), 4)


def test_missing_rotated_file_is_a_removal(tmp_path: Path) -> None:
    paths = write_rotated(tmp_path, build_chain(30))
    (tmp_path / "audit.log.1").unlink()
    problem = verify_files([path for path in paths if path.exists()]).problem
    assert problem is not None
    assert (problem.kind, problem.source, problem.line, problem.expected_seq, problem.seq) == (
        "removed", str(tmp_path / "audit.log"), 1, 11, 21)


def test_corrupt_gzip_is_unreadable(tmp_path: Path) -> None:
    paths = write_rotated(tmp_path, build_chain(30))
    (tmp_path / "audit.log.2.gz").write_bytes(b"\x1f\x8b\x08 definitely not gzip")
    problem = verify_files(paths).problem
    assert problem is not None and (problem.kind, problem.source) == ("unreadable", str(tmp_path / "audit.log.2.gz"))


# ---- reading back what the file holds past a head ----

@pytest.mark.parametrize("block", [16, 1 << 16])
@pytest.mark.parametrize("last_newline", [True, False])
def test_lines_after_reads_from_the_end_across_blocks_and_rotated_files(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, block: int, last_newline: bool) -> None:
    monkeypatch.setattr("llm_proxy.audit.files._TAIL_BYTES", block)  # 16: every line spans blocks
    events = build_chain(30)
    write_rotated(tmp_path, events)
    current = tmp_path / "audit.log"
    if not last_newline:
        current.write_bytes(current.read_bytes().rstrip(b"\n"))

    for seq in range(31):
        after = [orjson.loads(raw)["seq"] for _, raw in lines_after(current, seq, "") if raw.strip()]
        assert after == list(range(seq + 1, 31)), seq
    assert newest_event(current, "") == (30, events[-1]["hash"])
    assert newest_event(current, "elsewhere") is None
    current.write_bytes(b"")  # just rotated: the newest event is in the newest rotated file
    assert newest_event(current, "") == (20, events[19]["hash"])


# ---- the table and pruning ----

class HourClock:
    """A UTC clock that moves one hour each time an event is stamped."""

    def __init__(self, start: datetime = START) -> None:
        self.now = start - timedelta(hours=1)

    def __call__(self) -> datetime:
        self.now += timedelta(hours=1)
        return self.now


@pytest.fixture
async def db(tmp_path: Path) -> AsyncIterator[Database]:
    database = await Database.open(tmp_path / "llm-proxy.db")
    yield database
    await database.close()


@pytest.fixture
async def writer(db: Database) -> AsyncIterator[AuditWriter]:
    audit = AuditWriter(SqliteAudit(db), enabled=True, file_path=None, create_dir=False, store_in_db=True,
                        mask_client_ip=False, clock=HourClock())
    await audit.start()
    yield audit
    await audit.close()


def emit_hours(writer: AuditWriter, count: int) -> None:
    for n in range(count):
        writer.emit("token.access", actor="client", result="success", details={"n": n})


async def test_table_tampering_is_located(db: Database, writer: AuditWriter) -> None:
    emit_hours(writer, 10)
    await writer.flush()
    assert (await verify_table(SqliteAudit(db))).ok

    await db.execute("UPDATE audit_events SET details = '{\"n\":99}' WHERE seq = 3")
    problem = (await verify_table(SqliteAudit(db))).problem
    assert problem is not None and (problem.kind, problem.line, problem.seq) == ("altered", 3, 3)
    assert problem.where == "audit_events row 3 (seq 3)"

    await db.execute("DELETE FROM audit_events WHERE seq = 3")
    problem = (await verify_table(SqliteAudit(db))).problem
    assert problem is not None and (problem.kind, problem.line, problem.seq) == ("removed", 3, 4)

    await db.execute("UPDATE audit_events SET details = 'not json' WHERE seq = 2")
    problem = (await verify_table(SqliteAudit(db))).problem
    assert problem is not None and (problem.kind, problem.line) == ("invalid", 2)


async def test_prune_deletes_old_rows_in_batches_and_chain_still_verifies(db: Database, writer: AuditWriter) -> None:
    emit_hours(writer, 48)  # 2024-01-01T00:00Z .. 2024-01-02T23:00Z
    await writer.flush()
    twelfth = await db.fetchone("SELECT seq, hash FROM audit_events WHERE timestamp = '2024-01-01T11:00:00Z'")
    assert twelfth is not None

    result = await prune(SqliteAudit(db), older_than_days=1, batch_size=5, now=datetime(2024, 1, 2, 12, tzinfo=UTC))
    assert (result.deleted, result.batches) == (12, 3)
    assert result.pruned == result.anchors == {"": (12, twelfth["hash"])}
    first = await db.fetchone("SELECT min(seq), min(timestamp) FROM audit_events")
    assert first is not None and tuple(first) == (13, "2024-01-01T12:00:00Z")

    before_event = await verify_table(SqliteAudit(db))
    assert before_event.ok and before_event.chains[""].start == "assumed"

    writer.emit("audit.prune", actor="system", result="success", details=result.details())
    await writer.flush()
    after_event = await verify_table(SqliteAudit(db))
    assert after_event.ok and after_event.chains[""].start == "anchor"
    assert after_event.chains[""].anchor == (12, twelfth["hash"])
    assert after_event.events == 37

    nothing = await prune(SqliteAudit(db), older_than_days=1, batch_size=5, now=datetime(2024, 1, 2, 12, tzinfo=UTC))
    assert (nothing.deleted, nothing.batches, nothing.pruned) == (0, 0, {})
    assert nothing.anchors == {"": (12, twelfth["hash"])}  # carried forward from the first prune's event
    writer.emit("audit.prune", actor="system", result="success", details=nothing.details())
    await writer.flush()
    # An empty prune does not move the anchor.
    assert (await verify_table(SqliteAudit(db))).chains[""].anchor == (12, twelfth["hash"])

    await db.execute("DELETE FROM audit_events WHERE seq = 13")
    problem = (await verify_table(SqliteAudit(db))).problem
    assert problem is not None and (problem.kind, problem.seq, problem.expected_seq) == ("removed", 14, 13)


async def test_prune_removes_only_a_prefix_when_the_clock_stepped_back(db: Database) -> None:
    stamps = iter([START, START + timedelta(days=30), START, START + timedelta(days=30)])
    writer = AuditWriter(SqliteAudit(db), enabled=True, file_path=None, create_dir=False, store_in_db=True,
                         mask_client_ip=False, clock=lambda: next(stamps))
    await writer.start()
    emit_hours(writer, 4)
    await writer.close()
    result = await prune(SqliteAudit(db), older_than_days=10, now=START + timedelta(days=31))
    assert (result.deleted, result.pruned[""][0]) == (1, 1)
    assert [row[0] for row in await db.fetchall("SELECT seq FROM audit_events ORDER BY seq")] == [2, 3, 4]
    assert (await verify_table(SqliteAudit(db))).ok


async def test_prune_everything_and_bad_arguments(db: Database, writer: AuditWriter) -> None:
    emit_hours(writer, 3)
    await writer.flush()
    result = await prune(SqliteAudit(db), older_than_days=0, now=START + timedelta(days=1))
    assert (result.deleted, result.batches, result.pruned[""][0]) == (3, 1, 3)
    assert (await verify_table(SqliteAudit(db))).chains[""].start == "empty"
    with pytest.raises(ValueError, match="older_than_days"):
        await prune(SqliteAudit(db), older_than_days=-1)
    with pytest.raises(ValueError, match="batch_size"):
        await prune(SqliteAudit(db), older_than_days=1, batch_size=0)


@settings(max_examples=200, deadline=None)
@given(index=st.integers(0, 9), garbage=st.binary(max_size=300) | st.text(max_size=300).map(str.encode))
def test_any_replaced_line_is_reported_never_raises(index: int, garbage: bytes) -> None:
    events = build_chain(10)
    lines = as_lines(events)
    lines[index] = garbage.replace(b"\n", b" ")
    # Both ends pinned: losing the first or the last line is only visible against them.
    result = verify_lines(numbered(lines), anchors={"": (0, ZERO_HASH)}, heads={"": (10, events[-1]["hash"])})
    if result.ok:  # only a line that still parses to the very same event may pass
        assert orjson.loads(garbage) == events[index]


# ---- several instances' chains in one file (SPEC §7) ----

def instance_chain(instance: str, count: int) -> list[dict[str, Any]]:
    """A chain as the writer of that instance makes it: `instance` before seq and hash."""
    events, prev = [], ZERO_HASH
    for seq in range(1, count + 1):
        event: dict[str, Any] = {"timestamp": "2024-01-01T00:00:00Z", "action": "token.access", "actor": "client",
                                 "result": "success", "details": {"n": seq}, "instance": instance, "seq": seq}
        prev = event["hash"] = chain_hash(prev, event)
        events.append(event)
    return events


def interleaved(*chains: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Lines of several chains as processes sharing a file write them: each chain in order, mixed."""
    rng, queues, mixed = random.Random(3), [list(chain) for chain in chains], []
    while any(queues):
        queue = rng.choice([queue for queue in queues if queue])
        mixed.append(queue.pop(0))
    return mixed


def test_interleaved_chains_of_several_instances_each_verify() -> None:
    a, b, c = instance_chain("gw-1", 12), instance_chain("gw-2", 7), build_chain(3)  # c: no instance
    result = verify_lines(numbered(as_lines(interleaved(a, b, c))))
    assert result.ok and result.events == 22
    assert {name: (chain.first_seq, chain.last_seq, chain.start) for name, chain in result.chains.items()} == {
        "gw-1": (1, 12, "genesis"), "gw-2": (1, 7, "genesis"), "": (1, 3, "genesis")}
    assert result.describe() == "OK: 3 chains, 22 events, every chain verified"
    assert result.chain_lines() == ["events without an instance: OK: 3 events, seq 1..3, chain verified from the "
                                    "first event", "instance gw-1: OK: 12 events, seq 1..12, chain verified from "
                                    "the first event", "instance gw-2: OK: 7 events, seq 1..7, chain verified from "
                                    "the first event"]


def test_a_break_in_one_chain_is_named_with_its_instance_and_the_others_still_verify() -> None:
    a, b = instance_chain("gw-1", 10), instance_chain("gw-2", 10)
    mixed = interleaved(a, b)
    gone = next(index for index, event in enumerate(mixed) if (event["instance"], event["seq"]) == ("gw-2", 4))
    lines = as_lines(mixed)
    del lines[gone]
    result = verify_lines(numbered(lines))
    assert not result.ok and result.broken() == ["gw-2"]
    assert result.chains["gw-1"].ok and result.chains["gw-1"].events == 10
    problem = result.chains["gw-2"].problem
    assert problem is not None and (problem.kind, problem.seq, problem.expected_seq) == ("removed", 5, 4)
    assert result.describe().endswith("(instance gw-2); 1 of 2 chains broken")

    # A line moved into another chain's place stays in its own chain's order: still whole.
    swapped = as_lines(a[:5] + b[:3] + a[5:] + b[3:])
    assert verify_lines(numbered(swapped)).ok
    # But a chain's own lines out of order are not.
    shuffled = as_lines([*a[:4], a[5], a[4], *a[6:], *b])
    assert verify_lines(numbered(shuffled)).broken() == ["gw-1"]


def test_a_torn_line_stops_every_chain_and_an_instance_must_be_text() -> None:
    lines = as_lines(interleaved(instance_chain("gw-1", 5), instance_chain("gw-2", 5)))
    lines[4] = lines[4][:20]
    result = verify_lines(numbered(lines))
    assert not result.ok and result.problem is not None and (result.problem.kind, result.problem.line) == ("invalid", 5)
    assert result.describe().startswith("BROKEN at audit.log:5: invalid")
    odd = instance_chain("gw-1", 1)[0] | {"instance": 7}
    assert verify_lines(numbered([orjson.dumps(odd)])).problem_line is not None


def test_every_chain_is_checked_against_its_head_and_absent_ones_are_listed() -> None:
    a, b = instance_chain("gw-1", 6), instance_chain("gw-2", 4)
    heads = {"gw-1": (6, a[-1]["hash"]), "gw-2": (4, b[-1]["hash"]), "gw-3": (9, "f" * 64), "": (0, ZERO_HASH)}
    whole = verify_lines(numbered(as_lines(interleaved(a, b))), heads=heads)
    assert whole.ok and whole.absent == ("gw-3",)  # another host's: not in these lines, not a failure here
    # The newest line of one chain removed: only its head shows it.
    cut = verify_lines(numbered(as_lines(interleaved(a, b[:-1]))), heads=heads)
    assert cut.broken() == ["gw-2"]
    problem = cut.chains["gw-2"].problem
    assert problem is not None and problem.kind == "removed" and "4..4" in problem.message
    # No events at all while the database has heads: every line was removed.
    empty = verify_lines([], heads=heads)
    assert not empty.ok and set(empty.broken()) == {"gw-1", "gw-2", "gw-3"}


def test_a_chain_pruned_whole_verifies_when_its_anchor_is_its_head() -> None:
    a = instance_chain("gw-1", 3)
    anchors = {"gw-2": (8, "e" * 64)}
    heads = {"gw-1": (3, a[-1]["hash"]), "gw-2": (8, "e" * 64)}
    assert verify_lines(numbered(as_lines(a)), anchors=anchors, heads=heads).ok
    assert not verify_lines([], anchors=anchors, heads={"gw-2": (8, "d" * 64)}).ok
