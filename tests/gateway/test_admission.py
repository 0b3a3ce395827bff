"""Rates, quotas, capacity, brute-force blocking, IP allow-lists and body/model/stream limits, through real HTTP."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import openai
import orjson
import pytest

from llm_proxy.keys import AUDIT
from tests.fakes import MANAGEMENT_TOKEN, FakeClock, Gateway

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
BOGUS = "tok-" + "Z" * 43



@pytest.fixture
async def gateway_with_clock(make_gateway: Any) -> tuple[Gateway, FakeClock]:
    monotonic = FakeClock(1000.0)
    return await make_gateway(monotonic=monotonic), monotonic


def bearer(token: dict[str, Any] | str) -> dict[str, str]:
    secret = token if isinstance(token, str) else token["token"]
    return {"Authorization": f"Bearer {secret}"}


async def call(gateway: Gateway, token: dict[str, Any] | str, headers: dict[str, str] | None = None,
               ) -> tuple[int, str | None, Any]:
    """GET /v1/models; return the status, the error code (if any) and the response headers."""
    async with gateway.client.get("/v1/models", headers={**bearer(token), **(headers or {})}) as response:
        body = await response.json()
        code = body.get("error", {}).get("code") if isinstance(body, dict) else None
        return response.status, code, response.headers


async def manage_status(gateway: Gateway, secret: str, headers: dict[str, str] | None = None,
                        ) -> tuple[int, str | None]:
    async with gateway.client.get("/manage/projects", headers={**bearer(secret), **(headers or {})}) as response:
        body = await response.json()
        return response.status, body.get("error", {}).get("code")


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


# ---- brute-force blocking per client IP ----

async def test_an_ip_that_failed_too_often_is_blocked_even_with_a_valid_token(make_gateway: Any) -> None:
    monotonic = FakeClock(1000.0)
    gateway = await make_gateway(monotonic=monotonic, IP_RATE_LIMIT="3")
    token = await gateway.token()

    for _ in range(3):
        assert (await call(gateway, BOGUS))[:2] == (401, "invalid_token")

    # A valid token is refused too: answering it normally would tell a brute-forcing client which
    # guess was right (an oracle), defeating the block.
    status, code, headers = await call(gateway, token)
    assert (status, code) == (429, "rate_limited")
    assert headers["Retry-After"] == "20"
    # The management API shares the block, with the right management token as well.
    assert await manage_status(gateway, MANAGEMENT_TOKEN) == (429, "rate_limited")
    assert gateway.upstream.requests == []

    monotonic.advance(20)
    assert (await call(gateway, token))[0] == 200
    assert await manage_status(gateway, MANAGEMENT_TOKEN) == (200, None)


async def test_a_blocked_ip_gets_the_rate_limit_headers_of_its_failure_allowance(make_gateway: Any) -> None:
    gateway = await make_gateway(monotonic=FakeClock(1000.0), IP_RATE_LIMIT="3")
    token = await gateway.token()
    for _ in range(3):
        assert (await call(gateway, BOGUS))[:2] == (401, "invalid_token")

    status, code, headers = await call(gateway, token)
    async with gateway.client.get("/manage/projects", headers=bearer(MANAGEMENT_TOKEN)) as manage:
        manage_headers = manage.headers

    assert (status, code, manage.status) == (429, "rate_limited", 429)
    for seen in (headers, manage_headers):
        assert (seen["X-RateLimit-Limit"], seen["X-RateLimit-Remaining"], seen["Retry-After"]) == ("3", "0", "20")


async def test_failed_management_token_attempts_count_too(make_gateway: Any) -> None:
    gateway = await make_gateway(monotonic=FakeClock(1000.0), IP_RATE_LIMIT="3")
    token = await gateway.token()

    assert await manage_status(gateway, "wrong-" + "w" * 40) == (401, "invalid_management_token")
    async with gateway.client.get("/manage/projects") as response:  # no credential at all
        assert response.status == 401
    assert (await call(gateway, BOGUS))[:2] == (401, "invalid_token")

    assert (await call(gateway, token))[:2] == (429, "rate_limited")
    assert await manage_status(gateway, MANAGEMENT_TOKEN) == (429, "rate_limited")


async def test_blocking_one_client_ip_leaves_others_alone_behind_a_trusted_proxy(make_gateway: Any) -> None:
    gateway = await make_gateway(monotonic=FakeClock(1000.0), IP_RATE_LIMIT="3", TRUSTED_PROXIES="127.0.0.1/32")
    token = await gateway.token()
    attacker, bystander = {"X-Forwarded-For": "203.0.113.7"}, {"X-Forwarded-For": "203.0.113.8"}

    for _ in range(3):
        assert (await call(gateway, BOGUS, attacker))[0] == 401

    assert (await call(gateway, token, attacker))[:2] == (429, "rate_limited")
    assert (await call(gateway, token, bystander))[0] == 200
    assert (await call(gateway, token))[0] == 200  # the proxy itself, no header
    assert await manage_status(gateway, MANAGEMENT_TOKEN, bystander) == (200, None)
    assert await manage_status(gateway, MANAGEMENT_TOKEN, attacker) == (429, "rate_limited")


async def test_a_spoofed_forwarded_for_from_an_untrusted_peer_changes_nothing(make_gateway: Any) -> None:
    gateway = await make_gateway(monotonic=FakeClock(1000.0), IP_RATE_LIMIT="3")
    token = await gateway.token()

    for n in range(3):
        assert (await call(gateway, BOGUS, {"X-Forwarded-For": f"198.51.100.{n}"}))[0] == 401

    # TRUSTED_PROXIES is unset, so the header is ignored: every attempt was 127.0.0.1's.
    assert (await call(gateway, token, {"X-Forwarded-For": "198.51.100.99"}))[:2] == (429, "rate_limited")
    assert (await call(gateway, token))[:2] == (429, "rate_limited")


# ---- MANAGEMENT_ALLOWED_IPS ----

@pytest.mark.parametrize("secret", [MANAGEMENT_TOKEN, "wrong-" + "w" * 40])
async def test_management_from_a_disallowed_ip_is_403_before_the_credential_is_checked(
        make_gateway: Any, secret: str) -> None:
    gateway = await make_gateway(MANAGEMENT_ALLOWED_IPS="10.0.0.0/8")

    assert await manage_status(gateway, secret) == (403, "ip_not_allowed")
    async with gateway.client.get("/manage/projects") as response:
        assert response.status == 403


@pytest.mark.parametrize("allowed", ["127.0.0.1,::1", "127.0.0.0/8", "fd00::/8, 127.0.0.1/32", "::1, 127.0.0.1"])
async def test_management_from_an_allowed_ip_still_needs_the_token(make_gateway: Any, allowed: str) -> None:
    gateway = await make_gateway(MANAGEMENT_ALLOWED_IPS=allowed)

    assert await manage_status(gateway, MANAGEMENT_TOKEN) == (200, None)
    assert await manage_status(gateway, "wrong-" + "w" * 40) == (401, "invalid_management_token")


@pytest.mark.parametrize(("client_ip", "expected"), [("2001:db8:1::5", 200), ("2001:db9::5", 403),
                                                     ("192.0.2.1", 403)])
async def test_management_allow_list_matches_ipv6_cidrs(make_gateway: Any, client_ip: str, expected: int) -> None:
    gateway = await make_gateway(MANAGEMENT_ALLOWED_IPS="2001:db8::/32", TRUSTED_PROXIES="127.0.0.1")

    status, _ = await manage_status(gateway, MANAGEMENT_TOKEN, {"X-Forwarded-For": client_ip})

    assert status == expected


async def test_a_disallowed_ip_does_not_affect_the_proxy(make_gateway: Any) -> None:
    gateway = await make_gateway(MANAGEMENT_ALLOWED_IPS="127.0.0.1")
    token = await gateway.token()
    restricted = await make_gateway(MANAGEMENT_ALLOWED_IPS="10.0.0.0/8")

    assert (await call(restricted, token))[0] == 200


# ---- ALLOWED_MODELS ----

async def test_allowed_models_globs_gate_the_model_field(make_gateway: Any) -> None:
    gateway = await make_gateway(ALLOWED_MODELS="gpt-4o*,text-embedding-3-small")
    client = gateway.openai((await gateway.token())["token"])

    completion = await client.chat.completions.create(**CHAT)
    embedding = await client.embeddings.create(model="text-embedding-3-small", input="hello")
    assert completion.model == "gpt-4o-mini" and embedding.data
    assert len(gateway.upstream.requests) == 2

    for model in ("gpt-3.5-turbo", "text-embedding-3-small-x", "GPT-4O-MINI", "my-gpt-4o"):
        with pytest.raises(openai.PermissionDeniedError) as caught:
            await client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}])
        assert caught.value.code == "model_not_allowed"
    assert len(gateway.upstream.requests) == 2


@pytest.mark.parametrize("content_type", ["application/json; charset=utf-8", "Application/JSON"])
async def test_allowed_models_checks_json_with_parameters_in_its_content_type(
        make_gateway: Any, content_type: str) -> None:
    gateway = await make_gateway(ALLOWED_MODELS="gpt-4o*")
    token = await gateway.token()

    async with gateway.client.post("/v1/chat/completions", data=b'{"model": "gpt-3.5-turbo", "messages": []}',
                                   headers={**bearer(token), "Content-Type": content_type}) as response:
        assert response.status == 403
        assert (await response.json())["error"]["code"] == "model_not_allowed"
    assert gateway.upstream.requests == []


@pytest.mark.parametrize("body", [b'{"messages": []}', b'{"model": null}', b'{"model": ["gpt-4o"]}', b'[]',
                                  b'not json'])
async def test_allowed_models_needs_a_model_string(make_gateway: Any, body: bytes) -> None:
    gateway = await make_gateway(ALLOWED_MODELS="gpt-4o*")
    token = await gateway.token()

    async with gateway.client.post("/v1/chat/completions", data=body,
                                   headers={**bearer(token), "Content-Type": "application/json"}) as response:
        assert response.status == 400
        assert (await response.json())["error"]["type"] == "invalid_request_error"
    assert gateway.upstream.requests == []


async def test_allowed_models_cannot_be_bypassed_by_another_content_type(make_gateway: Any) -> None:
    gateway = await make_gateway(ALLOWED_MODELS="gpt-4o*")
    token = await gateway.token()

    async with gateway.client.post("/v1/chat/completions", data=b'{"model": "gpt-3.5-turbo", "messages": []}',
                                   headers={**bearer(token), "Content-Type": "text/plain"}) as response:
        assert response.status in (400, 403, 415)
    assert gateway.upstream.requests == []


@pytest.mark.parametrize("body", [
    b'{"model": "o1-pro", "model": "gpt-4o-mini", "messages": []}',
    b'{"model": "o1-pro", "messages": [], "mod\\u0065l": "gpt-4o-mini"}',  # the same key, spelt with an escape
    b'{"model": "gpt-4o-mini", "messages": [], "model": "gpt-4o-mini"}',
])
async def test_a_body_giving_model_twice_is_refused_whichever_value_would_pass(make_gateway: Any, body: bytes) -> None:
    """orjson keeps the last `model`, an upstream may read the first: o1-pro must not slip past gpt-4o*."""
    gateway = await make_gateway(ALLOWED_MODELS="gpt-4o*")
    token = await gateway.token()

    async with gateway.client.post("/v1/chat/completions", data=body,
                                   headers={**bearer(token), "Content-Type": "application/json"}) as response:
        assert response.status == 400
        error = (await response.json())["error"]
        assert error["param"] == "model" and "more than once" in error["message"]
    assert gateway.upstream.requests == []
    assert (await gateway.manage("GET", f"/tokens/{token['id']}", expect=200))["request_count"] == 0


@pytest.mark.parametrize(("body", "param"), [
    (b'{"model": "m", "stream": false, "messages": [], "stream": true}', "stream"),
    (b'{"model": "m", "stream": true, "stream_options": {"include_usage": false}, "stream_options": {}}',
     "stream_options"),
    (b'{"model": "m", "stream": true, "stream_options": {"include_usage": false, "include_usage": true}}',
     "stream_options"),
])
async def test_every_key_the_gateway_decides_on_is_refused_when_repeated(
        gateway: Gateway, body: bytes, param: str) -> None:
    token = await gateway.token()
    async with gateway.client.post("/v1/chat/completions", data=body,
                                   headers={**bearer(token), "Content-Type": "application/json"}) as response:
        assert response.status == 400
        assert (await response.json())["error"]["param"] == param
    assert gateway.upstream.requests == []


async def test_repeated_keys_the_gateway_does_not_decide_on_and_model_as_a_value_still_pass(gateway: Gateway) -> None:
    token = await gateway.token()
    body = (b'{"model": "gpt-4o-mini", "messages": [{"role": "model", "content": "\\u00e9 \\"model\\""},'
            b' {"role": "user", "content": "hi", "name": "a", "name": "b"}], "stream_options": [["include_usage", 1],'
            b' ["include_usage", 2]]}')
    async with gateway.client.post("/v1/chat/completions", data=body,
                                   headers={**bearer(token), "Content-Type": "application/json"}) as response:
        assert response.status == 200
    assert gateway.upstream.requests[-1].body == body


async def test_a_multipart_body_giving_model_twice_is_refused(make_gateway: Any) -> None:
    gateway = await make_gateway(ALLOWED_MODELS="whisper-1")
    token = await gateway.token()
    form = aiohttp.FormData()
    form.add_field("model", "gpt-4o-transcribe")
    form.add_field("model", "whisper-1")
    form.add_field("file", b"RIFF....", filename="a.wav", content_type="audio/wav")

    async with gateway.client.post("/v1/audio/transcriptions", data=form, headers=bearer(token)) as response:
        assert response.status == 400
        assert (await response.json())["error"]["param"] == "model"
    assert gateway.upstream.requests == []


def _nested(depth: int) -> bytes:
    return (b'{"model": "gpt-4o-mini", "stream": true, "stream_options": {}, "messages": [], "metadata": '
            + b"[" * depth + b"]" * depth + b"}")


@pytest.mark.parametrize("depth", [1000, 1023])
async def test_a_body_nested_too_deeply_for_the_gateway_is_400_and_costs_nothing(
        gateway: Gateway, caplog: pytest.LogCaptureFixture, depth: int) -> None:
    """orjson reads 1,000 levels, the standard library's re-encode of stream_options did not: 500 and a
    traceback per request, with the quota spent."""
    token = await gateway.token(max_requests=1)

    for _ in range(2):  # with the quota charged, the second would be 429
        async with gateway.client.post("/v1/chat/completions", data=_nested(depth),
                                       headers={**bearer(token), "Content-Type": "application/json"}) as response:
            assert response.status == 400
            assert (await response.json())["error"]["message"] == "request body is nested too deeply"
    assert gateway.upstream.requests == []
    assert not [record for record in caplog.records if record.levelname in ("ERROR", "CRITICAL")]
    fetched = await gateway.manage("GET", f"/tokens/{token['id']}", expect=200)
    assert fetched["request_count"] == 0 and fetched["total_tokens"] == 0
    assert (await call(gateway, token))[0] == 200  # the one request of its quota is still there


async def test_requests_the_gateway_refuses_before_the_upstream_cost_no_quota_but_do_cost_rate(
        make_gateway: Any) -> None:
    gateway = await make_gateway(ALLOWED_MODELS="gpt-4o*")
    token = await gateway.token(max_requests=1, rate_limit_per_minute=3)

    refused = [await gateway.client.get("/v1/files", headers=bearer(token)),
               await gateway.client.post("/v1/chat/completions", json={"model": "o1", "messages": []},
                                         headers=bearer(token))]
    assert [response.status for response in refused] == [404, 403]
    assert (await call(gateway, token))[0] == 200  # the quota of one is intact
    assert (await call(gateway, token))[:2] == (429, "quota_exceeded")
    fetched = await gateway.manage("GET", f"/tokens/{token['id']}", expect=200)
    assert fetched["request_count"] == 1
    assert refused[1].headers["X-RateLimit-Remaining"] == "1"  # each refusal took its share of the rate


# ---- MAX_REQUEST_SIZE ----

async def test_a_body_over_the_size_limit_is_413_and_not_forwarded(make_gateway: Any) -> None:
    gateway = await make_gateway(MAX_REQUEST_SIZE="1KB")
    token = await gateway.token()
    padding = 1024 - len(b'{"model": "m", "input": ""}')

    async with gateway.client.post("/v1/embeddings", data=b'{"model": "m", "input": "' + b"x" * padding + b'"}',
                                   headers={**bearer(token), "Content-Type": "application/json"}) as response:
        assert response.status == 200  # exactly the limit is fine
    async with gateway.client.post("/v1/embeddings", data=b'{"model": "m", "input": "' + b"x" * (padding + 1) + b'"}',
                                   headers={**bearer(token), "Content-Type": "application/json"}) as response:
        assert response.status == 413
        assert (await response.json())["error"]["code"] == "request_too_large"
    assert len(gateway.upstream.requests) == 1


@pytest.mark.parametrize("content_type", [
    "application/json",
    "application/octet-stream",
])
async def test_a_chunked_body_over_the_size_limit_is_413_and_not_forwarded(make_gateway: Any,
                                                                           content_type: str) -> None:
    gateway = await make_gateway(MAX_REQUEST_SIZE="1KB")
    token = await gateway.token()

    async def body() -> AsyncIterator[bytes]:
        for _ in range(8):
            yield b"x" * 256

    async with gateway.client.post("/v1/audio/transcriptions", data=body(),
                                   headers={**bearer(token), "Content-Type": content_type}) as response:
        assert response.status == 413
        assert (await response.json())["error"]["code"] == "request_too_large"
    assert gateway.upstream.requests == []
    assert (await call(gateway, token))[0] == 200  # the gateway is fine afterwards


# ---- STREAM_IDLE_TIMEOUT ----

async def test_a_long_but_lively_stream_is_never_cut(make_gateway: Any) -> None:
    gateway = await make_gateway(STREAM_IDLE_TIMEOUT="300ms")
    gateway.upstream.chunk_delay, gateway.upstream.chunks = 0.1, 10
    client = gateway.openai((await gateway.token())["token"])

    stream = await client.chat.completions.create(**CHAT, stream=True)
    parts = [chunk.choices[0].delta.content async for chunk in stream if chunk.choices[0].delta.content]

    # About a second in all, three times the idle timeout: only silence is limited.
    assert parts == [f"part{index} " for index in range(10)]


async def test_a_stream_silent_past_the_idle_timeout_is_cut(make_gateway: Any) -> None:
    gateway = await make_gateway(STREAM_IDLE_TIMEOUT="300ms")
    gateway.upstream.chunk_delay, gateway.upstream.chunks = 1.0, 2
    token = await gateway.token()

    async with gateway.client.post("/v1/chat/completions", json={**CHAT, "stream": True},
                                   headers=bearer(token)) as response:
        assert response.status == 200
        assert b"part0" in await response.content.readline()
        with pytest.raises(aiohttp.ClientPayloadError):
            await response.read()

    # The upstream connection was closed too (its handler ends), and the gateway still serves.
    await asyncio.wait_for(gateway.upstream.stream_closed.wait(), 5)
    async with gateway.client.get("/health") as health:
        assert health.status == 200
    assert (await call(gateway, token))[0] == 200


async def test_retrying_a_paused_token_or_one_of_an_inactive_project_does_not_block_the_ip(make_gateway: Any) -> None:
    """Only guesses count (unknown, revoked or expired tokens): an operator pausing a token or a project
    must not get every client behind that address blocked, their other tokens included."""
    gateway = await make_gateway(monotonic=FakeClock(1000.0), IP_RATE_LIMIT="3")
    paused = await gateway.token()
    await gateway.manage("PATCH", f"/tokens/{paused['id']}", {"is_active": False}, expect=200)
    idle_project = await gateway.project()
    orphan = await gateway.token(idle_project["id"])
    await gateway.manage("PATCH", f"/projects/{idle_project['id']}", {"is_active": False}, expect=200)
    other = await gateway.token()

    for _ in range(5):
        assert (await call(gateway, paused))[:2] == (401, "token_revoked")
        assert (await call(gateway, orphan))[:2] == (403, "project_inactive")
    assert (await call(gateway, other))[0] == 200

    revoked = await gateway.token()
    await gateway.manage("DELETE", f"/tokens/{revoked['id']}", expect=204)
    for _ in range(3):
        assert (await call(gateway, revoked))[:2] == (401, "token_revoked")
    assert (await call(gateway, other))[:2] == (429, "rate_limited")  # a dead token replayed does count
