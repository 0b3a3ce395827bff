"""`llm-proxy serve --workers N`: one parent, N gateway processes on one port sharing a Redis, one
SQLite file and one audit file; a worker killed with -9 is replaced; SIGTERM drains them all."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp.test_utils import TestServer

from tests.fakes import ENCRYPTION_KEY, MANAGEMENT_TOKEN, REPO, UPSTREAM_KEY, UpstreamState, bearer, free_port

pytestmark = pytest.mark.system

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
AUTH = {"Authorization": f"Bearer {MANAGEMENT_TOKEN}"}


def children(pid: int) -> set[int]:
    """The processes `pid` started and that still run (Linux /proc)."""
    found: set[int] = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text().split()
        found |= {int(child) for child in text}
    return found


def log_lines(path: Path) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines()] if path.exists() else []


async def until(check: Any, what: str, attempts: int = 300) -> None:
    """Poll `check()` (bounded: attempts × 50 ms) until it is true."""
    for _ in range(attempts):
        if check():
            return
        await asyncio.sleep(0.05)
    pytest.fail(f"waited in vain for {what}")


async def test_workers_share_one_port_survive_a_kill_and_drain_on_sigterm(
        tmp_path: Path, redis_url: str, upstream: tuple[UpstreamState, TestServer]) -> None:
    _, upstream_server = upstream
    port = free_port()
    log, audit = tmp_path / "gateway.log", tmp_path / "audit.log"
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(REPO),
           "MANAGEMENT_TOKEN": MANAGEMENT_TOKEN, "ENCRYPTION_KEY": ENCRYPTION_KEY,
           "OPENAI_API_URL": str(upstream_server.make_url("")).rstrip("/"), "LISTEN_ADDR": f"127.0.0.1:{port}",
           "DATABASE_PATH": str(tmp_path / "gateway.db"), "AUDIT_LOG_FILE": str(audit), "LOG_FILE": str(log),
           "REDIS_URL": redis_url, "RATE_LIMIT_PER_MINUTE": "0", "SHUTDOWN_GRACE": "5s", "INSTANCE_ID": "node"}
    parent = await asyncio.create_subprocess_exec(sys.executable, "-m", "llm_proxy", "serve", "--workers", "2",
                                                  cwd=tmp_path, env=env, stdout=asyncio.subprocess.DEVNULL,
                                                  stderr=asyncio.subprocess.DEVNULL)
    try:
        def listening() -> list[str]:
            return [line["instance"] for line in log_lines(log) if "listening on" in line["message"]]

        await until(lambda: sorted(listening()) == ["node-1", "node-2"], "both workers to listen")
        workers = children(parent.pid)
        assert len(workers) == 2

        url = f"http://127.0.0.1:{port}"
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:
            async with session.post(f"{url}/manage/projects", headers=AUTH,
                                    json={"name": "w", "api_key": UPSTREAM_KEY}) as response:
                project = await response.json()
            async with session.post(f"{url}/manage/tokens", headers=AUTH,
                                    json={"project_id": project["id"], "max_requests": 30}) as response:
                token = await response.json()

            async def ask() -> int:
                async with session.post(f"{url}/v1/chat/completions", json=CHAT, headers=bearer(token)) as answer:
                    await answer.read()
                    return answer.status

            # A fresh connection each: the kernel spreads them over both workers; one quota for both.
            statuses = await asyncio.gather(*(ask() for _ in range(40)))
            assert sorted(statuses) == [200] * 30 + [429] * 10

            # Every answer is audited (written within the writer's batching interval).
            await until(lambda: audit.exists() and len(audit.read_bytes().splitlines()) >= 42, "42 audit events")

            # A worker killed with -9 is replaced; the other serves meanwhile.
            victim = min(workers)
            os.kill(victim, signal.SIGKILL)
            await until(lambda: len(listening()) == 3, "the killed worker to be replaced")
            replaced = children(parent.pid)
            assert len(replaced) == 2 and victim not in replaced
            async with session.get(f"{url}/ready") as response:
                assert response.status == 200
            assert any("exited with code -9" in line["message"] for line in log_lines(log))

        # SIGTERM drains both and the parent exits 0, leaving no worker behind.
        parent.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(parent.wait(), timeout=30) == 0
        assert all(not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()
                   for pid in replaced)
    finally:
        if parent.returncode is None:
            parent.kill()
            await parent.wait()

    # One audit file written by three processes: every line whole; each instance's chain in order in it,
    # the replaced worker's continued where the killed one left it (same INSTANCE_ID); all verify.
    events = [orjson.loads(line) for line in audit.read_bytes().splitlines()]
    assert len(events) > 40 and all(event["hash"] for event in events)
    chains: dict[str, list[int]] = {}
    for event in events:
        chains.setdefault(event["instance"], []).append(event["seq"])
    assert set(chains) == {"node-1", "node-2"}
    assert all(seqs == list(range(1, len(seqs) + 1)) for seqs in chains.values()), chains
    verify = await asyncio.create_subprocess_exec(sys.executable, "-m", "llm_proxy", "audit", "verify", "--json",
                                                  cwd=tmp_path, env=env, stdout=asyncio.subprocess.PIPE,
                                                  stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(verify.communicate(), timeout=60)
    assert verify.returncode == 0, (out, err)
    checked = orjson.loads(out)["files"]
    assert {name: chain["events"] for name, chain in checked["chains"].items()} == \
        {name: len(seqs) for name, seqs in chains.items()}
    assert checked["absent"] == []  # the database's heads are those of the chains in the file


async def test_more_than_one_worker_without_redis_is_refused_in_one_line(tmp_path: Path) -> None:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(REPO),
           "MANAGEMENT_TOKEN": MANAGEMENT_TOKEN, "ENCRYPTION_KEY": ENCRYPTION_KEY,
           "DATABASE_PATH": str(tmp_path / "gateway.db"), "LISTEN_ADDR": f"127.0.0.1:{free_port()}"}
    process = await asyncio.create_subprocess_exec(sys.executable, "-m", "llm_proxy", "serve", "--workers", "2",
                                                   cwd=tmp_path, env=env, stdout=asyncio.subprocess.PIPE,
                                                   stderr=asyncio.subprocess.PIPE)
    _, err = await asyncio.wait_for(process.communicate(), timeout=30)
    assert process.returncode == 2
    assert err.decode().strip().splitlines() == [
        "llm-proxy: --workers/WORKERS: more than 1 worker needs REDIS_URL (the workers share their limits and "
        "token changes through it)"]
    assert not (tmp_path / "gateway.db").exists()
