"""What the gateway reads from a /v1 request body before forwarding it, through real HTTP: ALLOWED_MODELS,
keys given twice, nesting depth, MAX_REQUEST_SIZE, and what a refusal costs the token."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import openai
import pytest

from tests.fakes import Gateway, bearer, call

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}


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


# ---- a key given twice, a body nested too deeply ----

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


# ---- what a refusal costs ----

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


async def test_request_body_over_limit_is_413(make_gateway) -> None:  # type: ignore[no-untyped-def]
    gateway = await make_gateway(MAX_REQUEST_SIZE="1KB")
    token = await gateway.token()
    headers = {"Authorization": f"Bearer {token['token']}"}

    json_response = await gateway.client.post("/v1/chat/completions", headers=headers,
                                              json={"model": "m", "messages": [], "pad": "x" * 2000})
    upload = await gateway.client.post("/v1/audio/transcriptions", headers=headers, data=b"x" * 4096)

    assert json_response.status == 413
    assert upload.status == 413
    assert gateway.upstream.requests == []
