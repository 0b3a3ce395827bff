"""The console's gate: the IP allow-list and throttle, the session, and for every POST our origin and its CSRF token.

One middleware, in this order, because each step relies on the one before: a blocked or unlisted
IP learns nothing else; a request with no live session is sent to sign-in (nothing runs for it); a
POST must come from a page of ours (its Origin and Sec-Fetch-Site say so) and carry the session's
CSRF token. Under `Referrer-Policy: no-referrer` Chromium sends `Origin: null` on our own form
posts, so `null` is accepted; an Origin naming another host, or `Sec-Fetch-Site: cross-site`, is
not. Errors become pages, never the API's JSON.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Callable
from typing import Any

import aiohttp_jinja2
from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from llm_proxy.audit.writer import AuditWriter
from llm_proxy.console.sessions import ConsoleSessions, Session
from llm_proxy.errors import ApiError, PermissionDenied
from llm_proxy.gateway.admission import IpBlock
from llm_proxy.gateway.context import CLIENT_IP, REQUEST_ID, ip_in
from llm_proxy.manage.auth import ManagementAuth
from llm_proxy.settings import IPNetwork

log = logging.getLogger(__name__)
SESSION = web.RequestKey("console_session", Session)
# Whether the browser speaks HTTPS to us (directly, or to a trusted proxy in front): Secure cookies then.
HTTPS = web.RequestKey("console_https", bool)
LOGIN_PATH = "/admin/login"
# Reachable without a session: the sign-in page, and the stylesheet and script it uses.
_OPEN = (LOGIN_PATH, "/admin/static/")


class CrossOrigin(PermissionDenied):
    code, message = "cross_origin", "this form was not sent from the console's own pages"


class BadCsrfToken(PermissionDenied):
    code, message = "csrf_failed", "the form's CSRF token does not match this session: reload the page and try again"


def https_detector(tls: bool, trusted_proxies: tuple[IPNetwork, ...]) -> Callable[[web.Request], bool]:
    """Build the test of whether the browser speaks HTTPS: the gateway's own TLS, or a proxy of
    TRUSTED_PROXIES that terminated TLS and says so (`X-Forwarded-Proto: https`); no one else is believed."""
    def speaks_https(request: web.Request) -> bool:
        if tls:
            return True
        proto = request.headers.get("X-Forwarded-Proto")
        return (proto is not None and proto.split(",")[0].strip().lower() == "https"
                and ip_in(request.remote or "", trusted_proxies))
    return speaks_https


def cookie_name(request: web.Request) -> str:
    """The session cookie's name: `__Host-` over HTTPS, so it is Secure, host-only and for the whole site."""
    return "__Host-llm_proxy_session" if request[HTTPS] else "llm_proxy_session"


def set_session_cookie(response: web.StreamResponse, request: web.Request, session_id: str) -> None:
    """Give the browser the session id: never readable by script, never sent by another site."""
    secure = request[HTTPS]
    response.set_cookie(cookie_name(request), session_id, path="/" if secure else "/admin", httponly=True,
                        secure=secure, samesite="Strict")


def clear_session_cookie(response: web.StreamResponse, request: web.Request) -> None:
    """Tell the browser to forget the session id."""
    secure = request[HTTPS]
    response.del_cookie(cookie_name(request), path="/" if secure else "/admin", secure=secure, httponly=True,
                        samesite="Strict")


def from_our_origin(request: web.Request) -> bool:
    """Tell whether a POST comes from a page of ours, as far as the browser says (a browser always says)."""
    if request.headers.get("Sec-Fetch-Site", "").lower() == "cross-site":
        return False
    origin = request.headers.get("Origin")
    if origin is None or origin == "null":
        return True
    scheme, _, host = origin.partition("://")
    return bool(host) and host.lower() == request.host.lower() and scheme in ("http", "https")


async def csrf_field(request: web.Request) -> str | None:
    """The CSRF token a form carries, or None."""
    form = await request.post()
    value = form.get("csrf")
    return value if isinstance(value, str) else None


def console_guard(sessions: ConsoleSessions, auth: ManagementAuth, ip_block: IpBlock, audit: AuditWriter, *,
                  speaks_https: Callable[[web.Request], bool]) -> Middleware:
    """Build the console's one middleware (see the module docstring for its order)."""
    @web.middleware
    async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
        request[HTTPS] = speaks_https(request)
        try:
            await ip_block.check(request, "management")
            auth.check_ip(request)
            if request.method == "POST" and not from_our_origin(request):
                raise CrossOrigin()
            if request.path == "/admin":
                raise web.HTTPPermanentRedirect("/admin/")
            if request.path.startswith(_OPEN):
                return await handler(request)
            session = await sessions.find(request.cookies.get(cookie_name(request)))
            if session is None:
                raise web.HTTPSeeOther(LOGIN_PATH)
            if request.method == "POST":
                presented = await csrf_field(request)
                if presented is None or not hmac.compare_digest(presented.encode("utf-8", "replace"),
                                                                session.csrf.encode()):
                    audit.emit("auth.failure", actor="management", result="denied", request_id=request[REQUEST_ID],
                               client_ip=request[CLIENT_IP],
                               details={"reason": "csrf_failed", "endpoint": request.path, "via": "console",
                                        "user_agent": request.headers.get("User-Agent")})
                    raise BadCsrfToken()
            request[SESSION] = session
            return await handler(request)
        except ApiError as exc:
            return error_page(request, exc.status, exc.message, exc.headers)
        except web.HTTPNotFound:
            return error_page(request, 404, "There is no such page.", {})
        except web.HTTPMethodNotAllowed as exc:
            return error_page(request, 405, "This page does not take that method.", dict(exc.headers))
        except web.HTTPException as exc:
            if exc.status < 400:
                raise  # redirects
            return error_page(request, exc.status, exc.reason, dict(exc.headers))  # e.g. 413, a static 403
        except Exception:
            log.exception("console: %s %s failed", request.method, request.path)
            return error_page(request, 500, "The gateway could not do this; its log says why.", {})

    return guard


def error_page(request: web.Request, status: int, message: str, headers: dict[str, Any]) -> web.Response:
    """Render the console's error page."""
    response = aiohttp_jinja2.render_template("error.html", request, {"status": status, "message": message},
                                              status=status)
    for name in ("Retry-After", "Allow"):
        if name in headers:
            response.headers[name] = str(headers[name])
    return response
