"""The benchmark's Python upstream: a chat completion, and SSE streams paced or held open on request.

`POST /v1/chat/completions` answers the JSON completion below. With `?stream=1` it streams
`chunks` events `interval_ms` apart (defaults 10 and 0), each stamped with the upstream's
`time.monotonic_ns()` when it was written, so a client on the same machine can tell how long a
chunk spent in whatever sits between the two. With `hold_s=N` the stream sends its first event
and then stays open, silent, for N seconds (or until the client leaves) before finishing: that is
the held-open stream of the 1,000-stream memory test.
"""

from __future__ import annotations

import argparse
import asyncio
import time

from aiohttp import web

COMPLETION = (b'{"id":"chatcmpl-bench","object":"chat.completion","created":1700000000,"model":"gpt-4o-mini",'
              b'"choices":[{"index":0,"message":{"role":"assistant","content":"Hello! How can I help you today?"},'
              b'"logprobs":null,"finish_reason":"stop"}],'
              b'"usage":{"prompt_tokens":9,"completion_tokens":9,"total_tokens":18}}')
DONE = b"data: [DONE]\n\n"
MAX_CHUNKS = 1000
MAX_HOLD_S = 600.0


def event(index: int, sent_ns: int | None = None) -> bytes:
    """Return one SSE chunk event stamped with the monotonic time it is written (or with `sent_ns`)."""
    return (b'data: {"id":"chatcmpl-bench","object":"chat.completion.chunk","model":"gpt-4o-mini","i":%d,'
            b'"sent_ns":%d,"choices":[{"index":0,"delta":{"content":"tok"},"finish_reason":null}]}\n\n'
            % (index, time.monotonic_ns() if sent_ns is None else sent_ns))


def static_stream(chunks: int) -> bytes:
    """Return a whole SSE body stamped 0, for servers that cannot pace (nginx)."""
    return b"".join(event(index, 0) for index in range(chunks)) + DONE


def _number(request: web.Request, name: str, default: float, ceiling: float) -> float:
    try:
        value = float(request.query.get(name, default))
    except ValueError:
        raise web.HTTPBadRequest(text=f"{name} must be a number") from None
    return min(max(value, 0.0), ceiling)


async def completions(request: web.Request) -> web.StreamResponse:
    """Answer a chat completion, streamed (paced or held) when the query asks for it."""
    await request.read()
    if not request.query.get("stream"):
        return web.Response(body=COMPLETION, content_type="application/json")
    chunks = int(_number(request, "chunks", 10, MAX_CHUNKS))
    interval = _number(request, "interval_ms", 0, 10_000) / 1000
    hold = _number(request, "hold_s", 0, MAX_HOLD_S)
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await response.prepare(request)
    loop = asyncio.get_running_loop()
    start = loop.time()
    for index in range(max(chunks, 1)):
        # An absolute schedule, so a late wake-up does not push every later chunk back.
        delay = start + index * interval - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        await response.write(event(index))
        if index == 0 and hold:
            await asyncio.sleep(hold)
    await response.write(DONE)
    await response.write_eof()
    return response


def make_app() -> web.Application:
    """Build the upstream application: every path answers like /v1/chat/completions."""
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", completions)
    return app


def main() -> None:
    """Serve the upstream on 127.0.0.1 until SIGINT/SIGTERM."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    try:
        import uvloop
    except ImportError:
        loop = None
    else:
        loop = uvloop.new_event_loop()
    # Cancelled handlers end held streams the moment their client leaves.
    web.run_app(make_app(), host="127.0.0.1", port=args.port, access_log=None, print=None,
                handler_cancellation=True, backlog=2048, loop=loop)


if __name__ == "__main__":
    main()
