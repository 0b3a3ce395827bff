"""The benchmark's figures (every run's, by metric and target) and the two tables made of their medians.

The first table compares llm-proxy with the floor, the second the ways of running it: SQLite in one
process, PostgreSQL + Redis in one process, and `serve --workers 2` on PostgreSQL + Redis.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass, field

TARGETS = ("baseline", "floor", "llm-proxy")
# The several-processes table's columns: target name -> heading, and the short name its comparisons use.
PROCESSES = {"llm-proxy": ("SQLite, 1 process", "SQLite"),
             "pg-redis": ("PG + Redis, 1 process", "PG + Redis"),
             "workers": ("PG + Redis, 2 workers", "2 workers")}


@dataclass
class Results:
    """Every run's figure, by metric then target; the tables show medians."""
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


@dataclass(frozen=True)
class Row:
    """One line of the floor table."""
    label: str
    metric: str
    compare: str            # "ratio" (gateway / floor), "added" (gateway - floor), "value" or ""
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


@dataclass(frozen=True)
class ProcessRow:
    """One line of the several-processes table: a metric's medians, and `subject` compared with `base`.

    With `values` False the line only adds a comparison of the metric shown above it.
    """
    label: str
    metric: str
    compare: str = ""       # "ratio" (subject / base), "added" (subject - base), "value" (subject's own) or ""
    subject: str = "pg-redis"
    base: str = "llm-proxy"
    target: str = ""
    passes: Callable[[float], bool] | None = None
    values: bool = True


PROCESS_ROWS = (
    ProcessRow("throughput @32 conn (req/s)", "rps_32", "ratio", "workers", "pg-redis", "≥ 1.2×",
               lambda ratio: ratio >= 1.2),
    ProcessRow("throughput @32 conn, against SQLite", "rps_32", "ratio", "workers", "llm-proxy", "≥ 1.2×",
               lambda ratio: ratio >= 1.2, values=False),
    ProcessRow("throughput @32 conn, against SQLite", "rps_32", "ratio", values=False),
    ProcessRow("CPU per request @32 conn (µs)", "cpu_32", "ratio", target="≤ 1.3×", passes=lambda ratio: ratio <= 1.3),
    ProcessRow("CPU per request @32 conn, per worker", "cpu_32", "ratio", "workers", "pg-redis", values=False),
    ProcessRow("CPU per request with Redis + PG (µs)", "cpu_all_32", "ratio", target="≤ 1.3×",
               passes=lambda ratio: ratio <= 1.3),
    ProcessRow("p50 latency @32 conn (ms)", "p50_32", "ratio"),
    ProcessRow("p99 latency @32 conn (ms)", "p99_32", "ratio"),
    ProcessRow("p50 latency @1 conn (ms)", "p50_1", "added"),
    ProcessRow("p99 latency @1 conn (ms)", "p99_1", "added"),
    ProcessRow("TTFB streamed, p50 (ms)", "ttfb_50", "added"),
    ProcessRow("revocation seen by the other, p50 (ms)", "revoke_50"),
    ProcessRow("revocation seen by the other, p99 (ms)", "revoke_99", "value", target="< 100 ms",
               passes=lambda ms: ms < 100),
    ProcessRow("revocation seen by the other, max (ms)", "revoke_max"),
    ProcessRow("the revoking DELETE answered, p50 (ms)", "revoke_answer_50"),
    ProcessRow("the same, other under wrk -c32, p50 (ms)", "revoke_load_50"),
    ProcessRow("the same, other under wrk -c32, p99 (ms)", "revoke_load_99", "value", target="< 100 ms",
               passes=lambda ms: ms < 100),
    ProcessRow("the same, other under wrk -c32, max (ms)", "revoke_load_max"),
    ProcessRow("the same, DELETE answered, p50 (ms)", "revoke_load_answer_50"),
)


def _number(value: float | None) -> str:
    if value is None:
        return "–"
    if value >= 1000:
        return f"{value:,.0f}"
    return f"{value:.3f}" if value < 10 else f"{value:.1f}"


def _render(header: tuple[str, ...], lines: list[tuple[str, ...]]) -> str:
    widths = [max(len(line[column]) for line in (header, *lines)) for column in range(len(header))]

    def render(cells: tuple[str, ...]) -> str:
        return "| " + " | ".join(cell.ljust(width) for cell, width in zip(cells, widths, strict=True)) + " |"

    rule = "|" + "|".join("-" * (width + 2) for width in widths) + "|"
    return "\n".join([render(header), rule, *(render(line) for line in lines)])


def _compare(kind: str, subject: float | None, base: float | None) -> tuple[str, float | None]:
    """Return the comparison's text and the number a target judges."""
    if kind == "value":
        return "", subject
    if subject is None or base is None:
        return "", None
    if kind == "ratio" and base:
        return f"{subject / base:.2f}×", subject / base
    if kind == "added":
        return f"{subject - base:+.3f} ms", subject - base
    return "", None


def _verdict(passes: Callable[[float], bool] | None, checked: float | None, verdicts: bool) -> tuple[str, bool]:
    if not verdicts or passes is None or checked is None:
        return "", True
    ok = passes(checked)
    return ("PASS" if ok else "FAIL"), ok


def table(results: Results, *, verdicts: bool, streams: int) -> tuple[str, bool]:
    """Render the floor table; return it and whether every target with a verdict passed."""
    header = ("metric", *TARGETS, "llm-proxy vs floor", "target", "result")
    lines: list[tuple[str, ...]] = []
    all_pass = True
    for row in ROWS:
        values = {name: results.median(row.metric, name) for name in TARGETS}
        if values["llm-proxy"] is None and values["floor"] is None:
            continue
        comparison, checked = _compare(row.compare, values["llm-proxy"], values["floor"])
        verdict, ok = _verdict(row.passes, checked, verdicts)
        all_pass &= ok
        label = row.label.replace("1,000", f"{streams:,}")
        lines.append((label, *(_number(values[name]) for name in TARGETS), comparison, row.target, verdict))
    return _render(header, lines), all_pass


def process_table(results: Results, *, verdicts: bool) -> tuple[str, bool]:
    """Render the several-processes table (empty when none of its figures was taken); return it and the verdict."""
    header = ("metric", *(heading for heading, _ in PROCESSES.values()), "compared", "target", "result")
    lines: list[tuple[str, ...]] = []
    all_pass = True
    for row in PROCESS_ROWS:
        values = {name: results.median(row.metric, name) for name in PROCESSES}
        if values[row.subject] is None:
            continue
        comparison, checked = _compare(row.compare, values[row.subject], values[row.base])
        if comparison:
            sign = "÷" if row.compare == "ratio" else "−"
            comparison = f"{PROCESSES[row.subject][1]} {sign} {PROCESSES[row.base][1]}: {comparison}"
        verdict, ok = _verdict(row.passes, checked, verdicts)
        all_pass &= ok
        cells = (_number(values[name]) if row.values else "" for name in PROCESSES)
        lines.append((row.label, *cells, comparison, row.target, verdict))
    return (_render(header, lines) if lines else ""), all_pass


CORES = (("cores_gateway", "the target's processes"), ("cores_servers", "PostgreSQL + Redis"), ("cores_wrk", "wrk"),
         ("cores_rest", "the rest"))


def cores_table(results: Results, cpus: int) -> str:
    """Render how many cores each part used during the wrk -c32 runs, by target (empty when wrk did not run)."""
    names = [name for name in (*TARGETS, *PROCESSES) if results.median("cores_busy", name) is not None]
    header = ("target", *(heading for _, heading in CORES), "idle")
    lines = []
    for name in dict.fromkeys(names):
        busy = results.median("cores_busy", name) or 0.0
        label = PROCESSES[name][0] if name in PROCESSES else name
        lines.append((label, *(f"{results.median(metric, name) or 0.0:.2f}" for metric, _ in CORES),
                      f"{max(0.0, cpus - busy):.2f}"))
    return _render(header, lines) if lines else ""
