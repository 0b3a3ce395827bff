"""The management API under /manage: projects and tokens, each action audited."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any

import orjson
from aiohttp import web

from llm_proxy.audit.events import Action, Result
from llm_proxy.audit.writer import AuditWriter
from llm_proxy.errors import ApiError, BadRequest, MethodNotAllowed
from llm_proxy.gateway.bodies import read_body
from llm_proxy.gateway.context import CLIENT_IP, REQUEST_ID
from llm_proxy.manage.openapi import openapi_handler
from llm_proxy.manage.validation import (
    API_KEY_MAX_LENGTH,
    LIMIT_MAX,
    MAX_GRACE_SECONDS,
    NAME_MAX_LENGTH,
    Field,
    parse_json_object,
    query_bool,
    query_int,
    query_timestamp,
    validate,
)
from llm_proxy.models import TokenRecord
from llm_proxy.settings import Settings
from llm_proxy.storage.base import Store
from llm_proxy.tokens.cache import TokenCache
from llm_proxy.tokens.service import Limits, TokenService

_NAME = Field(str, max_length=NAME_MAX_LENGTH)
_API_KEY = Field(str, max_length=API_KEY_MAX_LENGTH)
_LIMIT = Field(int, nullable=True, minimum=0, maximum=LIMIT_MAX)

Details = dict[str, Any]
ActionHandler = Callable[["Management", web.Request, Details], Awaitable[web.StreamResponse]]


def json_response(document: Any, status: int = 200) -> web.Response:
    """Serialise a document with orjson."""
    return web.Response(body=orjson.dumps(document), status=status, content_type="application/json")


Route = Callable[["Management", web.Request], Awaitable[web.StreamResponse]]


def refused(exc: ApiError, details: Details) -> Result:
    """Note a refusal's status and code in an event's details; return the event's result (the console's too)."""
    details["status"], details["error_code"] = exc.status, exc.code
    return "error" if exc.status >= 500 else "denied" if exc.status in (403, 405) else "failure"


def audited(action: Action) -> Callable[[ActionHandler], Route]:
    """Emit one audit event per call of the handler, whatever its outcome."""
    def wrap(handler: ActionHandler) -> Route:
        async def run(self: Management, request: web.Request) -> web.StreamResponse:
            details: Details = {"http_method": request.method, "endpoint": request.path}
            result: Result = "success"
            try:
                return await handler(self, request, details)
            except ApiError as exc:
                result = refused(exc, details)
                raise
            except asyncio.CancelledError:
                result, details["status"] = "error", 499  # the client left; the change may not have happened
                raise
            except Exception:
                result = "error"
                raise
            finally:
                details["user_agent"] = request.headers.get("User-Agent")
                self.audit.emit(action, actor="management", result=result, project_id=details.pop("project_id", None),
                                request_id=request[REQUEST_ID], client_ip=request[CLIENT_IP], details=details)
        run.__name__ = handler.__name__
        run.__doc__ = handler.__doc__
        return run
    return wrap


class Management:
    """Handlers of the management API, sharing the database, the token cache and the audit writer."""

    def __init__(self, settings: Settings, service: TokenService, store: Store, cache: TokenCache,
                 audit: AuditWriter) -> None:
        self.settings = settings
        self.service = service
        self.store = store
        self.cache = cache
        self.audit = audit
        self._duration = Field(int, minimum=1, maximum=settings.max_token_duration_minutes)

    def routes(self) -> list[web.RouteDef]:
        """Return the route table, mounted under /manage."""
        return [
            web.post("/projects", self.create_project),
            web.get("/projects", self.list_projects, allow_head=False),
            web.get("/projects/{id}", self.get_project, allow_head=False),
            web.patch("/projects/{id}", self.update_project),
            web.delete("/projects/{id}", self.delete_project),
            web.post("/projects/{id}/tokens/revoke", self.revoke_project_tokens),
            web.get("/projects/{id}/usage", self.project_usage, allow_head=False),
            web.post("/tokens", self.create_token),
            web.get("/tokens", self.list_tokens, allow_head=False),
            web.get("/tokens/{id}", self.get_token, allow_head=False),
            web.patch("/tokens/{id}", self.update_token),
            web.delete("/tokens/{id}", self.revoke_token),
            web.post("/tokens/{id}/refresh", self.refresh_token),
            web.get("/audit", self.list_audit, allow_head=False),
            web.get("/openapi.json", openapi_handler(self.settings), allow_head=False),
        ]

    def token_public(self, token: TokenRecord) -> dict[str, Any]:
        """Return the API representation of a token: never the plaintext, counters live."""
        return token.public(self.cache.overlay(token))

    # ---- projects ----

    @audited("project.create")
    async def create_project(self, request: web.Request, details: Details) -> web.StreamResponse:
        body = validate(parse_json_object(await read_body(request, self.settings.request_timeout)),
                        {"name": replace(_NAME, required=True), "api_key": replace(_API_KEY, required=True)})
        project = await self.service.create_project(body["name"], body["api_key"])
        details.update(project_id=project.id, name=project.name)
        return json_response(project.public(), status=201)

    @audited("project.list")
    async def list_projects(self, request: web.Request, details: Details) -> web.StreamResponse:
        projects = await self.service.projects(query_bool(request.query, "active"))
        details["count"] = len(projects)
        return json_response({"data": [project.public() for project in projects]})

    @audited("project.read")
    async def get_project(self, request: web.Request, details: Details) -> web.StreamResponse:
        details["project_id"] = request.match_info["id"]
        project = await self.service.project(request.match_info["id"])
        return json_response(project.public())

    @audited("project.update")
    async def update_project(self, request: web.Request, details: Details) -> web.StreamResponse:
        project_id = details["project_id"] = request.match_info["id"]
        changes = validate(parse_json_object(await read_body(request, self.settings.request_timeout)),
                           {"name": _NAME, "api_key": _API_KEY, "is_active": Field(bool)}, require_any=True)
        project = await self.service.update_project(project_id, changes)
        details["changed"] = sorted(changes)
        return json_response(project.public())

    @audited("project.delete")
    async def delete_project(self, request: web.Request, details: Details) -> web.StreamResponse:
        details["project_id"] = request.match_info["id"]
        # Projects are deactivated, never deleted: their audit trail and tokens must stay resolvable.
        raise MethodNotAllowed("projects cannot be deleted; PATCH is_active=false instead",
                                headers={"Allow": "GET, PATCH"})

    @audited("token.revoke_batch")
    async def revoke_project_tokens(self, request: web.Request, details: Details) -> web.StreamResponse:
        project_id = details["project_id"] = request.match_info["id"]
        revoked, total = await self.service.revoke_project_tokens(project_id)
        already = total - len(revoked)
        details.update(revoked_count=len(revoked), already_revoked_count=already, total_tokens=total)
        return json_response({"revoked_count": len(revoked), "already_revoked_count": already,
                              "total_tokens": total})

    @audited("project.read")
    async def project_usage(self, request: web.Request, details: Details) -> web.StreamResponse:
        project_id = details["project_id"] = request.match_info["id"]
        details["view"] = "usage"
        await self.service.project(project_id)
        await self.cache.flush()  # include what is still only in memory
        days = await self.store.usage.daily(project_id, query_timestamp(request.query, "since"),
                                            query_timestamp(request.query, "until"))
        totals = {key: sum(day[key] for day in days)
                  for key in ("requests", "prompt_tokens", "completion_tokens", "total_tokens")}
        return json_response({"project_id": project_id, "data": days, "totals": totals})

    # ---- tokens ----

    @audited("token.create")
    async def create_token(self, request: web.Request, details: Details) -> web.StreamResponse:
        body = validate(parse_json_object(await read_body(request, self.settings.request_timeout)), {
            "project_id": Field(str, required=True, max_length=64), "duration_minutes": self._duration,
            "max_requests": _LIMIT, "rate_limit_per_minute": _LIMIT, "max_tokens_total": _LIMIT})
        details["project_id"] = body["project_id"]
        duration = body.get("duration_minutes") or self.settings.default_token_duration_minutes
        issued = await self.service.create_token(body["project_id"], duration, Limits(
            body.get("max_requests"), body.get("rate_limit_per_minute"), body.get("max_tokens_total")))
        token = issued.record
        details.update(token_id=token.token_hint, duration_minutes=duration)
        return json_response({**self.token_public(token), "token": issued.plaintext}, status=201)

    @audited("token.list")
    async def list_tokens(self, request: web.Request, details: Details) -> web.StreamResponse:
        project_id = request.query.get("project_id") or None
        details["project_id"] = project_id
        tokens = await self.service.tokens(project_id, active_only=bool(query_bool(request.query, "active_only")),
                                           expired=query_bool(request.query, "expired"))
        details["count"] = len(tokens)
        return json_response({"data": [self.token_public(token) for token in tokens]})

    @audited("token.read")
    async def get_token(self, request: web.Request, details: Details) -> web.StreamResponse:
        token = await self.service.token(request.match_info["id"])
        details.update(project_id=token.project_id, token_id=token.token_hint)
        return json_response(self.token_public(token))

    @audited("token.update")
    async def update_token(self, request: web.Request, details: Details) -> web.StreamResponse:
        changes = validate(parse_json_object(await read_body(request, self.settings.request_timeout)), {
            "is_active": Field(bool), "max_requests": _LIMIT, "rate_limit_per_minute": _LIMIT,
            "max_tokens_total": _LIMIT}, require_any=True)
        current = await self.service.token(request.match_info["id"])
        details.update(project_id=current.project_id, token_id=current.token_hint, changed=sorted(changes))
        token = await self.service.update_token(current.id, changes)
        return json_response(self.token_public(token))

    @audited("token.revoke")
    async def revoke_token(self, request: web.Request, details: Details) -> web.StreamResponse:
        token = await self.service.token(request.match_info["id"])
        details.update(project_id=token.project_id, token_id=token.token_hint)
        details["already_revoked"] = not await self.service.revoke_token(token.id)
        return web.Response(status=204)

    @audited("token.refresh")
    async def refresh_token(self, request: web.Request, details: Details) -> web.StreamResponse:
        body = validate(parse_json_object(await read_body(request, self.settings.request_timeout)), {
            "duration_minutes": self._duration, "grace_seconds": Field(int, minimum=0, maximum=MAX_GRACE_SECONDS)})
        old = await self.service.token(request.match_info["id"])
        details.update(project_id=old.project_id, old_token_id=old.token_hint)
        duration = body.get("duration_minutes") or self.settings.default_token_duration_minutes
        grace = body.get("grace_seconds", 0)
        issued = await self.service.refresh_token(old.id, duration, grace)
        token = issued.record
        details.update(token_id=token.token_hint, duration_minutes=duration, grace_seconds=grace)
        return json_response({**self.token_public(token), "token": issued.plaintext}, status=201)

    # ---- audit ----

    @audited("audit.list")
    async def list_audit(self, request: web.Request, details: Details) -> web.StreamResponse:
        query = request.query
        unknown = set(query) - {"action", "project_id", "result", "since", "until", "limit", "before"}
        if unknown:
            name = sorted(unknown)[0]
            raise BadRequest(f"unknown query parameter `{name}`", param=name)
        filters = {name: query[name] for name in ("action", "project_id", "result") if query.get(name)}
        limit = query_int(query, "limit", default=100, minimum=1, maximum=1000)
        assert limit is not None
        # The writer gathers events for up to 50 ms: write what is queued, so that an operator
        # reads every event that happened before the query.
        await self.audit.flush()
        # Every instance's chain, merged newest first; `before` is a position in that order, not a seq
        # (each chain counts its own).
        listed = await self.store.audit.query(
            filters=filters, since=query_timestamp(query, "since"), until=query_timestamp(query, "until"),
            before=query_int(query, "before", default=None, minimum=1, maximum=2**62), limit=limit)
        details.update(filters, count=len(listed))
        next_before = listed[-1][0] if len(listed) == limit else None
        return json_response({"data": [event for _, event in listed], "next_before": next_before})
