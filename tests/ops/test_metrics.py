"""/metrics through real HTTP: protected, Prometheus text, counting what happened."""

from __future__ import annotations

import re
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry
from prometheus_client import Histogram as PrometheusHistogram

from llm_proxy import __version__
from llm_proxy.app import AUDIT
from llm_proxy.ops.metrics import Histogram
from tests.fakes import MANAGEMENT_TOKEN, FakeClock, Gateway

BOUNDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


def _value(text: str, name: str, labels: str = "") -> float:
    pattern = rf"^{re.escape(name)}{re.escape('{' + labels + '}') if labels else ''} (\S+)$"
    match = re.search(pattern, text, flags=re.MULTILINE)
    assert match, f"{name}{{{labels}}} not in metrics"
    return float(match.group(1))


async def _scrape(gateway: Gateway) -> str:
    response = await gateway.client.get("/metrics", headers=gateway.auth)
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("text/plain")
    return await response.text()


async def test_metrics_need_the_management_token(gateway: Gateway) -> None:
    token = await gateway.token()
    anonymous = await gateway.client.get("/metrics")
    with_client_token = await gateway.client.get("/metrics", headers={"Authorization": f"Bearer {token['token']}"})

    assert anonymous.status == 401 and with_client_token.status == 401
    assert (await anonymous.json())["error"]["code"] == "invalid_management_token"


async def test_wrong_management_tokens_on_metrics_are_audited_and_lead_to_the_ip_block(make_gateway: Any) -> None:
    gateway = await make_gateway(monotonic=FakeClock(1000.0), IP_RATE_LIMIT="3")
    guess = "guess-" + "g" * 40
    for presented in (guess, guess, None):
        headers = {"Authorization": f"Bearer {presented}"} if presented else {}
        async with gateway.client.get("/metrics", headers=headers) as response:
            assert response.status == 401

    blocked = await gateway.client.get("/metrics", headers=gateway.auth)
    assert blocked.status == 429 and (await blocked.json())["error"]["code"] == "rate_limited"
    # The block is per IP and shared: the management API refuses this IP too.
    assert (await gateway.client.get("/manage/projects", headers=gateway.auth)).status == 429

    await gateway.app[AUDIT].flush()
    path = gateway.settings.audit_log_file
    assert path is not None
    text = path.read_bytes()
    events = [e for e in map(orjson.loads, text.splitlines()) if e.get("details", {}).get("endpoint") == "/metrics"]
    assert [(e["action"], e["actor"], e["result"], e["details"]["reason"]) for e in events] == [
        ("auth.failure", "management", "failure", "invalid_management_token"),
        ("auth.failure", "management", "failure", "invalid_management_token"),
        ("auth.failure", "management", "failure", "missing_credential"),
        ("auth.failure", "management", "denied", "ip_blocked")]
    assert events[0]["details"]["credential"] == "gu********gg"
    assert guess.encode() not in text and MANAGEMENT_TOKEN.encode() not in text


async def test_metrics_open_to_allowed_ips_without_token(make_gateway: Any) -> None:
    gateway = await make_gateway(MANAGEMENT_ALLOWED_IPS="127.0.0.1/32")
    assert (await gateway.client.get("/metrics")).status == 200


async def test_metrics_count_requests_denials_and_upstream_latency(gateway: Gateway) -> None:
    token = await gateway.token(rate_limit_per_minute=1)
    headers = {"Authorization": f"Bearer {token['token']}"}
    assert (await gateway.client.get("/v1/models", headers=headers)).status == 200
    assert (await gateway.client.get("/v1/models", headers=headers)).status == 429
    assert (await gateway.client.get("/v1/models", headers={"Authorization": "Bearer nope"})).status == 401

    text = await _scrape(gateway)

    assert _value(text, "llm_proxy_requests_total", 'route="proxy",status_class="2xx"') == 1
    assert _value(text, "llm_proxy_requests_total", 'route="proxy",status_class="4xx"') == 2
    assert _value(text, "llm_proxy_rate_limit_denials_total", 'reason="rate_limited"') == 1
    assert _value(text, "llm_proxy_upstream_latency_seconds_count") == 1
    assert _value(text, "llm_proxy_upstream_ttfb_seconds_count") == 1
    assert _value(text, "llm_proxy_in_flight_requests") == 0
    assert _value(text, "llm_proxy_audit_dropped_total") == 0
    assert _value(text, "llm_proxy_audit_db_errors_total") == 0
    assert _value(text, "llm_proxy_responses_cut_total", 'reason="upstream_broke"') == 0
    assert _value(text, "llm_proxy_responses_cut_total", 'reason="client_stalled"') == 0
    assert _value(text, "llm_proxy_audit_queue_depth") >= 0
    assert MANAGEMENT_TOKEN not in text and token["token"] not in text


async def test_overhead_header_reports_gateway_time(gateway: Gateway) -> None:
    token = await gateway.token()
    response = await gateway.client.get("/v1/models", headers={"Authorization": f"Bearer {token['token']}"})
    overhead = float(response.headers["X-LLM-Proxy-Overhead-Ms"])
    assert 0 <= overhead < 1000


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(min_value=0, max_value=200, allow_nan=False) | st.sampled_from(BOUNDS), max_size=30))
def test_histogram_renders_exactly_as_prometheus_clients_own(values: list[float]) -> None:
    """Our lock-free histogram and prometheus_client's Histogram give the same exposition for the same values
    (bounds themselves included: a value equal to a bound counts in that bucket)."""
    ours = Histogram("latency_seconds", "doc", BOUNDS)
    registry = CollectorRegistry()
    theirs = PrometheusHistogram("latency_seconds", "doc", buckets=BOUNDS, registry=registry)
    for value in values:
        ours.observe(value)
        theirs.observe(value)

    def samples(family: Any) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value for sample in family.samples
                if not sample.name.endswith("_created")}

    (expected,) = registry.collect()
    assert samples(ours.family()) == pytest.approx(samples(expected))


async def test_metrics_name_the_version_and_the_instance(make_gateway: Any) -> None:
    gateway = await make_gateway(INSTANCE_ID="gw-7")
    text = await (await gateway.client.get("/metrics", headers=gateway.auth)).text()
    assert f'llm_proxy_info{{instance="gw-7",version="{__version__}"}} 1.0' in text
    assert "llm_proxy_shared_state_available" not in text  # only with REDIS_URL
