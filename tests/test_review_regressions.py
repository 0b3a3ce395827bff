"""Regressions found by reviewing the day's fixes themselves: a client X-Request-ID carrying a secret,
a rate-spike burst lost to a truncated window, and include_usage re-encoding the request."""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any

from tests.fakes import MANAGEMENT_TOKEN, FakeClock


async def _audit_events(gateway: Any, **query: str) -> list[dict[str, Any]]:
    qs = "&".join(f"{k}={v}" for k, v in query.items())
    body = await gateway.manage("GET", f"/audit?limit=1000&{qs}", expect=200)
    return body["data"]


# ---- 1. client-chosen X-Request-ID: README says long random runs are stored obfuscated ----

async def test_request_id_carrying_a_long_random_secret_is_masked_in_audit(make_gateway: Any, tmp_path: Path) -> None:
    gateway = await make_gateway()
    token = (await gateway.token())["token"]
    # What `llm-proxy gen-secret` makes (a management token): a long random base64url run, a sane X-Request-ID.
    secret = secrets.token_urlsafe(32)
    while not (any(c.isupper() for c in secret) and any(c.islower() for c in secret)
               and any(c.isdigit() for c in secret)):
        secret = secrets.token_urlsafe(32)
    response = await gateway.client.get("/v1/models", headers={"Authorization": f"Bearer {token}",
                                                               "X-Request-ID": secret})
    assert response.status == 200
    await _audit_events(gateway)  # flushes the writer
    text = (tmp_path / "audit.log").read_text()
    assert secret not in text, "a long random run given as X-Request-ID is stored verbatim in the audit file"


async def test_request_id_carrying_the_management_token_is_masked_in_audit(make_gateway: Any, tmp_path: Path) -> None:
    gateway = await make_gateway()
    response = await gateway.client.get("/manage/projects", headers={**gateway.auth, "X-Request-ID": MANAGEMENT_TOKEN})
    assert response.status == 200
    await _audit_events(gateway)
    text = (tmp_path / "audit.log").read_text()
    assert MANAGEMENT_TOKEN not in text, "the management token, sent as X-Request-ID, is stored in the audit file"


# ---- 2. rate_spike: a burst is never lost to a window cut down to an older threshold ----

async def test_rate_spike_sliding_window_counts_burst_across_history_mark(make_gateway: Any) -> None:
    clock = FakeClock()
    gateway = await make_gateway(clock=clock, RATE_LIMIT_PER_MINUTE="0", ANOMALY_RATE_FACTOR="10",
                                 IP_RATE_LIMIT="100000")
    token = (await gateway.token(duration_minutes=600))["token"]
    headers = {"Authorization": f"Bearer {token}"}
    clock.advance(5)  # minute-aligned start + 5 s
    assert (await gateway.client.get("/v1/models", headers=headers)).status == 200  # first seen
    clock.advance(3590)  # 10 s before the token has an hour of history, 5 s before a minute ends
    for _ in range(200):
        assert (await gateway.client.get("/v1/models", headers=headers)).status == 200
    clock.advance(10)  # an hour of history now; the burst is 10 s old, inside the last 60 s
    for _ in range(5):
        assert (await gateway.client.get("/v1/models", headers=headers)).status == 200
    # 205 requests in the last 60 s, against ~3.4/min (or 1/60 per minute before the burst): a spike
    events = await _audit_events(gateway, action="token.anomaly")
    reasons = [event["details"]["reason"] for event in events]
    assert "rate_spike" in reasons, reasons


# ---- 3. include_usage set "by setting that one field": nothing else of the request changes ----

async def test_setting_include_usage_keeps_the_rest_of_the_request(make_gateway: Any) -> None:
    import json

    gateway = await make_gateway()
    token = (await gateway.token())["token"]
    big = 2**70 + 1  # an integer past 64 bits: JSON allows it, Python's json keeps it exact
    sent = (b'{"model": "gpt-4o-mini", "stream": true, "stream_options": {}, "seed": ' + str(big).encode()
            + b', "messages": [{"role": "user", "content": "hi"}]}')
    response = await gateway.client.post("/v1/chat/completions", data=sent,
                                         headers={"Authorization": f"Bearer {token}",
                                                  "Content-Type": "application/json"})
    await response.read()
    assert response.status == 200
    received = json.loads(gateway.upstream.requests[-1].body)
    expected = json.loads(sent)
    expected["stream_options"] = {"include_usage": True}
    assert received == expected, (received.get("seed"), big)

