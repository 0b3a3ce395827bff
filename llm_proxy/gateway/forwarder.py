"""Forward an admitted /v1 request to the upstream with the project's key and stream the answer back."""

from __future__ import annotations

import asyncio
import email.policy
import fnmatch
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from email.parser import BytesParser
from typing import Any

import aiohttp
import orjson
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from llm_proxy.audit.events import Result
from llm_proxy.audit.writer import AuditWriter
from llm_proxy.errors import (
    ApiError,
    BadRequest,
    EndpointNotAllowed,
    ModelNotAllowed,
    PayloadTooLarge,
    RequestTimeout,
    UpstreamAuthFailed,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from llm_proxy.gateway import metering as usage
from llm_proxy.gateway.bodies import read_body, refusing_deep_nesting
from llm_proxy.gateway.client_auth import CREDENTIAL
from llm_proxy.gateway.context import CLIENT_IP, REQUEST_ID, REQUEST_STARTED
from llm_proxy.models import Credential
from llm_proxy.ops.metrics import Metrics
from llm_proxy.settings import Settings
from llm_proxy.tokens.cache import TokenCache

# Set when an answer was cut off after its status was sent (audited `error`).
UPSTREAM_BROKEN = web.RequestKey("upstream_broken", bool)

log = logging.getLogger(__name__)

HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection",
                        "te", "trailer", "trailers", "transfer-encoding", "upgrade"})
# The client's credentials, cookies and claims about its own address never reach the upstream;
# Accept-Encoding is dropped so the upstream answers in identity encoding (usage can be read).
# OpenAI-Organization/-Project would let a token holder pick (and bill) any organization or project
# the operator's key can reach: the project's key alone decides.
REQUEST_DENY = HOP_BY_HOP | {"host", "authorization", "cookie", "content-length", "accept-encoding", "forwarded",
                             "x-real-ip", "x-request-id", "expect", "openai-organization", "openai-project"}
# Upstream cookies and account identifiers stay here; X-Request-ID is ours.
RESPONSE_DENY = HOP_BY_HOP | {"set-cookie", "server", "date", "x-request-id", "openai-organization",
                              "openai-project", "content-length"}
# Anything that could walk the upstream path out of /v1 once decoded or normalised.
_URL_CACHE_SIZE = 4096
# A non-streamed answer up to this size (by its Content-Length) is read whole and sent in one
# write: cheaper than relaying it piecewise, and a body that breaks off can still be answered
# with a clean 502/504. A client cannot use half a JSON document, so nothing useful is held back.
WHOLE_BODY_LIMIT = 256 * 1024
# The upstream refusing the project's key: its answer is about the operator's credentials, not the
# client's token, and OpenAI's own message shows part of the key ("Incorrect API key provided: sk-…").
CREDENTIALS_REFUSED = frozenset({401, 403})
_REFUSAL_LOG_INTERVAL = 60.0  # per project: one line a minute says it all, a line per request floods
_UNSAFE_PATH = re.compile(r"%2e|%2f|%5c|\\|//|/\.\.?(/|$)", re.IGNORECASE)


class Forwarder:
    """The /v1 handler: validates the path and body, then streams request and response through."""

    def __init__(self, settings: Settings, cache: TokenCache, audit: AuditWriter, metrics: Metrics,
                 refund: Callable[[Credential], Awaitable[None]]) -> None:
        self.session: aiohttp.ClientSession | None = None
        self._loop: asyncio.AbstractEventLoop  # set with the session, in the running loop
        self._cache = cache
        self._refund = refund
        self._audit = audit
        self._metrics = metrics
        self._upstream = settings.openai_api_url
        self._allowed = settings.allowed_endpoints
        self._allowed_models = settings.allowed_models
        self._max_body = settings.max_request_size
        self._request_timeout = settings.request_timeout
        self._idle = settings.stream_idle_timeout
        self._urls: dict[str, URL] = {}
        self._refusals_logged: dict[str, float] = {}  # project id -> when its key's refusal was last logged
        self._timeout = aiohttp.ClientTimeout(total=None, sock_connect=settings.request_timeout,
                                              sock_read=settings.stream_idle_timeout)

    def new_session(self, max_connections: int) -> aiohttp.ClientSession:
        """Create the one upstream session: no cookies kept, bytes passed through undecoded."""
        # Kept for the per-request timers: asyncio.get_running_loop() costs a getpid(2) each time on 3.11.
        self._loop = asyncio.get_running_loop()
        connector = aiohttp.TCPConnector(limit=max_connections, ttl_dns_cache=300)
        return aiohttp.ClientSession(connector=connector, cookie_jar=aiohttp.DummyCookieJar(),
                                     auto_decompress=False, trust_env=False, timeout=self._timeout)

    def upstream_url(self, raw_path: str) -> URL:
        """Map a client request-target to the upstream URL, refusing paths outside the allowed /v1 prefixes."""
        url = self._urls.get(raw_path)
        if url is not None:
            return url
        url = self._map(raw_path)
        if len(self._urls) >= _URL_CACHE_SIZE:
            self._urls.clear()  # the mapping is pure: forgetting costs only a recomputation
        self._urls[raw_path] = url
        return url

    def _map(self, raw_path: str) -> URL:
        path, _, _query = raw_path.partition("?")
        if not path.startswith("/v1/") or _UNSAFE_PATH.search(path):
            raise EndpointNotAllowed()
        if not any(path == prefix or path.startswith(prefix + "/") for prefix in self._allowed):
            raise EndpointNotAllowed()
        return URL(self._upstream + raw_path, encoded=True)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """Forward the request; charge its usage and audit it as token.access whatever happens."""
        started = time.perf_counter()
        credential = request[CREDENTIAL]
        result: Result = "error"
        status, model, tap, reason, upstream_status = 0, None, None, None, None
        try:
            try:
                url = self.upstream_url(request.raw_path)
                body, document, model = await self._body(request)
                if isinstance(body, bytes):
                    body, tap = usage.prepare(request.path, body, document)
            except ApiError:
                # Refused by the gateway's own checks before anything went upstream: no quota spent.
                # The rate allowance stays spent: it bounds how often a token makes the gateway read a body.
                await self._refund(credential)
                raise
            response = await self._forward(request, url, body, tap)
            status = response.status
            result = "success" if status < 400 else ("error" if status >= 500 else "failure")
            if request.get(UPSTREAM_BROKEN):
                result = "error"
            return response
        except ApiError as exc:
            status, reason = exc.status, exc.code
            if isinstance(exc, UpstreamAuthFailed):
                upstream_status = exc.upstream_status
            result = "error" if status >= 500 else "denied" if status in (403, 404) else "failure"
            raise
        except web.HTTPException as exc:
            status, result = exc.status, "failure"
            raise
        except asyncio.CancelledError:
            status, result = 499, "error"  # the client went away
            raise
        finally:
            details: dict[str, object] = {
                "http_method": request.method, "endpoint": request.path, "status": status,
                "duration_ms": round((time.perf_counter() - started) * 1000, 2), "model": model,
                "token_id": credential.hint, "user_agent": request.headers.get("User-Agent"), "reason": reason,
                "upstream_status": upstream_status}
            spent = tap.result() if tap is not None and status in (200, 499) else None
            if spent is not None:
                self._cache.add_usage(credential, spent.prompt_tokens, spent.completion_tokens, spent.total_tokens)
                details.update(prompt_tokens=spent.prompt_tokens, completion_tokens=spent.completion_tokens,
                               total_tokens=spent.total_tokens, usage_estimated=spent.estimated or None)
            self._audit.emit("token.access", actor="client", result=result, project_id=credential.project.id,
                             request_id=request[REQUEST_ID], client_ip=request[CLIENT_IP], details=details)

    async def _body(self, request: web.Request
                    ) -> tuple[bytes | _CappedBody | None, dict[str, Any] | None, str | None]:
        if not request.body_exists:
            return None, None, None
        length = request.content_length
        if length is not None and length > self._max_body:
            raise PayloadTooLarge(f"request body exceeds {self._max_body} bytes")
        content_type = request.content_type
        if (content_type != "application/json" and not self._allowed_models
                and not request.path.startswith(usage.USAGE_ENDPOINTS)):
            return _CappedBody(request.content, self._max_body), None, None
        # JSON bodies are small and name the model (for the audit and ALLOWED_MODELS). With models
        # restricted, and on every metered endpoint, a body is read whatever it claims to be, so no
        # label can dodge the model check or the usage metering (the upstream reads JSON regardless).
        # Uploads to unmetered endpoints (audio, images) still stream through.
        body = await read_body(request, self._request_timeout)
        document = None
        if content_type == "multipart/form-data":
            model = _multipart_model(request.headers.get("Content-Type", ""), body)
        else:
            document = _json_object(body)
            if document is not None:
                _refuse_repeated_decided_keys(body)
            model = document.get("model") if document is not None else None
            model = model if isinstance(model, str) else None
        if self._allowed_models:
            if model is None:
                raise BadRequest("while ALLOWED_MODELS is set, the body must be JSON or multipart/form-data "
                                 "naming a `model`", param="model")
            if not any(fnmatch.fnmatchcase(model, pattern) for pattern in self._allowed_models):
                raise ModelNotAllowed(f"model {model!r} is not allowed", param="model")
        return body, document, model

    async def _forward(self, request: web.Request, url: URL, body: bytes | _CappedBody | None,
                       tap: usage.UsageTap | None) -> web.StreamResponse:
        assert self.session is not None
        connection = request.headers.get("Connection")
        # Headers the client named in Connection are hop-by-hop too.
        deny = REQUEST_DENY | {name.strip().lower() for name in connection.split(",")} if connection else REQUEST_DENY
        headers = [(name, value) for name, value in request.headers.items()
                   if (lowered := name.lower()) not in deny and not lowered.startswith("x-forwarded-")]
        headers += (("Authorization", request[CREDENTIAL].project.authorization), ("Accept-Encoding", "identity"))
        sent = time.perf_counter()
        deadline = _Deadline(self._loop, self._request_timeout)
        try:
            upstream = await self.session.request(request.method, url, headers=headers, data=body,
                                                  allow_redirects=False)
        except asyncio.CancelledError:
            if not deadline.settle():
                raise  # the client went away (or the server is stopping), not our deadline
            raise self._timed_out(body) from None
        except TimeoutError:  # aiohttp's own connect/read timeouts
            raise self._timed_out(body) from None
        except aiohttp.ClientError as exc:
            # aiohttp wraps what the body generator raised; a cut-off upload is the client's fault.
            if isinstance(exc.__cause__, _BodyTooLarge) or isinstance(exc, _BodyTooLarge):
                raise PayloadTooLarge(f"request body exceeds {self._max_body} bytes") from None
            log.warning("upstream request failed: %s", type(exc).__name__)
            raise UpstreamUnavailable() from None
        finally:
            deadline.settle()  # whatever happened, the timer must not outlive the await it guards
        answered = time.perf_counter()
        self._metrics.upstream_latency.observe(answered - sent)
        try:
            if upstream.status in CREDENTIALS_REFUSED:
                raise self._credentials_refused(request, upstream.status)
            if tap is not None and (upstream.status != 200 or not tap.begin(upstream.content_type)):
                tap.stop()  # errors and answers of other types are relayed untouched and not metered
                tap = None
            return await self._relay(request, upstream, sent, answered, tap)
        finally:
            upstream.close()

    def _credentials_refused(self, request: web.Request, status: int) -> UpstreamAuthFailed:
        """Say (to the operator, once a minute per project) that the upstream refused a project's key."""
        project_id = request[CREDENTIAL].project.id
        now = self._loop.time()
        if now >= self._refusals_logged.get(project_id, 0.0):
            self._refusals_logged[project_id] = now + _REFUSAL_LOG_INTERVAL
            log.error("the upstream refused the API key of project %s (status %d): its requests fail with 502 "
                      "upstream_auth_failed until the key is replaced (PATCH /manage/projects/%s api_key)",
                      project_id, status, project_id)
        # The upstream's body is never relayed: it may quote part of the key.
        return UpstreamAuthFailed(status, headers={"x-should-retry": "false"})

    @staticmethod
    def _timed_out(body: bytes | _CappedBody | None) -> ApiError:
        if isinstance(body, _CappedBody) and not body.finished:
            return RequestTimeout()  # the client, not the upstream, was too slow
        return UpstreamTimeout()

    async def _relay(self, request: web.Request, upstream: aiohttp.ClientResponse, sent: float,
                     answered: float, tap: usage.UsageTap | None) -> web.StreamResponse:
        headers: CIMultiDict[str] = CIMultiDict()
        for name, value in upstream.headers.items():
            lowered = name.lower()
            # The gateway alone decides CORS: the upstream's own Access-Control-* never pass.
            if lowered not in RESPONSE_DENY and not lowered.startswith("access-control-"):
                headers.add(name, value)
        if "X-Request-ID" in upstream.headers:
            headers["X-Upstream-Request-ID"] = upstream.headers["X-Request-ID"]
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
            return await self._relay_whole(request, upstream, headers, sent, tap)
        response = web.StreamResponse(status=upstream.status, reason=upstream.reason, headers=headers)
        if not streamed and length is not None and (tap is None or not tap.streamed):
            response.content_length = length
        await response.prepare(request)
        first, relayed = True, 0
        watch = _StallWatch(self._loop, self._idle, request.transport, self._metrics)
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



    async def _relay_whole(self, request: web.Request, upstream: aiohttp.ClientResponse, headers: CIMultiDict[str],
                           sent: float, tap: usage.UsageTap | None) -> web.Response:
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
        watch = _StallWatch(self._loop, self._idle, request.transport, self._metrics)
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


class _Deadline:
    """Cancel the running task `delay` seconds from now, unless settled first.

    asyncio.timeout() does this job for the one await per request that needs it (connect, upload
    and the upstream's headers) at several times the cost: a profile under load put it at ~15 µs
    of the event loop's time per request.
    """

    __slots__ = ("_cancelling", "_expired", "_fired", "_handle", "_settled", "_task")

    def __init__(self, loop: asyncio.AbstractEventLoop, delay: float) -> None:
        task = asyncio.current_task(loop)
        assert task is not None
        self._task = task
        self._cancelling = task.cancelling()
        self._expired = False
        self._settled = False
        self._fired = False
        self._handle = loop.call_later(delay, self._expire)

    def _expire(self) -> None:
        self._expired = True
        self._task.cancel()

    def settle(self) -> bool:
        """Stop the timer; True when it fired and its cancellation was the only one (it is then withdrawn).

        Idempotent: later calls return the first call's answer and withdraw nothing more.
        """
        if not self._settled:
            self._settled = True
            self._handle.cancel()
            self._fired = self._expired and self._task.uncancel() <= self._cancelling
        return self._fired


class _StallWatch:
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


class _BodyTooLarge(Exception):
    pass


class _CappedBody:
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
                raise _BodyTooLarge()
            yield chunk
        self.finished = True


def _json_object(body: bytes) -> dict[str, Any] | None:
    """Return a body's JSON object, or None when it is not one."""
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    return document if isinstance(document, dict) else None


# Keys whose values the gateway acts on: the model policy, metering and the usage event it hides.
_DECIDED_KEYS = ("model", "stream", "stream_options")
_DECIDED_KEY_TEXTS = tuple(f'"{key}"'.encode() for key in (*_DECIDED_KEYS, "include_usage"))


def _refuse_repeated_decided_keys(body: bytes) -> None:
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


def _multipart_model(content_type: str, body: bytes) -> str | None:
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
