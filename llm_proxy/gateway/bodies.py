"""Read request bodies within their limits, and check what the gateway decides on in them."""

from __future__ import annotations

import asyncio
import contextlib
import email.policy
import json
from collections.abc import AsyncIterator, Iterator
from email.parser import BytesParser
from typing import Any

import aiohttp
import orjson
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


class BodyTooLarge(Exception):
    """A streamed request body grew past its limit."""


class CappedBody:
    """A request body passed through as it arrives, refused once it grows past `limit`."""

    def __init__(self, stream: aiohttp.StreamReader, limit: int) -> None:
        self._stream = stream
        self._limit = limit
        self.finished = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        total = 0
        async for chunk in self._stream.iter_any():
            total += len(chunk)
            if total > self._limit:
                raise BodyTooLarge()
            yield chunk
        self.finished = True


def json_object(body: bytes) -> dict[str, Any] | None:
    """Return a body's JSON object, or None when it is not one."""
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    return document if isinstance(document, dict) else None


# Keys whose values the gateway acts on: the model policy, metering and the usage event it hides.
_DECIDED_KEYS = ("model", "stream", "stream_options")
_DECIDED_KEY_TEXTS = tuple(f'"{key}"'.encode() for key in (*_DECIDED_KEYS, "include_usage"))


def refuse_repeated_decided_keys(body: bytes) -> None:
    """Refuse a JSON object that gives `model`, `stream` or `stream_options` (or its `include_usage`) twice.

    orjson keeps the last of repeated keys, an upstream's parser may keep the first: `{"model":
    "o1-pro", "model": "gpt-4o-mini"}` would pass ALLOWED_MODELS here and run o1-pro there.
    """
    # Each of these keys, unless spelt with \u escapes, is its literal quoted text in the body; when
    # every one appears at most once and nothing is escaped, none can be repeated (the usual body:
    # a few byte scans, not a second parse).
    if b"\\u" not in body and all(body.count(text) <= 1 for text in _DECIDED_KEY_TEXTS):
        return
    with refusing_deep_nesting():
        pairs = json.loads(body, object_pairs_hook=list)  # every object as its (key, value) pairs, in order
    keys = [key for key, _ in pairs]
    for key in _DECIDED_KEYS:
        if keys.count(key) > 1:
            raise BadRequest(f"`{key}` is given more than once in the request body", param=key)
    options = dict(pairs).get("stream_options")
    if isinstance(options, list) and all(type(pair) is tuple for pair in options):  # an object, not an array
        if [key for key, _ in options].count("include_usage") > 1:
            raise BadRequest("`stream_options.include_usage` is given more than once in the request body",
                             param="stream_options")


def multipart_model(content_type: str, body: bytes) -> str | None:
    """Return the `model` field of a multipart/form-data body (audio and image uploads)."""
    message = BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: " + content_type.encode("latin-1", "replace") + b"\r\n\r\n" + body)
    if not message.is_multipart():
        return None
    parts = [part for part in message.iter_parts() if part.get_param("name", header="content-disposition") == "model"]
    if len(parts) > 1:  # as with a JSON key given twice: which one the upstream reads is not ours to guess
        raise BadRequest("`model` is given more than once in the request body", param="model")
    payload = parts[0].get_payload(decode=True) if parts else None
    return payload.decode("utf-8", "replace").strip() or None if isinstance(payload, bytes) else None
