"""Benchmark llm-proxy against the upstream alone and a bare aiohttp pass-through (the floor); print the tables.

    python bench/run.py            # the full benchmark (nginx, wrk, PostgreSQL, Redis: `make bench` installs them)
    python bench/run.py --smoke    # a few requests through every piece, Python only, in seconds

Everything listens on 127.0.0.1 and every load is bounded in count and time. Each figure is the
median of --runs runs, and the runs of the targets are interleaved so that drift on the machine
hits them alike. Besides the floor table, the same run measures llm-proxy on PostgreSQL + Redis in
one process and under `serve --workers 2`, and how fast a revocation reaches another process.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import backends
import hotspots
import probes
import revocation
from load import Target, cpu_seconds, run_wrk, wrk_command
from machine import Reading, describe, interference, reading
from services import (
    GatewayKeys,
    Service,
    raise_fd_limit,
    start_floor,
    start_gateway,
    start_nginx,
    start_python_upstream,
)
from tables import TARGETS, Results, cores_table, process_table, quantile, table

MB = 1024  # VmRSS is in kB
WORKERS = 2


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
    revocations: int = 200      # per run, both processes idle
    revocations_loaded: int = 100  # per run, the receiving process under wrk -c32
    plain_requests: int = 0     # smoke: Python requests instead of wrk

    @classmethod
    def smoke(cls) -> Plan:
        return cls(runs=1, ttfb_requests=10, chunk_requests=2, chunks=3, interval_ms=5, streams=20, revocations=6,
                   revocations_loaded=0, plain_requests=20)


@dataclass
class Cluster:
    """The several-processes targets: gateways on one PostgreSQL and one Redis."""
    single: Service             # one process, the target "pg-redis"
    other: Service              # a second process on the same database and Redis, for the revocations
    workers: Service            # `serve --workers 2`, the target "workers"
    servers: tuple[int, ...]    # Redis's and PostgreSQL's pids
    versions: list[str] = field(default_factory=list)


@dataclass
class Started:
    upstream: Service
    floor: Service
    gateway: Service
    cluster: Cluster | None

    def targets(self) -> list[Target]:
        targets = [Target("baseline", self.upstream.url, None, None),
                   Target("floor", self.floor.url, None, self.floor.pid),
                   Target("llm-proxy", self.gateway.url, self.gateway.extra["token"], self.gateway.pid)]
        if self.cluster is not None:
            single, workers = self.cluster.single, self.cluster.workers
            targets += [Target("pg-redis", single.url, single.extra["token"], single.pid, self.cluster.servers),
                        Target("workers", workers.url, workers.extra["token"], workers.pid, self.cluster.servers)]
        return targets


# ---- the measurements ----

def interleaved(plan: Plan, targets: list[Target]) -> Iterator[Target]:
    for _ in range(plan.runs):
        yield from targets


def measure(plan: Plan, started: Started, results: Results, say: Callable[[str], None]) -> None:
    """Take every figure of the tables, run by run."""
    targets = started.targets()
    floor_targets = [target for target in targets if target.name in TARGETS]
    # While the floor's targets are loaded the several-processes gateways and servers sit idle: what
    # they use meanwhile is the price of running them beside (a drift on the floor table's figures).
    bystanders = () if started.cluster is None else (started.cluster.single.pid, started.cluster.other.pid,
                                                     started.cluster.workers.pid, *started.cluster.servers)
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
            idle_before = cpu_seconds(*bystanders)
            figures = run_wrk(target, 32, 2, plan.duration)
            if target in floor_targets and bystanders:
                results.add("bystanders_cpu", target.name, (cpu_seconds(*bystanders) - idle_before) / plan.duration)
            results.add("rps_32", target.name, figures["rps"])
            results.add("p50_32", target.name, figures["p50_us"] / 1000)
            results.add("p99_32", target.name, figures["p99_us"] / 1000)
            if "cpu_us" in figures:
                results.add("cpu_32", target.name, figures["cpu_us"])
                results.add("cpu_all_32", target.name, figures["cpu_all_us"])
            for share in ("gateway", "servers", "wrk", "rest", "busy"):
                results.add(f"cores_{share}", target.name, figures[f"cores_{share}"])
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
    for target in interleaved(plan, floor_targets):
        delays = asyncio.run(probes.chunk_delays(target.url, target.token, plan.chunk_requests, plan.chunks,
                                                 plan.interval_ms)).values
        results.add("chunk_50", target.name, quantile(delays, 0.5))
        results.add("chunk_99", target.name, quantile(delays, 0.99))
        results.add("chunk_max", target.name, max(delays))

    say(f"memory: {plan.streams} held streams × {plan.runs} runs each")
    streaming = [target for target in floor_targets if target.pid is not None]
    for target in streaming:
        assert target.pid is not None
        results.add("rss_idle", target.name, probes.rss_kb(target.pid) / MB)
    for target in interleaved(plan, streaming):
        opened, rss = asyncio.run(probes.held_streams(target.url, target.token, plan.streams, target.pid))
        assert opened == plan.streams and rss is not None
        results.add("rss_streams", target.name, rss / MB)
        time.sleep(1.0)  # let the last round's connections close before the next opens its own

    if started.cluster is not None:
        revocations(plan, started.cluster, results, say)


def revocations(plan: Plan, cluster: Cluster, results: Results, say: Callable[[str], None]) -> None:
    """Measure how long a revocation through one process takes to reach the other, idle and under load."""
    pair = (revocation.Gateway(cluster.single.url), revocation.Gateway(cluster.other.url))
    management, project = cluster.single.extra["management_token"], cluster.single.extra["project_id"]

    def record(prefix: str, measured: revocation.Propagation) -> None:
        values = measured.values + [float("inf")] * measured.unseen  # never seen: worse than any figure
        results.add(f"{prefix}_50", "pg-redis", quantile(values, 0.5))
        results.add(f"{prefix}_99", "pg-redis", quantile(values, 0.99))
        results.add(f"{prefix}_max", "pg-redis", max(values))
        results.add(f"{prefix}_answer_50", "pg-redis", quantile(measured.answered, 0.5))
        if measured.unseen:
            say(f"{measured.unseen} revocations not seen by the other process within {revocation.GIVE_UP_S} s")

    say(f"revocation: {plan.revocations} tokens revoked through one process, polled on the other, × {plan.runs} runs")
    for _ in range(plan.runs):
        record("revoke", asyncio.run(revocation.measure(pair, management, project, plan.revocations)))
    if not plan.revocations_loaded:
        return
    say(f"revocation under load: {plan.revocations_loaded} tokens, the other process under wrk -c32, "
        f"× {plan.runs} runs")
    loaded = Target("pg-redis-other", cluster.other.url, cluster.single.extra["token"], cluster.other.pid)
    for _ in range(plan.runs):
        argv, env = wrk_command(loaded, 32, 2, 120)
        wrk = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)  # noqa: S603
        try:
            time.sleep(1.0)  # the load is on before the first revocation
            record("revoke_load", asyncio.run(revocation.measure(pair, management, project, plan.revocations_loaded,
                                                                 alternate=False)))
        finally:
            wrk.terminate()
            wrk.wait(10)


def profile(targets: list[Target], seconds: int, out: Path, say: Callable[[str], None]) -> list[Path]:
    """Sample each server with py-spy while wrk -c32 loads it; return the raw profiles written."""
    spy = shutil.which("py-spy", path=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}")
    if spy is None:
        raise RuntimeError("py-spy is not installed (make bench installs it into .venv)")
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for target in targets:
        if target.pid is None:
            continue
        path = out / f"{target.name}.raw.txt"
        say(f"profiling {target.name} for {seconds} s under wrk -c32 -> {path}")
        # --gil: only the thread holding the GIL, i.e. the serial work that caps throughput (threads
        # blocked in queue.get can look busy otherwise); --subprocesses: every worker of `serve --workers`.
        recorder = subprocess.Popen([spy, "record", "--pid", str(target.pid), "--duration", str(seconds),  # noqa: S603
                                     "--rate", "200", "--gil", "--subprocesses", "--format", "raw",
                                     "--output", str(path)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        run_wrk(target, 32, 2, seconds + 2)
        _, errors = recorder.communicate(timeout=60)
        if recorder.returncode != 0:
            raise RuntimeError(f"py-spy failed: {errors.decode(errors='replace')[-1000:]}")
        written.append(path)
    return written


# ---- running it ----

def start_cluster(workdir: Path, upstream: str, overrides: dict[str, str], stack: ExitStack) -> Cluster:
    """Start Redis, PostgreSQL and the gateways on them: two single processes and `serve --workers 2`."""
    redis = backends.start_redis(workdir)
    stack.callback(redis.stop)
    postgres = backends.start_postgres()
    stack.callback(postgres.stop)
    shared = {**overrides, "DATABASE_URL": postgres.url, "REDIS_URL": redis.url}
    keys = GatewayKeys()  # one database: one MANAGEMENT_TOKEN and ENCRYPTION_KEY for all of them

    def gateway(name: str, project: str | None, workers: int = 1) -> Service:
        (workdir / name).mkdir()
        service = start_gateway(workdir / name, upstream, shared, name=name, keys=keys, project=project,
                                workers=workers)
        stack.callback(service.stop)
        return service

    single = gateway("pg-redis", "bench")
    other = gateway("pg-redis-other", None)
    workers = gateway("workers", "bench-workers", WORKERS)
    versions = [f"{backends.version('postgres')}; {backends.version('redis-server')}"]
    return Cluster(single, other, workers, (redis.pid, postgres.pid), versions)


@contextmanager
def servers(workdir: Path, smoke: bool, processes: bool, overrides: dict[str, str]) -> Iterator[Started]:
    """Start upstream(s), floor and gateways (and the several-processes ones); stop them all, last started first."""
    with ExitStack() as stack:
        def started(service: Service) -> Service:
            stack.callback(service.stop)
            return service

        python_upstream = started(start_python_upstream(workdir))
        upstream = python_upstream if smoke else started(start_nginx(workdir, python_upstream.url))
        floor = started(start_floor(workdir, upstream.url))
        gateway = started(start_gateway(workdir, upstream.url, overrides))
        cluster = start_cluster(workdir, upstream.url, overrides, stack) if processes else None
        yield Started(upstream, floor, gateway, cluster)


def _assignment(text: str) -> tuple[str, str]:
    name, equals, value = text.partition("=")
    if not equals or not name:
        raise argparse.ArgumentTypeError(f"{text!r} is not NAME=VALUE")
    return name, value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="a quick check that every piece works (no nginx/wrk)")
    parser.add_argument("--runs", type=int, default=3, help="runs per figure; the tables show medians (default 3)")
    parser.add_argument("--duration", type=int, default=5, help="seconds per wrk run (default 5)")
    parser.add_argument("--profile", action="store_true",
                        help="afterwards, sample floor and gateways with py-spy under load and print the top frames")
    parser.add_argument("--no-processes", dest="processes", action="store_false",
                        help="leave out PostgreSQL + Redis, --workers and the revocations (the floor table only)")
    parser.add_argument("--gateway-env", type=_assignment, action="append", default=[], metavar="NAME=VALUE",
                        help="set a variable of llm-proxy (repeatable), e.g. AUDIT_ENABLED=false to price the audit")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write every run's figures to FILE")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (logs, audit, database)")
    args = parser.parse_args(argv)
    plan = Plan.smoke() if args.smoke else Plan(runs=max(1, args.runs), duration=max(1, args.duration))
    begun = time.monotonic()

    def say(message: str) -> None:
        print(f"[{time.monotonic() - begun:6.1f}s] {message}", file=sys.stderr, flush=True)

    absent = backends.missing() if args.processes else []
    if absent:
        say(f"not measuring several processes: {' and '.join(absent)} missing (make bench installs them)")
    raise_fd_limit()
    before = reading()
    after: Reading | None = None
    workdir = Path(tempfile.mkdtemp(prefix="llm-proxy-bench-"))
    results = Results()
    reports: list[str] = []
    about: list[str] = []
    try:
        say(f"starting servers in {workdir}")
        with servers(workdir, args.smoke, args.processes and not absent, dict(args.gateway_env)) as started:
            measure(plan, started, results, say)
            if args.profile:
                profiled = [target for target in started.targets() if target.name != "baseline"]
                try:
                    reports = [hotspots.report(path, count=20) for path in profile(profiled, 8, workdir, say)]
                except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
                    say(f"no profile: {exc}")
            cluster = started.cluster
            about = describe(workdir / "llm-proxy.log", cluster.versions if cluster is not None else ())
            # Read before PostgreSQL stops: pg_ctl's server is no child of ours, so its work counts only while it runs.
            after = reading(cluster.servers if cluster is not None else ())
    finally:
        if args.keep:
            say(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    say("done")
    others = interference(before, after) if after is not None else 0.0
    return report(args, argv, plan, results, about, others, reports)


def report(args: argparse.Namespace, argv: list[str] | None, plan: Plan, results: Results, about: list[str],
           others: float, reports: list[str]) -> int:
    """Print what was measured; return the exit status."""
    rendered, floor_pass = table(results, verdicts=not args.smoke, streams=plan.streams)
    processes, processes_pass = process_table(results, verdicts=not args.smoke)
    print("\n".join(about))
    print(f"command: python bench/run.py {' '.join(argv if argv is not None else sys.argv[1:])}".rstrip())
    print(f"other work (other processes, the kernel, the hypervisor's steal) used {others:.1%} of the machine"
          + (" — the figures are disturbed; run again on a quiet machine" if others > 0.05 else ""))
    bystanders = results.median("bystanders_cpu", "llm-proxy")
    if bystanders is not None:
        print(f"the idle several-processes servers and gateways used {bystanders:.1%} of one core while "
              "llm-proxy (SQLite) was loaded")
    print(f"each figure: the median of {plan.runs} run(s); latencies in ms; RSS in MB (VmRSS)")
    if args.smoke:
        print("smoke mode: a handful of requests through every piece; the figures mean nothing")
    print()
    print(rendered)
    if processes:
        print()
        print(f"Several processes: PostgreSQL + Redis (REDIS_URL, DATABASE_URL), one process and `serve --workers "
              f"{WORKERS}`; revocations: through one of two processes on them, until the other refuses "
              f"({plan.revocations} idle, {plan.revocations_loaded} under load, per run)")
        print()
        print(processes)
    cores = cores_table(results, os.cpu_count() or 1)
    if cores:
        print()
        print(f"Where the machine's {os.cpu_count()} cores went while wrk -c32 loaded each target (cores, medians; "
              "the rest is nginx, the kernel and other work):")
        print()
        print(cores)
    for profiled in reports:
        print()
        print(profiled)
    if args.json is not None:
        args.json.write_text(json.dumps({"machine": about, "runs": results.runs}, indent=2))
    return 1 if args.strict and not (floor_pass and processes_pass) else 0


if __name__ == "__main__":
    sys.exit(main())
