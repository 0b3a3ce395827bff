"""The operator's endpoints beside the API: /health and /ready (open, revealing nothing) and /metrics."""

from __future__ import annotations

import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from llm_proxy import __version__
from llm_proxy.errors import error_body
from llm_proxy.gateway.admission import IpBlock
from llm_proxy.manage.auth import ManagementAuth
from llm_proxy.ops.metrics import Metrics
from llm_proxy.storage.base import Store


def health_routes(store: Store) -> list[web.RouteDef]:
    """Return /health (the process answers) and /ready (the database answers too)."""

    async def health(request: web.Request) -> web.Response:
        return web.Response(body=orjson.dumps({"status": "ok", "version": __version__}),
                            content_type="application/json")

    async def ready(request: web.Request) -> web.Response:
        if await store.ping():
            return web.Response(body=b'{"status":"ready"}', content_type="application/json")
        return web.Response(status=503, content_type="application/json", headers={"Retry-After": "5"},
                            body=error_body("database is not answering", "server_error", "not_ready"))

    return [web.get("/health", health), web.get("/ready", ready)]


def metrics_route(metrics: Metrics, ip_block: IpBlock, auth: ManagementAuth) -> web.RouteDef:
    """Return GET /metrics: open to a management token, or to MANAGEMENT_ALLOWED_IPS when that is set."""

    async def handler(request: web.Request) -> web.Response:
        # The same checks, counting and audit as /manage, so /metrics is no side door for guessing
        # the management token; only the allow-list works differently (it opens, for scrapers).
        await ip_block.check(request, "management")
        if not auth.ip_listed(request):
            await auth.authenticate(request)
        return web.Response(body=metrics.render(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    return web.get("/metrics", handler, allow_head=False)
