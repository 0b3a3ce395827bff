"""/metrics through real HTTP: protected, Prometheus text, counting what happened."""

from __future__ import annotations

import re
from typing import Any

from tests.fakes import MANAGEMENT_TOKEN, Gateway


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
    assert _value(text, "llm_proxy_audit_queue_depth") >= 0
    assert MANAGEMENT_TOKEN not in text and token["token"] not in text


async def test_overhead_header_reports_gateway_time(gateway: Gateway) -> None:
    token = await gateway.token()
    response = await gateway.client.get("/v1/models", headers={"Authorization": f"Bearer {token['token']}"})
    overhead = float(response.headers["X-LLM-Proxy-Overhead-Ms"])
    assert 0 <= overhead < 1000
