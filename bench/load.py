"""Apply load with wrk and read what it cost: requests/s, latencies, CPU time per request of the serving processes."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from probes import PATH
from services import HERE, which


@dataclass(frozen=True)
class Target:
    """One thing under load: its base URL, the token it wants, its process and the servers working for it.

    `pid` is the process whose tree (children included: `serve --workers N`) does the serving;
    `servers` are the processes whose trees work for it besides (PostgreSQL, Redis).
    """
    name: str
    url: str
    token: str | None
    pid: int | None
    servers: tuple[int, ...] = ()


def _stat(pid: int) -> list[str]:
    # After the command name (which may hold spaces): state ppid pgrp … utime(11) stime(12) cutime(13) cstime(14).
    return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()


def processes() -> dict[int, tuple[int, int, float]]:
    """Return every live process as pid -> (ppid, process group, CPU seconds of it and its reaped children)."""
    tick = os.sysconf("SC_CLK_TCK")
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = _stat(int(entry.name))
            except OSError:  # ended meanwhile
                continue
            found[int(entry.name)] = (int(fields[1]), int(fields[2]), sum(int(value) for value in fields[11:15]) / tick)
    return found


def trees(roots: Iterable[int], table: dict[int, tuple[int, int, float]] | None = None) -> set[int]:
    """Return the live processes among `roots` and their descendants."""
    table = processes() if table is None else table
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    found: set[int] = set()
    pending = [pid for pid in roots if pid in table]
    while pending:
        pid = pending.pop()
        if pid not in found:
            found.add(pid)
            pending.extend(children.get(pid, ()))
    return found


def cpu_seconds(*roots: int) -> float:
    """Return the CPU time (user + system, every thread) the trees of `roots` have used so far.

    A process's reaped children count in it (cutime), so a child that ended meanwhile is not lost.
    """
    table = processes()
    return sum(table[pid][2] for pid in trees(roots, table))


def busy_seconds() -> float:
    """Return the CPU time every core has spent busy since boot (user, nice, system, irq, softirq, steal)."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(value) for value in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _reaped_seconds() -> float:
    used = resource.getrusage(resource.RUSAGE_CHILDREN)
    return used.ru_utime + used.ru_stime


def parse_wrk(output: str) -> dict[str, float]:
    """Return the figures post.lua printed (latencies in microseconds)."""
    for line in output.splitlines():
        if line.startswith("WRK_RESULT "):
            figures: dict[str, float] = json.loads(line.removeprefix("WRK_RESULT "))
            return figures
    raise RuntimeError(f"wrk printed no result line:\n{output[-2000:]}")


def wrk_command(target: Target, connections: int, threads: int, duration: int) -> tuple[list[str], dict[str, str]]:
    """Return the argv and environment of a wrk run against a target's chat completions."""
    wrk = which("wrk")
    if wrk is None:
        raise RuntimeError("wrk is not installed (make bench installs it: apt-get install wrk)")
    env = {**os.environ, "BENCH_TOKEN": target.token or ""}
    return [wrk, f"-t{threads}", f"-c{connections}", f"-d{duration}s", "--timeout", "10s",
            "-s", str(HERE / "post.lua"), target.url + PATH], env


def run_wrk(target: Target, connections: int, threads: int, duration: int) -> dict[str, float]:
    """Run wrk against a target's chat completions; fail on any error or non-2xx answer.

    For a target with a pid, also report the CPU time it spent per request (`cpu_us`), and with
    the servers working for it (`cpu_all_us`): unlike requests/s, that barely moves when
    something else on the machine competes for the cores. And where the machine's cores went
    meanwhile, in cores: `cores_gateway`, `cores_servers`, `cores_wrk`, `cores_rest` (nginx, the
    kernel, other work) and `cores_busy` (all of it).
    """
    argv, env = wrk_command(target, connections, threads, duration)
    own = (target.pid,) if target.pid is not None else ()
    cpu_before, servers_before = cpu_seconds(*own), cpu_seconds(*target.servers)
    busy_before, wrk_before, started = busy_seconds(), _reaped_seconds(), time.monotonic()
    done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=duration + 30, check=False)  # noqa: S603
    wall, wrk_cpu, busy = time.monotonic() - started, _reaped_seconds() - wrk_before, busy_seconds() - busy_before
    cpu, servers = cpu_seconds(*own) - cpu_before, cpu_seconds(*target.servers) - servers_before
    if done.returncode != 0:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stderr[-2000:]}")
    figures = parse_wrk(done.stdout)
    errors = {key: figures[key] for key in ("connect_errors", "read_errors", "write_errors", "status_errors",
                                            "timeouts") if figures[key]}
    if errors:
        raise RuntimeError(f"wrk against {target.name} saw errors: {errors}")
    figures["rps"] = figures["requests"] / (figures["duration_us"] / 1e6)
    if target.pid is not None and figures["requests"]:
        figures["cpu_us"] = cpu / figures["requests"] * 1e6
        figures["cpu_all_us"] = (cpu + servers) / figures["requests"] * 1e6
    figures.update(cores_gateway=cpu / wall, cores_servers=servers / wall, cores_wrk=wrk_cpu / wall,
                   cores_rest=max(0.0, busy - cpu - servers - wrk_cpu) / wall, cores_busy=busy / wall)
    return figures
