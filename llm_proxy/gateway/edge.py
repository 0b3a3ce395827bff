"""The one middleware every request passes through: its context, CORS preflights, OpenAI-shaped errors, its count."""

from __future__ import annotations

import logging

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from llm_proxy.errors import ApiError, DatabaseUnavailable, Overloaded, error_body, error_response
from llm_proxy.gateway.context import REQUEST_ID, request_context
from llm_proxy.gateway.cors import cors_preflight
from llm_proxy.ops.metrics import Metrics
from llm_proxy.settings import IPNetwork
from llm_proxy.storage.errors import StorageBusy, StorageError, StorageUnavailable

log = logging.getLogger(__name__)


def edge_middleware(*, trusted_proxies: tuple[IPNetwork, ...], cors_allowed_origins: tuple[str, ...],
                    metrics: Metrics) -> Middleware:
    """Build the outermost middleware; its steps run in this order:

    1. request context: every later step, and every error body and audit event, needs the request
       id and the resolved client IP;
    2. CORS preflight, answered before any credential check (a browser preflight never carries
       Authorization); CORS headers on real responses come from the response hook, because only a
       hook reaches streamed responses;
    3. the handler (for /manage, the sub-application's own credential middlewares first); whatever
       it raises becomes an OpenAI error body;
    4. the count in llm_proxy_requests_total, of the status the client really gets.

    One middleware rather than four: on /v1 each extra layer is another coroutine on every request.
    """
    set_context = request_context(trusted_proxies)
    preflight = cors_preflight(cors_allowed_origins) if cors_allowed_origins else None

    @web.middleware
    async def edge(request: web.Request, handler: Handler) -> web.StreamResponse:
        set_context(request)
        try:
            answer = preflight(request) if preflight is not None else None
            response = answer if answer is not None else await handler(request)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            response = failure_response(request, exc)
        except Exception as exc:
            response = failure_response(request, exc)
        metrics.count_response(request.path, response.status)
        return response

    return edge


_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}


def failure_response(request: web.Request, exc: Exception) -> web.Response:
    """Map what a handler raised to the OpenAI error body; nothing internal reaches the client.

    Call it from the `except` clause that caught `exc` (unexpected errors are logged with their
    traceback); an HTTPException below 400 (a redirect) is the caller's to re-raise.
    """
    if isinstance(exc, ApiError):
        return error_response(exc)
    if isinstance(exc, web.HTTPException):
        headers = {k: v for k, v in exc.headers.items() if k in ("Allow", "Retry-After")}
        type_ = "invalid_request_error" if exc.status < 500 else "server_error"
        code = _HTTP_CODES.get(exc.status, f"http_{exc.status}")
        return web.Response(status=exc.status, headers=headers, content_type="application/json",
                            body=error_body(exc.reason.lower(), type_, code))
    if isinstance(exc, StorageBusy):
        # Another process held the database past the busy timeout: a retryable condition.
        log.warning("database busy past its timeout (request_id=%s)", request.get(REQUEST_ID))
        return error_response(Overloaded("the database is busy; retry shortly", headers={"Retry-After": "5"}))
    if isinstance(exc, StorageUnavailable):
        # The database is down or unreachable (PostgreSQL restarting, a network partition): retryable,
        # and logged by whoever notices first in the process (the audit writer, the counter flusher).
        return error_response(DatabaseUnavailable(headers={"Retry-After": "5"}))
    log.exception("unhandled %s (request_id=%s)",
                  "database error" if isinstance(exc, StorageError) else "error", request.get(REQUEST_ID))
    return error_response(ApiError())
