"""The console's Projects and Tokens pages: thin handlers over the management API's service, audited alike.

Every change is a POST answered by a redirect back to its page (so a reload repeats nothing), except
creating or refreshing a token: that answer shows the plaintext, once, and is never stored (no-store).
A change writes the audit event the management API writes, with `details.via: "console"`.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp_jinja2
from aiohttp import web

from llm_proxy.audit.events import Action, Result
from llm_proxy.audit.writer import AuditWriter
from llm_proxy.console.forms import form_bool, form_int, form_text
from llm_proxy.console.guard import SESSION, error_page
from llm_proxy.console.sessions import ConsoleSessions
from llm_proxy.errors import ApiError, Conflict
from llm_proxy.gateway.context import CLIENT_IP, REQUEST_ID
from llm_proxy.manage.api import refused
from llm_proxy.manage.validation import API_KEY_MAX_LENGTH, LIMIT_MAX, MAX_GRACE_SECONDS, NAME_MAX_LENGTH
from llm_proxy.settings import Settings
from llm_proxy.tokens.cache import TokenCache
from llm_proxy.tokens.service import IssuedToken, Limits, TokenService

Change = Callable[[dict[str, Any]], Awaitable[web.StreamResponse]]
# What a redirect after a change says; the query names a message, never carries text of its own.
NOTICES = {"created": "Created.", "renamed": "Renamed.", "key": "Upstream key replaced.",
           "activated": "Activated.", "deactivated": "Deactivated.", "revoked": "Revoked.",
           "limits": "Limits saved.", "paused": "Paused.", "resumed": "Resumed."}


def page(request: web.Request, template: str, context: dict[str, Any], status: int = 200) -> web.Response:
    """Render a console page: the session's CSRF token and the notice named in the query are always there."""
    notice = NOTICES.get(request.query.get("done", ""))
    return aiohttp_jinja2.render_template(template, request, {
        **context, "csrf": request[SESSION].csrf, "notice": notice, "path": request.path}, status=status)


class FormAlreadySent(Conflict):
    code = "form_already_sent"
    message = ("this form was already sent (a reload?): the token it made is on the Tokens page, and its "
               "plaintext is not shown again; create another if you need one")


class Pages:
    """Projects and Tokens."""

    def __init__(self, settings: Settings, service: TokenService, cache: TokenCache, audit: AuditWriter,
                 sessions: ConsoleSessions) -> None:
        self._sessions = sessions
        self._settings = settings
        self._service = service
        self._cache = cache
        self._audit = audit

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get("/projects", self.projects, allow_head=False),
            web.post("/projects", self.create_project),
            web.get("/projects/{id}", self.project, allow_head=False),
            web.post("/projects/{id}", self.change_project),
            web.post("/projects/{id}/revoke-tokens", self.revoke_project_tokens),
            web.get("/tokens", self.tokens, allow_head=False),
            web.post("/tokens", self.create_token),
            web.get("/tokens/{id}", self.token, allow_head=False),
            web.post("/tokens/{id}", self.change_token),
            web.post("/tokens/{id}/revoke", self.revoke_token),
            web.post("/tokens/{id}/refresh", self.refresh_token),
        ]

    # ---- projects ----

    async def projects(self, request: web.Request) -> web.StreamResponse:
        search = request.query.get("q", "").strip()
        projects = await self._service.projects()
        if search:
            projects = [project for project in projects if search.casefold() in project.name.casefold()]
        return page(request, "projects.html", {"projects": projects, "search": search})

    async def create_project(self, request: web.Request) -> web.StreamResponse:
        form = await request.post()

        async def create(details: dict[str, Any]) -> web.StreamResponse:
            name = form_text(form, "name", NAME_MAX_LENGTH)
            project = await self._service.create_project(name, form_text(form, "api_key", API_KEY_MAX_LENGTH))
            details.update(project_id=project.id, name=project.name)
            raise web.HTTPSeeOther(f"/admin/projects/{project.id}?done=created")
        return await self._change(request, "project.create", create)

    async def project(self, request: web.Request) -> web.StreamResponse:
        project = await self._service.project(request.match_info["id"])
        tokens = await self._service.tokens(project.id)
        live = sum(1 for token in tokens if token.revoked_at is None and token.is_active)
        return page(request, "project.html", {"project": project, "token_count": len(tokens), "live_tokens": live})

    async def change_project(self, request: web.Request) -> web.StreamResponse:
        project_id = request.match_info["id"]
        form = await request.post()
        what = form.get("change")
        fields: dict[str, tuple[str, Callable[[], Any]]] = {
            "rename": ("name", lambda: form_text(form, "name", NAME_MAX_LENGTH)),
            "key": ("api_key", lambda: form_text(form, "api_key", API_KEY_MAX_LENGTH)),
            "active": ("is_active", lambda: form_bool(form, "is_active")),
        }
        if what not in fields:
            return error_page(request, 400, "Unknown change.", {})
        column, value = fields[str(what)]

        async def update(details: dict[str, Any]) -> web.StreamResponse:
            details["project_id"] = project_id
            new = value()
            await self._service.update_project(project_id, {column: new})
            details["changed"] = [column]
            done = "key" if what == "key" else "renamed" if what == "rename" else \
                "activated" if new else "deactivated"
            raise web.HTTPSeeOther(f"/admin/projects/{project_id}?done={done}")
        return await self._change(request, "project.update", update)

    async def revoke_project_tokens(self, request: web.Request) -> web.StreamResponse:
        project_id = request.match_info["id"]

        async def revoke(details: dict[str, Any]) -> web.StreamResponse:
            details["project_id"] = project_id
            revoked, total = await self._service.revoke_project_tokens(project_id)
            details.update(revoked_count=len(revoked), already_revoked_count=total - len(revoked), total_tokens=total)
            raise web.HTTPSeeOther(f"/admin/projects/{project_id}?done=revoked")
        return await self._change(request, "token.revoke_batch", revoke)

    # ---- tokens ----

    async def tokens(self, request: web.Request) -> web.StreamResponse:
        project_id = request.query.get("project_id") or None
        state = request.query.get("state", "active")
        projects = await self._service.projects()
        tokens = await self._service.tokens(project_id, active_only=state == "active",
                                            expired=True if state == "expired" else None)
        names = {project.id: project.name for project in projects}
        rows = [(token, self._cache.overlay(token) or {}) for token in reversed(tokens)]
        return page(request, "tokens.html", {
            "rows": rows, "names": names, "projects": projects, "project_id": project_id, "state": state,
            "once": secrets.token_urlsafe(16),
            "default_duration": self._settings.default_token_duration_minutes,
            "max_duration": self._settings.max_token_duration_minutes, "limit_max": LIMIT_MAX})

    async def create_token(self, request: web.Request) -> web.StreamResponse:
        form = await request.post()

        async def create(details: dict[str, Any]) -> web.StreamResponse:
            project_id = details["project_id"] = form_text(form, "project_id", 64)
            duration = self._duration(form)
            # The answer shows a plaintext once: sending the same form again (a reload) must not make
            # a second token.
            limits = Limits(form_int(form, "max_requests", 0, LIMIT_MAX),
                            form_int(form, "rate_limit_per_minute", 0, LIMIT_MAX),
                            form_int(form, "max_tokens_total", 0, LIMIT_MAX))
            once = form_text(form, "once", 64)
            if not await self._sessions.use_once(request[SESSION], once):
                raise FormAlreadySent()
            try:
                issued = await self._service.create_token(project_id, duration, limits)
            except ApiError:
                await self._sessions.forget_once(once)  # refused: the same form may be sent again
                raise
            details.update(token_id=issued.record.token_hint, duration_minutes=duration)
            return self._issued(request, issued, "created")
        return await self._change(request, "token.create", create)

    async def token(self, request: web.Request) -> web.StreamResponse:
        token = await self._service.token(request.match_info["id"])
        project = await self._service.project(token.project_id)
        return page(request, "token.html", {"token": token, "live": self._cache.overlay(token) or {},
                                            "project": project, "limit_max": LIMIT_MAX,
                                            "max_duration": self._settings.max_token_duration_minutes,
                                            "default_duration": self._settings.default_token_duration_minutes,
                                            "max_grace": MAX_GRACE_SECONDS})

    async def change_token(self, request: web.Request) -> web.StreamResponse:
        token_id = request.match_info["id"]
        form = await request.post()

        async def update(details: dict[str, Any]) -> web.StreamResponse:
            current = await self._service.token(token_id)
            details.update(project_id=current.project_id, token_id=current.token_hint)
            if form.get("change") == "active":
                changes: dict[str, Any] = {"is_active": form_bool(form, "is_active")}
                done = "resumed" if changes["is_active"] else "paused"
            else:
                changes = {name: form_int(form, name, 0, LIMIT_MAX)
                           for name in ("max_requests", "rate_limit_per_minute", "max_tokens_total")}
                done = "limits"
            details["changed"] = sorted(changes)
            await self._service.update_token(token_id, changes)
            raise web.HTTPSeeOther(f"/admin/tokens/{token_id}?done={done}")
        return await self._change(request, "token.update", update)

    async def revoke_token(self, request: web.Request) -> web.StreamResponse:
        token_id = request.match_info["id"]

        async def revoke(details: dict[str, Any]) -> web.StreamResponse:
            token = await self._service.token(token_id)
            details.update(project_id=token.project_id, token_id=token.token_hint)
            details["already_revoked"] = not await self._service.revoke_token(token.id)
            raise web.HTTPSeeOther(f"/admin/tokens/{token_id}?done=revoked")
        return await self._change(request, "token.revoke", revoke)

    async def refresh_token(self, request: web.Request) -> web.StreamResponse:
        token_id = request.match_info["id"]
        form = await request.post()

        async def refresh(details: dict[str, Any]) -> web.StreamResponse:
            old = await self._service.token(token_id)
            details.update(project_id=old.project_id, old_token_id=old.token_hint)
            duration = self._duration(form)
            grace = form_int(form, "grace_seconds", 0, MAX_GRACE_SECONDS) or 0
            issued = await self._service.refresh_token(old.id, duration, grace)
            details.update(token_id=issued.record.token_hint, duration_minutes=duration, grace_seconds=grace)
            return self._issued(request, issued, "refreshed")
        return await self._change(request, "token.refresh", refresh)

    # ---- shared ----

    def _duration(self, form: Any) -> int:
        duration = form_int(form, "duration_minutes", 1, self._settings.max_token_duration_minutes)
        return duration or self._settings.default_token_duration_minutes

    def _issued(self, request: web.Request, issued: IssuedToken, verb: str) -> web.StreamResponse:
        return page(request, "token_issued.html", {"token": issued.record, "plaintext": issued.plaintext,
                                                   "verb": verb}, status=201)

    async def _change(self, request: web.Request, action: Action, change: Change) -> web.StreamResponse:
        """Run a change and write its audit event, as the management API's `audited` does; show a refusal."""
        details: dict[str, Any] = {"http_method": "POST", "endpoint": request.path, "via": "console"}
        result: Result = "success"
        try:
            return await change(details)
        except ApiError as exc:
            result = refused(exc, details)
            if exc.param:
                details["param"] = exc.param
            return error_page(request, exc.status, exc.message, exc.headers)
        except web.HTTPException:
            raise  # the redirect after a change that worked
        except asyncio.CancelledError:
            result, details["status"] = "error", 499  # the browser left; the change may not have happened
            raise
        except Exception:
            result = "error"
            raise
        finally:
            details["user_agent"] = request.headers.get("User-Agent")
            self._audit.emit(action, actor="management", result=result, project_id=details.pop("project_id", None),
                             request_id=request[REQUEST_ID], client_ip=request[CLIENT_IP], details=details)
