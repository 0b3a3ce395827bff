"""Usage metering: per-token totals, budgets and daily project usage through the real openai SDK; the usage event
hidden byte for byte from an awkward upstream; clients that leave mid-stream; the tap on its own."""

from __future__ import annotations

import asyncio
import calendar
import datetime as dt
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import openai
import orjson
import pytest
from aiohttp import web
from hypothesis import given
from hypothesis import strategies as st

from llm_proxy.app import AUDIT, TOKEN_CACHE
from llm_proxy.gateway.metering import Usage, UsageTap, prepare
from tests.fakes import (
    FakeClock,
    Gateway,
    access_events,
    assert_error,
    bearer,
    send,
    serving,
    serving_like_serve,
)

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


# An upstream written by hand, for the streams the fake upstream does not send.

USAGE = {"prompt_tokens": 11, "completion_tokens": 3, "total_tokens": 14}


def chunk(content: str | None = None, *, finish: str | None = None, usage_null: bool = True,
          choices: list[dict[str, Any]] | None = None, end: bytes = b"\n\n") -> bytes:
    payload: dict[str, Any] = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1700000000,
                               "model": "gpt-4o-mini"}
    if choices is None:
        delta = {"content": content} if content is not None else {}
        choices = [{"index": 0, "delta": delta, "finish_reason": finish}]
    payload["choices"] = choices
    if usage_null:
        payload["usage"] = None
    return b"data: " + orjson.dumps(payload) + end


def usage_event(end: bytes = b"\n\n") -> bytes:
    return b"data: " + orjson.dumps({"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1700000000,
                                     "model": "gpt-4o-mini", "choices": [], "usage": USAGE}) + end


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def sse_pieces(pieces: list[bytes], delay: float = 0.0, seen: list[bytes] | None = None) -> Handler:
    """An upstream handler writing `pieces` as they are (with a pause between them: separate TCP chunks)."""
    async def handler(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        if seen is not None:
            seen.append(body)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for piece in pieces:
            await response.write(piece)
            if delay:
                await asyncio.sleep(delay)
        await response.write_eof()
        return response
    return handler


def upstream_app(chat: Handler | None = None, responses: Handler | None = None) -> web.Application:
    app = web.Application()
    if chat is not None:
        app.router.add_post("/v1/chat/completions", chat)
    if responses is not None:
        app.router.add_post("/v1/responses", responses)

    async def models(request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": []})
    app.router.add_get("/v1/models", models)
    return app


async def post_stream(gateway: Gateway, token: dict[str, Any], body: dict[str, Any],
                      path: str = "/v1/chat/completions") -> tuple[int, bytes]:
    async with gateway.client.post(path, json=body, headers=bearer(token)) as response:
        return response.status, await response.read()


# ---- through the real openai SDK ----

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


async def test_usage_date_filters(gateway: Any) -> None:
    """From the fifth review (the management API's contract)."""
    token = await gateway.token()
    sdk = gateway.openai(token["token"])
    await sdk.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
    pid = token["project_id"]
    status, doc, _ = await send(gateway, "GET", f"/manage/projects/{pid}/usage")
    assert status == 200 and len(doc["data"]) == 1, doc
    today = doc["data"][0]["date"]
    assert doc["totals"]["requests"] == 1 and doc["totals"]["total_tokens"] == 7, doc
    assert doc["project_id"] == pid
    status, doc, _ = await send(gateway, "GET", f"/manage/projects/{pid}/usage?since={today}&until={today}")
    assert status == 200 and doc["data"] == [], doc  # until exclusive
    status, doc, _ = await send(gateway, "GET", f"/manage/projects/{pid}/usage?since={today}")
    assert len(doc["data"]) == 1
    status, doc, _ = await send(gateway, "GET", f"/manage/projects/{pid}/usage?until={today}")
    assert doc["data"] == [] and doc["totals"]["requests"] == 0
    for query, param in (("since=yesterday", "since"), ("until=2024-02-30", "until"), ("since=2024-01-01T1:00:00Z",
                                                                                         "since"),
                         ("since=%EF%BC%92024-01-01", "since")):
        status, doc, _ = await send(gateway, "GET", f"/manage/projects/{pid}/usage?{query}")
        assert status == 400, (query, status, doc)
        assert_error(doc, "invalid_request", param)


async def test_usage_until_instant_includes_that_days_earlier_part(gateway: Any) -> None:
    """From the fifth review (the management API's contract)."""
    token = await gateway.token()
    sdk = gateway.openai(token["token"])
    await sdk.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
    pid = token["project_id"]
    doc = await gateway.manage("GET", f"/projects/{pid}/usage", expect=200)
    today = doc["data"][0]["date"]
    # until=TODAYT23:59:59Z covers (most of) today: a day's totals are either all in or the
    # filter must refuse instants. Silently dropping the whole day is wrong.
    status, doc, _ = await send(gateway, "GET", f"/manage/projects/{pid}/usage?until={today}T23:59:59Z")
    assert status == 400 or len(doc["data"]) == 1, (status, doc)


async def test_daily_usage_survives_a_restart(make_gateway: Any) -> None:
    first = await make_gateway()
    token = await first.token()
    await first.openai(token["token"]).chat.completions.create(**CHAT)
    await first.close()

    second = await make_gateway()
    await second.openai(token["token"]).chat.completions.create(**CHAT)
    await second.app[TOKEN_CACHE].flush()
    usage = await second.manage("GET", f"/projects/{token['project_id']}/usage", expect=200)
    assert usage["totals"] == {"requests": 2, "prompt_tokens": 10, "completion_tokens": 4, "total_tokens": 14}
    assert await _token_usage(second, token["id"]) == (10, 4, 14)


async def test_daily_usage_rolls_over_at_utc_midnight(make_gateway: Any) -> None:
    """From the second review (streams and accounting against an awkward upstream)."""
    midnight = calendar.timegm((2027, 1, 16, 0, 0, 0, 0, 0, 0))
    clock = FakeClock(midnight - 1.5)
    gateway = await make_gateway(clock=clock, RATE_LIMIT_PER_MINUTE="0")
    token = await gateway.token()
    client = gateway.openai(token["token"])

    await client.chat.completions.create(**CHAT)
    await gateway.app[TOKEN_CACHE].flush()
    clock.advance(1.0)  # 23:59:59.5
    await client.chat.completions.create(**CHAT)
    clock.advance(1.0)  # 00:00:00.5 next day
    await client.chat.completions.create(**CHAT)

    usage = await gateway.manage("GET", f"/projects/{token['project_id']}/usage", expect=200)
    assert usage["data"] == [
        {"date": "2027-01-15", "requests": 2, "prompt_tokens": 10, "completion_tokens": 4, "total_tokens": 14},
        {"date": "2027-01-16", "requests": 1, "prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}]
    until = await gateway.manage("GET", f"/projects/{token['project_id']}/usage?until=2027-01-16", expect=200)
    assert until["totals"]["requests"] == 2


# ---- the usage event through an awkward upstream: hidden byte for byte, and charged ----

async def test_usage_event_with_multi_line_data_is_hidden_and_charged(make_gateway: Any) -> None:
    """SSE allows an event's data over several `data:` lines (joined with LF). The usage-only event the
    gateway asked for must still be recognised: hidden from a client that did not ask, and charged exactly.

    From the second review (streams and accounting against an awkward upstream)."""
    multi = (b'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","choices":[],\n'
             b'data: "usage":' + orjson.dumps(USAGE) + b"}\n\n")
    kept = [chunk("a "), chunk("b "), chunk(finish="stop"), b"data: [DONE]\n\n"]
    pieces = [*kept[:3], multi, kept[3]]
    async with serving(upstream_app(chat=sse_pieces(pieces))) as url:
        gateway = await make_gateway(upstream_url=url)
        token = await gateway.token()
        status, received = await post_stream(gateway, token, {**CHAT, "stream": True})

        assert status == 200
        assert received == b"".join(kept), "the usage event the client did not ask for reached it"
        assert await _token_usage(gateway, token["id"]) == (11, 3, 14)


async def test_events_ended_by_lf_then_crlf_are_relayed_not_swallowed(make_gateway: Any) -> None:
    """A line ending is LF, CR or CRLF, in any mix: `\\n\\r\\n` ends an event. The client that did not ask for
    usage must get every event but the usage one, not lose the whole stream.

    From the second review (streams and accounting against an awkward upstream)."""
    end = b"\n\r\n"
    kept = [chunk("a ", end=end), chunk("b ", end=end), chunk(finish="stop", end=end)]
    pieces = [*kept, usage_event(end), b"data: [DONE]" + end]
    async with serving(upstream_app(chat=sse_pieces(pieces, delay=0.01))) as url:
        gateway = await make_gateway(upstream_url=url)
        token = await gateway.token()
        status, received = await post_stream(gateway, token, {**CHAT, "stream": True})

        assert status == 200
        assert received == b"".join([*kept, b"data: [DONE]" + end])


async def test_awkward_chunk_boundaries_are_byte_exact_end_to_end(make_gateway: Any) -> None:
    """Events cut inside `data:`, inside CRLF, comments, `event:` lines, multi-line data, the usage event cut in
    two, and a final event with no blank line: the client gets exactly the stream minus the hidden event.

    From the second review (streams and accounting against an awkward upstream)."""
    usage = usage_event(b"\r\n\r\n")
    stream_parts = [
        b": keep-alive comment\n\n",
        b"event: message\r\n" + chunk("one ", end=b"\r\n\r\n"),
        b"data: {\"id\":\"chatcmpl-1\",\"choices\":[{\"index\":0,\n"
        b"data: \"delta\":{\"content\":\"two \"},\"finish_reason\":null}],\"usage\":null}\n\n",
        chunk(finish="stop", end=b"\r\n\r\n"),
    ]
    before = b"".join(stream_parts)
    last = b"data: [DONE]"  # no trailing blank line
    whole = before + usage + last
    # Cut points: inside "data:", inside a CRLF pair, inside the usage event, inside "[DONE]".
    cuts = sorted({before.index(b"data:") + 2, before.index(b"\r\n\r\n") + 1, before.index(b"\r\n\r\n") + 3,
                   len(before) + 5, len(before) + len(usage) // 2, len(before) + len(usage) - 1,
                   len(before) + len(usage) + 7})
    pieces, start = [], 0
    for cut in cuts:
        pieces.append(whole[start:cut])
        start = cut
    pieces.append(whole[start:])
    async with serving(upstream_app(chat=sse_pieces(pieces, delay=0.02))) as url:
        gateway = await make_gateway(upstream_url=url)
        token = await gateway.token()
        status, received = await post_stream(gateway, token, {**CHAT, "stream": True})

        assert status == 200
        assert received == before + last
        assert await _token_usage(gateway, token["id"]) == (11, 3, 14)


async def test_a_final_usage_event_without_blank_line_is_still_hidden(make_gateway: Any) -> None:
    """From the second review (streams and accounting against an awkward upstream)."""
    kept = [chunk("a "), chunk(finish="stop")]
    pieces = [*kept, usage_event(b"")]
    async with serving(upstream_app(chat=sse_pieces(pieces))) as url:
        gateway = await make_gateway(upstream_url=url)
        token = await gateway.token()
        status, received = await post_stream(gateway, token, {**CHAT, "stream": True})

        assert (status, received) == (200, b"".join(kept))
        assert await _token_usage(gateway, token["id"]) == (11, 3, 14)


@pytest.mark.parametrize("options", [None, {}, {"include_usage": False}], ids=["null", "empty", "false"])
async def test_stream_options_not_asking_for_usage_hide_the_event_and_charge(gateway: Gateway,
                                                                             options: Any) -> None:
    """From the second review (streams and accounting against an awkward upstream)."""
    token = await gateway.token()
    status, received = await post_stream(gateway, token, {**CHAT, "stream": True, "stream_options": options})

    assert status == 200
    assert b'"choices":[]' not in received and received.endswith(b"data: [DONE]\n\n")
    assert orjson.loads(gateway.upstream.requests[-1].body)["stream_options"]["include_usage"] is True
    assert await _token_usage(gateway, token["id"]) == (11, 3, 14)


async def test_client_asking_for_usage_gets_the_upstream_stream_byte_for_byte(gateway: Gateway,
                                                                               upstream: Any) -> None:
    """From the second review (streams and accounting against an awkward upstream)."""
    _, server = upstream
    body = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
    raw = orjson.dumps(body)
    async with aiohttp.ClientSession() as session:
        async with session.post(server.make_url("/v1/chat/completions"), data=raw,
                                headers={"Content-Type": "application/json"}) as direct:
            expected = await direct.read()
    token = await gateway.token()
    async with gateway.client.post("/v1/chat/completions", data=raw,
                                   headers={**bearer(token), "Content-Type": "application/json"}) as response:
        received = await response.read()

    assert received == expected
    assert gateway.upstream.requests[-1].body == raw  # the request body was not rewritten either


async def test_n_greater_than_one_with_tool_calls_hides_only_the_usage_event(make_gateway: Any) -> None:
    """From the second review (streams and accounting against an awkward upstream)."""
    tool = {"index": 0, "id": "call_1", "type": "function", "function": {"name": "f", "arguments": ""}}
    kept = [
        chunk(choices=[{"index": 0, "delta": {"role": "assistant", "content": None, "tool_calls": [tool]},
                        "finish_reason": None},
                       {"index": 1, "delta": {"role": "assistant", "content": "hi"}, "finish_reason": None}]),
        chunk(choices=[{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": "{\"a\""}}]},
                        "finish_reason": None}]),
        chunk(choices=[{"index": 0, "delta": {}, "finish_reason": "tool_calls"},
                       {"index": 1, "delta": {}, "finish_reason": "stop"}]),
        b"data: [DONE]\n\n",
    ]
    pieces = [*kept[:3], usage_event(), kept[3]]
    async with serving(upstream_app(chat=sse_pieces(pieces))) as url:
        gateway = await make_gateway(upstream_url=url)
        token = await gateway.token()
        status, received = await post_stream(gateway, token, {**CHAT, "stream": True, "n": 2})

        assert (status, received) == (200, b"".join(kept))
        assert await _token_usage(gateway, token["id"]) == (11, 3, 14)


async def test_a_very_large_single_event_passes_whole_and_usage_is_still_hidden(make_gateway: Any) -> None:
    """From the second review (streams and accounting against an awkward upstream)."""
    big = chunk("x" * (200 * 1024))
    kept = [chunk("a "), big, chunk(finish="stop"), b"data: [DONE]\n\n"]
    pieces = [kept[0], big[:70_000], big[70_000:150_000], big[150_000:], kept[2], usage_event(), kept[3]]
    async with serving(upstream_app(chat=sse_pieces(pieces, delay=0.01))) as url:
        gateway = await make_gateway(upstream_url=url)
        token = await gateway.token()
        status, received = await post_stream(gateway, token, {**CHAT, "stream": True})

        assert (status, received == b"".join(kept)) == (200, True)
        assert await _token_usage(gateway, token["id"]) == (11, 3, 14)


# ---- what is charged, whatever the answer ----

async def test_stream_request_answered_200_with_an_unexpected_type_is_not_metered(make_gateway: Any) -> None:
    """'errors and unexpected answers are relayed untouched and not metered' (forwarder): a 200 text/plain.

    From the second review (streams and accounting against an awkward upstream)."""
    async def chat(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(body=b"plain text, not an event stream", content_type="text/plain")

    async with serving(upstream_app(chat=chat)) as url:
        gateway = await make_gateway(upstream_url=url)
        token = await gateway.token()
        status, received = await post_stream(gateway, token, {**CHAT, "stream": True})

        assert (status, received) == (200, b"plain text, not an event stream")
        (event,) = await access_events(gateway)
        assert "prompt_tokens" not in event["details"], event["details"]
        assert await _token_usage(gateway, token["id"]) == (0, 0, 0)


async def test_stream_request_answered_with_a_plain_json_completion_is_charged_its_usage(make_gateway: Any) -> None:
    """An upstream that ignores `stream` and answers one JSON completion: its own usage is what is charged.

    From the second review (streams and accounting against an awkward upstream)."""
    completion = {"id": "chatcmpl-1", "object": "chat.completion", "model": "gpt-4o-mini",
                  "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello"},
                               "finish_reason": "stop"}],
                  "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}}
    raw = orjson.dumps(completion)

    async def chat(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(body=raw, content_type="application/json")

    async with serving(upstream_app(chat=chat)) as url:
        gateway = await make_gateway(upstream_url=url)
        token = await gateway.token()
        status, received = await post_stream(gateway, token, {**CHAT, "stream": True})

        assert (status, received) == (200, raw)
        assert await _token_usage(gateway, token["id"]) == (5, 2, 7)


async def test_a_body_the_gateway_cannot_parse_but_the_upstream_can_is_still_metered(make_gateway: Any) -> None:
    """A lone surrogate escape (`\\ud800`) is refused by orjson but read by most JSON parsers (Python's, JS's).
    The budget must not be dodged that way: the request is either refused or charged the upstream's usage.

    From the second review (streams and accounting against an awkward upstream)."""
    async def chat(request: web.Request) -> web.Response:
        json.loads(await request.read())  # the stdlib parser, as many upstreams
        return web.json_response({"id": "chatcmpl-1", "object": "chat.completion", "model": "gpt-4o-mini",
                                  "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"},
                                               "finish_reason": "stop"}],
                                  "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}})

    body = b'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi \\ud800"}]}'
    async with serving(upstream_app(chat=chat)) as url:
        gateway = await make_gateway(upstream_url=url)
        token = await gateway.token(max_tokens_total=10)
        statuses = []
        for _ in range(4):
            async with gateway.client.post("/v1/chat/completions", data=body,
                                           headers={**bearer(token), "Content-Type": "application/json"}) as r:
                await r.read()
                statuses.append(r.status)

        spent = await _token_usage(gateway, token["id"])
        assert statuses[0] == 400 or spent[2] >= 10, (statuses, spent)
        assert statuses.count(200) <= 2, f"budget of 10 tokens let {statuses.count(200)} requests of 7 through"


async def test_a_request_in_flight_when_the_budget_runs_out_finishes(gateway: Gateway) -> None:
    """From the second review (streams and accounting against an awkward upstream)."""
    gateway.upstream.chunks, gateway.upstream.chunk_delay = 8, 0.1
    token = await gateway.token(max_tokens_total=10)
    client = gateway.openai(token["token"])

    stream = await client.chat.completions.create(**CHAT, stream=True)
    first = await stream.__anext__()
    await client.chat.completions.create(**CHAT)  # 7
    await client.chat.completions.create(**CHAT)  # 14: budget spent
    async with gateway.client.post("/v1/chat/completions", json=CHAT, headers=bearer(token)) as refused:
        assert refused.status == 429 and (await refused.json())["error"]["code"] == "budget_exceeded"
    rest = [c async for c in stream]

    assert first.choices and len(rest) >= 8  # the admitted stream ran to its end
    assert await _token_usage(gateway, token["id"]) == (10 + 11, 4 + 8, 14 + 19)


# ---- clients that leave mid-stream ----

async def test_client_leaving_a_responses_stream_is_charged_for_the_deltas_delivered(tmp_path: Path) -> None:
    """README: a client that hangs up is charged 'one completion token per content event relayed'. On
    /v1/responses the content events are `response.output_text.delta`.

    From the second review (streams and accounting against an awkward upstream)."""
    closed = asyncio.Event()

    async def responses(request: web.Request) -> web.StreamResponse:
        await request.read()
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        try:
            await response.write(b'event: response.created\ndata: {"type":"response.created","response":'
                                 b'{"id":"resp_1","status":"in_progress","usage":null}}\n\n')
            for index in range(50):
                data = {"type": "response.output_text.delta", "item_id": "msg_1", "output_index": 0,
                        "content_index": 0, "delta": f"word{index} "}
                await response.write(b"event: response.output_text.delta\ndata: " + orjson.dumps(data) + b"\n\n")
                await asyncio.sleep(0.1)
        finally:
            closed.set()
        return response

    async with serving(upstream_app(responses=responses)) as url, serving_like_serve(tmp_path, url) as gateway:
        token = await gateway.token()
        async with aiohttp.ClientSession() as session:
            response = await session.post(gateway.client.make_url("/v1/responses"),
                                          json={"model": "gpt-4o-mini", "input": "hello there", "stream": True},
                                          headers=bearer(token))
            received = b""
            while received.count(b"response.output_text.delta\ndata") < 4:
                received += await response.content.readany()
            response.close()
        await asyncio.wait_for(closed.wait(), 3)
        await asyncio.sleep(0.2)
        (event,) = await access_events(gateway)
        details = event["details"]
        assert details["status"] == 499 and event["result"] == "error"
        assert details.get("usage_estimated") is True
        assert details["completion_tokens"] >= 4, details


async def test_client_leaving_a_chat_stream_is_audited_499_and_charged(tmp_path: Path,
                                                                        upstream: Any) -> None:
    """From the second review (streams and accounting against an awkward upstream)."""
    state, server = upstream
    state.chunks, state.chunk_delay = 50, 0.1
    async with serving_like_serve(tmp_path, str(server.make_url("")).rstrip("/")) as gateway:
        token = await gateway.token()
        async with aiohttp.ClientSession() as session:
            response = await session.post(gateway.client.make_url("/v1/chat/completions"),
                                          json={**CHAT, "stream": True}, headers=bearer(token))
            received = b""
            while received.count(b"\n\n") < 3:
                received += await response.content.readany()
            response.close()
        await asyncio.wait_for(state.stream_closed.wait(), 3)
        await asyncio.sleep(0.2)
        (event,) = await access_events(gateway)
        assert (event["result"], event["details"]["status"]) == ("error", 499)
        assert event["details"]["usage_estimated"] is True and event["details"]["completion_tokens"] >= 3


async def test_client_leaving_a_tool_call_stream_is_charged_for_the_deltas_delivered(tmp_path: Path) -> None:
    """Tool-call argument deltas carry no `content` key: are they 'content events' for the disconnect estimate?

    From the second review (streams and accounting against an awkward upstream)."""
    closed = asyncio.Event()

    async def chat(request: web.Request) -> web.StreamResponse:
        await request.read()
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        try:
            tool = {"index": 0, "id": "call_1", "type": "function", "function": {"name": "f", "arguments": ""}}
            await response.write(chunk(choices=[{"index": 0, "delta": {"role": "assistant", "content": None,
                                                                       "tool_calls": [tool]}, "finish_reason": None}]))
            for index in range(50):
                await response.write(chunk(choices=[{"index": 0, "delta": {"tool_calls": [
                    {"index": 0, "function": {"arguments": f"arg{index}"}}]}, "finish_reason": None}]))
                await asyncio.sleep(0.1)
        finally:
            closed.set()
        return response

    async with serving(upstream_app(chat=chat)) as url, serving_like_serve(tmp_path, url) as gateway:
        token = await gateway.token()
        async with aiohttp.ClientSession() as session:
            response = await session.post(gateway.client.make_url("/v1/chat/completions"),
                                          json={**CHAT, "stream": True}, headers=bearer(token))
            received = b""
            while received.count(b"arguments") < 5:
                received += await response.content.readany()
            response.close()
        await asyncio.wait_for(closed.wait(), 3)
        await asyncio.sleep(0.2)
        (event,) = await access_events(gateway)
        assert event["details"]["usage_estimated"] is True
        assert event["details"]["completion_tokens"] >= 4, event["details"]


# ---- the usage event, unit by unit ----

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


@pytest.mark.parametrize("options", ["yes", [], 1], ids=["string", "list", "int"])
async def test_a_wrongly_typed_stream_options_is_not_silently_rewritten(gateway: Gateway, options: Any) -> None:
    """The upstream, not the gateway, judges a client's invalid stream_options (OpenAI answers 400).

    From the second review (streams and accounting against an awkward upstream)."""
    token = await gateway.token()
    await post_stream(gateway, token, {**CHAT, "stream": True, "stream_options": options})
    assert orjson.loads(gateway.upstream.requests[-1].body)["stream_options"] == options


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
