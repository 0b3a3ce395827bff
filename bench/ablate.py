"""Price features and patches: several llm-proxy variants side by side, measured in shuffled rounds against the floor.

    python bench/ablate.py --variant audit-off:AUDIT_ENABLED=false --variant access-log-off:LOG_LEVEL=warning
    cp -r llm_proxy /tmp/try/ && $EDITOR /tmp/try/llm_proxy/gateway/forwarder.py
    python bench/ablate.py --variant patched@/tmp/try                        # imports /tmp/try/llm_proxy
    python bench/ablate.py --variant redis:REDIS_URL={redis} --variant pg:DATABASE_URL={postgres}
    python bench/ablate.py --variant before@/tmp/base:REDIS_URL={redis} --variant after@/tmp/try:REDIS_URL={redis}

Every variant runs at once in its own process (with the bench's every-feature-on settings plus its
own overrides, or importing llm_proxy from another directory); each round loads the floor and
every variant once with wrk -c32, in a shuffled order, so drift on the machine spreads over all.
CPU time per request is the figure to compare: it hardly moves when something else competes for
the cores, where requests/s does. Two processes running the same code can differ by 10-20 %
(memory layout, hash seeds): `--instances 2` or more starts each target that many times and
pools their samples, so one lucky or unlucky process cannot decide a comparison. `{redis}` in a
variable's value starts a private Redis (one for all), `{postgres}` a private PostgreSQL (a database
of its own for each process). Needs nginx and wrk, like the full benchmark.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import sys
import tempfile
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import backends
from load import Target, run_wrk
from machine import interference, reading
from services import Service, raise_fd_limit, start_floor, start_gateway, start_nginx, start_python_upstream

PLACEHOLDERS = ("{redis}", "{postgres}")


@dataclass(frozen=True)
class Variant:
    """A gateway to measure: a name, environment overrides, and where llm_proxy is imported from."""
    name: str
    env: dict[str, str] = field(default_factory=dict)
    pythonpath: str | None = None


def parse_variant(text: str) -> Variant:
    """Read `NAME`, `NAME:VAR=VALUE,VAR=VALUE` or `NAME@DIRECTORY` (llm_proxy imported from DIRECTORY), the
    last also with variables: `NAME@DIRECTORY:VAR=VALUE,...`."""
    name, at, directory = text.partition("@")
    if at:
        directory, _, assignments = directory.partition(":")
        if not Path(directory, "llm_proxy").is_dir():
            raise argparse.ArgumentTypeError(f"{directory} holds no llm_proxy package")
        return Variant(name, parse_variant(f"{name}:{assignments}").env, str(Path(directory).resolve()))
    name, _, assignments = text.partition(":")
    env = {}
    for assignment in filter(None, assignments.split(",")):
        variable, equals, value = assignment.partition("=")
        if not equals or not variable:
            raise argparse.ArgumentTypeError(f"{assignment!r} is not VAR=VALUE")
        env[variable] = value
    if not name:
        raise argparse.ArgumentTypeError(f"{text!r} names no variant")
    return Variant(name, env)


def start_variant(workdir: Path, upstream: str, variant: Variant, servers: dict[str, str]) -> Service:
    """Start one gateway variant in its own directory; `servers` maps placeholders to URLs."""
    directory = workdir / variant.name
    directory.mkdir(parents=True)
    env = {}
    for name, value in variant.env.items():
        if "{postgres}" in value:  # a database per process: without REDIS_URL a process owns its database
            database = f"bench_{workdir.name}_{variant.name}".lower().replace("-", "_")
            value = value.replace("{postgres}", backends.create_database(servers["{postgres}"], database))
        env[name] = value.replace("{redis}", servers.get("{redis}", "{redis}"))
    saved = os.environ.get("PYTHONPATH")
    if variant.pythonpath is not None:
        os.environ["PYTHONPATH"] = variant.pythonpath  # the child imports llm_proxy from there first
    try:
        return start_gateway(directory, upstream, env)
    finally:
        if saved is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = saved


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", type=parse_variant, action="append", default=[], metavar="SPEC",
                        help="NAME[:VAR=VALUE,...] or NAME@DIRECTORY[:VAR=VALUE,...] (repeatable); "
                             "`all-on` is always measured")
    parser.add_argument("--rounds", type=int, default=5, help="rounds (default 5)")
    parser.add_argument("--duration", type=int, default=3, help="seconds per wrk run (default 3)")
    parser.add_argument("--instances", type=int, default=1,
                        help="processes started per target, their samples pooled (default 1)")
    args = parser.parse_args(argv)
    variants = [Variant("all-on"), *args.variant]
    if len({variant.name for variant in variants}) != len(variants):
        parser.error("variant names must differ (and not be all-on)")
    raise_fd_limit()
    workdir = Path(tempfile.mkdtemp(prefix="llm-proxy-ablate-"))
    samples: dict[str, tuple[list[float], list[float], list[float]]] = {}
    try:
        with ExitStack() as stack:
            def started(service: Service) -> Service:
                stack.callback(service.stop)
                return service

            python_upstream = started(start_python_upstream(workdir))
            nginx = started(start_nginx(workdir, python_upstream.url))
            wanted = {mark for variant in variants for value in variant.env.values() for mark in PLACEHOLDERS
                      if mark in value}
            servers: dict[str, str] = {}
            daemons: dict[str, int] = {}
            for mark, start in (("{redis}", lambda: backends.start_redis(workdir)),
                                ("{postgres}", backends.start_postgres)):
                if mark in wanted:
                    backend = start()
                    stack.callback(backend.stop)
                    servers[mark], daemons[mark] = backend.url, backend.pid
            targets, owner = [], {}
            for instance in range(max(1, args.instances)):
                (workdir / f"i{instance}").mkdir()
                floor = started(start_floor(workdir / f"i{instance}", nginx.url))
                targets.append(Target(f"floor#{instance}", floor.url, None, floor.pid))
                owner[targets[-1].name] = "floor"
                for variant in variants:
                    gateway = started(start_variant(workdir / f"i{instance}", nginx.url, variant, servers))
                    uses = tuple(pid for mark, pid in daemons.items()
                                 if any(mark in value for value in variant.env.values()))
                    targets.append(Target(f"{variant.name}#{instance}", gateway.url, gateway.extra["token"],
                                          gateway.pid, uses))
                    owner[targets[-1].name] = variant.name
            for target in targets:
                run_wrk(target, 32, 2, 2)  # warm-up: token cache, connection pools, allocator
            before = reading(daemons.values())
            order = random.Random(0)  # noqa: S311 (an order, not a secret)
            for round_number in range(max(1, args.rounds)):
                print(f"round {round_number + 1}/{args.rounds}", file=sys.stderr, flush=True)
                shuffled = targets[:]
                order.shuffle(shuffled)
                for target in shuffled:
                    figures = run_wrk(target, 32, 2, args.duration)
                    rps, cpu, cpu_all = samples.setdefault(owner[target.name], ([], [], []))
                    rps.append(figures["rps"])
                    cpu.append(figures["cpu_us"])
                    cpu_all.append(figures["cpu_all_us"])
            others = interference(before, reading(daemons.values()))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    floor_cpu = statistics.median(samples["floor"][1])
    base_cpu = statistics.median(samples["all-on"][1])
    print(f"medians of {args.rounds} rounds × {max(1, args.instances)} processes of wrk -t2 -c32 -d{args.duration}s; "
          f"other work used {others:.1%} of the machine")
    print("| target | req/s | CPU µs/request | vs floor | vs all-on | CPU spread | with Redis/PostgreSQL µs |")
    print("|---|---|---|---|---|---|---|")
    for name in ("floor", *(variant.name for variant in variants)):
        rps, cpu, cpu_all = samples[name]
        median = statistics.median(cpu)
        print(f"| {name} | {statistics.median(rps):,.0f} | {median:.0f} | {median / floor_cpu:.2f}× | "
              f"{median - base_cpu:+.0f} µs | {min(cpu):.0f}–{max(cpu):.0f} | {statistics.median(cpu_all):.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
