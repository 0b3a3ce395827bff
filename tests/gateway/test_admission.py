"""Admission on /v1 through real HTTP: per-token rates, quotas, the global rate and the concurrency cap."""

from __future__ import annotations

import asyncio
from typing import Any

import openai
import orjson
import pytest

from llm_proxy.app import AUDIT
from tests.fakes import FakeClock, Gateway, bearer, call

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
async def gateway_with_clock(make_gateway: Any) -> tuple[Gateway, FakeClock]:
    monotonic = FakeClock(1000.0)
    return await make_gateway(monotonic=monotonic), monotonic


async def audit_events(gateway: Gateway, request_id: str) -> list[dict[str, Any]]:
    await gateway.app[AUDIT].flush()
    path = gateway.settings.audit_log_file
    assert path is not None
    return [e for e in map(orjson.loads, path.read_bytes().splitlines()) if e.get("request_id") == request_id]


# ---- per-token rate limit ----

async def test_token_rate_limit_bursts_then_refills_continuously(make_gateway: Any) -> None:
    monotonic = FakeClock(1000.0)
    gateway = await make_gateway(monotonic=monotonic)
    token = await gateway.token(rate_limit_per_minute=3)

    for remaining in (2, 1, 0):
        status, _, headers = await call(gateway, token)
        assert status == 200
        assert (headers["X-RateLimit-Limit"], headers["X-RateLimit-Remaining"]) == ("3", str(remaining))

    status, code, headers = await call(gateway, token)
    assert (status, code) == (429, "rate_limited")
    # The next request is allowed one emission interval (60 s / 3) after the burst.
    assert headers["Retry-After"] == "20"
    assert (headers["X-RateLimit-Limit"], headers["X-RateLimit-Remaining"]) == ("3", "0")
    assert len(gateway.upstream.requests) == 3

    monotonic.advance(19.9)
    assert (await call(gateway, token))[:2] == (429, "rate_limited")
    monotonic.advance(0.1)
    status, _, headers = await call(gateway, token)
    assert status == 200 and headers["X-RateLimit-Remaining"] == "0"
    assert (await call(gateway, token))[:2] == (429, "rate_limited")
    assert len(gateway.upstream.requests) == 4


async def test_a_raised_rate_relieves_a_throttled_token_on_its_next_request(gateway_with_clock: Any) -> None:
    """5 of 5 used, raised to 100: the next request is admitted with 94 left, not 429 with `Remaining: 0`."""
    gateway, _ = gateway_with_clock
    token = await gateway.token(rate_limit_per_minute=5)
    assert [(await call(gateway, token))[0] for _ in range(6)] == [200] * 5 + [429]

    await gateway.manage("PATCH", f"/tokens/{token['id']}", {"rate_limit_per_minute": 100}, expect=200)
    status, _, headers = await call(gateway, token)

    assert status == 200
    assert (headers["X-RateLimit-Limit"], headers["X-RateLimit-Remaining"]) == ("100", "94")
    assert [(await call(gateway, token))[0] for _ in range(95)] == [200] * 94 + [429]


async def test_a_lowered_rate_keeps_the_share_of_the_minute_already_used(gateway_with_clock: Any) -> None:
    gateway, _ = gateway_with_clock
    token = await gateway.token(rate_limit_per_minute=10)
    for _ in range(5):
        await call(gateway, token)  # half the minute used

    await gateway.manage("PATCH", f"/tokens/{token['id']}", {"rate_limit_per_minute": 4}, expect=200)
    assert [(await call(gateway, token))[0] for _ in range(3)] == [200, 200, 429]


async def test_streamed_response_carries_rate_limit_headers(gateway_with_clock: Any) -> None:
    gateway, _ = gateway_with_clock
    token = await gateway.token(rate_limit_per_minute=5)

    async with gateway.client.post("/v1/chat/completions", json={**CHAT, "stream": True},
                                   headers=bearer(token)) as response:
        assert response.status == 200
        assert response.content_type == "text/event-stream"
        assert (response.headers["X-RateLimit-Limit"], response.headers["X-RateLimit-Remaining"]) == ("5", "4")
        assert (await response.read()).endswith(b"data: [DONE]\n\n")


async def test_rate_limit_zero_means_unlimited_and_sends_no_rate_headers(make_gateway: Any) -> None:
    gateway = await make_gateway(monotonic=FakeClock(1000.0), RATE_LIMIT_PER_MINUTE="2")
    token = await gateway.token(rate_limit_per_minute=0)

    for _ in range(25):
        status, _, headers = await call(gateway, token)
        assert status == 200
        assert "X-RateLimit-Limit" not in headers and "X-RateLimit-Remaining" not in headers


async def test_null_rate_limit_means_the_server_default(make_gateway: Any) -> None:
    gateway = await make_gateway(monotonic=FakeClock(1000.0), RATE_LIMIT_PER_MINUTE="2")
    token = await gateway.token()
    assert token["rate_limit_per_minute"] is None

    assert [(await call(gateway, token))[0] for _ in range(2)] == [200, 200]
    status, code, headers = await call(gateway, token)
    assert (status, code) == (429, "rate_limited")
    assert (headers["X-RateLimit-Limit"], headers["Retry-After"]) == ("2", "30")


async def test_openai_sdk_sees_rate_limit_error(gateway_with_clock: Any) -> None:
    gateway, _ = gateway_with_clock
    token = await gateway.token(rate_limit_per_minute=1)
    client = gateway.openai(token["token"])
    await client.chat.completions.create(**CHAT)

    with pytest.raises(openai.RateLimitError) as caught:
        await client.chat.completions.create(**CHAT)

    assert caught.value.code == "rate_limited"
    assert caught.value.response.headers["Retry-After"] == "60"


async def test_rate_headers_and_retry_after_for_a_rate_not_dividing_60(make_gateway: Any) -> None:
    """From the second review (streams and accounting against an awkward upstream)."""
    monotonic = FakeClock(1000.0)
    gateway = await make_gateway(monotonic=monotonic)
    token = await gateway.token(rate_limit_per_minute=7)
    for remaining in range(6, -1, -1):
        async with gateway.client.get("/v1/models", headers=bearer(token)) as response:
            assert (response.status, response.headers["X-RateLimit-Remaining"]) == (200, str(remaining))
    async with gateway.client.get("/v1/models", headers=bearer(token)) as response:
        assert response.status == 429
        assert response.headers["Retry-After"] == "9"  # 60/7 = 8.57 s, rounded up
        assert (response.headers["X-RateLimit-Limit"], response.headers["X-RateLimit-Remaining"]) == ("7", "0")
    monotonic.advance(60 / 7)
    async with gateway.client.get("/v1/models", headers=bearer(token)) as response:
        assert (response.status, response.headers["X-RateLimit-Remaining"]) == (200, "0")


async def test_patching_a_tokens_rate_while_in_use_applies_at_once(make_gateway: Any) -> None:
    """From the second review (streams and accounting against an awkward upstream)."""
    monotonic = FakeClock(1000.0)
    gateway = await make_gateway(monotonic=monotonic, RATE_LIMIT_PER_MINUTE="600")
    token = await gateway.token(rate_limit_per_minute=2)

    async def status() -> tuple[int, str | None]:
        async with gateway.client.get("/v1/models", headers=bearer(token)) as response:
            return response.status, response.headers.get("X-RateLimit-Limit")

    assert [await status() for _ in range(3)] == [(200, "2"), (200, "2"), (429, "2")]
    await gateway.manage("PATCH", f"/tokens/{token['id']}", {"rate_limit_per_minute": 0}, expect=200)
    assert [await status() for _ in range(5)] == [(200, None)] * 5
    await gateway.manage("PATCH", f"/tokens/{token['id']}", {"rate_limit_per_minute": 1}, expect=200)
    assert await status() == (429, "1")  # the minute's allowance of 2/min was spent 0 s ago
    monotonic.advance(60)
    assert [await status() for _ in range(2)] == [(200, "1"), (429, "1")]


# ---- lifetime quota ----

async def test_quota_is_exact_under_concurrency_and_survives_a_restart(make_gateway: Any) -> None:
    gateway = await make_gateway()
    token = await gateway.token(max_requests=5)

    results = await asyncio.gather(*(call(gateway, token) for _ in range(50)))

    statuses = sorted((status, code) for status, code, _ in results)
    assert statuses == [(200, None)] * 5 + [(429, "quota_exceeded")] * 45
    assert all("Retry-After" in headers for status, _, headers in results if status == 429)
    assert len(gateway.upstream.requests) == 5
    assert (await gateway.manage("GET", f"/tokens/{token['id']}", expect=200))["request_count"] == 5

    # Closing flushes the in-memory counters; a new process on the same database still refuses.
    await gateway.close()
    restarted = await make_gateway()
    assert (await restarted.manage("GET", f"/tokens/{token['id']}", expect=200))["request_count"] == 5
    assert (await call(restarted, token))[:2] == (429, "quota_exceeded")
    assert len(gateway.upstream.requests) == 5


async def test_sdk_sees_quota_exceeded_as_rate_limit_error(gateway_with_clock: Any) -> None:
    gateway, _ = gateway_with_clock
    token = await gateway.token(max_requests=1)
    client = gateway.openai(token["token"])
    await client.models.list()

    with pytest.raises(openai.RateLimitError) as caught:
        await client.models.list()
    assert caught.value.code == "quota_exceeded"


async def test_concurrent_requests_never_exceed_max_requests_even_with_rate_and_global_limits(
        make_gateway: Any) -> None:
    """From the security review."""
    gateway = await make_gateway(GLOBAL_RATE_LIMIT="1000")
    token = await gateway.token(max_requests=5, rate_limit_per_minute=1000)
    responses = await asyncio.gather(*(gateway.client.get("/v1/models", headers=bearer(token["token"]))
                                       for _ in range(40)))
    statuses = sorted(r.status for r in responses)
    assert statuses.count(200) == 5 and statuses.count(429) == 35
    assert len(gateway.upstream.requests) == 5
    assert (await gateway.manage("GET", f"/tokens/{token['id']}", expect=200))["request_count"] == 5


# ---- global rate limit ----

async def test_global_rate_limit_spans_tokens(make_gateway: Any) -> None:
    monotonic = FakeClock(1000.0)
    gateway = await make_gateway(monotonic=monotonic, GLOBAL_RATE_LIMIT="4")
    project = await gateway.project()
    first, second = await gateway.token(project["id"]), await gateway.token(project["id"])

    assert [(await call(gateway, token))[0] for token in (first, second, first, second)] == [200] * 4
    for token in (first, second):
        status, code, headers = await call(gateway, token)
        assert (status, code) == (429, "rate_limited")
        assert headers["Retry-After"] == "15"
    assert len(gateway.upstream.requests) == 4

    monotonic.advance(15)
    assert (await call(gateway, second))[0] == 200
    assert (await call(gateway, first))[0] == 429


async def test_a_token_denied_by_its_own_rate_spends_nothing_of_the_global_allowance(make_gateway: Any) -> None:
    gateway = await make_gateway(monotonic=FakeClock(1000.0), GLOBAL_RATE_LIMIT="3")
    project = await gateway.project()
    greedy = await gateway.token(project["id"], rate_limit_per_minute=1)
    other = await gateway.token(project["id"])

    assert (await call(gateway, greedy))[0] == 200
    for _ in range(10):
        status, code, headers = await call(gateway, greedy)
        assert (status, code, headers["X-RateLimit-Limit"]) == (429, "rate_limited", "1")

    # Peek-then-hit: the ten denials above cost the global allowance nothing.
    assert [(await call(gateway, other))[0] for _ in range(2)] == [200, 200]
    assert (await call(gateway, other))[:2] == (429, "rate_limited")


async def test_a_global_denial_spends_nothing_of_the_token_rate(make_gateway: Any) -> None:
    monotonic = FakeClock(1000.0)
    gateway = await make_gateway(monotonic=monotonic, GLOBAL_RATE_LIMIT="1")
    project = await gateway.project()
    hog, token = await gateway.token(project["id"]), await gateway.token(project["id"], rate_limit_per_minute=1)
    assert (await call(gateway, hog))[0] == 200

    for _ in range(5):
        assert (await call(gateway, token))[:2] == (429, "rate_limited")

    monotonic.advance(60)
    # The token never got through, so its own allowance of one is still whole.
    assert (await call(gateway, token))[0] == 200


async def test_a_token_out_of_quota_spends_nothing_of_the_global_allowance(make_gateway: Any) -> None:
    gateway = await make_gateway(monotonic=FakeClock(1000.0), GLOBAL_RATE_LIMIT="3")
    project = await gateway.project()
    exhausted = await gateway.token(project["id"], max_requests=1)
    other = await gateway.token(project["id"])

    assert (await call(gateway, exhausted))[0] == 200
    for _ in range(5):
        assert (await call(gateway, exhausted))[0] == 429

    # A holder of a used-up token must not be able to starve everyone else.
    assert [(await call(gateway, other))[0] for _ in range(2)] == [200, 200]


async def test_global_rate_limited_response_carries_rate_limit_headers(make_gateway: Any) -> None:
    gateway = await make_gateway(monotonic=FakeClock(1000.0), GLOBAL_RATE_LIMIT="1")
    token = await gateway.token()
    assert (await call(gateway, token))[0] == 200

    status, code, headers = await call(gateway, token)

    assert (status, code) == (429, "rate_limited")
    assert {"Retry-After", "X-RateLimit-Limit", "X-RateLimit-Remaining"} <= set(headers)


# ---- admission control (concurrency cap) ----

async def test_requests_past_the_concurrency_cap_get_503_and_are_not_forwarded(make_gateway: Any) -> None:
    gateway = await make_gateway(MAX_CONCURRENT_REQUESTS="2")
    gateway.upstream.chunk_delay, gateway.upstream.chunks = 0.05, 6
    token = await gateway.token()

    async with gateway.client.post("/v1/chat/completions", json={**CHAT, "stream": True},
                                   headers=bearer(token)) as first, \
            gateway.client.post("/v1/chat/completions", json={**CHAT, "stream": True},
                                headers=bearer(token)) as second:
        # The first line of each stream has arrived: both are in flight, holding both slots.
        assert (await first.content.readline()).startswith(b"data: ")
        assert (await second.content.readline()).startswith(b"data: ")

        status, code, headers = await call(gateway, token)
        assert (status, code) == (503, "overloaded")
        assert headers["Retry-After"] == "1"
        assert len(gateway.upstream.requests) == 2

        for stream in (first, second):
            assert (await stream.read()).endswith(b"data: [DONE]\n\n")

    # A request turned away for capacity costs no quota, and the slots are free again.
    assert (await call(gateway, token))[0] == 200
    assert (await gateway.manage("GET", f"/tokens/{token['id']}", expect=200))["request_count"] == 3


async def test_a_request_refused_for_capacity_writes_its_one_denied_access_event(make_gateway: Any) -> None:
    gateway = await make_gateway(MAX_CONCURRENT_REQUESTS="1")
    gateway.upstream.chunk_delay, gateway.upstream.chunks = 0.05, 6
    token = await gateway.token()

    async with gateway.client.post("/v1/chat/completions", json={**CHAT, "stream": True},
                                   headers=bearer(token)) as first:
        assert (await first.content.readline()).startswith(b"data: ")
        status, code, _ = await call(gateway, token, {"X-Request-ID": "over-capacity-1", "User-Agent": "probe/1"})
        assert (status, code) == (503, "overloaded")
        await first.read()

    (event,) = await audit_events(gateway, "over-capacity-1")
    assert (event["action"], event["actor"], event["result"], event["project_id"]) == (
        "token.access", "client", "denied", token["project_id"])
    assert event["details"] == {"http_method": "GET", "endpoint": "/v1/models", "status": 503,
                                "reason": "overloaded", "token_id": token["token_hint"], "user_agent": "probe/1"}


