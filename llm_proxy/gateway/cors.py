"""Answer CORS preflights and label responses for the configured browser origins (never with credentials)."""

from __future__ import annotations

import re
from collections.abc import Callable

from aiohttp import hdrs, web
from multidict import CIMultiDict

from llm_proxy.errors import PermissionDenied, error_body
from llm_proxy.settings import normalize_origin

ALLOWED_METHODS = "GET, POST, PATCH, DELETE, OPTIONS"
EXPOSED_HEADERS = "X-Request-ID, X-RateLimit-Limit, X-RateLimit-Remaining, Retry-After, X-LLM-Proxy-Overhead-Ms"
PREFLIGHT_MAX_AGE = "600"
# Bearer tokens, not cookies: a browser never needs Access-Control-Allow-Credentials here.
_SAFE_REQUEST_HEADERS = frozenset({"authorization", "content-type", "x-request-id", "openai-organization",
                                   "openai-project", "openai-beta"})
# The openai JS SDK sends a family of x-stainless-* headers (lang, os, arch, retry-count, …).
_SDK_HEADER = re.compile(r"x-stainless-[a-z0-9-]+")


class CorsPolicy:
    """Which Origin may read the gateway's responses, decided once from the configured list."""

    def __init__(self, allowed_origins: tuple[str, ...]) -> None:
        self.enabled = bool(allowed_origins)
        self.wildcard = "*" in allowed_origins
        origins = set()
        for origin in allowed_origins:
            if origin == "*":
                continue
            normalized = normalize_origin(origin)
            if normalized is None:
                raise ValueError(f"{origin!r} is not an origin such as https://app.example.com")
            origins.add(normalized)
        self._origins = frozenset(origins)

    def allow_origin(self, origin: str | None) -> str | None:
        """Return the Access-Control-Allow-Origin value for this request's Origin, or None to send none."""
        if self.wildcard:
            return "*"
        if origin is not None and normalize_origin(origin) in self._origins:
            return origin
        return None


class _PreflightResponse(web.Response):
    """A preflight answer, complete as built; the response hook leaves it alone."""


def cors_preflight(allowed_origins: tuple[str, ...]) -> Callable[[web.Request], web.Response | None]:
    """Build the check answering a CORS preflight (204 for allowed origins, 403 otherwise); None for other requests."""
    policy = CorsPolicy(allowed_origins)

    def preflight(request: web.Request) -> web.Response | None:
        headers = request.headers
        if not (policy.enabled and request.method == hdrs.METH_OPTIONS and hdrs.ORIGIN in headers
                and hdrs.ACCESS_CONTROL_REQUEST_METHOD in headers):
            return None
        allow_origin = policy.allow_origin(headers[hdrs.ORIGIN])
        if allow_origin is None:
            # Vary: a cache must not serve this refusal to a preflight from an allowed origin.
            return _PreflightResponse(
                status=403, content_type="application/json", headers={hdrs.VARY: hdrs.ORIGIN},
                body=error_body("origin is not allowed", PermissionDenied.type, "cors_origin_not_allowed"))
        answer = CIMultiDict({
            hdrs.ACCESS_CONTROL_ALLOW_ORIGIN: allow_origin,
            hdrs.ACCESS_CONTROL_ALLOW_METHODS: ALLOWED_METHODS,
            hdrs.ACCESS_CONTROL_MAX_AGE: PREFLIGHT_MAX_AGE,
            hdrs.VARY: (hdrs.ACCESS_CONTROL_REQUEST_HEADERS if policy.wildcard
                        else f"{hdrs.ORIGIN}, {hdrs.ACCESS_CONTROL_REQUEST_HEADERS}"),
        })
        allowed_headers = _safe_request_headers(headers.get(hdrs.ACCESS_CONTROL_REQUEST_HEADERS, ""))
        if allowed_headers:
            answer[hdrs.ACCESS_CONTROL_ALLOW_HEADERS] = allowed_headers
        return _PreflightResponse(status=204, headers=answer)

    return preflight


def cors_headers(allowed_origins: tuple[str, ...]) -> Callable[[web.Request, web.StreamResponse], None]:
    """Build the step labelling a response for the request's Origin (run just before it is sent)."""
    policy = CorsPolicy(allowed_origins)

    def add_cors_headers(request: web.Request, response: web.StreamResponse) -> None:
        if isinstance(response, _PreflightResponse):
            return
        headers = response.headers
        # The gateway alone decides CORS: an upstream's own Access-Control-* (the OpenAI API sends
        # `*`) must not reach the browser, and credentials are never allowed.
        for name in [name for name in headers if name.lower().startswith("access-control-")]:
            headers.popall(name, None)
        if not policy.enabled:
            return
        if not policy.wildcard:
            # Caches must not hand one origin's answer (or a no-CORS answer) to another origin.
            _add_vary(headers, hdrs.ORIGIN)
        allow_origin = policy.allow_origin(request.headers.get(hdrs.ORIGIN))
        if allow_origin is not None:
            headers[hdrs.ACCESS_CONTROL_ALLOW_ORIGIN] = allow_origin
            headers[hdrs.ACCESS_CONTROL_EXPOSE_HEADERS] = EXPOSED_HEADERS

    return add_cors_headers


def _safe_request_headers(requested: str) -> str:
    names = dict.fromkeys(name.strip().lower() for name in requested.split(","))
    return ", ".join(name for name in names if name in _SAFE_REQUEST_HEADERS or _SDK_HEADER.fullmatch(name))


def _add_vary(headers: CIMultiDict[str], name: str) -> None:
    present = [part.strip() for value in headers.getall(hdrs.VARY, ()) for part in value.split(",") if part.strip()]
    if "*" in present or name.lower() in (part.lower() for part in present):
        return
    headers[hdrs.VARY] = ", ".join([*present, name])
