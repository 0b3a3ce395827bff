"""Set the security headers every response carries, streamed and error responses included."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import hdrs, web

ResponseHook = Callable[[web.Request, web.StreamResponse], Awaitable[None]]
HeaderStep = Callable[[web.Request, web.StreamResponse], None]

# Management answers hold tokens, keys and audit data: never stored, framed or leaked via Referer.
_MANAGEMENT_HEADERS = {
    hdrs.CACHE_CONTROL: "no-store",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
}


# The console's pages (SPEC §8): everything from our own origin, nothing inline, never framed or cached.
CONSOLE_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
               "form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
_CONSOLE_HEADERS = {**_MANAGEMENT_HEADERS, "Content-Security-Policy": CONSOLE_CSP}


def is_console_path(path: str) -> bool:
    """Tell whether a request path belongs to the admin console."""
    return path == "/admin" or path.startswith("/admin/")


def is_management_path(path: str) -> bool:
    """Tell whether a request path belongs to the management API."""
    return path == "/manage" or path.startswith("/manage/")


def response_hook(*steps: HeaderStep) -> ResponseHook:
    """Run several header steps as one on_response_prepare hook (one coroutine per response, not one per step)."""
    async def hook(request: web.Request, response: web.StreamResponse) -> None:
        for step in steps:
            step(request, response)
    return hook


def security_headers(*, hsts_max_age: int | None) -> HeaderStep:
    """Build the step setting the security headers; pass hsts_max_age=None (or 0) when not serving TLS."""
    if hsts_max_age is not None and (isinstance(hsts_max_age, bool) or hsts_max_age < 0):
        raise ValueError(f"hsts_max_age must be a non-negative int or None, not {hsts_max_age!r}")
    # No includeSubDomains: the gateway cannot know that every sibling host of its name speaks HTTPS.
    hsts = f"max-age={hsts_max_age}" if hsts_max_age else None

    def add_security_headers(request: web.Request, response: web.StreamResponse) -> None:
        headers = response.headers
        # aiohttp adds `Server: Python/3.x aiohttp/3.x` in _prepare_headers, which runs just
        # before on_response_prepare, so removing it here keeps versions off the wire.
        headers.popall(hdrs.SERVER, None)
        headers["X-Content-Type-Options"] = "nosniff"
        if hsts is not None:
            headers[hdrs.STRICT_TRANSPORT_SECURITY] = hsts
        if is_management_path(request.path):
            headers.update(_MANAGEMENT_HEADERS)
        elif is_console_path(request.path):
            headers.update(_CONSOLE_HEADERS)

    return add_security_headers
