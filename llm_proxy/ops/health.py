"""Liveness and readiness endpoints, open to anyone and revealing nothing."""

from __future__ import annotations

import orjson
from aiohttp import web

from llm_proxy import __version__
from llm_proxy.errors import error_body
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
