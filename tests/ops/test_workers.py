"""The worker supervisor (`serve --workers N`): children on one port, a dead one restarted, a drain on stop."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import pytest

from llm_proxy.ops.workers import Supervisor
from tests.fakes import REPO, free_port

pytestmark = pytest.mark.system  # every test starts real child processes

# A child: serves its pid on the port with SO_REUSEPORT, as a gateway worker binds it, and stops on
# SIGTERM (aiohttp's run_app). MODE=fail exits 3 at once; MODE=stubborn ignores SIGTERM.
CHILD = """
import os, signal, sys
from aiohttp import web
from llm_proxy.ops.workers import report_ready
if os.environ["MODE"] == "fail":
    sys.exit(3)
async def pid(request):
    return web.Response(text=str(os.getpid()))
app = web.Application()
app.router.add_get("/", pid)
if os.environ["MODE"] == "stubborn":
    async def ignore(app):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    app.on_startup.append(ignore)
web.run_app(app, host="127.0.0.1", port=int(os.environ["PORT"]), reuse_port=True, print=lambda _: report_ready())
"""


def supervisor(port: int, count: int, modes: dict[int, str] | None = None, grace: float = 5.0) -> Supervisor:
    def environment(number: int) -> dict[str, str]:
        return {**os.environ, "PYTHONPATH": str(REPO), "PORT": str(port), "MODE": (modes or {}).get(number, "serve")}
    return Supervisor(count, lambda number: [sys.executable, "-c", CHILD], environment, grace=grace,
                      kill_margin=0.5)


async def pids_answering(port: int, want: int, within: float = 20.0) -> set[int]:
    """The pids that answer fresh connections, until `want` distinct ones did (bounded: `within` seconds; a
    child starting on a loaded machine may take several to listen)."""
    seen: set[int] = set()
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session, \
                    session.get(f"http://127.0.0.1:{port}/") as response:
                seen.add(int(await response.text()))
        except aiohttp.ClientConnectionError:
            await asyncio.sleep(0.02)
        if len(seen) >= want:
            break
    return seen


@asynccontextmanager
async def running(workers: Supervisor) -> AsyncIterator[asyncio.Task[int]]:
    task = asyncio.create_task(workers.run())
    try:
        yield task
    finally:
        workers.stop()
        await asyncio.wait_for(task, timeout=30)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def test_children_share_one_port_and_drain_on_stop() -> None:
    port = free_port()
    workers = supervisor(port, 2)
    task = asyncio.create_task(workers.run())
    seen = await pids_answering(port, 2)
    assert seen == set(workers.pids) and len(seen) == 2
    workers.stop()
    assert await asyncio.wait_for(task, timeout=30) == 0
    assert not any(alive(pid) for pid in seen)


async def test_a_child_killed_with_9_is_restarted() -> None:
    port = free_port()
    workers = supervisor(port, 2)
    async with running(workers):
        first = await pids_answering(port, 2)
        victim = min(first)
        os.kill(victim, signal.SIGKILL)
        for _ in range(500):  # bounded: until the restarted child has started
            if len(workers.pids) == 2 and victim not in workers.pids:
                break
            await asyncio.sleep(0.01)
        now = await pids_answering(port, 2)
        assert victim not in now and len(now) == 2, (first, now)
        assert workers.restarts == 1


async def test_a_failed_first_start_stops_every_worker_with_its_code() -> None:
    port = free_port()
    workers = supervisor(port, 2, modes={2: "fail"})
    assert await asyncio.wait_for(workers.run(), timeout=30) == 3
    assert workers.pids == []
    assert workers.restarts == 0


async def test_a_child_that_ignores_sigterm_is_killed_after_the_grace(tmp_path: Path) -> None:
    port = free_port()
    workers = supervisor(port, 1, modes={1: "stubborn"}, grace=0.5)
    task = asyncio.create_task(workers.run())
    (pid,) = await pids_answering(port, 1)
    workers.stop()
    assert await asyncio.wait_for(task, timeout=30) == 1  # not a clean drain
    assert not alive(pid)
