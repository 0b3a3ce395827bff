"""What the figures were taken on: the machine, the versions, and how much of it other work used meanwhile."""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from load import busy_seconds, processes, trees
from services import HERE, which


@dataclass(frozen=True)
class Reading:
    """The machine's busy CPU time and the part of it this benchmark's own processes used, at one moment."""
    at: float
    busy: float
    own: float


def reading(daemons: Iterable[int] = ()) -> Reading:
    """Read the machine now; this process's tree is the benchmark's own, and so are the trees of `daemons`.

    `daemons` are servers started here that left this tree (pg_ctl's PostgreSQL). Work of a process
    that ended meanwhile is counted where it was reaped: in this tree when it was one of ours.
    """
    table = processes()
    own = trees([os.getpid(), *daemons], table)
    return Reading(time.monotonic(), busy_seconds(), sum(table[pid][2] for pid in own))


def interference(before: Reading, after: Reading) -> float:
    """Return the share of the machine (all cores) other work used between two readings.

    Other work is every busy tick that was not ours: other processes, even short-lived ones, the
    kernel's own threads, and time the hypervisor took from this VM (steal).
    """
    elapsed = max(after.at - before.at, 1e-9)
    others = (after.busy - before.busy) - (after.own - before.own)
    return max(0.0, others) / (elapsed * (os.cpu_count() or 1))


def _version(argv: list[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)  # noqa: S603
    except OSError:
        return "not installed"
    said = (done.stdout + done.stderr).strip()
    return said.splitlines()[0] if said else "?"


def describe(gateway_log: Path | None, backends: Iterable[str] = ()) -> list[str]:
    """Describe what the figures were taken on; `backends` are version lines of PostgreSQL and Redis."""
    import aiohttp

    import llm_proxy

    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor() or "?")
    try:
        import uvloop
        loop = f"uvloop {uvloop.__version__}"
    except ImportError:
        loop = "asyncio (uvloop not installed)"
    if gateway_log is not None and gateway_log.is_file():
        said = gateway_log.read_text(errors="replace")
        loop += " (llm-proxy: uvloop)" if '"event_loop":"uvloop"' in said else " (llm-proxy: asyncio)"
    commit = _version(["git", "-C", str(HERE.parent), "rev-parse", "--short", "HEAD"])
    # Untracked files count: a new module the package imports is as much a change as an edited one.
    dirty = _version(["git", "-C", str(HERE.parent), "status", "--porcelain", "--", "llm_proxy", "bench"])
    modified = " (llm_proxy/ or bench/ modified in the working tree)" if dirty not in ("?", "not installed") else ""
    return [
        f"date: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M:%S} UTC",
        f"commit: {commit}{modified}",
        f"machine: {os.cpu_count()} CPUs, {model}, {platform.system()} {platform.release()}",
        f"python {platform.python_version()}, aiohttp {aiohttp.__version__}, {loop}, llm-proxy {llm_proxy.__version__}",
        f"{_version([which('nginx') or 'nginx', '-v'])}; {_version([which('wrk') or 'wrk', '--version'])}",
        *backends,
    ]
