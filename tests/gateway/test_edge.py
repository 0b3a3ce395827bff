"""The edge middleware on a bare app: request context first, then CORS preflights, error bodies, and the count."""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from llm_proxy.errors import InvalidToken, RateLimited
from llm_proxy.gateway.context import CLIENT_IP, REQUEST_ID, REQUEST_STARTED
from llm_proxy.gateway.edge import edge_middleware
from llm_proxy.ops.metrics import Metrics
from llm_proxy.storage.errors import StorageBusy
from tests.fakes import bare_metrics

ORIGIN = "https://app.example.com"
Client = Callable[..., Awaitable[TestClient]]


async def _context(request: web.Request) -> web.Response:
    return web.json_response({"request_id": request[REQUEST_ID], "client_ip": request[CLIENT_IP],
                              "started": isinstance(request[REQUEST_STARTED], float)})


async def _needs_token(request: web.Request) -> web.Response:
    raise InvalidToken()


async def _rate_limited(request: web.Request) -> web.Response:
    raise RateLimited(headers={"Retry-After": "7"})


async def _redirect(request: web.Request) -> web.Response:
    raise web.HTTPFound("/elsewhere")


async def _locked(request: web.Request) -> web.Response:
    raise StorageBusy("database is locked")  # what the storage boundary makes of sqlite3's "locked"


async def _crash(request: web.Request) -> web.Response:
    raise RuntimeError("internal detail: /srv/secret/path")


@pytest.fixture
def make_client(aiohttp_client: Client) -> Callable[..., Awaitable[tuple[TestClient, Metrics]]]:
    async def make(**options: Any) -> tuple[TestClient, Metrics]:
        metrics = bare_metrics()
        app = web.Application(middlewares=[edge_middleware(metrics=metrics, **{
            "trusted_proxies": (), "cors_allowed_origins": (), **options})])
        app.router.add_get("/context", _context)
        app.router.add_route("*", "/v1/models", _needs_token)
        app.router.add_get("/limited", _rate_limited)
        app.router.add_get("/redirect", _redirect)
        app.router.add_get("/locked", _locked)
        app.router.add_get("/crash", _crash)
        return await aiohttp_client(app), metrics
    return make


async def test_context_is_set_before_the_handler(make_client: Any) -> None:
    client, _ = await make_client()

    chosen = await (await client.get("/context", headers={"X-Request-ID": "req-42"})).json()
    generated = await (await client.get("/context", headers={"X-Request-ID": "bad id with spaces"})).json()

    assert chosen == {"request_id": "req-42", "client_ip": "127.0.0.1", "started": True}
    assert len(generated["request_id"]) == 32 and generated["request_id"] != "bad id with spaces"


async def test_forwarded_for_is_believed_only_from_trusted_proxies(make_client: Any) -> None:
    client, _ = await make_client(trusted_proxies=(ipaddress.ip_network("127.0.0.0/8"),))

    seen = await (await client.get("/context", headers={"X-Forwarded-For": "203.0.113.7"})).json()

    assert seen["client_ip"] == "203.0.113.7"


@pytest.mark.parametrize(("path", "status", "code", "headers"), [
    ("/v1/models", 401, "invalid_token", {}),
    ("/limited", 429, "rate_limited", {"Retry-After": "7"}),
    ("/locked", 503, "overloaded", {"Retry-After": "5"}),
    ("/crash", 500, "internal_error", {}),
    ("/nowhere", 404, "not_found", {}),
])
async def test_failures_become_the_openai_error_body(make_client: Any, caplog: pytest.LogCaptureFixture,
                                                     path: str, status: int, code: str,
                                                     headers: dict[str, str]) -> None:
    client, _ = await make_client()
    with caplog.at_level(logging.ERROR, logger="llm_proxy.errors"):
        response = await client.get(path)
        body = await response.json()

    assert response.status == status and body["error"]["code"] == code
    assert set(body["error"]) <= {"message", "type", "code", "param"}
    assert "/srv/secret/path" not in str(body)
    for name, value in headers.items():
        assert response.headers[name] == value
    if path == "/crash":  # the operator gets the traceback, the client does not
        assert "RuntimeError" in caplog.text


async def test_method_not_allowed_keeps_its_allow_header(make_client: Any) -> None:
    client, _ = await make_client()
    response = await client.post("/context")
    assert response.status == 405 and (await response.json())["error"]["code"] == "method_not_allowed"
    assert "GET" in response.headers["Allow"]


async def test_redirects_pass_through(make_client: Any) -> None:
    client, _ = await make_client()
    response = await client.get("/redirect", allow_redirects=False)
    assert response.status == 302 and response.headers["Location"] == "/elsewhere"


async def test_every_answer_is_counted_by_route_family_and_status_class(make_client: Any) -> None:
    client, metrics = await make_client()
    for path in ("/context", "/v1/models", "/limited", "/crash", "/nowhere"):
        await client.get(path)

    assert metrics.requests["other", "2xx"] == 1
    assert metrics.requests["proxy", "4xx"] == 1
    assert metrics.requests["other", "4xx"] == 2
    assert metrics.requests["other", "5xx"] == 1


async def test_a_preflight_is_answered_before_the_handler_checks_credentials(make_client: Any) -> None:
    client, metrics = await make_client(cors_allowed_origins=(ORIGIN,))
    preflight = {"Origin": ORIGIN, "Access-Control-Request-Method": "POST"}

    allowed = await client.options("/v1/models", headers=preflight)
    refused = await client.options("/v1/models", headers={**preflight, "Origin": "https://evil.example"})
    plain_options = await client.options("/v1/models")  # not a preflight: the handler answers

    assert allowed.status == 204 and allowed.headers["Access-Control-Allow-Origin"] == ORIGIN
    assert refused.status == 403 and (await refused.json())["error"]["code"] == "cors_origin_not_allowed"
    assert plain_options.status == 401
    assert metrics.requests["proxy", "2xx"] == 1 and metrics.requests["proxy", "4xx"] == 2
