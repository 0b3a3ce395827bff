"""Relay an upstream answer to the client: small documents whole, everything else as it arrives."""

from __future__ import annotations

import asyncio
import logging
import time

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

from llm_proxy.errors import UpstreamTimeout, UpstreamUnavailable
from llm_proxy.gateway.context import REQUEST_STARTED
from llm_proxy.gateway.headers import client_headers
from llm_proxy.gateway.metering import UsageTap
from llm_proxy.ops.metrics import Metrics

# Set when an answer was cut off after its status was sent (audited `error`).
UPSTREAM_BROKEN = web.RequestKey("upstream_broken", bool)

log = logging.getLogger(__name__)

# A non-streamed answer up to this size (by its Content-Length) is read whole and sent in one
# write: cheaper than relaying it piecewise, and a body that breaks off can still be answered
# with a clean 502/504. A client cannot use half a JSON document, so nothing useful is held back.
WHOLE_BODY_LIMIT = 256 * 1024


class Relay:
    """Stream answers back under a stall watch (STREAM_IDLE_TIMEOUT) and count what was cut off."""

    def __init__(self, idle: float, metrics: Metrics) -> None:
        self.loop: asyncio.AbstractEventLoop  # the running loop, set when the upstream session is made
        self._idle = idle
        self._metrics = metrics

    async def send(self, request: web.Request, upstream: aiohttp.ClientResponse, sent: float,
                   answered: float, tap: UsageTap | None) -> web.StreamResponse:
        """Send the upstream's answer: read whole and sent in one write when small, else chunk by chunk."""
        headers = client_headers(upstream)
        streamed = upstream.content_type == "text/event-stream"
        if streamed:
            headers["X-Accel-Buffering"] = "no"
            headers["Cache-Control"] = "no-cache"
        # What the gateway itself cost so far: everything but the wait for the upstream's headers.
        overhead = time.perf_counter() - request[REQUEST_STARTED] - (answered - sent)
        headers["X-LLM-Proxy-Overhead-Ms"] = f"{overhead * 1000:.3f}"
        length = upstream.content_length
        if (not streamed and length is not None and length <= WHOLE_BODY_LIMIT and request.method != "HEAD"
                and upstream.status not in (204, 304)):
            return await self._whole(request, upstream, headers, sent, tap)
        response = web.StreamResponse(status=upstream.status, reason=upstream.reason, headers=headers)
        if not streamed and length is not None and (tap is None or not tap.streamed):
            response.content_length = length
        await response.prepare(request)
        first, relayed = True, 0
        watch = StallWatch(self.loop, self._idle, request.transport, self._metrics)
        try:
            async for chunk in upstream.content.iter_any():
                if first:
                    self._metrics.upstream_ttfb.observe(time.perf_counter() - sent)
                    first = False
                if tap is not None:
                    chunk = tap.feed(chunk)
                    if not chunk:
                        continue
                watch.since = watch.now()
                await response.write(chunk)
                watch.since = None
                relayed += len(chunk)
            if tap is not None and (rest := tap.finish()):
                watch.since = watch.now()
                await response.write(rest)
        except (aiohttp.ClientError, TimeoutError, ConnectionResetError) as exc:
            if watch.stalled:
                pass  # logged by the watch when it cut the connection
            elif isinstance(exc, ConnectionResetError):
                return response  # the client left; closing the upstream happens in the caller
            else:
                log.warning("upstream stream broke after %d bytes: %s", relayed, type(exc).__name__)
            # Headers are gone already: the only honest signal left is to cut the connection.
            request[UPSTREAM_BROKEN] = True
            if not watch.stalled:
                self._metrics.count_cut("upstream_broke")
            if request.transport is not None:
                request.transport.close()
            return response
        finally:
            watch.cancel()
        await response.write_eof()
        return response

    async def _whole(self, request: web.Request, upstream: aiohttp.ClientResponse, headers: CIMultiDict[str],
                     sent: float, tap: UsageTap | None) -> web.Response:
        try:
            body = await upstream.read()  # bounded: STREAM_IDLE_TIMEOUT of silence ends it
        except TimeoutError:
            log.warning("upstream body stalled for %ss; answered 504", self._idle)
            raise UpstreamTimeout() from None
        except (aiohttp.ClientError, ConnectionResetError) as exc:
            log.warning("upstream body broke before its end: %s; answered 502", type(exc).__name__)
            raise UpstreamUnavailable() from None
        self._metrics.upstream_ttfb.observe(time.perf_counter() - sent)
        if tap is not None:
            body = tap.feed(body) + tap.finish()
        response = web.Response(status=upstream.status, reason=upstream.reason, body=body, headers=headers)
        # Sent here, not by aiohttp after the handler returns, so that the send is inside the
        # handler: its concurrency slot is held, a client that stops reading is cut after
        # STREAM_IDLE_TIMEOUT, and the audit event is written once the outcome is known.
        watch = StallWatch(self.loop, self._idle, request.transport, self._metrics)
        watch.since = watch.now()
        try:
            await response.prepare(request)
            await response.write_eof()
        except ConnectionResetError:  # aiohttp's ClientConnectionResetError included
            if watch.stalled:
                request[UPSTREAM_BROKEN] = True  # cut by the watch, which logged and counted it: audited `error`
        finally:
            watch.cancel()
        return response


class StallWatch:
    """Cut a client that stops reading: one timer per response, not one per chunk.

    The relay marks when a write starts (`since`) and clears it when the write returns; the timer
    fires every `limit` seconds and aborts the connection if a write has been pending that long.
    A stalled client would otherwise hold a concurrency slot and an upstream connection forever
    (aiohttp stops the upstream read timer while the relay is blocked writing).
    """

    __slots__ = ("_handle", "_limit", "_loop", "_metrics", "_transport", "since", "stalled")

    def __init__(self, loop: asyncio.AbstractEventLoop, limit: float, transport: asyncio.Transport | None,
                 metrics: Metrics) -> None:
        self._loop = loop
        self._metrics = metrics
        self._limit = limit
        self._transport = transport
        self.since: float | None = None
        self.stalled = False
        self._handle = self._loop.call_later(limit, self._check)

    def now(self) -> float:
        return self._loop.time()

    def _check(self) -> None:
        since, now = self.since, self._loop.time()
        if since is not None and now - since >= self._limit:
            self.stalled = True
            log.warning("client stopped reading for %ss; connection closed", self._limit)
            self._metrics.count_cut("client_stalled")
            if self._transport is not None:
                self._transport.abort()  # close() would wait for the unread buffer to drain
            return
        self._handle = self._loop.call_later(self._limit - (now - since if since is not None else 0), self._check)

    def cancel(self) -> None:
        self._handle.cancel()
