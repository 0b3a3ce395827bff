"""The gateway as operators run it: `llm-proxy serve` in its own process, stopped by SIGTERM or killed."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sqlite3
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, closing
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp.test_utils import TestServer

from llm_proxy.audit.verify import verify_files
from tests.fakes import ENCRYPTION_KEY, MANAGEMENT_TOKEN, REPO, UPSTREAM_KEY, UpstreamState, bearer, free_port

pytestmark = pytest.mark.system  # every test runs `llm-proxy serve` as its own process

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}


class Served:
    def __init__(self, process: asyncio.subprocess.Process, url: str, data: Path) -> None:
        self.process = process
        self.url = url
        self.data = data
        self.auth = {"Authorization": f"Bearer {MANAGEMENT_TOKEN}"}

    async def token(self, session: aiohttp.ClientSession, **fields: Any) -> dict[str, Any]:
        async with session.post(f"{self.url}/manage/projects", headers=self.auth,
                                json={"name": "p", "api_key": UPSTREAM_KEY}) as response:
            project = await response.json()
        async with session.post(f"{self.url}/manage/tokens", headers=self.auth,
                                json={"project_id": project["id"], **fields}) as response:
            assert response.status == 201
            return dict(await response.json())


def serving_env(tmp_path: Path, upstream_url: str, **overrides: str) -> dict[str, str]:
    """The environment `serving_process` runs the gateway with; a CLI command given it sees the same files."""
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(REPO),
            "MANAGEMENT_TOKEN": MANAGEMENT_TOKEN, "ENCRYPTION_KEY": ENCRYPTION_KEY, "OPENAI_API_URL": upstream_url,
            "DATABASE_PATH": str(tmp_path / "data" / "gateway.db"),
            "AUDIT_LOG_FILE": str(tmp_path / "data" / "audit.log"), "LOG_FILE": str(tmp_path / "gateway.log"),
            "RATE_LIMIT_PER_MINUTE": "0", "SHUTDOWN_GRACE": "10s", **overrides}


@asynccontextmanager
async def serving_process(tmp_path: Path, upstream_url: str,
                          **overrides: str) -> AsyncIterator[tuple[asyncio.subprocess.Process, str]]:
    """Run `llm-proxy serve` as operators do (data in tmp_path/data, log in tmp_path/gateway.log) until healthy."""
    port = free_port()
    env = serving_env(tmp_path, upstream_url, LISTEN_ADDR=f"127.0.0.1:{port}", **overrides)
    process = await asyncio.create_subprocess_exec(sys.executable, "-m", "llm_proxy", "serve", cwd=tmp_path, env=env,
                                                   stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as session:
            for _ in range(200):
                try:
                    async with session.get(f"{url}/health") as response:
                        if response.status == 200:
                            break
                except aiohttp.ClientConnectionError:
                    await asyncio.sleep(0.05)
            else:
                process.kill()
                pytest.fail(f"gateway did not start: {(await process.communicate())[1].decode()}")
        yield process, url
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


@pytest.fixture
async def served(tmp_path: Path, upstream: tuple[UpstreamState, TestServer]) -> AsyncIterator[Served]:
    _, server = upstream
    async with serving_process(tmp_path, str(server.make_url("")).rstrip("/")) as (process, url):
        yield Served(process, url, tmp_path / "data")


async def test_sigterm_lets_a_stream_finish_then_flushes_and_exits_0(served: Served,
                                                                     upstream: tuple[UpstreamState, Any]) -> None:
    state, _ = upstream
    state.chunk_delay, state.chunks = 0.15, 10
    async with aiohttp.ClientSession() as session:
        token = await served.token(session)
        response = await session.post(f"{served.url}/v1/chat/completions", json={**CHAT, "stream": True},
                                      headers={"Authorization": f"Bearer {token['token']}"})
        first = await response.content.readline()

        served.process.send_signal(signal.SIGTERM)
        rest = await asyncio.wait_for(response.read(), timeout=10)
        stopped_accepting = False
        for _ in range(100):  # new connections are refused once the listener is closed
            try:
                async with session.get(f"{served.url}/health") as probe:
                    await probe.read()
            except aiohttp.ClientConnectionError:
                stopped_accepting = True
                break
            await asyncio.sleep(0.02)

    assert await asyncio.wait_for(served.process.wait(), timeout=15) == 0
    assert first.startswith(b"data: ") and rest.rstrip().endswith(b"data: [DONE]")
    assert rest.count(b"part") == 9  # every chunk after the signal arrived
    assert stopped_accepting
    with sqlite3.connect(served.data / "gateway.db") as db:
        assert db.execute("SELECT request_count FROM tokens WHERE id = ?", (token["id"],)).fetchone() == (1,)
    events = [orjson.loads(line) for line in (served.data / "audit.log").read_bytes().splitlines()]
    access = [e for e in events if e["action"] == "token.access"]
    assert len(access) == 1 and access[0]["details"]["status"] == 200


async def test_kill_9_under_load_leaves_whole_audit_lines_and_a_sound_database(served: Served) -> None:
    async with aiohttp.ClientSession() as session:
        token = await served.token(session)
        headers = {"Authorization": f"Bearer {token['token']}"}
        completed: list[float] = []

        async def hammer() -> None:
            while True:
                try:
                    async with session.post(f"{served.url}/v1/chat/completions", json=CHAT,
                                            headers=headers) as response:
                        await response.read()
                        if response.status == 200:
                            completed.append(time.monotonic())
                except aiohttp.ClientError:
                    return

        workers = [asyncio.create_task(hammer()) for _ in range(16)]
        started = time.monotonic()
        while time.monotonic() - started < 4.0 or len(completed) < 300:
            assert time.monotonic() - started < 20, "the gateway is too slow to load"
            await asyncio.sleep(0.05)
        served.process.kill()  # SIGKILL: no cleanup runs
        killed = time.monotonic()
        await served.process.wait()
        await asyncio.gather(*workers)
    done = len(completed)
    # The flush interval is 1 s; under a loaded machine its write can queue behind audit batches.
    settled = sum(1 for at in completed if at <= killed - 3.0)
    lines = (served.data / "audit.log").read_bytes().splitlines()
    assert len(lines) > 100
    for line in lines:
        orjson.loads(line)  # every line whole: a torn line would not parse
    assert verify_files([served.data / "audit.log"]).ok
    with sqlite3.connect(served.data / "gateway.db") as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        (count,) = db.execute("SELECT request_count FROM tokens WHERE id = ?", (token["id"],)).fetchone()
    # Counters are written every second: only the last moments' requests can be missing. A request
    # is counted when admitted, so the (at most 16) in flight at the kill may be counted unanswered.
    assert settled <= count <= done + len(workers)


@pytest.fixture
async def served_short_grace(tmp_path: Path, upstream: tuple[UpstreamState, TestServer]
                             ) -> AsyncIterator[tuple[asyncio.subprocess.Process, str, Path]]:
    _, server = upstream
    async with serving_process(tmp_path, str(server.make_url("")).rstrip("/"), SHUTDOWN_GRACE="1s") as (process, url):
        yield process, url, tmp_path / "data"


async def test_a_stream_outlasting_shutdown_grace_is_cut_and_still_audited_and_counted(
        served_short_grace: tuple[asyncio.subprocess.Process, str, Path],
        upstream: tuple[UpstreamState, Any]) -> None:
    """From the second review (streams and accounting against an awkward upstream)."""
    process, url, data = served_short_grace
    state, _ = upstream
    state.chunks, state.chunk_delay = 40, 0.2  # 8 s of stream, SHUTDOWN_GRACE 1 s
    auth = {"Authorization": f"Bearer {MANAGEMENT_TOKEN}"}
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{url}/manage/projects", headers=auth,
                                json={"name": "p", "api_key": UPSTREAM_KEY}) as response:
            project = await response.json()
        async with session.post(f"{url}/manage/tokens", headers=auth, json={"project_id": project["id"]}) as response:
            token = await response.json()
        response = await session.post(f"{url}/v1/chat/completions", json={**CHAT, "stream": True},
                                      headers=bearer(token))
        await response.content.readline()
        process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(response.read(), timeout=10)
        except (aiohttp.ClientError, TimeoutError):
            pass
    assert await asyncio.wait_for(process.wait(), timeout=15) == 0

    with sqlite3.connect(data / "gateway.db") as db:
        row = db.execute("SELECT request_count, total_tokens FROM tokens WHERE id = ?", (token["id"],)).fetchone()
    events = [orjson.loads(line) for line in (data / "audit.log").read_bytes().splitlines()]
    access = [e for e in events if e["action"] == "token.access"]
    assert len(access) == 1, "the cut stream's token.access event was lost at shutdown"
    assert access[0]["result"] == "error"
    assert row[0] == 1 and row[1] > 0, row  # counted and charged (estimate) before exit


async def _stop(process: asyncio.subprocess.Process) -> None:
    process.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(process.wait(), timeout=15) == 0


async def _chat(session: aiohttp.ClientSession, url: str, token: dict[str, Any], count: int) -> None:
    for _ in range(count):
        async with session.post(f"{url}/v1/chat/completions", json=CHAT,
                                headers={"Authorization": f"Bearer {token['token']}"}) as response:
            assert response.status == 200


def _backup(database: Path, copy: Path) -> None:
    with closing(sqlite3.connect(database)) as source, closing(sqlite3.connect(copy)) as target:
        source.backup(target)


async def test_events_in_the_file_but_not_in_the_database_are_restored_at_start(
        tmp_path: Path, upstream: tuple[UpstreamState, TestServer]) -> None:
    """A crash between the audit file append and the COMMIT leaves the file ahead of the table; the
    next start puts those events into the table, so both `audit verify`s pass and none is lost.

    From a black-box review: after one `kill -9` under load `audit verify --db` reported seq
    537..620 removed for good. Putting back a copy of the database taken before the last run makes
    exactly that state, without having to win a race against the kill.
    """
    upstream_url = str(upstream[1].make_url("")).rstrip("/")
    data = tmp_path / "data"
    auth = {"Authorization": f"Bearer {MANAGEMENT_TOKEN}"}
    async with aiohttp.ClientSession() as session:
        async with serving_process(tmp_path, upstream_url) as (process, url):
            token = await Served(process, url, data).token(session)
            await _chat(session, url, token, 2)
            await _stop(process)
        _backup(data / "gateway.db", tmp_path / "before.db")
        async with serving_process(tmp_path, upstream_url) as (process, url):
            await _chat(session, url, token, 3)
            await _stop(process)
        (tmp_path / "before.db").replace(data / "gateway.db")
        for suffix in ("-wal", "-shm"):
            (data / f"gateway.db{suffix}").unlink(missing_ok=True)
        with closing(sqlite3.connect(data / "gateway.db")) as db:
            (kept,) = db.execute("SELECT max(seq) FROM audit_events").fetchone()
        lost = [event for event in _file_events(data / "audit.log") if event["seq"] > kept]
        assert [event["action"] for event in lost].count("token.access") == 3

        async with serving_process(tmp_path, upstream_url) as (process, url):
            async with session.get(f"{url}/manage/audit?limit=1000", headers=auth) as response:
                listed = (await response.json())["data"]
            await _stop(process)

    events = _file_events(data / "audit.log")
    with closing(sqlite3.connect(data / "gateway.db")) as db:
        rows = db.execute("SELECT seq, hash FROM audit_events ORDER BY seq").fetchall()
    assert rows == [(event["seq"], event["hash"]) for event in events]
    assert [seq for seq, _ in rows] == list(range(1, len(rows) + 1))
    assert [event for event in listed if kept < event["seq"] <= lost[-1]["seq"]] == lost[::-1]
    restored = [line for line in _log_messages(tmp_path / "gateway.log") if line.startswith("restored ")]
    assert restored == [f"restored {len(lost)} audit events (seq {kept + 1}..{lost[-1]['seq']}) "
                        f"from {data / 'audit.log'} into the database"]
    env = serving_env(tmp_path, upstream_url)
    for argv in (["audit", "verify", "--db"], ["audit", "verify"]):
        verify = await asyncio.create_subprocess_exec(sys.executable, "-m", "llm_proxy", *argv, cwd=tmp_path,
                                                      env=env, stdout=asyncio.subprocess.PIPE,
                                                      stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(verify.communicate(), timeout=30)
        assert verify.returncode == 0, (argv, out.decode(), err.decode())


def _file_events(path: Path) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines()]


def _log_messages(path: Path) -> list[str]:
    return [orjson.loads(line)["message"] for line in path.read_bytes().splitlines()]


# ---- startup failures: one line naming what to fix, and never a claim to be listening ----

async def _serve_until_exit(tmp_path: Path, **overrides: str) -> tuple[int | None, str]:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(REPO),
           "MANAGEMENT_TOKEN": MANAGEMENT_TOKEN, "ENCRYPTION_KEY": ENCRYPTION_KEY,
           "LISTEN_ADDR": f"127.0.0.1:{free_port()}",
           "DATABASE_PATH": str(tmp_path / "data" / "gateway.db"),
           "AUDIT_LOG_FILE": str(tmp_path / "data" / "audit.log"), **overrides}
    process = await asyncio.create_subprocess_exec(sys.executable, "-m", "llm_proxy", "serve", cwd=tmp_path, env=env,
                                                   stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                                                   stderr=asyncio.subprocess.PIPE)
    try:
        _, err = await asyncio.wait_for(process.communicate(), timeout=30)
    except TimeoutError:
        process.kill()
        _, err = await process.communicate()
    return process.returncode, err.decode()


def _error_line(err: str) -> str:
    assert "Traceback" not in err and MANAGEMENT_TOKEN not in err and ENCRYPTION_KEY not in err, err
    lines = [line for line in err.splitlines() if not line.startswith('{"time"')]  # JSON log lines on stderr
    assert len(lines) == 1 and lines[0].startswith("llm-proxy: "), err
    return lines[0]


@pytest.mark.parametrize(("variable", "where"), [
    ("DATABASE_PATH", "a-file/sub/gateway.db"),
    ("AUDIT_LOG_FILE", "a-file/audit.log"),
    ("AUDIT_LOG_FILE", "."),  # a directory
])
async def test_an_unusable_file_path_names_its_variable_and_exits_2(tmp_path: Path, variable: str,
                                                                    where: str) -> None:
    (tmp_path / "a-file").write_text("a file where a directory belongs")
    code, err = await _serve_until_exit(tmp_path, **{variable: str(tmp_path / where)})
    line = _error_line(err)
    assert code == 2, err  # a configuration error, as the README's exit codes say
    assert f"configuration error: {variable}: cannot use" in line, line
    assert "listening on" not in err


async def test_a_port_in_use_is_one_line_and_never_claims_to_listen(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code, err = await _serve_until_exit(tmp_path, LISTEN_ADDR=f"127.0.0.1:{port}")
    line = _error_line(err)
    assert code == 1 and f"cannot listen on 127.0.0.1:{port}" in line, err
    assert "listening on" not in err, err


async def test_the_listening_line_comes_once_the_socket_listens(served: Served) -> None:
    log_file = served.data.parent / "gateway.log"
    for _ in range(200):  # the log is written by a background thread: poll, bounded
        lines = [orjson.loads(line) for line in log_file.read_bytes().splitlines()] if log_file.exists() else []
        listening = [line for line in lines if "listening on" in line["message"]]
        if listening:
            break
        await asyncio.sleep(0.02)
    assert len(listening) == 1, lines
    assert listening[0]["message"].endswith(f"listening on {served.url}")
    assert listening[0]["event_loop"] in ("uvloop", "asyncio")
