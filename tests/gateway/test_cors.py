"""CORS on a bare app shaped like the gateway: the middleware and hook at the root, an auth-like check inside /v1."""

from __future__ import annotations

from typing import Any

import pytest
from aiohttp import web
from aiohttp.typedefs import Handler

from llm_proxy.cors import EXPOSED_HEADERS, CorsPolicy, cors_headers, normalize_origin
from llm_proxy.edge import edge_middleware
from llm_proxy.errors import InvalidToken, RateLimited
from llm_proxy.security_headers import response_hook
from tests.fakes import bare_metrics

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
