"""Read request bodies within their limits, and decode JSON the standard library's way without a 500."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator

from aiohttp import web

from llm_proxy.errors import BadRequest, PayloadTooLarge, RequestTimeout


@contextlib.contextmanager
def refusing_deep_nesting() -> Iterator[None]:
    """Turn the standard library's RecursionError on a deeply nested body into a 400 naming the body.

    orjson accepts 1,024 levels; json.loads and json.dumps recurse and give up near Python's
    recursion limit. Without this a body orjson read could still end in a 500 and a traceback.
    """
    try:
        yield
    except RecursionError:
        raise BadRequest("request body is nested too deeply") from None


async def read_body(request: web.Request, limit_seconds: float) -> bytes:
    """Read a whole (size-capped) request body, refusing a client that sends it too slowly or too much."""
    try:
        if request.content.is_eof():
            return await request.read()  # it all came with the headers: no timer needed
        async with asyncio.timeout(limit_seconds):
            return await request.read()
    except TimeoutError:
        raise RequestTimeout() from None
    except web.HTTPRequestEntityTooLarge:
        # aiohttp's own exception past client_max_size: the gateway's 413, so that it is answered
        # in the OpenAI shape and audited as the client's invalid input, not as our error.
        raise PayloadTooLarge(f"request body exceeds {request.client_max_size} bytes") from None
