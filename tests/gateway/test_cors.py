"""CORS on a bare app shaped like the gateway: the middleware and hook at the root, an auth-like check inside /v1.

Then the whole gateway: allowed and refused origins on errors, streams, preflights and IP refusals.
"""

from __future__ import annotations

from typing import Any

import pytest
from aiohttp import web
from aiohttp.typedefs import Handler

from llm_proxy.errors import InvalidToken, RateLimited
from llm_proxy.gateway.cors import EXPOSED_HEADERS, CorsPolicy, cors_headers
from llm_proxy.gateway.edge import edge_middleware
from llm_proxy.gateway.security_headers import response_hook
from llm_proxy.settings import normalize_origin
from tests.fakes import assert_error, assert_security, bare_metrics, send

APP_ORIGIN = "https://app.example.com"
CONFIGURED = (APP_ORIGIN, "http://localhost:3000")

ALLOWED = [APP_ORIGIN, "https://APP.Example.COM", "https://app.example.com:443", "http://localhost:3000"]
REFUSED = [
    "https://app.example.com.evil.com", "https://evil.com", "https://evilapp.example.com", "https://app.example.co",
    "https://sub.app.example.com", "http://app.example.com", "https://app.example.com:8443",
    "https://app.example.com/", "https://app.example.com@evil.com", "https://evil.com#https://app.example.com",
    "http://localhost:3001", "http://localhost", "null", "", "app.example.com", "*",
]
REQUESTED_HEADERS = "Authorization, Content-Type, X-Stainless-OS, x-stainless-retry-count, OpenAI-Beta, X-Evil"
ECHOED_HEADERS = "authorization, content-type, x-stainless-os, x-stainless-retry-count, openai-beta"


@web.middleware
async def require_bearer(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Stand-in for the /v1 token check: browsers never send Authorization on a preflight."""
    if not request.headers.get("Authorization", "").startswith("Bearer "):
        raise InvalidToken()
    return await handler(request)


async def _models(request: web.Request) -> web.Response:
    return web.json_response({"data": []})


async def _completion_stream(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    for chunk in (b"data: {}\n\n", b"data: [DONE]\n\n"):
        await response.write(chunk)
    await response.write_eof()
    return response


async def _rate_limited(request: web.Request) -> web.Response:
    raise RateLimited(headers={"Retry-After": "7"})


async def _crash(request: web.Request) -> web.Response:
    raise RuntimeError("boom")


async def _upstream_cors(request: web.Request) -> web.Response:
    """What the forwarder relays: the upstream's own CORS opinion, which must not survive."""
    return web.json_response({}, headers={"Access-Control-Allow-Origin": "*", "Vary": "Accept-Encoding",
                                          "Access-Control-Allow-Credentials": "true",
                                          "Access-Control-Expose-Headers": "X-Secret"})


def make_app(allowed_origins: tuple[str, ...]) -> web.Application:
    """Root: the edge middleware and a response hook with the CORS step, as create_app builds them; a /v1 sub-app
    raising auth errors."""
    app = web.Application(middlewares=[edge_middleware(trusted_proxies=(), cors_allowed_origins=allowed_origins,
                                                       metrics=bare_metrics())])
    app.on_response_prepare.append(response_hook(cors_headers(allowed_origins)))
    app.router.add_get("/health", _models)
    proxy = web.Application(middlewares=[require_bearer])
    proxy.add_routes([web.get("/models", _models), web.post("/chat/completions", _completion_stream),
                      web.get("/rate-limited", _rate_limited), web.get("/crash", _crash),
                      web.get("/upstream", _upstream_cors)])
    app.add_subapp("/v1", proxy)
    return app


def _cors_headers(response: Any) -> dict[str, str]:
    return {name.lower(): value for name, value in response.headers.items()
            if name.lower().startswith("access-control-")}


def _vary(response: Any) -> list[str]:
    return [part.strip().lower() for value in response.headers.getall("Vary", []) for part in value.split(",")]


AUTH = {"Authorization": "Bearer tok-test"}


@pytest.mark.parametrize("origin", ALLOWED)
async def test_allowed_origin_is_echoed_exactly_without_credentials(aiohttp_client: Any, origin: str) -> None:
    client = await aiohttp_client(make_app(CONFIGURED))

    response = await client.get("/v1/models", headers={**AUTH, "Origin": origin})

    assert response.status == 200
    assert _cors_headers(response) == {"access-control-allow-origin": origin,
                                       "access-control-expose-headers": EXPOSED_HEADERS}
    assert "origin" in _vary(response)


@pytest.mark.parametrize("origin", REFUSED)
async def test_other_origins_proceed_without_cors_headers(aiohttp_client: Any, origin: str) -> None:
    client = await aiohttp_client(make_app(CONFIGURED))

    response = await client.get("/v1/models", headers={**AUTH, "Origin": origin})

    assert response.status == 200
    assert _cors_headers(response) == {}
    assert "origin" in _vary(response)


async def test_request_without_origin_gets_no_cors_headers_but_varies(aiohttp_client: Any) -> None:
    client = await aiohttp_client(make_app(CONFIGURED))

    response = await client.get("/v1/models", headers=AUTH)

    assert _cors_headers(response) == {}
    assert _vary(response) == ["origin"]


@pytest.mark.parametrize(("path", "headers", "status"), [
    ("/v1/models", {}, 401),                        # raised by the inner auth middleware
    ("/v1/rate-limited", AUTH, 429),                # raised by the handler, with Retry-After
    ("/v1/crash", AUTH, 500),                       # an unexpected exception
    ("/v1/missing", AUTH, 404),                     # the router's own HTTPNotFound
    ("/health", {"Content-Type": "text/plain"}, 405),
])
async def test_error_responses_carry_cors_headers(aiohttp_client: Any, path: str, headers: dict[str, str],
                                                  status: int) -> None:
    client = await aiohttp_client(make_app(CONFIGURED))

    method = "PUT" if status == 405 else "GET"
    response = await client.request(method, path, headers={**headers, "Origin": APP_ORIGIN})

    assert response.status == status
    assert (await response.json())["error"]["code"]
    assert response.headers["Access-Control-Allow-Origin"] == APP_ORIGIN
    assert response.headers["Access-Control-Expose-Headers"] == EXPOSED_HEADERS
    assert "Access-Control-Allow-Credentials" not in response.headers


async def test_streamed_responses_carry_cors_headers(aiohttp_client: Any) -> None:
    client = await aiohttp_client(make_app(CONFIGURED))

    response = await client.post("/v1/chat/completions", headers={**AUTH, "Origin": APP_ORIGIN})

    assert await response.read() == b"data: {}\n\ndata: [DONE]\n\n"
    assert response.headers["Access-Control-Allow-Origin"] == APP_ORIGIN
    assert response.headers["Access-Control-Expose-Headers"] == EXPOSED_HEADERS


@pytest.mark.parametrize(("allowed_origins", "expected"), [
    (CONFIGURED, {"access-control-allow-origin": APP_ORIGIN, "access-control-expose-headers": EXPOSED_HEADERS}),
    (("*",), {"access-control-allow-origin": "*", "access-control-expose-headers": EXPOSED_HEADERS}),
    ((), {}),
])
async def test_upstream_cors_headers_never_pass_through(aiohttp_client: Any, allowed_origins: tuple[str, ...],
                                                        expected: dict[str, str]) -> None:
    client = await aiohttp_client(make_app(allowed_origins))

    response = await client.get("/v1/upstream", headers={**AUTH, "Origin": APP_ORIGIN})

    assert _cors_headers(response) == expected
    assert _vary(response)[0] == "accept-encoding"


@pytest.mark.parametrize("origin", ALLOWED)
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/models", "/manage/tokens", "/anything"])
async def test_preflight_from_allowed_origin_is_204(aiohttp_client: Any, origin: str, path: str) -> None:
    client = await aiohttp_client(make_app(CONFIGURED))

    response = await client.options(path, headers={"Origin": origin, "Access-Control-Request-Method": "POST",
                                                   "Access-Control-Request-Headers": REQUESTED_HEADERS})

    assert response.status == 204
    assert await response.read() == b""
    assert _cors_headers(response) == {
        "access-control-allow-origin": origin,
        "access-control-allow-methods": "GET, POST, PATCH, DELETE, OPTIONS",
        "access-control-allow-headers": ECHOED_HEADERS,
        "access-control-max-age": "600",
    }
    assert {"origin", "access-control-request-headers"} <= set(_vary(response))


async def test_preflight_without_requested_headers_allows_none(aiohttp_client: Any) -> None:
    client = await aiohttp_client(make_app(CONFIGURED))

    response = await client.options("/v1/models", headers={"Origin": APP_ORIGIN,
                                                           "Access-Control-Request-Method": "GET"})

    assert response.status == 204
    assert "Access-Control-Allow-Headers" not in response.headers


@pytest.mark.parametrize("origin", REFUSED)
async def test_preflight_from_other_origin_is_403_without_cors_headers(aiohttp_client: Any, origin: str) -> None:
    client = await aiohttp_client(make_app(CONFIGURED))

    response = await client.options("/v1/chat/completions", headers={
        "Origin": origin, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"})

    assert response.status == 403
    assert await response.json() == {"error": {"message": "origin is not allowed", "type": "permission_error",
                                               "code": "cors_origin_not_allowed"}}
    assert _cors_headers(response) == {}
    assert "origin" in _vary(response)  # a cache must not hand this refusal to an allowed origin


async def test_options_that_is_not_a_preflight_goes_to_the_router(aiohttp_client: Any) -> None:
    client = await aiohttp_client(make_app(CONFIGURED))

    response = await client.options("/health", headers={"Origin": APP_ORIGIN})

    assert response.status == 405
    assert response.headers["Access-Control-Allow-Origin"] == APP_ORIGIN


@pytest.mark.parametrize("origin", [APP_ORIGIN, "https://evil.com", "null", None])
async def test_wildcard_mode_allows_any_origin_without_credentials(aiohttp_client: Any, origin: str | None) -> None:
    client = await aiohttp_client(make_app(("*",)))
    origin_header = {} if origin is None else {"Origin": origin}

    response = await client.get("/v1/models", headers={**AUTH, **origin_header})
    error = await client.get("/v1/models", headers=origin_header)

    for answer in (response, error):
        assert _cors_headers(answer) == {"access-control-allow-origin": "*",
                                         "access-control-expose-headers": EXPOSED_HEADERS}
        assert "origin" not in _vary(answer)


async def test_wildcard_preflight_answers_star(aiohttp_client: Any) -> None:
    client = await aiohttp_client(make_app(("*",)))

    response = await client.options("/v1/chat/completions", headers={
        "Origin": "https://anyone.example", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": REQUESTED_HEADERS})

    assert response.status == 204
    assert response.headers["Access-Control-Allow-Origin"] == "*"
    assert response.headers["Access-Control-Allow-Headers"] == ECHOED_HEADERS
    assert "Access-Control-Allow-Credentials" not in response.headers


@pytest.mark.parametrize(("method", "path", "headers", "status"), [
    ("GET", "/v1/models", AUTH, 200),
    ("GET", "/v1/models", {}, 401),
    ("POST", "/v1/chat/completions", AUTH, 200),
    ("OPTIONS", "/health", {"Access-Control-Request-Method": "GET"}, 405),
    ("OPTIONS", "/v1/models", {"Access-Control-Request-Method": "GET"}, 401),
])
async def test_empty_config_means_no_cors_at_all(aiohttp_client: Any, method: str, path: str,
                                                 headers: dict[str, str], status: int) -> None:
    client = await aiohttp_client(make_app(()))

    response = await client.request(method, path, headers={**headers, "Origin": APP_ORIGIN})
    await response.read()

    assert response.status == status
    assert _cors_headers(response) == {}
    assert "origin" not in _vary(response)


@pytest.mark.parametrize(("origin", "normalized"), [
    ("https://app.example.com", "https://app.example.com:443"),
    ("HTTPS://App.Example.com:443", "https://app.example.com:443"),
    ("http://localhost:3000", "http://localhost:3000"),
    ("http://[::1]:8080", "http://[::1]:8080"),
    ("http://127.0.0.1", "http://127.0.0.1:80"),
    ("https://app.example.com/", None), ("https://a@b.com", None), ("https://a.com:0", None),
    ("https://a.com:65536", None), ("ftp://a.com", None), ("null", None), ("", None),
    ("https://a.com\n", None), ("https://a.com?x", None),
])
def test_normalize_origin(origin: str, normalized: str | None) -> None:
    assert normalize_origin(origin) == normalized


@pytest.mark.parametrize("bad", ["https://app.example.com/path", "ftp://app.example.com", "app.example.com"])
def test_unparsable_configured_origin_is_refused_at_setup(bad: str) -> None:
    with pytest.raises(ValueError, match="is not an origin"):
        CorsPolicy((APP_ORIGIN, bad))


# ---- the whole gateway ----

async def test_cors_allowed_origin_on_errors_and_streams(make_gateway: Any) -> None:
    """From the fifth review (the management API's contract)."""
    gw = await make_gateway(CORS_ALLOWED_ORIGINS=f"{APP_ORIGIN},http://localhost:3000")
    token = await gw.token()
    for method, path, auth in (("GET", "/manage/projects", False), ("GET", "/manage/nope", True),
                               ("PUT", "/manage/projects", True), ("GET", "/health", False), ("GET", "/nope", False),
                               ("GET", "/metrics", False), ("POST", "/manage/projects", True)):
        status, _doc, headers = await send(gw, method, path, auth=auth, headers={"Origin": APP_ORIGIN},
                                          body={} if method == "POST" else None)
        assert headers.get("Access-Control-Allow-Origin") == APP_ORIGIN, (method, path, status, dict(headers))
        assert "Origin" in headers.get("Vary", ""), (path, dict(headers))
        assert "Access-Control-Allow-Credentials" not in headers
        assert "X-Request-ID" in headers.get("Access-Control-Expose-Headers", "")
        assert_security(headers, path.startswith("/manage"))
    response = await gw.client.post("/v1/chat/completions", headers={"Authorization": f"Bearer {token['token']}",
                                                                     "Origin": APP_ORIGIN},
                                    json={"model": "gpt-4o-mini", "stream": True,
                                          "messages": [{"role": "user", "content": "x"}]})
    await response.read()
    assert response.headers.get("Access-Control-Allow-Origin") == APP_ORIGIN


async def test_cors_disallowed_origins_get_nothing(make_gateway: Any) -> None:
    """From the fifth review (the management API's contract)."""
    gw = await make_gateway(CORS_ALLOWED_ORIGINS=f"{APP_ORIGIN},http://localhost:3000")
    for origin in ("null", f"{APP_ORIGIN}/", "https://app.example.com:8443", "http://app.example.com",
                   "https://evil.com", "http://localhost:3001", "http://localhost", "https://app.example.com.evil.com",
                   "https://app.example.com:443/", "HTTPS://evil.com", "https://app.example.com:0",
                   "https://app.example.com:99999", "file://", "https://*.example.com"):
        status, doc, headers = await send(gw, "GET", "/manage/projects", headers={"Origin": origin})
        assert status == 200
        assert not [h for h in headers if h.lower().startswith("access-control-")], (origin, dict(headers))
        assert "Origin" in headers.get("Vary", ""), origin
        status, doc, headers = await send(gw, "OPTIONS", "/manage/projects", auth=False,
                                          headers={"Origin": origin, "Access-Control-Request-Method": "POST"})
        assert status == 403, (origin, status)
        assert_error(doc, "cors_origin_not_allowed")
        assert not [h for h in headers if h.lower().startswith("access-control-")], (origin, dict(headers))
        assert_security(headers, management=True)


async def test_cors_preflight_allowed(make_gateway: Any) -> None:
    """From the fifth review (the management API's contract)."""
    gw = await make_gateway(CORS_ALLOWED_ORIGINS=f"{APP_ORIGIN},http://localhost:3000")
    for origin, path in ((APP_ORIGIN, "/manage/projects"), ("http://localhost:3000", "/v1/chat/completions"),
                         ("https://APP.example.com", "/anything"), ("https://app.example.com:443", "/health")):
        status, doc, headers = await send(gw, "OPTIONS", path, auth=False,
                                          headers={"Origin": origin, "Access-Control-Request-Method": "PATCH",
                                                   "Access-Control-Request-Headers": "authorization, x-evil"})
        assert status == 204, (origin, path, status, doc)
        assert headers["Access-Control-Allow-Origin"] == origin
        assert "PATCH" in headers["Access-Control-Allow-Methods"]
        assert headers["Access-Control-Allow-Headers"] == "authorization"
        assert headers["Access-Control-Max-Age"] == "600"
        assert "Access-Control-Allow-Credentials" not in headers
        assert "Origin" in headers.get("Vary", "")
        assert_security(headers, path.startswith("/manage"))


async def test_cors_wildcard(make_gateway: Any) -> None:
    """From the fifth review (the management API's contract)."""
    gw = await make_gateway(CORS_ALLOWED_ORIGINS="*")
    for origin in ("null", "https://x.example"):
        status, _doc, headers = await send(gw, "OPTIONS", "/manage/tokens", auth=False,
                                          headers={"Origin": origin, "Access-Control-Request-Method": "POST"})
        assert status == 204 and headers["Access-Control-Allow-Origin"] == "*"
        assert "Access-Control-Allow-Credentials" not in headers
        status, _doc, headers = await send(gw, "GET", "/manage/tokens", auth=False, headers={"Origin": origin})
        assert status == 401 and headers["Access-Control-Allow-Origin"] == "*"


async def test_no_cors_config_means_no_cors_and_upstream_acao_stripped(make_gateway: Any, upstream: Any) -> None:
    """From the fifth review (the management API's contract)."""
    gw = await make_gateway()
    token = await gw.token()
    state, _ = upstream
    state.status = 418
    state.status_headers = {"Access-Control-Allow-Origin": "*", "Access-Control-Allow-Credentials": "true"}
    response = await gw.client.post("/v1/chat/completions", headers={"Authorization": f"Bearer {token['token']}",
                                                                     "Origin": APP_ORIGIN},
                                    json={"model": "gpt-4o-mini", "messages": []})
    await response.read()
    assert response.status == 418
    assert not [h for h in response.headers if h.lower().startswith("access-control-")], dict(response.headers)
    _status, _doc, headers = await send(gw, "OPTIONS", "/manage/projects", auth=False,
                                      headers={"Origin": APP_ORIGIN, "Access-Control-Request-Method": "POST"})
    assert not [h for h in headers if h.lower().startswith("access-control-")], dict(headers)


async def test_ip_refusals_carry_cors_security_and_openai_shape(make_gateway: Any) -> None:
    """From the fifth review (the management API's contract)."""
    gw = await make_gateway(CORS_ALLOWED_ORIGINS=APP_ORIGIN, MANAGEMENT_ALLOWED_IPS="10.0.0.0/8")
    status, doc, headers = await send(gw, "GET", "/manage/projects", headers={"Origin": APP_ORIGIN})
    assert status == 403, (status, doc)
    assert_error(doc, "ip_not_allowed")
    assert headers.get("Access-Control-Allow-Origin") == APP_ORIGIN
    assert_security(headers, management=True)
    gw2 = await make_gateway(CORS_ALLOWED_ORIGINS=APP_ORIGIN, IP_RATE_LIMIT="2", DATABASE_PATH=str(
        gw.settings.database_path) + "-2")
    for _ in range(3):
        await send(gw2, "GET", "/manage/projects", auth=False)
    status, doc, headers = await send(gw2, "GET", "/manage/projects", headers={"Origin": APP_ORIGIN})
    assert status == 429, (status, doc)
    assert_error(doc, "rate_limited")
    assert headers.get("Retry-After") and headers.get("Access-Control-Allow-Origin") == APP_ORIGIN
    assert_security(headers, management=True)
