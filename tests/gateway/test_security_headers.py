"""Security headers on a bare app with only the hook (and the real error middleware), over real HTTP.

Then the whole gateway: every kind of answer carries them.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from llm_proxy.errors import InvalidToken
from llm_proxy.gateway.edge import edge_middleware
from llm_proxy.gateway.security_headers import is_management_path, response_hook, security_headers
from tests.fakes import assert_error, assert_security, bare_metrics, send

MANAGEMENT_ONLY = ("X-Frame-Options", "Referrer-Policy")


async def _json(request: web.Request) -> web.Response:
    return web.json_response({"ok": True})


async def _cached(request: web.Request) -> web.Response:
    return web.json_response({"ok": True}, headers={"Cache-Control": "public, max-age=60"})


async def _stream(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    for chunk in (b"data: 1\n\n", b"data: [DONE]\n\n"):
        await response.write(chunk)
    await response.write_eof()
    return response


async def _unauthorized(request: web.Request) -> web.Response:
    raise InvalidToken()


async def _crash(request: web.Request) -> web.Response:
    raise RuntimeError("boom")


def _routes() -> list[web.RouteDef]:
    return [web.get("/json", _json), web.get("/cached", _cached), web.get("/stream", _stream),
            web.get("/unauthorized", _unauthorized), web.get("/crash", _crash)]


def make_app(*, hsts_max_age: int | None = None, with_hook: bool = True) -> web.Application:
    """Mirror production: the hook on the root app (there, one step of create_app's one hook), /manage a sub-app."""
    app = web.Application(middlewares=[edge_middleware(trusted_proxies=(), cors_allowed_origins=(),
                                                       metrics=bare_metrics())])
    if with_hook:
        app.on_response_prepare.append(response_hook(security_headers(hsts_max_age=hsts_max_age)))
    app.add_routes([*_routes(), web.get("/managex", _cached)])
    manage = web.Application()
    manage.add_routes(_routes())
    app.add_subapp("/manage", manage)
    return app


async def _raw_get(client: TestClient[Any, Any], path: str) -> tuple[str, list[tuple[str, str]]]:
    """Send a GET over a bare socket; return the status line and the header lines exactly as sent."""
    assert client.server.port is not None
    reader, writer = await asyncio.open_connection(client.server.host, client.server.port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".encode())
    await writer.drain()
    data = await reader.read()
    writer.close()
    await writer.wait_closed()
    status_line, *lines = data.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
    return status_line, [(name.strip(), value.strip()) for name, value in (line.split(":", 1) for line in lines)]


ALL_PATHS = ["/json", "/cached", "/stream", "/unauthorized", "/crash", "/missing",
             "/manage/json", "/manage/stream", "/manage/unauthorized", "/manage/crash", "/manage/missing"]


@pytest.mark.parametrize("path", ALL_PATHS)
async def test_every_response_is_nosniff_and_has_no_server_header(aiohttp_client: Any, path: str) -> None:
    client = await aiohttp_client(make_app())

    response = await client.get(path)
    await response.read()

    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert "Server" not in response.headers


@pytest.mark.parametrize("path", ["/json", "/stream", "/unauthorized", "/crash", "/missing", "/manage/stream"])
async def test_server_header_is_absent_on_the_wire(aiohttp_client: Any, path: str) -> None:
    client = await aiohttp_client(make_app())

    status_line, headers = await _raw_get(client, path)

    assert status_line.startswith("HTTP/1.1 ")
    assert [name for name, _ in headers if name.lower() == "server"] == []
    assert ("X-Content-Type-Options", "nosniff") in headers


async def test_without_the_hook_aiohttp_announces_its_version(aiohttp_client: Any) -> None:
    """The control: the raw reader does see aiohttp's Server header when nothing removes it."""
    client = await aiohttp_client(make_app(with_hook=False))

    _, headers = await _raw_get(client, "/json")

    assert next(value for name, value in headers if name.lower() == "server").startswith("Python/")


async def test_unhandled_exception_without_error_middleware_still_gets_headers(aiohttp_client: Any) -> None:
    app = web.Application()
    app.on_response_prepare.append(response_hook(security_headers(hsts_max_age=None)))
    app.router.add_get("/manage/crash", _crash)
    client = await aiohttp_client(app)

    status_line, headers = await _raw_get(client, "/manage/crash")

    assert status_line == "HTTP/1.1 500 Internal Server Error"
    assert [name for name, _ in headers if name.lower() == "server"] == []
    assert ("Cache-Control", "no-store") in headers


@pytest.mark.parametrize("path", ["/manage/json", "/manage/cached", "/manage/stream", "/manage/unauthorized",
                                  "/manage/crash", "/manage/missing"])
async def test_management_responses_are_never_cached_framed_or_referred(aiohttp_client: Any, path: str) -> None:
    client = await aiohttp_client(make_app())

    response = await client.get(path)
    await response.read()

    assert response.headers.getall("Cache-Control") == ["no-store"]
    assert response.headers["X-Frame-Options"] == "DENY"
    assert response.headers["Referrer-Policy"] == "no-referrer"


@pytest.mark.parametrize(("path", "cache_control"), [
    ("/json", None), ("/stream", None), ("/unauthorized", None), ("/cached", "public, max-age=60"),
    ("/managex", "public, max-age=60"),
])
async def test_other_responses_keep_their_own_cache_control(aiohttp_client: Any, path: str,
                                                            cache_control: str | None) -> None:
    client = await aiohttp_client(make_app())

    response = await client.get(path)
    await response.read()

    assert response.headers.get("Cache-Control") == cache_control
    assert not any(name in response.headers for name in MANAGEMENT_ONLY)


@pytest.mark.parametrize("path", ["/json", "/stream", "/unauthorized", "/missing", "/manage/json"])
async def test_hsts_is_sent_when_serving_tls(aiohttp_client: Any, path: str) -> None:
    client = await aiohttp_client(make_app(hsts_max_age=31536000))

    response = await client.get(path)
    await response.read()

    assert response.headers["Strict-Transport-Security"] == "max-age=31536000"


@pytest.mark.parametrize("hsts_max_age", [None, 0])
async def test_hsts_is_not_sent_without_tls_or_when_off(aiohttp_client: Any, hsts_max_age: int | None) -> None:
    client = await aiohttp_client(make_app(hsts_max_age=hsts_max_age))

    response = await client.get("/json")

    assert "Strict-Transport-Security" not in response.headers


@pytest.mark.parametrize("hsts_max_age", [-1, True])
def test_nonsense_hsts_max_age_is_refused_at_setup(hsts_max_age: Any) -> None:
    with pytest.raises(ValueError, match="hsts_max_age"):
        security_headers(hsts_max_age=hsts_max_age)


@pytest.mark.parametrize(("path", "expected"), [
    ("/manage", True), ("/manage/", True), ("/manage/tokens/abc", True),
    ("/managex", False), ("/v1/manage/tokens", False), ("/", False), ("/Manage/tokens", False),
])
def test_management_paths(path: str, expected: bool) -> None:
    assert is_management_path(path) is expected


# ---- the whole gateway ----

async def test_security_headers_everywhere(gateway: Any) -> None:
    """From the fifth review (the management API's contract)."""
    token = await gateway.token()
    for method, path, auth, manage in (("GET", "/health", False, False), ("GET", "/ready", False, False),
                                       ("GET", "/metrics", True, False), ("GET", "/metrics", False, False),
                                       ("GET", "/nope", False, False), ("POST", "/health", False, False),
                                       ("GET", "/v1/nope", False, False), ("GET", "/manage/projects", False, True),
                                       ("HEAD", "/health", False, False), ("OPTIONS", "/manage/projects", True, True),
                                       ("GET", "/favicon.ico", False, False)):
        status, doc, headers = await send(gateway, method, path, auth=auth)
        assert_security(headers, manage)
        if status >= 400 and method != "HEAD":
            assert_error(doc)
    response = await gateway.client.post("/v1/chat/completions", headers={"Authorization": f"Bearer {token['token']}"},
                                         json={"model": "gpt-4o-mini", "stream": True,
                                               "messages": [{"role": "user", "content": "x"}]})
    await response.read()
    assert response.status == 200
    assert_security(response.headers, management=False)
