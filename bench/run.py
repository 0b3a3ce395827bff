"""Benchmark llm-proxy against the upstream alone and a bare aiohttp pass-through (the floor); print one table.

    python bench/run.py            # the full benchmark (needs nginx and wrk; `make bench` installs them)
    python bench/run.py --smoke    # a few requests through every piece, Python only, in seconds

Everything listens on 127.0.0.1 and every load is bounded in count and time. Each figure is the
median of --runs runs, and the runs of the three targets are interleaved so that drift on the
machine hits them alike.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import hotspots
import probes
from services import (
    HERE,
    Service,
    raise_fd_limit,
    start_floor,
    start_gateway,
    start_nginx,
    start_python_upstream,
    which,
)

TARGETS = ("baseline", "floor", "llm-proxy")
MB = 1024  # VmRSS is in kB


@dataclass(frozen=True)
class Target:
    """One thing under load: its base URL, the token it wants, and the process whose memory counts."""
    name: str
    url: str
    token: str | None
    pid: int | None


@dataclass
class Plan:
    """How much load each measurement applies."""
    runs: int
    duration: int = 5           # seconds of each wrk run
    ttfb_requests: int = 300
    chunk_requests: int = 15
    chunks: int = 10
    interval_ms: int = 20
    streams: int = 1000
    plain_requests: int = 0     # smoke: Python requests instead of wrk

    @classmethod
    def smoke(cls) -> Plan:
        return cls(runs=1, ttfb_requests=10, chunk_requests=2, chunks=3, interval_ms=5, streams=20, plain_requests=20)


@dataclass
class Results:
    """Every run's figure, by metric then target; the table shows medians."""
    runs: dict[str, dict[str, list[float]]] = field(default_factory=dict)

    def add(self, metric: str, target: str, value: float) -> None:
        self.runs.setdefault(metric, {}).setdefault(target, []).append(value)

    def median(self, metric: str, target: str) -> float | None:
        values = self.runs.get(metric, {}).get(target)
        return statistics.median(values) if values else None


def quantile(values: list[float], q: float) -> float:
    """Return the q-quantile (0..1) of values, nearest rank."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


# ---- wrk ----

def parse_wrk(output: str) -> dict[str, float]:
    """Return the figures post.lua printed (latencies in microseconds)."""
    for line in output.splitlines():
        if line.startswith("WRK_RESULT "):
            figures: dict[str, float] = json.loads(line.removeprefix("WRK_RESULT "))
            return figures
    raise RuntimeError(f"wrk printed no result line:\n{output[-2000:]}")


def cpu_seconds(pid: int) -> float:
    """Return the CPU time (user + system, every thread) a process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_wrk(target: Target, connections: int, threads: int, duration: int) -> dict[str, float]:
    """Run wrk against a target's chat completions; fail on any error or non-2xx answer.

    For a target with a pid, also report the CPU time it spent per request: unlike requests/s,
    that barely moves when something else on the machine competes for the cores.
    """
    wrk = which("wrk")
    if wrk is None:
        raise RuntimeError("wrk is not installed (make bench installs it: apt-get install wrk)")
    env = {**os.environ, "BENCH_TOKEN": target.token or ""}
    argv = [wrk, f"-t{threads}", f"-c{connections}", f"-d{duration}s", "--timeout", "10s",
            "-s", str(HERE / "post.lua"), target.url + probes.PATH]
    cpu_before = cpu_seconds(target.pid) if target.pid is not None else 0.0
    done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=duration + 30, check=False)  # noqa: S603
    cpu = cpu_seconds(target.pid) - cpu_before if target.pid is not None else None
    if done.returncode != 0:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stderr[-2000:]}")
    figures = parse_wrk(done.stdout)
    errors = {key: figures[key] for key in ("connect_errors", "read_errors", "write_errors", "status_errors",
                                            "timeouts") if figures[key]}
    if errors:
        raise RuntimeError(f"wrk against {target.name} saw errors: {errors}")
    figures["rps"] = figures["requests"] / (figures["duration_us"] / 1e6)
    if cpu is not None and figures["requests"]:
        figures["cpu_us"] = cpu / figures["requests"] * 1e6
    return figures


# ---- the measurements ----

def interleaved(plan: Plan, targets: list[Target]) -> Iterator[Target]:
    for _ in range(plan.runs):
        yield from targets


def measure(plan: Plan, targets: list[Target], results: Results, say: Callable[[str], None]) -> None:
    """Take every figure of the table, run by run."""
    streaming = [target for target in targets if target.pid is not None]
    if plan.plain_requests:
        say("sequential requests (Python client)")
        for target in interleaved(plan, targets):
            latencies = asyncio.run(probes.plain_requests(target.url, target.token, plan.plain_requests)).values
            results.add("p50_1", target.name, quantile(latencies, 0.5))
            results.add("p99_1", target.name, quantile(latencies, 0.99))
    else:
        say("warming up (2 s each)")
        for target in targets:
            run_wrk(target, 32, 2, 2)
        say(f"wrk -t2 -c32 -d{plan.duration}s × {plan.runs} runs each")
        for target in interleaved(plan, targets):
            figures = run_wrk(target, 32, 2, plan.duration)
            results.add("rps_32", target.name, figures["rps"])
            results.add("p50_32", target.name, figures["p50_us"] / 1000)
            results.add("p99_32", target.name, figures["p99_us"] / 1000)
            if "cpu_us" in figures:
                results.add("cpu_32", target.name, figures["cpu_us"])
        say(f"wrk -t1 -c1 -d{plan.duration}s × {plan.runs} runs each")
        for target in interleaved(plan, targets):
            figures = run_wrk(target, 1, 1, plan.duration)
            results.add("p50_1", target.name, figures["p50_us"] / 1000)
            results.add("p99_1", target.name, figures["p99_us"] / 1000)

    say(f"time to first byte: {plan.ttfb_requests} sequential streamed requests × {plan.runs} runs each")
    for target in interleaved(plan, targets):
        timings = asyncio.run(probes.first_byte(target.url, target.token, plan.ttfb_requests))
        results.add("ttfb_50", target.name, quantile(timings.values, 0.5))
        results.add("ttfb_99", target.name, quantile(timings.values, 0.99))
        if timings.overhead_header:
            results.add("overhead_header_50", target.name, quantile(timings.overhead_header, 0.5))

    say(f"per-chunk delay: {plan.chunk_requests} streams of {plan.chunks} chunks {plan.interval_ms} ms apart "
        f"× {plan.runs} runs each")
    for target in interleaved(plan, targets):
        delays = asyncio.run(probes.chunk_delays(target.url, target.token, plan.chunk_requests, plan.chunks,
                                                 plan.interval_ms)).values
        results.add("chunk_50", target.name, quantile(delays, 0.5))
        results.add("chunk_99", target.name, quantile(delays, 0.99))
        results.add("chunk_max", target.name, max(delays))

    say(f"memory: {plan.streams} held streams × {plan.runs} runs each")
    for target in streaming:
        assert target.pid is not None
        results.add("rss_idle", target.name, probes.rss_kb(target.pid) / MB)
    for target in interleaved(plan, streaming):
        opened, rss = asyncio.run(probes.held_streams(target.url, target.token, plan.streams, target.pid))
        assert opened == plan.streams and rss is not None
        results.add("rss_streams", target.name, rss / MB)
        time.sleep(1.0)  # let the last round's connections close before the next opens its own


def profile(targets: list[Target], seconds: int, out: Path, say: Callable[[str], None]) -> list[Path]:
    """Sample each server with py-spy while wrk -c32 loads it; return the raw profiles written."""
    spy = shutil.which("py-spy", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    if spy is None:
        raise RuntimeError("py-spy is not installed (make bench installs it into .venv)")
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for target in targets:
        if target.pid is None:
            continue
        path = out / f"{target.name}.raw.txt"
        say(f"profiling {target.name} for {seconds} s under wrk -c32 -> {path}")
        recorder = subprocess.Popen([spy, "record", "--pid", str(target.pid), "--duration", str(seconds),  # noqa: S603
                                     # --gil: only the thread holding the GIL, i.e. the serial work that
                                     # caps throughput (threads blocked in queue.get can look busy otherwise).
                                     "--rate", "200", "--gil", "--format", "raw", "--output", str(path)],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        run_wrk(target, 32, 2, seconds + 2)
        _, errors = recorder.communicate(timeout=60)
        if recorder.returncode != 0:
            raise RuntimeError(f"py-spy failed: {errors.decode(errors='replace')[-1000:]}")
        written.append(path)
    return written


# ---- the table ----

@dataclass(frozen=True)
class Row:
    label: str
    metric: str
    compare: str            # "ratio" (gateway / floor), "added" (gateway - floor) or ""
    target: str = ""
    passes: Callable[[float], bool] | None = None   # applied to the comparison (or the value itself for "value")


ROWS = (
    Row("throughput @32 conn (req/s)", "rps_32", "ratio", "≥ 0.8× floor", lambda ratio: ratio >= 0.8),
    Row("CPU per request @32 conn (µs)", "cpu_32", "ratio"),
    Row("p50 latency @32 conn (ms)", "p50_32", "ratio"),
    Row("p99 latency @32 conn (ms)", "p99_32", "ratio"),
    Row("p50 latency @1 conn (ms)", "p50_1", "added", "≤ +0.5 ms", lambda added: added <= 0.5),
    Row("p99 latency @1 conn (ms)", "p99_1", "added", "≤ +2 ms", lambda added: added <= 2.0),
    Row("TTFB streamed, p50 (ms)", "ttfb_50", "added", "≤ +1 ms", lambda added: added <= 1.0),
    Row("TTFB streamed, p99 (ms)", "ttfb_99", "added"),
    Row("per-chunk delay, p50 (ms)", "chunk_50", "added", "≤ +1 ms", lambda added: added <= 1.0),
    Row("per-chunk delay, p99 (ms)", "chunk_99", "added", "≤ +1 ms", lambda added: added <= 1.0),
    Row("per-chunk delay, max (ms)", "chunk_max", "added"),
    Row("RSS idle, after load (MB)", "rss_idle", "ratio"),
    Row("RSS 1,000 open streams (MB)", "rss_streams", "value", "< 150 MB", lambda mb: mb < 150),
    Row("X-LLM-Proxy-Overhead-Ms, p50", "overhead_header_50", ""),
)


def _number(value: float | None) -> str:
    if value is None:
        return "–"
    if value >= 1000:
        return f"{value:,.0f}"
    return f"{value:.3f}" if value < 10 else f"{value:.1f}"


def table(results: Results, *, verdicts: bool, streams: int) -> tuple[str, bool]:
    """Render the table; return it and whether every target with a verdict passed."""
    header = ("metric", *TARGETS, "llm-proxy vs floor", "target", "result")
    lines: list[tuple[str, ...]] = []
    all_pass = True
    for row in ROWS:
        values = {name: results.median(row.metric, name) for name in TARGETS}
        gateway, floor = values["llm-proxy"], values["floor"]
        if gateway is None and floor is None:
            continue
        comparison, checked = "", None
        if gateway is not None and floor is not None and row.compare == "ratio" and floor:
            checked = gateway / floor
            comparison = f"{checked:.2f}×"
        elif gateway is not None and floor is not None and row.compare == "added":
            checked = gateway - floor
            comparison = f"{checked:+.3f} ms"
        elif row.compare == "value":
            checked = gateway
        verdict = ""
        if verdicts and row.passes is not None and checked is not None:
            ok = row.passes(checked)
            all_pass &= ok
            verdict = "PASS" if ok else "FAIL"
        label = row.label.replace("1,000", f"{streams:,}")
        lines.append((label, *(_number(values[name]) for name in TARGETS), comparison, row.target, verdict))
    widths = [max(len(line[column]) for line in (header, *lines)) for column in range(len(header))]

    def render(cells: tuple[str, ...]) -> str:
        return "| " + " | ".join(cell.ljust(width) for cell, width in zip(cells, widths, strict=True)) + " |"

    rule = "|" + "|".join("-" * (width + 2) for width in widths) + "|"
    return "\n".join([render(header), rule, *(render(line) for line in lines)]), all_pass


# ---- the machine ----

def foreign_cpu() -> dict[int, float]:
    """Return CPU seconds (own + reaped children) of every process outside this process group."""
    tick = os.sysconf("SC_CLK_TCK")
    mine = os.getpgid(0)
    seconds = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        # After the command name: state ppid pgrp … utime(11) stime(12) cutime(13) cstime(14).
        if int(fields[2]) != mine:
            seconds[int(entry.name)] = sum(int(value) for value in fields[11:15]) / tick
    return seconds


def interference(before: dict[int, float], after: dict[int, float], elapsed: float) -> float:
    """Return the share of the machine other processes used between two foreign_cpu() readings."""
    used = sum(value - before.get(pid, 0.0) for pid, value in after.items())
    return max(0.0, used) / (elapsed * (os.cpu_count() or 1))


def _version(argv: list[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)  # noqa: S603
    except OSError:
        return "not installed"
    return (done.stdout + done.stderr).strip().splitlines()[0] if (done.stdout + done.stderr).strip() else "?"


def machine(gateway_log: Path | None) -> list[str]:
    """Describe what the figures were taken on."""
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
    dirty = _version(["git", "-C", str(HERE.parent), "status", "--porcelain", "--untracked-files=no"])
    return [
        f"date: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M:%S} UTC",
        f"commit: {commit}{' (working tree modified)' if dirty not in ('?', 'not installed') else ''}",
        f"machine: {os.cpu_count()} CPUs, {model}, {platform.system()} {platform.release()}",
        f"python {platform.python_version()}, aiohttp {aiohttp.__version__}, {loop}, llm-proxy {llm_proxy.__version__}",
        f"{_version([which('nginx') or 'nginx', '-v'])}; {_version([which('wrk') or 'wrk', '--version'])}",
    ]


# ---- running it ----

@contextmanager
def servers(workdir: Path, smoke: bool, overrides: dict[str, str]) -> Iterator[tuple[Service, Service, Service]]:
    """Start upstream(s), floor and gateway; stop them all, last started first."""
    with ExitStack() as stack:
        def started(service: Service) -> Service:
            stack.callback(service.stop)
            return service

        python_upstream = started(start_python_upstream(workdir))
        upstream = python_upstream if smoke else started(start_nginx(workdir, python_upstream.url))
        floor = started(start_floor(workdir, upstream.url))
        gateway = started(start_gateway(workdir, upstream.url, overrides))
        yield upstream, floor, gateway


def _assignment(text: str) -> tuple[str, str]:
    name, equals, value = text.partition("=")
    if not equals or not name:
        raise argparse.ArgumentTypeError(f"{text!r} is not NAME=VALUE")
    return name, value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="a quick check that every piece works (no nginx/wrk)")
    parser.add_argument("--runs", type=int, default=3, help="runs per figure; the table shows medians (default 3)")
    parser.add_argument("--duration", type=int, default=5, help="seconds per wrk run (default 5)")
    parser.add_argument("--profile", action="store_true",
                        help="afterwards, sample floor and llm-proxy with py-spy under load and print the top frames")
    parser.add_argument("--gateway-env", type=_assignment, action="append", default=[], metavar="NAME=VALUE",
                        help="set a variable of llm-proxy (repeatable), e.g. AUDIT_ENABLED=false to price the audit")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write every run's figures to FILE")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (logs, audit, database)")
    args = parser.parse_args(argv)
    plan = Plan.smoke() if args.smoke else Plan(runs=max(1, args.runs), duration=max(1, args.duration))
    started = time.monotonic()

    def say(message: str) -> None:
        print(f"[{time.monotonic() - started:6.1f}s] {message}", file=sys.stderr, flush=True)

    raise_fd_limit()
    others_before = foreign_cpu()
    workdir = Path(tempfile.mkdtemp(prefix="llm-proxy-bench-"))
    results = Results()
    reports: list[str] = []
    try:
        say(f"starting servers in {workdir}")
        with servers(workdir, args.smoke, dict(args.gateway_env)) as (upstream, floor, gateway):
            targets = [Target("baseline", upstream.url, None, None), Target("floor", floor.url, None, floor.pid),
                       Target("llm-proxy", gateway.url, gateway.extra["token"], gateway.pid)]
            measure(plan, targets, results, say)
            if args.profile:
                try:
                    reports = [hotspots.report(path, count=20) for path in profile(targets, 8, workdir, say)]
                except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
                    say(f"no profile: {exc}")
            about = machine(workdir / "llm-proxy.log")
    finally:
        if args.keep:
            say(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    say("done")
    others = interference(others_before, foreign_cpu(), time.monotonic() - started)

    rendered, all_pass = table(results, verdicts=not args.smoke, streams=plan.streams)
    print("\n".join(about))
    print(f"command: python bench/run.py {' '.join(argv if argv is not None else sys.argv[1:])}".rstrip())
    print(f"other processes used {others:.1%} of the machine during the run"
          + (" — the figures are disturbed; run again on a quiet machine" if others > 0.05 else ""))
    print(f"each figure: the median of {plan.runs} run(s); latencies in ms; RSS in MB (VmRSS)")
    if args.smoke:
        print("smoke mode: a handful of requests through every piece; the figures mean nothing")
    print()
    print(rendered)
    for report in reports:
        print()
        print(report)
    if args.json is not None:
        args.json.write_text(json.dumps({"machine": about, "runs": results.runs}, indent=2))
    return 1 if args.strict and not all_pass else 0


if __name__ == "__main__":
    sys.exit(main())
