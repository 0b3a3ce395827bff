"""The floor: the least a sane aiohttp pass-through does (no auth, limits, audit or logs), bytes streamed through.

It makes the same choices as llm-proxy's forwarder where they cost time: one shared
`ClientSession` (no cookie jar, no decompression, connection limit 1000), the request-target
passed through already encoded, a JSON request body read whole, the answer relayed with
`StreamResponse` + `iter_any()`, handler cancellation on, uvloop when it is installed. What
llm-proxy costs beyond this is the price of its features.
"""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web
from yarl import URL

HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection",
                        "te", "trailer", "trailers", "transfer-encoding", "upgrade"})
REQUEST_DROP = HOP_BY_HOP | {"host", "content-length"}
RESPONSE_DROP = HOP_BY_HOP | {"content-length", "server", "date"}
SESSION = web.AppKey("session", aiohttp.ClientSession)


def make_app(upstream: str, max_connections: int = 1000) -> web.Application:
    """Build the pass-through application in front of `upstream` (scheme://host:port)."""
    base = upstream.rstrip("/")

    async def session(app: web.Application) -> AsyncIterator[None]:
        app[SESSION] = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=max_connections), cookie_jar=aiohttp.DummyCookieJar(),
            auto_decompress=False, trust_env=False,
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=60, sock_read=300))
        yield
        await app[SESSION].close()

    async def forward(request: web.Request) -> web.StreamResponse:
        headers = {name: value for name, value in request.headers.items() if name.lower() not in REQUEST_DROP}
        body = await request.read() if request.body_exists else None
        async with request.app[SESSION].request(request.method, URL(base + request.raw_path, encoded=True),
                                                headers=headers, data=body, allow_redirects=False) as upstream:
            response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
            for name, value in upstream.headers.items():
                if name.lower() not in RESPONSE_DROP:
                    response.headers.add(name, value)
            if upstream.content_length is not None and upstream.content_type != "text/event-stream":
                response.content_length = upstream.content_length
            await response.prepare(request)
            async for chunk in upstream.content.iter_any():
                await response.write(chunk)
            await response.write_eof()
            return response

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", forward)
    app.cleanup_ctx.append(session)
    return app


def main() -> None:
    """Serve the floor on 127.0.0.1 until SIGINT/SIGTERM."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="upstream base URL, e.g. http://127.0.0.1:8001")
    args = parser.parse_args()
    try:
        import uvloop
    except ImportError:
        loop = None
    else:
        loop = uvloop.new_event_loop()
    web.run_app(make_app(args.upstream), host="127.0.0.1", port=args.port, access_log=None, print=None,
                handler_cancellation=True, loop=loop)


if __name__ == "__main__":
    main()
