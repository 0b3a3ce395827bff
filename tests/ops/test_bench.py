"""The benchmark script: a smoke run through every piece (Python only), and its parsing and rendering helpers."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from tests.fakes import REPO

BENCH = REPO / "bench"


@pytest.fixture(scope="module")
def bench() -> Iterator[dict[str, ModuleType]]:
    """Import the bench modules the way `python bench/run.py` does (bench/ first on sys.path)."""
    sys.path.insert(0, str(BENCH))
    try:
        yield {name: importlib.import_module(name) for name in ("run", "hotspots", "services", "upstream", "ablate")}
    finally:
        sys.path.remove(str(BENCH))
        for name in ("run", "hotspots", "services", "upstream", "probes", "ablate"):
            sys.modules.pop(name, None)


@pytest.mark.system
def test_smoke_run_goes_through_upstream_floor_and_gateway(tmp_path: Path) -> None:
    out = tmp_path / "figures.json"
    done = subprocess.run([sys.executable, str(BENCH / "run.py"), "--smoke", "--json", str(out)],
                          capture_output=True, text=True, timeout=60, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(BENCH.parent)}, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| metric" in done.stdout and "smoke mode" in done.stdout
    runs = json.loads(out.read_text())["runs"]
    for metric in ("p50_1", "ttfb_50", "chunk_50"):
        assert set(runs[metric]) == {"baseline", "floor", "llm-proxy"}, metric
    assert set(runs["rss_streams"]) == {"floor", "llm-proxy"}
    assert runs["overhead_header_50"]["llm-proxy"][0] >= 0  # the gateway reports its own cost


def test_wrk_result_line_is_parsed(bench: dict[str, ModuleType]) -> None:
    output = ("Running 5s test @ http://127.0.0.1:1/v1/chat/completions\n"
              'WRK_RESULT {"requests":100,"duration_us":1000000,"p50_us":250,"status_errors":0}\n')
    assert bench["run"].parse_wrk(output) == {"requests": 100, "duration_us": 1000000, "p50_us": 250,
                                              "status_errors": 0}
    with pytest.raises(RuntimeError):
        bench["run"].parse_wrk("Running 5s test\n")


def test_table_compares_with_the_floor_and_judges_targets(bench: dict[str, ModuleType]) -> None:
    run = bench["run"]
    results = run.Results()
    for target, rps, p50 in (("baseline", 20000, 0.1), ("floor", 5000, 0.3), ("llm-proxy", 3000, 1.0)):
        results.add("rps_32", target, rps)
        results.add("p50_1", target, p50)
    results.add("rss_streams", "llm-proxy", 90.0)
    rendered, all_pass = run.table(results, verdicts=True, streams=1000)
    assert not all_pass
    rows = {line.split("|")[1].strip(): line for line in rendered.splitlines()[2:]}
    assert "0.60×" in rows["throughput @32 conn (req/s)"] and "FAIL" in rows["throughput @32 conn (req/s)"]
    assert "+0.700 ms" in rows["p50 latency @1 conn (ms)"] and "FAIL" in rows["p50 latency @1 conn (ms)"]
    assert "PASS" in rows["RSS 1,000 open streams (MB)"]


def test_quantile_is_nearest_rank(bench: dict[str, ModuleType]) -> None:
    assert bench["run"].quantile([5.0, 1.0, 3.0], 0.5) == 3.0
    assert bench["run"].quantile(list(range(101)), 0.99) == 99


def test_profile_summary_ranks_self_and_inclusive_time(bench: dict[str, ModuleType], tmp_path: Path) -> None:
    raw = tmp_path / "llm-proxy.raw.txt"
    raw.write_text("run (/v/lib/python3.11/site-packages/aiohttp/web.py:10);"
                   "handle (/w/llm_proxy/forwarder.py:90);write (/v/site-packages/aiohttp/http_writer.py:5) 3\n"
                   "run (/v/lib/python3.11/site-packages/aiohttp/web.py:10);"
                   "handle (/w/llm_proxy/forwarder.py:91) 1\n")
    profile = bench["hotspots"].parse(raw.read_text())
    assert profile.samples == 4
    assert profile.top("own", 1) == [("aiohttp/http_writer.py:write", 0.75)]
    assert profile.top("inclusive", 5, "llm_proxy/") == [("llm_proxy/forwarder.py:handle", 1.0)]
    assert "75.0%" in bench["hotspots"].report(raw)


@pytest.mark.system
def test_nginx_config_answers_post_and_stays_in_its_directory(bench: dict[str, ModuleType], tmp_path: Path) -> None:
    config = bench["services"].nginx_config(tmp_path, 8123, "http://127.0.0.1:8124")
    assert "listen 127.0.0.1:8123" in config and "daemon off;" in config
    assert "proxy_buffering off;" in config
    for line in config.splitlines():
        if line.strip().startswith(("pid ", "error_log ", "client_body_temp_path ")):
            assert str(tmp_path) in line
    nginx = bench["services"].which("nginx")
    if nginx is None:
        pytest.skip("nginx is not installed here (make bench installs it)")
    (tmp_path / "nginx.conf").write_text(config)
    checked = subprocess.run([nginx, "-t", "-p", str(tmp_path), "-e", str(tmp_path / "error.log"),
                              "-c", str(tmp_path / "nginx.conf")], capture_output=True, text=True, timeout=30,
                             check=False)
    assert checked.returncode == 0, checked.stderr


def test_ablation_variants_are_parsed(bench: dict[str, ModuleType], tmp_path: Path) -> None:
    ablate = bench["ablate"]
    assert ablate.parse_variant("quiet:AUDIT_ENABLED=false,LOG_LEVEL=warning") == ablate.Variant(
        "quiet", {"AUDIT_ENABLED": "false", "LOG_LEVEL": "warning"})
    (tmp_path / "llm_proxy").mkdir()
    assert ablate.parse_variant(f"patched@{tmp_path}").pythonpath == str(tmp_path)
    for bad in ("x:NOVALUE", f"y@{tmp_path / 'missing'}", ":A=1"):
        with pytest.raises(argparse.ArgumentTypeError):
            ablate.parse_variant(bad)
