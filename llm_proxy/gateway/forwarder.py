"""Forward an admitted /v1 request to the upstream with the project's key and stream the answer back."""

from __future__ import annotations

import asyncio
import fnmatch
import logging
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
from aiohttp import web
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
from llm_proxy.gateway.bodies import (
    BodyTooLarge,
    CappedBody,
    json_object,
    multipart_model,
    read_body,
    refuse_repeated_decided_keys,
)
from llm_proxy.gateway.client_auth import CREDENTIAL
from llm_proxy.gateway.context import CLIENT_IP, REQUEST_ID
from llm_proxy.gateway.headers import upstream_headers
from llm_proxy.gateway.relay import UPSTREAM_BROKEN, Relay
from llm_proxy.models import Credential
from llm_proxy.ops.metrics import Metrics
from llm_proxy.settings import Settings

log = logging.getLogger(__name__)

# Anything that could walk the upstream path out of /v1 once decoded or normalised.
_URL_CACHE_SIZE = 4096
# The upstream refusing the project's key: its answer is about the operator's credentials, not the
# client's token, and OpenAI's own message shows part of the key ("Incorrect API key provided: sk-…").
CREDENTIALS_REFUSED = frozenset({401, 403})
_REFUSAL_LOG_INTERVAL = 60.0  # per project: one line a minute says it all, a line per request floods
_UNSAFE_PATH = re.compile(r"%2e|%2f|%5c|\\|//|/\.\.?(/|$)", re.IGNORECASE)


class Forwarder:
    """The /v1 handler: validates the path and body, then streams request and response through."""

    def __init__(self, settings: Settings, audit: AuditWriter, metrics: Metrics,
                 refund: Callable[[Credential], Awaitable[None]],
                 add_usage: Callable[[Credential, int, int, int], None]) -> None:
        self.session: aiohttp.ClientSession | None = None
        self._loop: asyncio.AbstractEventLoop  # set with the session, in the running loop
        self._refund = refund
        self._add_usage = add_usage
        self._audit = audit
        self._metrics = metrics
        self._upstream = settings.openai_api_url
        self._allowed = settings.allowed_endpoints
        self._allowed_models = settings.allowed_models
        self._max_body = settings.max_request_size
        self._request_timeout = settings.request_timeout
        self._relay = Relay(settings.stream_idle_timeout, metrics)
        self._urls: dict[str, URL] = {}
        self._refusals_logged: dict[str, float] = {}  # project id -> when its key's refusal was last logged
        self._timeout = aiohttp.ClientTimeout(total=None, sock_connect=settings.request_timeout,
                                              sock_read=settings.stream_idle_timeout)

    def new_session(self, max_connections: int) -> aiohttp.ClientSession:
        """Create the one upstream session: no cookies kept, bytes passed through undecoded."""
        # Kept for the per-request timers: asyncio.get_running_loop() costs a getpid(2) each time on 3.11.
        self._loop = self._relay.loop = asyncio.get_running_loop()
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
                self._add_usage(credential, spent.prompt_tokens, spent.completion_tokens, spent.total_tokens)
                details.update(prompt_tokens=spent.prompt_tokens, completion_tokens=spent.completion_tokens,
                               total_tokens=spent.total_tokens, usage_estimated=spent.estimated or None)
            self._audit.emit("token.access", actor="client", result=result, project_id=credential.project.id,
                             request_id=request[REQUEST_ID], client_ip=request[CLIENT_IP], details=details)

    async def _body(self, request: web.Request
                    ) -> tuple[bytes | CappedBody | None, dict[str, Any] | None, str | None]:
        if not request.body_exists:
            return None, None, None
        length = request.content_length
        if length is not None and length > self._max_body:
            raise PayloadTooLarge(f"request body exceeds {self._max_body} bytes")
        content_type = request.content_type
        if (content_type != "application/json" and not self._allowed_models
                and not request.path.startswith(usage.USAGE_ENDPOINTS)):
            return CappedBody(request.content, self._max_body), None, None
        # JSON bodies are small and name the model (for the audit and ALLOWED_MODELS). With models
        # restricted, and on every metered endpoint, a body is read whatever it claims to be, so no
        # label can dodge the model check or the usage metering (the upstream reads JSON regardless).
        # Uploads to unmetered endpoints (audio, images) still stream through.
        body = await read_body(request, self._request_timeout)
        document = None
        if content_type == "multipart/form-data":
            model = multipart_model(request.headers.get("Content-Type", ""), body)
        else:
            document = json_object(body)
            if document is not None:
                refuse_repeated_decided_keys(body)
            model = document.get("model") if document is not None else None
            model = model if isinstance(model, str) else None
        if self._allowed_models:
            if model is None:
                raise BadRequest("while ALLOWED_MODELS is set, the body must be JSON or multipart/form-data "
                                 "naming a `model`", param="model")
            if not any(fnmatch.fnmatchcase(model, pattern) for pattern in self._allowed_models):
                raise ModelNotAllowed(f"model {model!r} is not allowed", param="model")
        return body, document, model

    async def _forward(self, request: web.Request, url: URL, body: bytes | CappedBody | None,
                       tap: usage.UsageTap | None) -> web.StreamResponse:
        assert self.session is not None
        headers = upstream_headers(request, request[CREDENTIAL].project.authorization)
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
            if isinstance(exc.__cause__, BodyTooLarge) or isinstance(exc, BodyTooLarge):
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
            return await self._relay.send(request, upstream, sent, answered, tap)
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
    def _timed_out(body: bytes | CappedBody | None) -> ApiError:
        if isinstance(body, CappedBody) and not body.finished:
            return RequestTimeout()  # the client, not the upstream, was too slow
        return UpstreamTimeout()

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


