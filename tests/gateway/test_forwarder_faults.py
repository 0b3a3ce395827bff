"""The forwarder's fault matrix through real HTTP: each way the upstream or the client misbehaves, and what is seen.

Faults covered elsewhere: a refused connection, an aiohttp upstream that hangs, 429 headers and 503
through the SDK, client disconnect (gateway/test_forwarder.py, gateway/test_usage.py); SQLite locked
by another process (storage/test_locked_database.py); a full disk under the audit file
(audit/test_trail.py); SIGTERM and kill -9 (ops/test_process.py); the audit writer on its own
(audit/test_writer.py).
"""

from __future__ import annotations

import asyncio
import re
import socket
import struct
import time
import tracemalloc
from collections.abc import Awaitable, Callable
from contextlib import closing
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from llm_proxy.gateway.relay import WHOLE_BODY_LIMIT
from tests.fakes import Gateway, access_events, bearer, call, eventually, serving, serving_like_serve

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
MODELS = b'{"object":"list","data":[]}'
MB = 1024 * 1024


# ---- helpers ----

async def assert_healthy(gateway: Gateway, token: dict[str, Any]) -> None:
    """The gateway answers its health check and still proxies an ordinary request."""
    async with gateway.client.get("/health") as health:
        assert health.status == 200
    async with gateway.client.get("/v1/models", headers=bearer(token)) as models:
        assert models.status == 200, await models.text()
        await models.read()


def chat_upstream(chat: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.Application:
    """Build an upstream whose chat completions misbehave and whose GET /v1/models is ordinary."""
    async def models(request: web.Request) -> web.Response:
        return web.Response(body=MODELS, content_type="application/json")

    app = web.Application()
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/chat/completions", chat)
    return app


Misbehaviour = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def until_eof(reader: asyncio.StreamReader) -> None:
    """Read and discard until the peer hangs up; never write."""
    while await reader.read(65536):
        pass


class RawUpstream:
    """A TCP server speaking just enough HTTP/1.1 to misbehave on purpose (GET /v1/models is answered)."""

    def __init__(self, misbehave: Misbehaviour) -> None:
        self._misbehave = misbehave
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[Any]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self.accepted = asyncio.Event()  # a request reached the misbehaviour
        self.hung_up = asyncio.Event()   # the gateway closed the connection we misbehaved on
        self.url = ""

    async def __aenter__(self) -> RawUpstream:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._writers:
            writer.close()
        await asyncio.gather(*self._handlers, return_exceptions=True)
        await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        self._writers.add(writer)
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except asyncio.IncompleteReadError:
                    return
                await reader.readexactly(_content_length(head))
                if head.startswith(b"GET /v1/models "):
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                                 b"Content-Length: %d\r\n\r\n%s" % (len(MODELS), MODELS))
                    await writer.drain()
                    continue
                self.accepted.set()
                await self._misbehave(reader, writer)
                if reader.at_eof():
                    self.hung_up.set()
                return
        except ConnectionError:
            pass
        finally:
            writer.close()


def _content_length(head: bytes) -> int:
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return 0


def reset(writer: asyncio.StreamWriter) -> None:
    """Abort the connection with a TCP RST rather than an orderly FIN."""
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


SSE_HEAD = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")


def http_chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def sse_event(index: int) -> bytes:
    return b"data: " + orjson.dumps({"id": "c", "object": "chat.completion.chunk", "choices": [
        {"index": 0, "delta": {"content": f"part{index} "}, "finish_reason": None}]}) + b"\n\n"


# ---- malformed answers are relayed untouched ----

MALFORMED_SSE = [
    b": a comment, then a line with no field name\ngarbage garbage\n\n",
    b'data: {"id": "x", "choices": [{"delta": {"content": "cut',   # invalid JSON, and cut across writes
    b' here"\n\n',
    b'data: {"id":"y","choices":[{"index":0,"delta":{"content":"no blank line after me"}}]}\n',
    b"event: weird\r\ndata: \xff\xfe not UTF-8\r\n\r\n",
    b'data: {"usage": "not an object", "choices": []}\n\n',
    b"data: [DONE]\n\n",
]


def sse_writer(pieces: list[bytes]) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """An upstream chat handler that writes `pieces` as an event stream, as they are."""
    async def chat(request: web.Request) -> web.StreamResponse:
        await request.read()
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for piece in pieces:
            await response.write(piece)
        await response.write_eof()
        return response
    return chat


async def stream_chat(gateway: Gateway, token: dict[str, Any], include_usage: bool) -> tuple[int, bytes]:
    """POST a streamed chat through the gateway; return the status and every byte received."""
    body: dict[str, Any] = {**CHAT, "stream": True}
    if include_usage:
        body["stream_options"] = {"include_usage": True}
    async with gateway.client.post("/v1/chat/completions", json=body, headers=bearer(token)) as response:
        return response.status, await response.read()


@pytest.mark.parametrize("include_usage", [True, False], ids=["client-asked-usage", "gateway-asks-usage"])
async def test_malformed_sse_reaches_the_client_byte_for_byte(make_gateway: Any, include_usage: bool) -> None:
    """Malformed SSE (garbage lines, missing blank lines, invalid JSON, bad UTF-8) passes through untouched."""
    async with serving(chat_upstream(sse_writer(MALFORMED_SSE))) as url:
        gateway = await make_gateway(upstream_url=url)
        token = await gateway.token()
        status, received = await stream_chat(gateway, token, include_usage)

        assert status == 200
        assert received == b"".join(MALFORMED_SSE)
        (event,) = await access_events(gateway)
        assert (event["result"], event["details"]["status"]) == ("success", 200)
        await assert_healthy(gateway, token)


async def test_invalid_json_answer_reaches_the_client_byte_for_byte(make_gateway: Any) -> None:
    """A non-streamed answer that claims JSON but is not is relayed untouched, with its length."""
    broken = b'{"id": "chatcmpl-1", "choices": [{"message": {"content": "trunc'

    async def chat(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(body=broken, content_type="application/json")

    async with serving(chat_upstream(chat)) as url:
        gateway = await make_gateway(upstream_url=url)
        token = await gateway.token()

        async with gateway.client.post("/v1/chat/completions", json=CHAT, headers=bearer(token)) as response:
            received = await response.read()

        assert (response.status, received, response.content_length) == (200, broken, len(broken))
        (event,) = await access_events(gateway)
        assert event["result"] == "success" and "prompt_tokens" not in event["details"]
        await assert_healthy(gateway, token)


@pytest.mark.parametrize(("status", "content_type", "body", "headers", "result"), [
    (500, "application/json", b'{"error":{"message":"boom","type":"server_error"}}', {}, "error"),
    (502, "text/html", b"<html><body>502 Bad Gateway</body></html>", {"Retry-After": "3"}, "error"),
    (503, "text/plain", b"overloaded", {"Retry-After": "9", "x-ratelimit-reset-requests": "1s"}, "error"),
    (429, "application/json", b'{"error":{"code":"rate_limit_exceeded"}}',
     {"Retry-After": "20", "x-ratelimit-remaining-tokens": "0"}, "failure"),
])
async def test_upstream_error_answers_pass_through_with_headers_and_are_audited(
        make_gateway: Any, status: int, content_type: str, body: bytes, headers: dict[str, str],
        result: str) -> None:
    """Upstream 5xx/429, JSON or not, reach the client unchanged (status, body, headers); audit says who failed."""
    async def chat(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(status=status, body=body, content_type=content_type, headers=headers)

    async with serving(chat_upstream(chat)) as url:
        gateway = await make_gateway(upstream_url=url)
        token = await gateway.token()

        async with gateway.client.post("/v1/chat/completions", json={**CHAT, "stream": True},
                                       headers=bearer(token)) as response:
            received = await response.read()

        assert (response.status, received, response.content_type) == (status, body, content_type)
        for name, value in headers.items():
            assert response.headers[name] == value
        (event,) = await access_events(gateway)
        assert (event["result"], event["details"]["status"]) == (result, status)
        await assert_healthy(gateway, token)


# ---- the upstream falls silent ----

async def test_upstream_that_accepts_and_never_answers_is_504_after_request_timeout(make_gateway: Any) -> None:
    """A TCP peer that reads the request and never writes: 504 at REQUEST_TIMEOUT, the gateway hangs up."""
    async with RawUpstream(lambda reader, writer: until_eof(reader)) as upstream:
        gateway = await make_gateway(upstream_url=upstream.url, REQUEST_TIMEOUT="300ms")
        token = await gateway.token()

        started = time.monotonic()
        pending = asyncio.ensure_future(gateway.client.post("/v1/chat/completions", json=CHAT,
                                                            headers=bearer(token)))
        await asyncio.wait_for(upstream.accepted.wait(), 2)
        async with gateway.client.get("/health") as health:  # the event loop is not stuck meanwhile
            assert health.status == 200
        async with await pending as response:
            error = await response.json()
        elapsed = time.monotonic() - started

        assert (response.status, error["error"]["code"]) == (504, "upstream_timeout")
        assert 0.3 <= elapsed < 1.5, elapsed
        await asyncio.wait_for(upstream.hung_up.wait(), 1)  # no half-open upstream connection left behind
        (event,) = await access_events(gateway)
        assert (event["result"], event["details"]["status"]) == ("error", 504)
        await assert_healthy(gateway, token)


async def test_a_client_leaving_before_the_upstream_answers_is_audited_499_not_504(tmp_path: Path) -> None:
    """Under `serve` a departed client's handler is cancelled: while the upstream is still thinking, that must
    close the upstream connection at once and be audited error/499, not be mistaken for the REQUEST_TIMEOUT."""
    async with RawUpstream(lambda reader, writer: until_eof(reader)) as upstream, \
            serving_like_serve(tmp_path, upstream.url) as gateway:
        token = await gateway.token()

        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.3):
                await gateway.client.post("/v1/chat/completions", json=CHAT, headers=bearer(token))
        await asyncio.wait_for(upstream.hung_up.wait(), 2)

        (event,) = await access_events(gateway)
        assert (event["result"], event["details"]["status"]) == ("error", 499)
        await assert_healthy(gateway, token)


@pytest.mark.parametrize(("head", "first", "body"), [
    (SSE_HEAD, http_chunk(sse_event(0)), {**CHAT, "stream": True}),
    # Beyond WHOLE_BODY_LIMIT a JSON answer is relayed as it arrives, like a stream.
    (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % (WHOLE_BODY_LIMIT + 1),
     b'{"id": "chatcmpl-1", "choices": [', CHAT),
], ids=["sse", "large-content-length"])
async def test_upstream_stalling_mid_body_is_cut_after_stream_idle_timeout_and_audited_error(
        make_gateway: Any, head: bytes, first: bytes, body: dict[str, Any]) -> None:
    """Headers and a first piece, then silence past STREAM_IDLE_TIMEOUT: the client's body is cut, audit `error`."""
    async def stall(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(head + first)
        await writer.drain()
        await until_eof(reader)

    async with RawUpstream(stall) as upstream:
        gateway = await make_gateway(upstream_url=upstream.url, STREAM_IDLE_TIMEOUT="300ms")
        token = await gateway.token()

        started = time.monotonic()
        async with gateway.client.post("/v1/chat/completions", json=body, headers=bearer(token)) as response:
            assert response.status == 200
            assert await response.content.readany()
            with pytest.raises(aiohttp.ClientPayloadError):
                await response.read()
        elapsed = time.monotonic() - started

        assert 0.3 <= elapsed < 1.5, elapsed
        await asyncio.wait_for(upstream.hung_up.wait(), 1)
        (event,) = await access_events(gateway)
        assert (event["result"], event["details"]["status"]) == ("error", 200)
        await assert_healthy(gateway, token)


@pytest.mark.parametrize(("ending", "status", "code"), [
    ("stall", 504, "upstream_timeout"),
    ("close", 502, "upstream_unavailable"),
    ("reset", 502, "upstream_unavailable"),
])
async def test_a_small_answer_broken_off_mid_body_is_a_clean_502_or_504(
        make_gateway: Any, ending: str, status: int, code: str) -> None:
    """A JSON answer within WHOLE_BODY_LIMIT is read whole before anything is sent: if it breaks off, the client
    gets an OpenAI error it can retry on instead of half a document, and the audit says `error` with that status."""
    async def misbehave(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
                     b'{"id": "chatcmpl-1", "choices": [')
        await writer.drain()
        if ending == "close":
            writer.close()
        elif ending == "reset":
            reset(writer)
        else:
            await until_eof(reader)

    async with RawUpstream(misbehave) as upstream:
        gateway = await make_gateway(upstream_url=upstream.url, STREAM_IDLE_TIMEOUT="300ms")
        token = await gateway.token()

        started = time.monotonic()
        async with gateway.client.post("/v1/chat/completions", json=CHAT, headers=bearer(token)) as response:
            error = await response.json()
        elapsed = time.monotonic() - started

        assert (response.status, error["error"]["code"]) == (status, code)
        if ending == "stall":
            assert 0.3 <= elapsed < 1.5, elapsed
            await asyncio.wait_for(upstream.hung_up.wait(), 1)  # the gateway let go of the silent upstream
        (event,) = await access_events(gateway)
        assert (event["result"], event["details"]["status"]) == ("error", status)
        await assert_healthy(gateway, token)


# ---- STREAM_IDLE_TIMEOUT with the fake upstream ----

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


# ---- the upstream breaks ----

async def cut_responses(gateway: Gateway) -> dict[str, float]:
    """llm_proxy_responses_cut_total by reason, as an operator's scrape sees it."""
    async with gateway.client.get("/metrics", headers=gateway.auth) as scrape:
        text = await scrape.text()
    return {reason: float(match.group(1)) for reason in ("upstream_broke", "client_stalled")
            if (match := re.search(rf'^llm_proxy_responses_cut_total{{reason="{reason}"}} (\S+)$', text, re.MULTILINE))}


async def test_upstream_closing_mid_stream_is_audited_error_and_the_next_request_is_served(gateway: Gateway) -> None:
    """The upstream closes mid-stream: the client's stream ends short, audit `error`, the next stream is whole."""
    gateway.upstream.chunks, gateway.upstream.break_after_chunks = 5, 2
    token = await gateway.token()

    async with gateway.client.post("/v1/chat/completions", json={**CHAT, "stream": True},
                                   headers=bearer(token)) as response:
        assert response.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await response.read()
    gateway.upstream.break_after_chunks = None
    async with gateway.client.post("/v1/chat/completions", json={**CHAT, "stream": True},
                                   headers=bearer(token)) as response:
        whole = await response.read()

    assert response.status == 200 and whole.endswith(b"data: [DONE]\n\n") and whole.count(b"part") == 5
    broken, served = await access_events(gateway)
    assert (broken["result"], broken["details"]["status"]) == ("error", 200)
    assert (served["result"], served["details"]["status"]) == ("success", 200)
    assert await cut_responses(gateway) == {"upstream_broke": 1, "client_stalled": 0}


async def test_upstream_tcp_reset_mid_stream_is_audited_error(make_gateway: Any) -> None:
    """A TCP RST (not an orderly close) after two events: the client's stream is cut, audit `error`, all else fine."""
    async def cut(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(SSE_HEAD + http_chunk(sse_event(0)) + http_chunk(sse_event(1)))
        await writer.drain()
        reset(writer)

    async with RawUpstream(cut) as upstream:
        gateway = await make_gateway(upstream_url=upstream.url)
        token = await gateway.token()

        async with gateway.client.post("/v1/chat/completions", json={**CHAT, "stream": True},
                                       headers=bearer(token)) as response:
            assert response.status == 200
            with pytest.raises(aiohttp.ClientPayloadError):
                await response.read()

        (event,) = await access_events(gateway)
        assert (event["result"], event["details"]["status"]) == ("error", 200)
        await assert_healthy(gateway, token)


async def test_a_broken_stream_is_logged_with_how_far_it_got(make_gateway: Any,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    """The operator's warning about a stream cut by the upstream says how many bytes the client got."""
    async def cut(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(SSE_HEAD + http_chunk(sse_event(0)) + http_chunk(sse_event(1)))
        await writer.drain()

    async with RawUpstream(cut) as upstream:
        gateway = await make_gateway(upstream_url=upstream.url)
        token = await gateway.token()
        received = b""
        async with gateway.client.post("/v1/chat/completions", json={**CHAT, "stream": True},
                                       headers=bearer(token)) as response:
            with pytest.raises(aiohttp.ClientPayloadError):
                while data := await response.content.readany():
                    received += data

    assert received == sse_event(0) + sse_event(1)
    (warning,) = [r.getMessage() for r in caplog.records if "stream broke" in r.getMessage()]
    relayed = int(warning.split(" after ")[1].split()[0])
    assert relayed >= len(received), warning


async def _close_at_once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    pass  # RawUpstream closes the connection


async def _reset_at_once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    reset(writer)


async def _answer_garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(b"SSH-2.0-OpenSSH_9.6\r\nthis is not HTTP\r\n\r\n")
    await writer.drain()


@pytest.mark.parametrize("misbehave", [_close_at_once, _reset_at_once, _answer_garbage],
                         ids=["closes", "resets", "not-http"])
async def test_upstream_broken_before_its_headers_is_502(make_gateway: Any, misbehave: Misbehaviour) -> None:
    """Accepted, then closed, reset or answered with something that is not HTTP: 502 upstream_unavailable."""
    async with RawUpstream(misbehave) as upstream:
        gateway = await make_gateway(upstream_url=upstream.url)
        token = await gateway.token()

        async with gateway.client.post("/v1/chat/completions", json=CHAT, headers=bearer(token)) as response:
            error = await response.json()

        assert (response.status, error["error"]["code"]) == (502, "upstream_unavailable")
        (event,) = await access_events(gateway)
        assert (event["result"], event["details"]["status"]) == ("error", 502)
        await assert_healthy(gateway, token)


# ---- SSE events that never end ----

@pytest.mark.parametrize("include_usage", [
    pytest.param(True, id="client-asked-usage"),
    pytest.param(False, id="gateway-asks-usage"),
])
async def test_an_unterminated_last_event_is_relayed_exactly_once(make_gateway: Any, include_usage: bool) -> None:
    """An upstream that ends without the final blank line: the client gets exactly the bytes sent, once."""
    sent = sse_event(0) + b"data: [DONE]"

    async with serving(chat_upstream(sse_writer([sent]))) as url:
        gateway = await make_gateway(upstream_url=url)
        token = await gateway.token()
        _, received = await stream_chat(gateway, token, include_usage)

        assert received == sent


async def test_an_unterminated_event_is_relayed_as_it_arrives(make_gateway: Any) -> None:
    """A 1 MB event with no blank line yet: the client starts getting it before the upstream finishes it."""
    delivered = asyncio.Event()
    piece = b"data: " + b"x" * MB

    async def chat(request: web.Request) -> web.StreamResponse:
        await request.read()
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(piece)
        try:
            await asyncio.wait_for(delivered.wait(), 1.0)
        except TimeoutError:
            pass
        await response.write(b"\n\n")
        await response.write_eof()
        return response

    async with serving(chat_upstream(chat)) as url:
        gateway = await make_gateway(upstream_url=url)
        token = await gateway.token()
        async with gateway.client.post("/v1/chat/completions", json={**CHAT, "stream": True},
                                       headers=bearer(token)) as response:
            try:
                first = await asyncio.wait_for(response.content.readany(), 0.5)
            except TimeoutError:
                first = b""
            delivered.set()
            rest = await response.read()

        assert first, "nothing of the event reached the client while the upstream was still sending it"
        assert first + rest == piece + b"\n\n"


@pytest.mark.parametrize("terminated, include_usage", [
    pytest.param(True, False, id="terminated-events"),
    pytest.param(False, True, id="unterminated-client-asked-usage"),
    pytest.param(False, False, id="unterminated-gateway-asks-usage"),
])
async def test_a_stream_is_relayed_in_bounded_memory(make_gateway: Any, terminated: bool, include_usage: bool) -> None:
    """8 MB of SSE read promptly by the client: the gateway's Python heap never holds more than a few MB of it."""
    size, chunk = 8 * MB, b"y" * (64 * 1024)
    last = b"\n\n" if terminated else b""
    event = b"data: " + chunk[: len(chunk) - 8] + b"\n\n" if terminated else chunk

    async def chat(request: web.Request) -> web.StreamResponse:
        await request.read()
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for _ in range(size // len(event)):
            await response.write(event)
        await response.write(last)
        await response.write_eof()
        return response

    async with serving(chat_upstream(chat)) as url:
        gateway = await make_gateway(upstream_url=url)
        token = await gateway.token()
        body: dict[str, Any] = {**CHAT, "stream": True}
        if include_usage:
            body["stream_options"] = {"include_usage": True}
        received = 0
        tracemalloc.start()
        try:
            async with gateway.client.post("/v1/chat/completions", json=body, headers=bearer(token)) as response:
                async for data in response.content.iter_any():
                    received += len(data)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

        assert received >= size
        assert peak < 4 * MB, f"peak Python heap {peak / MB:.1f} MB while relaying {size // MB} MB"


# ---- a slow client ----

async def test_slow_client_back_pressures_the_upstream_instead_of_buffering(make_gateway: Any) -> None:
    """A client that stops reading a fast 32 MB stream: the upstream is held back, not buffered in the gateway."""
    event = b"data: " + b"z" * (64 * 1024 - 8) + b"\n\n"
    count = 32 * MB // len(event)
    written = 0

    async def chat(request: web.Request) -> web.StreamResponse:
        nonlocal written
        await request.read()
        assert request.transport is not None
        # Small kernel buffers on both ends we own, so what is measured is the gateway's own buffering.
        request.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for _ in range(count):
            await response.write(event)  # awaits while the gateway does not take more
            written += len(event)
        await response.write_eof()
        return response

    def small_receive_buffer(addr_info: Any) -> socket.socket:
        family, type_, proto, _, _ = addr_info
        sock = socket.socket(family, type_, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        return sock

    async with serving(chat_upstream(chat)) as url:
        gateway = await make_gateway(upstream_url=url)
        token = await gateway.token()
        connector = aiohttp.TCPConnector(socket_factory=small_receive_buffer)
        async with aiohttp.ClientSession(connector=connector) as session:
            async with session.post(gateway.client.make_url("/v1/chat/completions"), json={**CHAT, "stream": True},
                                    headers=bearer(token)) as response:
                assert response.status == 200
                tracemalloc.start()
                try:
                    # Read nothing; poll until the upstream's progress stops (it must, long before 32 MB).
                    deadline, seen = time.monotonic() + 5, -1
                    while written != seen:
                        assert time.monotonic() < deadline, f"upstream never stalled ({written / MB:.1f} MB sent)"
                        seen = written
                        await asyncio.sleep(0.3)
                    heap = tracemalloc.get_traced_memory()[1]
                finally:
                    tracemalloc.stop()
                stalled_at = written
                received = 0
                async for data in response.content.iter_any():
                    received += len(data)

        # What left the upstream sits almost all in kernel socket buffers (the gateway's two sockets are
        # autotuned: 6-10 MB together on a stock Linux); the Python heap of gateway, upstream and client
        # together grows by under 2 MB.
        assert stalled_at < 16 * MB, f"{stalled_at / MB:.1f} MB left the upstream while the client read nothing"
        assert heap < 4 * MB, f"the Python heap grew by {heap / MB:.1f} MB while the client read nothing"
        assert received == written == count * len(event)
        (access,) = await access_events(gateway)
        assert access["result"] == "success"


async def test_a_client_that_stops_reading_is_cut_after_stream_idle_timeout(
        make_gateway: Any, caplog: pytest.LogCaptureFixture) -> None:
    """A reader that stalls longer than STREAM_IDLE_TIMEOUT loses its connection; the upstream is released."""
    event = b"data: " + b"z" * (64 * 1024 - 8) + b"\n\n"
    upstream_done = asyncio.Event()

    async def chat(request: web.Request) -> web.StreamResponse:
        await request.read()
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        try:
            for _ in range(32 * MB // len(event)):
                await response.write(event)
            await response.write_eof()
        finally:
            upstream_done.set()
        return response

    async with serving(chat_upstream(chat)) as url:
        gateway = await make_gateway(upstream_url=url, STREAM_IDLE_TIMEOUT="500ms")
        token = await gateway.token()
        async with aiohttp.ClientSession() as session:
            async with session.post(gateway.client.make_url("/v1/chat/completions"), json={**CHAT, "stream": True},
                                    headers=bearer(token)) as response:
                assert response.status == 200
                # Read nothing: the gateway's writes back up, then time out, and it hangs up.
                await asyncio.wait_for(upstream_done.wait(), timeout=10)
                with pytest.raises(aiohttp.ClientPayloadError):
                    async for _ in response.content.iter_any():
                        pass

    assert any("client stopped reading" in record.getMessage() for record in caplog.records)
    (access,) = await access_events(gateway)
    assert access["result"] == "error"
    assert await cut_responses(gateway) == {"upstream_broke": 0, "client_stalled": 1}


async def test_a_client_that_stops_reading_a_whole_answer_is_cut_too(
        make_gateway: Any, caplog: pytest.LogCaptureFixture) -> None:
    """A non-streamed answer within WHOLE_BODY_LIMIT is sent inside the handler under the same stall watch: a client
    that reads none of it loses its connection after STREAM_IDLE_TIMEOUT and the request is audited `error`."""
    body = b'{"id": "chatcmpl-1", "pad": "' + b"z" * (WHOLE_BODY_LIMIT - 64) + b'"}'

    async def chat(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(body=body, content_type="application/json")

    async with serving(chat_upstream(chat)) as url:
        gateway = await make_gateway(upstream_url=url, STREAM_IDLE_TIMEOUT="500ms")
        token = await gateway.token()
        payload = orjson.dumps(CHAT)
        loop = asyncio.get_running_loop()
        with closing(socket.socket()) as client:
            # A tiny receive window, and nothing read: the gateway's send backs up within a few KiB.
            client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            client.setblocking(False)
            server = gateway.client.server.runner.server  # type: ignore[union-attr]
            earlier = set(server.connections)  # the test client's own keep-alive connection
            await loop.sock_connect(client, (gateway.client.host, gateway.client.port))
            # And a small send buffer on the gateway's side of this connection: loopback's
            # autotuned buffers would otherwise swallow the whole 256 KiB.
            await eventually(lambda: bool(set(server.connections) - earlier), "the gateway to accept the connection")
            (handler,) = set(server.connections) - earlier
            handler.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
            await loop.sock_sendall(client, b"POST /v1/chat/completions HTTP/1.1\r\nHost: gateway\r\n"
                                    b"Authorization: Bearer " + token["token"].encode() + b"\r\n"
                                    b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                                    % (len(payload), payload))
            await eventually(lambda: any("client stopped reading" in record.getMessage()
                                         for record in caplog.records), "the gateway to cut the silent reader")

        (access,) = await access_events(gateway)
        assert access["result"] == "error"  # as for a stream cut this way (its status: 200, or 499 once aborted)
        assert await cut_responses(gateway) == {"upstream_broke": 0, "client_stalled": 1}
        await assert_healthy(gateway, token)


