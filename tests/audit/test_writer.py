"""Tests for the audit writer: event shape, both sinks, restarts, rotation, back-pressure and failures."""

from __future__ import annotations

import asyncio
import gzip
import logging
import os
import re
import shutil
import sqlite3
import stat
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import aiosqlite
import orjson
import pytest

from llm_proxy.audit.chain import ZERO_HASH, chain_hash
from llm_proxy.audit.files import AppendFile as _AppendFile
from llm_proxy.audit.masking import mask_ip
from llm_proxy.audit.verify import verify_files, verify_table
from llm_proxy.audit.writer import AuditWriter
from llm_proxy.storage.sqlite.audit import COLUMNS, INSERT_ROWS, SqliteAudit, event_from_row
from llm_proxy.storage.sqlite.database import Database

SPEC_DETAILS = {"http_method": "POST", "endpoint": "/manage/tokens", "duration_minutes": 60,
                "token_id": "tok-1234****cdef", "user_agent": "curl/8.5.0"}
KEY_ORDER = ["timestamp", "action", "actor", "project_id", "request_id", "client_ip", "result", "details",
             "seq", "hash"]


class FakeClock:
    """A settable UTC clock, so timestamps are known and no test waits for time to pass."""

    def __init__(self, now: datetime = datetime(2023, 12, 1, 10, 0, 0, 250000, tzinfo=UTC)) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **delta: float) -> None:
        self.now += timedelta(**delta)


class FlakyDatabase(Database):
    """A real database whose next `failures` transactions fail as if it were locked."""

    failures = 0

    async def _write(self, work: Callable[[aiosqlite.Connection], Awaitable[Any]]) -> Any:
        if self.failures:
            self.failures -= 1
            raise sqlite3.OperationalError("database is locked")
        return await super()._write(work)


@pytest.fixture
async def db(tmp_path: Path) -> AsyncIterator[FlakyDatabase]:
    database = await FlakyDatabase.open(tmp_path / "llm-proxy.db")
    assert isinstance(database, FlakyDatabase)
    yield database
    await database.close()


@pytest.fixture
def audit_path(tmp_path: Path) -> Path:
    return tmp_path / "logs" / "audit.log"


WriterFactory = Callable[..., AuditWriter]


@pytest.fixture
async def make_writer(db: Database, audit_path: Path) -> AsyncIterator[WriterFactory]:
    made: list[AuditWriter] = []

    def make(**overrides: Any) -> AuditWriter:
        options: dict[str, Any] = {"enabled": True, "file_path": audit_path, "create_dir": True,
                                   "store_in_db": True, "mask_client_ip": False, "clock": FakeClock()}
        options.update(overrides)
        writer = AuditWriter(SqliteAudit(db), **options)
        made.append(writer)
        return writer

    yield make
    for writer in made:
        await writer.close()


def file_events(*paths: Path) -> list[dict[str, Any]]:
    return [orjson.loads(line) for path in paths for line in path.read_bytes().splitlines()]


async def table_events(db: Database) -> list[dict[str, Any]]:
    rows = await db.fetchall(f"SELECT {', '.join(COLUMNS)} FROM audit_events ORDER BY seq")
    return [event_from_row(row) for row in rows]


async def head(db: Database) -> tuple[int, str] | None:
    row = await db.fetchone("SELECT seq, hash FROM audit_chain WHERE instance = ''")
    return None if row is None else (row[0], row[1])


def emit_numbered(writer: AuditWriter, count: int, start: int = 0) -> None:
    for n in range(start, start + count):
        writer.emit("token.access", actor="client", result="success", request_id=f"req-{n}", details={"n": n})


# ---- event shape ----

async def test_awkward_text_and_large_numbers_reach_the_table_exactly_as_the_file(
        make_writer: WriterFactory, audit_path: Path, db: Database) -> None:
    """Rows go into the table through one JSON document per batch: quotes, backslashes, control and
    non-BMP characters, line separators and integers beyond 2**53 must come out unchanged."""
    writer = make_writer()
    await writer.start()
    writer.emit("token.access", actor="client", result="success", project_id="p\u2028x", request_id="r'\"\\",
                details={"user_agent": "naïve ☃ \u0001 \"q\" 𝄞", "big": 2**63 - 1, "ratio": 1.5, "nested": [None]})
    writer.emit("token.access", actor="client", result="failure")
    await writer.flush()

    events = file_events(audit_path)
    assert await table_events(db) == events
    assert events[0]["details"]["big"] == 2**63 - 1 and events[0]["request_id"] == "r'\"\\"
    typed = await db.fetchall("SELECT typeof(seq), typeof(client_ip), typeof(details) FROM audit_events ORDER BY seq")
    assert [tuple(row) for row in typed] == [("integer", "null", "text"), ("integer", "null", "null")]


async def test_event_has_spec_shape_and_key_order(make_writer: WriterFactory, audit_path: Path) -> None:
    writer = make_writer()
    await writer.start()
    writer.emit("token.create", actor="management", result="success", project_id="proj-123",
                request_id="req-456", client_ip="192.168.1.100", details=SPEC_DETAILS)
    writer.emit("auth.failure", actor="client", result="failure", project_id=None,
                details={"reason": "invalid_token", "model": None, "empty": ""})
    writer.emit("token.list", actor="management", result="success", details={"model": None})
    await writer.flush()

    full, partial, bare = file_events(audit_path)
    assert list(full) == KEY_ORDER
    assert audit_path.read_bytes().startswith(
        b'{"timestamp":"2023-12-01T10:00:00Z","action":"token.create","actor":"management",'
        b'"project_id":"proj-123","request_id":"req-456","client_ip":"192.168.1.100","result":"success",'
        b'"details":{"http_method":"POST","endpoint":"/manage/tokens","duration_minutes":60,')
    assert full["details"] == SPEC_DETAILS
    assert list(partial) == ["timestamp", "action", "actor", "result", "details", "seq", "hash"]
    assert partial["details"] == {"reason": "invalid_token", "empty": ""}
    assert list(bare) == ["timestamp", "action", "actor", "result", "seq", "hash"]
    assert [event["seq"] for event in (full, partial, bare)] == [1, 2, 3]


async def test_timestamp_is_utc_with_z_at_second_precision(make_writer: WriterFactory, audit_path: Path) -> None:
    paris = timezone(timedelta(hours=1))
    writer = make_writer(clock=FakeClock(datetime(2024, 3, 1, 0, 30, 15, 999999, tzinfo=paris)))
    system = make_writer(clock=None, file_path=audit_path.with_name("system.log"))
    await writer.start()
    await system.start()
    writer.emit("token.read", actor="management", result="success")
    system.emit("token.read", actor="management", result="success")
    await writer.flush()
    await system.flush()
    assert file_events(audit_path)[0]["timestamp"] == "2024-02-29T23:30:15Z"
    system_stamp = file_events(audit_path.with_name("system.log"))[0]["timestamp"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", system_stamp)


@pytest.mark.parametrize("use_file", [True, False], ids=["file", "no-file"])
@pytest.mark.parametrize("use_db", [True, False], ids=["db", "no-db"])
async def test_every_sink_combination_writes_the_same_chain(make_writer: WriterFactory, db: Database,
                                                            audit_path: Path, use_file: bool, use_db: bool) -> None:
    writer = make_writer(file_path=audit_path if use_file else None, store_in_db=use_db)
    await writer.start()
    writer.emit("token.create", actor="management", result="success", project_id="proj-1", details=SPEC_DETAILS)
    writer.emit("token.access", actor="client", result="success", project_id="proj-1", client_ip="10.0.0.7",
                details={"status": 200, "duration_ms": 12, "model": "gpt-4o", "prompt_tokens": 5})
    writer.emit("auth.failure", actor="client", result="failure", client_ip="2001:db8::1")
    await writer.close()

    # The expected chain, computed independently of the writer.
    bodies: list[dict[str, Any]] = [
        {"timestamp": "2023-12-01T10:00:00Z", "action": "token.create", "actor": "management",
         "project_id": "proj-1", "result": "success", "details": SPEC_DETAILS},
        {"timestamp": "2023-12-01T10:00:00Z", "action": "token.access", "actor": "client", "project_id": "proj-1",
         "client_ip": "10.0.0.7", "result": "success",
         "details": {"status": 200, "duration_ms": 12, "model": "gpt-4o", "prompt_tokens": 5}},
        {"timestamp": "2023-12-01T10:00:00Z", "action": "auth.failure", "actor": "client",
         "client_ip": "2001:db8::1", "result": "failure"},
    ]
    expected, prev = [], ZERO_HASH
    for seq, body in enumerate(bodies, 1):
        event = {**body, "seq": seq}
        prev = event["hash"] = chain_hash(prev, event)
        expected.append(event)

    assert await head(db) == (3, expected[-1]["hash"])
    assert writer.written == 3
    if use_file:
        assert file_events(audit_path) == expected
        assert [list(event) for event in file_events(audit_path)] == [list(event) for event in expected]
        assert verify_files([audit_path]).ok
    else:
        assert not audit_path.parent.exists()
    assert await table_events(db) == (expected if use_db else [])
    if use_db:
        assert [list(event) for event in await table_events(db)] == [list(event) for event in expected]
        assert (await verify_table(SqliteAudit(db))).ok


# ---- client IP masking ----

@pytest.mark.parametrize(("raw", "masked"), [
    ("192.168.1.100", "192.168.1.0"),
    ("10.0.0.0", "10.0.0.0"),
    ("2001:db8:abcd:12:1:2:3:4", "2001:db8:abcd::"),
    ("2001:db8:abcd:ffff:ffff:ffff:ffff:ffff", "2001:db8:abcd::"),
    ("::1", "::"),
    ("::ffff:203.0.113.77", "203.0.113.0"),
    ("not-an-ip", "****"),
    ("192.168.1.100:443", "****"),
])
def test_mask_ip(raw: str, masked: str) -> None:
    assert mask_ip(raw) == masked


@pytest.mark.parametrize(("mask", "expected"), [(True, ["203.0.113.0", "2001:db8:1::"]),
                                                (False, ["203.0.113.9", "2001:db8:1:2::9"])])
async def test_writer_masks_client_ip_only_when_asked(make_writer: WriterFactory, db: Database, audit_path: Path,
                                                      mask: bool, expected: list[str]) -> None:
    writer = make_writer(mask_client_ip=mask)
    await writer.start()
    for ip in ("203.0.113.9", "2001:db8:1:2::9"):
        writer.emit("token.access", actor="client", result="success", client_ip=ip)
    await writer.flush()
    assert [event["client_ip"] for event in file_events(audit_path)] == expected
    assert [event["client_ip"] for event in await table_events(db)] == expected


# ---- chain continuity ----

async def test_chain_continues_across_restart(make_writer: WriterFactory, db: Database, audit_path: Path) -> None:
    first = make_writer()
    await first.start()
    emit_numbered(first, 3)
    await first.close()
    second = make_writer()
    await second.start()
    emit_numbered(second, 2, start=3)
    await second.close()

    events = file_events(audit_path)
    assert [event["seq"] for event in events] == [1, 2, 3, 4, 5]
    assert events == await table_events(db)
    assert (await head(db)) == (5, events[-1]["hash"])
    assert verify_files([audit_path]).ok and (await verify_table(SqliteAudit(db))).ok


async def test_chain_continues_when_database_only_mode_restarts(make_writer: WriterFactory, db: Database,
                                                                audit_path: Path) -> None:
    first = make_writer(store_in_db=False)
    await first.start()
    emit_numbered(first, 2)
    await first.close()
    second = make_writer(store_in_db=False)
    await second.start()
    emit_numbered(second, 2)
    await second.close()
    assert [event["seq"] for event in file_events(audit_path)] == [1, 2, 3, 4]
    assert verify_files([audit_path]).ok


async def lose_from_database(db: Database, events: list[dict[str, Any]], kept: int) -> None:
    """Leave the database as a crash between file append and COMMIT does: events after `kept` only in the file."""
    await db.execute("DELETE FROM audit_events WHERE seq > ?", (kept,))
    await db.execute("UPDATE audit_chain SET seq = ?, hash = ?", (kept, events[kept - 1]["hash"]))


async def test_restart_restores_the_events_the_database_lost(
        make_writer: WriterFactory, db: Database, audit_path: Path, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("llm_proxy.audit.restore.RESTORE_CHUNK", 2)  # several chunks in one transaction
    monkeypatch.setattr("llm_proxy.audit.files._TAIL_BYTES", 64)  # read back in blocks shorter than a line
    first = make_writer()
    await first.start()
    emit_numbered(first, 6)
    await first.close()
    await lose_from_database(db, file_events(audit_path), kept=1)

    second = make_writer()
    await second.start()
    assert await table_events(db) == file_events(audit_path)
    emit_numbered(second, 1, start=6)
    await second.close()

    events = file_events(audit_path)
    assert [event["seq"] for event in events] == [1, 2, 3, 4, 5, 6, 7]
    assert await table_events(db) == events
    assert await head(db) == (7, events[-1]["hash"])
    assert verify_files([audit_path]).ok and (await verify_table(SqliteAudit(db))).ok
    assert f"restored 5 audit events (seq 2..6) from {audit_path} into the database" in caplog.messages
    assert "ahead of the database" not in caplog.text


@pytest.mark.parametrize(("tamper", "kind"), [
    (lambda lines: lines.__setitem__(3, lines[3].replace(b"req-3", b"req-X")), "altered"),
    (lambda lines: lines.pop(2), "removed"),
])
async def test_events_that_do_not_chain_from_the_database_head_are_not_restored(
        make_writer: WriterFactory, db: Database, audit_path: Path, caplog: pytest.LogCaptureFixture,
        tamper: Callable[[list[bytes]], Any], kind: str) -> None:
    first = make_writer()
    await first.start()
    emit_numbered(first, 5)
    await first.close()
    events = file_events(audit_path)
    await lose_from_database(db, events, kept=1)
    lines = audit_path.read_bytes().splitlines()
    tamper(lines)
    audit_path.write_bytes(b"\n".join(lines) + b"\n")

    second = make_writer()
    await second.start()
    emit_numbered(second, 1, start=5)
    await second.close()

    errors = [record.getMessage() for record in caplog.records if record.levelno == logging.ERROR]
    assert len(errors) == 1 and "do not chain from it" in errors[0] and f"({kind} at seq " in errors[0]
    assert [event["seq"] for event in await table_events(db)] == [1, 6]  # nothing restored
    seqs = [event["seq"] for event in file_events(audit_path)]
    assert seqs[-2:] == [5, 6] and len(seqs) == len(set(seqs))  # continued after the file: no seq twice
    problem = verify_files([audit_path]).problem
    assert problem is not None and problem.kind == kind  # the file is what `audit verify` flags


async def test_with_store_in_db_off_a_restart_advances_only_the_head(
        make_writer: WriterFactory, db: Database, audit_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    first = make_writer(store_in_db=False)
    await first.start()
    emit_numbered(first, 3)
    await first.close()
    events = file_events(audit_path)
    await db.execute("UPDATE audit_chain SET seq = 1, hash = ?", (events[0]["hash"],))

    second = make_writer(store_in_db=False)
    await second.start()

    assert await head(db) == (3, events[-1]["hash"])
    assert await table_events(db) == []
    assert any("advanced to seq 3 after 2 events" in message for message in caplog.messages)
    emit_numbered(second, 1, start=3)
    await second.close()
    assert [event["seq"] for event in file_events(audit_path)] == [1, 2, 3, 4]


@pytest.mark.parametrize("layout", ["rotated while writing", "rotated and compressed", "rotated while down"])
async def test_restore_reads_the_rotated_file_when_the_current_one_starts_past_the_head(
        make_writer: WriterFactory, db: Database, audit_path: Path, caplog: pytest.LogCaptureFixture,
        layout: str) -> None:
    rotated = audit_path.with_name("audit.log.1")
    first = make_writer()
    await first.start()
    emit_numbered(first, 3)
    await first.flush()
    if layout != "rotated while down":
        audit_path.rename(rotated)  # as logrotate does: the writer opens a new file
        emit_numbered(first, 2, start=3)
    await first.close()
    events = file_events(*[path for path in (rotated, audit_path) if path.exists()])
    await lose_from_database(db, events, kept=2)
    if layout == "rotated while down":
        audit_path.rename(rotated)
        audit_path.touch()  # `create`: the new file is empty
    if layout == "rotated and compressed":
        rotated.with_name("audit.log.1.gz").write_bytes(gzip.compress(rotated.read_bytes()))
        rotated.unlink()
        rotated = rotated.with_name("audit.log.1.gz")

    second = make_writer()
    await second.start()
    emit_numbered(second, 1, start=len(events))
    await second.close()

    files = [rotated, audit_path]
    assert await table_events(db) == (events + file_events(audit_path)[-1:])
    assert verify_files(files).ok and (await verify_table(SqliteAudit(db))).ok
    sources = f"{rotated} and {audit_path}" if layout != "rotated while down" else f"{rotated}"
    assert (f"restored {len(events) - 2} audit events (seq 3..{len(events)}) from {sources} into the database"
            in caplog.messages)


async def test_events_from_another_process_are_chained_after(
        make_writer: WriterFactory, db: Database, audit_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    server = make_writer()
    await server.start()
    emit_numbered(server, 3)
    await server.flush()
    cli = make_writer()  # as `llm-proxy audit prune` would, in its own process, while the server runs
    await cli.start()
    cli.emit("audit.prune", actor="system", result="success", details={"deleted": 0})
    await cli.close()
    emit_numbered(server, 2, start=3)
    await server.flush()

    events = await table_events(db)
    assert [event["seq"] for event in events] == [1, 2, 3, 4, 5, 6]
    assert events[3]["action"] == "audit.prune"
    assert file_events(audit_path) == events
    assert verify_files([audit_path]).ok and (await verify_table(SqliteAudit(db))).ok
    assert "extended by another process" in caplog.text


async def test_the_file_is_appended_while_the_database_write_lock_is_held(
        make_writer: WriterFactory, tmp_path: Path, audit_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another process (a CLI command) can only write the chain once this batch is in the file too."""
    original = _AppendFile.append
    outcomes: list[str] = []

    def append_and_probe(self: _AppendFile, data: bytes) -> tuple[int, OSError | None]:
        probe = sqlite3.connect(tmp_path / "llm-proxy.db", timeout=0, isolation_level=None)
        try:
            probe.execute("BEGIN IMMEDIATE")
            probe.execute("ROLLBACK")
            outcomes.append("free")
        except sqlite3.OperationalError as exc:
            outcomes.append(str(exc))
        finally:
            probe.close()
        return original(self, data)

    monkeypatch.setattr(_AppendFile, "append", append_and_probe)
    writer = make_writer()
    await writer.start()
    emit_numbered(writer, 3)
    await writer.flush()
    emit_numbered(writer, 2, start=3)
    await writer.close()

    assert outcomes == ["database is locked", "database is locked"]
    assert [event["seq"] for event in file_events(audit_path)] == [1, 2, 3, 4, 5]


async def test_a_cli_command_writing_during_a_batch_lands_after_it_in_the_file(
        make_writer: WriterFactory, db: Database, tmp_path: Path, audit_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """`llm-proxy audit prune` (here: its own thread, event loop and connection) writes its event
    just as the gateway appends a batch: the file keeps seq order, so `audit verify` stays clean.

    The gateway's append waits up to a second for the command to finish first; it can only
    finish first if nothing stops it from writing between the batch's COMMIT and its append.
    """
    original = _AppendFile.append
    cli_done = threading.Event()
    cli_threads: list[threading.Thread] = []

    async def cli_command() -> None:
        database = await Database.open(tmp_path / "llm-proxy.db")
        try:
            cli = AuditWriter(SqliteAudit(database), enabled=True, file_path=audit_path, create_dir=True,
                              store_in_db=True, mask_client_ip=False, batch_interval=0)
            await cli.start()
            cli.emit("audit.prune", actor="system", result="success", details={"deleted": 0})
            await cli.close()
        finally:
            await database.close()
            cli_done.set()

    def append_with_a_cli_command_meanwhile(self: _AppendFile, data: bytes) -> tuple[int, OSError | None]:
        if not cli_threads:
            cli_threads.append(threading.Thread(target=asyncio.run, args=(cli_command(),)))
            cli_threads[0].start()
            cli_done.wait(timeout=1.0)
        return original(self, data)

    monkeypatch.setattr(_AppendFile, "append", append_with_a_cli_command_meanwhile)
    server = make_writer()
    await server.start()
    emit_numbered(server, 3)
    await server.flush()
    await asyncio.to_thread(cli_threads[0].join)
    emit_numbered(server, 1, start=3)
    await server.close()

    events = file_events(audit_path)
    assert [event["seq"] for event in events] == [1, 2, 3, 4, 5]
    assert [event["action"] for event in events] == ["token.access"] * 3 + ["audit.prune", "token.access"]
    assert events == await table_events(db)
    assert verify_files([audit_path]).ok and (await verify_table(SqliteAudit(db))).ok


async def test_a_commit_that_fails_after_the_append_writes_the_batch_to_the_file_once(
        make_writer: WriterFactory, db: Database, audit_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    writer = make_writer()
    await writer.start()
    emit_numbered(writer, 2)
    await writer.flush()

    real_write = Database._write
    failed = False

    async def commit_fails_once(self: Database, work: Callable[[aiosqlite.Connection], Awaitable[Any]]) -> Any:
        nonlocal failed
        if failed:
            return await real_write(self, work)
        failed = True

        async def work_then_fail(conn: aiosqlite.Connection) -> Any:
            await work(conn)
            raise sqlite3.OperationalError("disk I/O error")  # as a COMMIT that fails would
        return await real_write(self, work_then_fail)

    monkeypatch.setattr(Database, "_write", commit_fails_once)
    emit_numbered(writer, 2, start=2)
    await writer.flush()
    assert [event["seq"] for event in file_events(audit_path)] == [1, 2, 3, 4]
    assert [event["seq"] for event in await table_events(db)] == [1, 2]
    assert writer.db_errors == 1

    emit_numbered(writer, 1, start=4)  # the next batch stores the rows the failed commit lost
    await writer.close()
    events = file_events(audit_path)
    assert [event["seq"] for event in events] == [1, 2, 3, 4, 5]
    assert await table_events(db) == events
    assert verify_files([audit_path]).ok and (await verify_table(SqliteAudit(db))).ok


async def test_rotation_while_writing_loses_and_tears_nothing(make_writer: WriterFactory, audit_path: Path) -> None:
    old_umask = os.umask(0o022)
    try:
        writer = make_writer()
        await writer.start()
        rotated = audit_path.with_name("audit.log.1")
        emit_numbered(writer, 100)
        await writer.flush()
        for n in range(100, 300):
            if n == 200:
                os.rename(audit_path, rotated)  # batches are in flight, maybe mid-write in the thread
            writer.emit("token.access", actor="client", result="success", details={"n": n})
            if n % 10 == 0:
                await asyncio.sleep(0)  # let the writer take partial batches while we keep emitting
        await writer.flush()
    finally:
        os.umask(old_umask)

    old, new = file_events(rotated), file_events(audit_path)
    assert len(old) >= 100 and len(new) >= 100
    assert [event["details"]["n"] for event in old + new] == list(range(300))
    assert [event["seq"] for event in old + new] == list(range(1, 301))
    assert stat.S_IMODE(audit_path.stat().st_mode) == 0o640
    result = verify_files([audit_path, rotated])
    assert result.ok and result.events == 300 and result.chains[""].start == "genesis"


@pytest.mark.system
async def test_logrotate_recipe_rename_and_create(make_writer: WriterFactory, audit_path: Path,
                                                  tmp_path: Path) -> None:
    if shutil.which("logrotate") is None:
        pytest.skip("logrotate is not installed (make system-deps)")
    config = tmp_path / "logrotate.conf"
    config.write_text(f"{audit_path} {{\n  rotate 5\n  create 0640\n  compress\n  delaycompress\n"
                      "  missingok\n  notifempty\n}\n")
    writer = make_writer()
    await writer.start()
    for round_ in range(3):
        emit_numbered(writer, 20, start=round_ * 40)
        await writer.flush()  # notifempty: make sure there is something to rotate
        emit_numbered(writer, 20, start=round_ * 40 + 20)  # still in flight while logrotate runs
        process = await asyncio.create_subprocess_exec(
            "logrotate", "-f", "-s", str(tmp_path / "logrotate.state"), str(config),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        output, _ = await process.communicate()
        assert process.returncode == 0, output.decode()
    emit_numbered(writer, 10, start=120)
    await writer.flush()

    files = sorted(audit_path.parent.glob("audit.log*"))
    assert {path.name for path in files} >= {"audit.log", "audit.log.1", "audit.log.2.gz"}
    result = verify_files(files)
    assert result.ok, result.describe()
    assert (result.events, result.chains[""].first_seq, result.chains[""].last_seq) == (130, 1, 130)


# ---- back-pressure and failures ----

async def test_a_batch_larger_than_one_insert_statement_is_stored_whole_and_in_order(
        make_writer: WriterFactory, audit_path: Path, db: Database) -> None:
    writer = make_writer()
    await writer.start()
    count = INSERT_ROWS * 2 + 7  # three statements, the last one short
    emit_numbered(writer, count)  # no await in between: one batch
    await writer.flush()

    events = await table_events(db)
    assert [event["seq"] for event in events] == list(range(1, count + 1))
    assert events == file_events(audit_path)


async def test_full_queue_drops_and_counts_without_raising(make_writer: WriterFactory, db: Database,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    writer = make_writer(queue_size=5)
    await writer.start()
    emit_numbered(writer, 8)  # no await in between: the writer cannot run
    assert (writer.dropped, writer.queue_depth) == (3, 5)
    assert [r.levelno for r in caplog.records if "queue is full" in r.getMessage()] == [logging.ERROR]
    await writer.flush()
    assert (writer.written, writer.queue_depth) == (5, 0)
    assert len(await table_events(db)) == 5


async def test_disk_full_keeps_events_in_database(make_writer: WriterFactory, db: Database,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full")
    writer = make_writer(file_path=Path("/dev/full"))
    await writer.start()
    emit_numbered(writer, 3)
    await writer.flush()
    assert writer.file_errors == 3
    emit_numbered(writer, 2, start=3)
    await writer.flush()
    assert (writer.file_errors, writer.written) == (5, 5)
    assert [event["seq"] for event in await table_events(db)] == [1, 2, 3, 4, 5]
    assert (await verify_table(SqliteAudit(db))).ok
    assert "No space left on device" in caplog.text


async def test_unwritable_path_counts_errors_and_writer_recovers(make_writer: WriterFactory, db: Database,
                                                                 audit_path: Path) -> None:
    writer = make_writer()
    await writer.start()
    emit_numbered(writer, 2)
    await writer.flush()
    rotated = audit_path.with_name("audit.log.1")
    audit_path.rename(rotated)
    audit_path.mkdir()  # reopening now fails with IsADirectoryError
    emit_numbered(writer, 2, start=2)
    await writer.flush()
    assert writer.file_errors == 2
    audit_path.rmdir()
    emit_numbered(writer, 2, start=4)
    await writer.flush()

    assert [event["seq"] for event in file_events(rotated, audit_path)] == [1, 2, 5, 6]
    assert [event["seq"] for event in await table_events(db)] == [1, 2, 3, 4, 5, 6]
    assert (await verify_table(SqliteAudit(db))).ok
    problem = verify_files([rotated, audit_path]).problem
    assert problem is not None
    assert (problem.kind, problem.source, problem.line, problem.seq) == ("removed", str(audit_path), 1, 5)


async def test_database_failures_are_retried(make_writer: WriterFactory, db: FlakyDatabase) -> None:
    writer = make_writer()
    writer.DB_RETRY_DELAYS = (0.0, 0.0, 0.0)
    await writer.start()
    db.failures = 2
    emit_numbered(writer, 3)
    await writer.flush()
    assert writer.db_errors == 0
    assert len(await table_events(db)) == 3


async def test_database_outage_keeps_file_and_stores_rows_later(make_writer: WriterFactory, db: FlakyDatabase,
                                                                audit_path: Path) -> None:
    writer = make_writer()
    writer.DB_RETRY_DELAYS = (0.0, 0.0, 0.0)
    await writer.start()
    db.failures = 4  # every attempt for the first batch
    emit_numbered(writer, 3)
    await writer.flush()
    assert writer.db_errors == 1
    assert await table_events(db) == []
    assert len(file_events(audit_path)) == 3
    emit_numbered(writer, 2, start=3)
    await writer.flush()
    assert await table_events(db) == file_events(audit_path)
    assert (await verify_table(SqliteAudit(db))).ok and (await head(db) or (0,))[0] == 5


async def test_close_drains_everything_emitted_before(make_writer: WriterFactory, db: Database,
                                                      audit_path: Path) -> None:
    writer = make_writer()
    await writer.start()
    emit_numbered(writer, 1200)  # more than two batches
    await writer.close()
    assert [event["seq"] for event in file_events(audit_path)] == list(range(1, 1201))
    assert len(await table_events(db)) == 1200
    writer.emit("token.read", actor="management", result="success")  # after close: dropped, no exception
    assert writer.dropped == 1
    await writer.flush()


async def test_disabled_writer_does_nothing(make_writer: WriterFactory, db: Database, audit_path: Path) -> None:
    writer = make_writer(enabled=False)
    await writer.start()
    emit_numbered(writer, 3)
    await writer.flush()
    await writer.close()
    assert not audit_path.parent.exists()
    assert await table_events(db) == []
    assert await head(db) is None
    assert (writer.dropped, writer.written, writer.queue_depth) == (0, 0, 0)


async def test_missing_directory_without_create_dir_fails_at_start(make_writer: WriterFactory) -> None:
    writer = make_writer(create_dir=False)
    with pytest.raises(FileNotFoundError):
        await writer.start()


async def test_bad_values_never_raise_and_still_chain(make_writer: WriterFactory, db: Database,
                                                      audit_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    writer = make_writer()
    await writer.start()
    writer.emit("token.read", actor="management", result="success", details=["not", "a", "dict"])  # type: ignore[arg-type]
    writer.emit("token.read", actor="management", result="success", details={"huge": 2**70})
    writer.emit("token.read", actor="management", result="success", details={"tags": {"a"}, "at": datetime(2024, 1, 1)})
    writer.emit("token.read\ud800", actor="management", result="success")
    writer.emit("token.read", actor="management", result="success", project_id=42)  # type: ignore[arg-type]
    writer.emit("token.read", actor="management", result="success", details={"name": "Zoë ✓ 漢字"})
    await writer.flush()

    assert writer.dropped == 1
    events = file_events(audit_path)
    assert [event["seq"] for event in events] == [1, 2, 3, 4, 5]
    assert events[0]["details"] == {"huge": str(2**70)}  # repaired, not dropped
    assert events[1]["details"] == {"tags": "{'a'}", "at": "2024-01-01T00:00:00"}
    assert events[2]["action"] == "token.read?"
    assert events[3]["project_id"] == "42"
    assert events[4]["details"] == {"name": "Zoë ✓ 漢字"}
    assert events == await table_events(db)
    assert verify_files([audit_path]).ok and (await verify_table(SqliteAudit(db))).ok


async def test_flush_and_close_without_start_return(make_writer: WriterFactory) -> None:
    writer = make_writer()
    await writer.flush()
    await writer.close()
