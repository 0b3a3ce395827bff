"""Usage accounting end to end with the real openai SDK: per-token totals, budgets, daily project usage."""

from __future__ import annotations

import datetime as dt
from typing import Any

import aiohttp
import openai
import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from llm_proxy.keys import AUDIT, TOKEN_STORE
from llm_proxy.usage import Usage, UsageTap, prepare
from tests.fakes import Gateway

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello there"}]}


async def _token_usage(gateway: Gateway, token_id: str) -> tuple[int, int, int]:
    token = await gateway.manage("GET", f"/tokens/{token_id}", expect=200)
    return token["prompt_tokens"], token["completion_tokens"], token["total_tokens"]


async def _last_access(gateway: Gateway) -> dict[str, Any]:
    await gateway.app[AUDIT].flush()
    path = gateway.settings.audit_log_file
    assert path is not None
    events = [orjson.loads(line) for line in path.read_bytes().splitlines()]
    return [event for event in events if event["action"] == "token.access"][-1]


async def test_plain_chat_is_charged_the_upstream_usage(gateway: Gateway) -> None:
    token = await gateway.token()
    completion = await gateway.openai(token["token"]).chat.completions.create(**CHAT)

    assert completion.usage is not None and completion.usage.total_tokens == 7
    assert await _token_usage(gateway, token["id"]) == (5, 2, 7)
    details = (await _last_access(gateway))["details"]
    assert (details["prompt_tokens"], details["completion_tokens"], details["total_tokens"]) == (5, 2, 7)
    assert "usage_estimated" not in details


async def test_stream_without_include_usage_is_charged_and_client_sees_no_usage_chunk(gateway: Gateway) -> None:
    gateway.upstream.chunks = 3
    token = await gateway.token()

    stream = await gateway.openai(token["token"]).chat.completions.create(**CHAT, stream=True)
    chunks = [chunk async for chunk in stream]

    assert chunks and all(chunk.choices for chunk in chunks)
    assert all(getattr(chunk, "usage", None) is None for chunk in chunks)
    sent = orjson.loads(gateway.upstream.requests[-1].body)
    assert sent["stream_options"] == {"include_usage": True}
    assert await _token_usage(gateway, token["id"]) == (11, 3, 14)


async def test_stream_with_include_usage_passes_the_usage_chunk_through(gateway: Gateway) -> None:
    gateway.upstream.chunks = 2
    token = await gateway.token()

    stream = await gateway.openai(token["token"]).chat.completions.create(
        **CHAT, stream=True, stream_options={"include_usage": True})
    chunks = [chunk async for chunk in stream]

    assert chunks[-1].choices == [] and chunks[-1].usage is not None and chunks[-1].usage.total_tokens == 13
    assert await _token_usage(gateway, token["id"]) == (11, 2, 13)


async def test_embeddings_and_responses_are_charged(gateway: Gateway) -> None:
    token = await gateway.token()
    client = gateway.openai(token["token"])

    await client.embeddings.create(model="text-embedding-3-small", input="hi")
    assert await _token_usage(gateway, token["id"]) == (3, 0, 3)
    await client.responses.create(model="gpt-4o-mini", input="hi")
    assert await _token_usage(gateway, token["id"]) == (12, 4, 16)
    stream = await client.responses.create(model="gpt-4o-mini", input="hi", stream=True)
    assert [event.type async for event in stream][-1] == "response.completed"
    assert await _token_usage(gateway, token["id"]) == (21, 8, 29)


async def test_client_that_disconnects_is_charged_what_was_delivered(gateway: Gateway) -> None:
    gateway.upstream.chunk_delay = 0.2
    gateway.upstream.chunks = 50
    token = await gateway.token()

    async with aiohttp.ClientSession() as session:
        response = await session.post(gateway.client.make_url("/v1/chat/completions"),
                                      json={**CHAT, "stream": True},
                                      headers={"Authorization": f"Bearer {token['token']}"})
        received = b""
        while received.count(b"\n\n") < 2:
            received += await response.content.readany()
        response.close()
    await gateway.upstream.stream_closed.wait()

    event = await _last_access(gateway)
    details = event["details"]
    assert details["usage_estimated"] is True
    # "hello there" is 11 characters: ceil(11 / 4) prompt tokens; one token per content event delivered.
    assert details["prompt_tokens"] == 3 and 2 <= details["completion_tokens"] <= 4
    assert await _token_usage(gateway, token["id"]) == (3, details["completion_tokens"],
                                                          3 + details["completion_tokens"])


async def test_budget_stops_a_token_after_the_request_that_crossed_it(gateway: Gateway) -> None:
    token = await gateway.token(max_tokens_total=10)
    client = gateway.openai(token["token"])

    await client.chat.completions.create(**CHAT)       # 7 used
    await client.chat.completions.create(**CHAT)       # 14 used: the request already admitted may overshoot
    with pytest.raises(openai.RateLimitError) as caught:
        await client.chat.completions.create(**CHAT)

    assert caught.value.code == "budget_exceeded"
    assert caught.value.response.headers["x-should-retry"] == "false"
    assert await _token_usage(gateway, token["id"]) == (10, 4, 14)


async def test_project_daily_usage(gateway: Gateway) -> None:
    project = await gateway.project()
    first, second = await gateway.token(project["id"]), await gateway.token(project["id"])
    await gateway.openai(first["token"]).chat.completions.create(**CHAT)
    await gateway.openai(second["token"]).embeddings.create(model="text-embedding-3-small", input="x")
    await gateway.client.get("/v1/models", headers={"Authorization": f"Bearer {second['token']}"})
    today = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d")

    usage = await gateway.manage("GET", f"/projects/{project['id']}/usage", expect=200)
    empty = await gateway.manage("GET", f"/projects/{project['id']}/usage?until={today}", expect=200)
    ranged = await gateway.manage("GET", f"/projects/{project['id']}/usage?since={today}", expect=200)

    day = {"date": today, "requests": 3, "prompt_tokens": 8, "completion_tokens": 2, "total_tokens": 10}
    assert usage["data"] == [day] and ranged["data"] == [day]
    assert usage["totals"] == {key: value for key, value in day.items() if key != "date"}
    assert empty["data"] == []
    await gateway.manage("GET", "/projects/nope/usage", expect=404)
    await gateway.manage("GET", f"/projects/{project['id']}/usage?since=soon", expect=400)


async def test_daily_usage_survives_a_restart(make_gateway: Any) -> None:
    first = await make_gateway()
    token = await first.token()
    await first.openai(token["token"]).chat.completions.create(**CHAT)
    await first.close()

    second = await make_gateway()
    await second.openai(token["token"]).chat.completions.create(**CHAT)
    await second.app[TOKEN_STORE].flush()
    usage = await second.manage("GET", f"/projects/{token['project_id']}/usage", expect=200)
    assert usage["totals"] == {"requests": 2, "prompt_tokens": 10, "completion_tokens": 4, "total_tokens": 14}
    assert await _token_usage(second, token["id"]) == (10, 4, 14)


def test_tap_hides_only_the_usage_event_it_asked_for_and_keeps_bytes_exact() -> None:
    body, tap = prepare("/v1/chat/completions", b'{"stream": true}', {"stream": True})
    assert tap is not None and orjson.loads(body)["stream_options"] == {"include_usage": True}
    assert tap.begin("text/event-stream")
    stream = (b'data: {"choices":[{"delta":{"content":"a"}}],"usage":null}\n\n'
              b'data: {"choices":[],"usage":{"prompt_tokens":1,"completion_tokens":1,"total_tokens":2}}\n\n'
              b"data: [DONE]\n\n")
    # Fed in awkward pieces: events split across chunks must come out whole and in order.
    out = b"".join(tap.feed(stream[i:i + 7]) for i in range(0, len(stream), 7)) + tap.finish()

    assert out == (b'data: {"choices":[{"delta":{"content":"a"}}],"usage":null}\n\n' b"data: [DONE]\n\n")
    assert tap.result() is not None and tap.result().total_tokens == 2  # type: ignore[union-attr]


def test_tap_passes_streams_through_untouched_when_the_client_asked() -> None:
    document = {"stream": True, "stream_options": {"include_usage": True}}
    body, tap = prepare("/v1/chat/completions", orjson.dumps(document), document)
    assert isinstance(tap, UsageTap) and orjson.loads(body) == document
    assert tap.begin("text/event-stream")
    chunk = b'data: {"choices":[],"usage":{"prompt_tokens":2,"completion_tokens":3,"total_tokens":5}}\r\n\r\n'
    assert tap.feed(chunk[:10]) == chunk[:10] and tap.feed(chunk[10:]) == chunk[10:]
    assert tap.result() is not None and tap.result().completion_tokens == 3  # type: ignore[union-attr]


def test_endpoints_without_usage_are_not_metered() -> None:
    assert prepare("/v1/models", b"{}", {}) == (b"{}", None)


def test_a_body_the_gateway_cannot_read_is_metered_from_the_answer() -> None:
    body, tap = prepare("/v1/chat/completions", b"x" * 40, None)
    assert body == b"x" * 40 and tap is not None
    assert tap.begin("text/event-stream")
    tap.feed(b'data: {"choices":[{"delta":{"content":"a"}}]}\n\n')
    assert tap.result() == Usage(10, 1, 11, estimated=True)  # a quarter of the body's bytes as the prompt


def test_usage_is_requested_without_touching_the_rest_of_the_body() -> None:
    raw = b'{"model": "m", "stream": true, "seed": 123456789012345678901234567890, "x": "\\u00e9"}\n'
    body, tap = prepare("/v1/chat/completions", raw, orjson.loads(raw))
    assert tap is not None
    assert body == raw[:-2] + b',"stream_options":{"include_usage":true}}\n'


async def test_setting_include_usage_keeps_the_rest_of_the_request(make_gateway: Any) -> None:
    """From the review of the day's fixes."""
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


@pytest.mark.parametrize("options", ['"yes"', "[]", "1"])
def test_stream_options_of_a_wrong_type_are_sent_as_they_came(options: str) -> None:
    raw = b'{"stream": true, "stream_options": %s}' % options.encode()
    body, tap = prepare("/v1/chat/completions", raw, orjson.loads(raw))
    assert body == raw and tap is not None


# Line endings as SSE allows them, mixed: LF, CRLF, CR, and LF then CRLF.
_EVENTS = [b'data: {"choices":[{"delta":{"content":"x"}}],"usage":null}\n\n',
           b'event: ping\ndata: {"choices":[{"delta":{}}]}\r\n\r\n',
           b'data: {"choices":[{"delta":{"content":"y"}}]}\n\r\n',
           b": comment\r\r",
           b"data: [DONE]\n\n"]
_USAGE_EVENTS = [b'data: {"choices":[],"usage":{"prompt_tokens":4,"completion_tokens":2,"total_tokens":6}}\n\n',
                 b'data: {"choices":[],\r\ndata: "usage":{"prompt_tokens":4,"completion_tokens":2,'
                 b'"total_tokens":6}}\r\n\r\n',
                 b'data: {"choices":[],"usage":{"prompt_tokens":4,"completion_tokens":2,"total_tokens":6}}\n\r\n']


@given(events=st.lists(st.sampled_from(_EVENTS), max_size=8), at=st.integers(0, 8),
       cuts=st.lists(st.integers(1, 40), max_size=30), hide=st.booleans(), usage_event=st.sampled_from(_USAGE_EVENTS))
def test_tap_output_is_the_stream_minus_only_the_hidden_event(events: list[bytes], at: int, cuts: list[int],
                                                              hide: bool, usage_event: bytes) -> None:
    """Whatever the cuts and line endings, the client gets the upstream's bytes minus the usage event
    it did not ask for (a usage event whose JSON spans two data lines included), and usage is read."""
    stream = b"".join([*events[:at], usage_event, *events[at:]])
    document: dict[str, Any] = {"stream": True}
    if not hide:
        document["stream_options"] = {"include_usage": True}
    _, tap = prepare("/v1/chat/completions", orjson.dumps(document), document)
    assert tap is not None and tap.begin("text/event-stream")
    out, position = b"", 0
    for size in cuts:
        out += tap.feed(stream[position:position + size])
        position += size
    out += tap.feed(stream[position:]) + tap.finish()

    assert out == (stream.replace(usage_event, b"") if hide else stream)
    assert tap.result() == Usage(4, 2, 6)


def test_a_stream_left_before_any_answer_is_charged_its_prompt_estimate() -> None:
    """The client hung up before the upstream's headers: begin() never ran, so the request's own
    stream flag decides, and the prompt the upstream already received is estimated."""
    document = {"stream": True, "messages": [{"role": "user", "content": "x" * 40}]}
    _, tap = prepare("/v1/chat/completions", orjson.dumps(document), document)
    assert tap is not None and tap.result() == Usage(10, 0, 10, estimated=True)
    plain = {"messages": [{"role": "user", "content": "x" * 40}]}
    _, tap = prepare("/v1/chat/completions", orjson.dumps(plain), plain)
    assert tap is not None and tap.result() is None  # a document answer that never came carries no usage
