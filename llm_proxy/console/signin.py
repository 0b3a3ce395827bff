"""Signing in to the console with a management token, and out; both audited (admin.login, admin.logout)."""

from __future__ import annotations

import aiohttp_jinja2
from aiohttp import web

from llm_proxy.audit.writer import AuditWriter
from llm_proxy.console.guard import LOGIN_PATH, SESSION, clear_session_cookie, cookie_name, set_session_cookie
from llm_proxy.console.sessions import ConsoleSessions
from llm_proxy.gateway.client_auth import rejection_details
from llm_proxy.gateway.context import CLIENT_IP, REQUEST_ID
from llm_proxy.limiting.base import FailureLimiter
from llm_proxy.manage.auth import ManagementTokens


class SignIn:
    """The sign-in page, its form, and signing out."""

    def __init__(self, sessions: ConsoleSessions, tokens: ManagementTokens, failures: FailureLimiter,
                 audit: AuditWriter) -> None:
        self._sessions = sessions
        self._tokens = tokens
        self._failures = failures
        self._audit = audit

    def routes(self) -> list[web.RouteDef]:
        return [web.get("/login", self.form, allow_head=False), web.post("/login", self.sign_in),
                web.post("/logout", self.sign_out)]

    async def form(self, request: web.Request) -> web.StreamResponse:
        if await self._sessions.find(request.cookies.get(cookie_name(request))) is not None:
            raise web.HTTPSeeOther("/admin/")
        return aiohttp_jinja2.render_template("login.html", request, {})

    async def sign_in(self, request: web.Request) -> web.StreamResponse:
        form = await request.post()
        presented = form.get("token")
        token = presented.strip() if isinstance(presented, str) else None
        details = {"via": "console", "user_agent": request.headers.get("User-Agent")}
        if not token or not self._tokens.accepts(token):
            # Counted toward the per-IP block, as a wrong token on /manage is: no side door for guessing.
            await self._failures.record_failure(request[CLIENT_IP])
            reason = "missing_credential" if not token else "invalid_management_token"
            self._audit.emit("admin.login", actor="management", result="failure", request_id=request[REQUEST_ID],
                             client_ip=request[CLIENT_IP], details={**rejection_details(request, reason, token),
                                                                   **details})
            return aiohttp_jinja2.render_template("login.html", request,
                                                  {"error": "That is not a management token of this gateway."},
                                                  status=401)
        old = request.cookies.get(cookie_name(request))
        if old:
            await self._sessions.end(old)  # a new id at every sign-in: a planted id never becomes a session
        session = await self._sessions.open(token)
        self._audit.emit("admin.login", actor="management", result="success", request_id=request[REQUEST_ID],
                         client_ip=request[CLIENT_IP], details=details)
        redirect = web.HTTPSeeOther("/admin/")
        set_session_cookie(redirect, request, session.id)
        raise redirect

    async def sign_out(self, request: web.Request) -> web.StreamResponse:
        await self._sessions.end(request[SESSION].id)
        self._audit.emit("admin.logout", actor="management", result="success", request_id=request[REQUEST_ID],
                         client_ip=request[CLIENT_IP],
                         details={"via": "console", "user_agent": request.headers.get("User-Agent")})
        redirect = web.HTTPSeeOther(LOGIN_PATH)
        clear_session_cookie(redirect, request)
        raise redirect
