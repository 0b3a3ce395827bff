"""The one middleware every request passes through: its context, CORS preflights, OpenAI-shaped errors, its count."""

from __future__ import annotations

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from llm_proxy.errors import failure_response
from llm_proxy.gateway.context import request_context
from llm_proxy.gateway.cors import cors_preflight
from llm_proxy.ops.metrics import Metrics
from llm_proxy.settings import IPNetwork


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
