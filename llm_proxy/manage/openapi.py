"""The OpenAPI 3.1 document of the management API and health endpoints, built from the limits the handlers enforce."""

from __future__ import annotations

import json
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web

from llm_proxy import __version__
from llm_proxy.manage.validation import (
    API_KEY_MAX_LENGTH,
    LIMIT_MAX,
    MAX_GRACE_SECONDS,
    NAME_MAX_LENGTH,
    UNPRINTABLE,
)
from llm_proxy.models import TOKEN_FIELDS
from llm_proxy.settings import Settings

Schema = dict[str, Any]

# A string field is stripped (str.strip) before it is checked for emptiness, length and control
# characters (validation.UNPRINTABLE), so its pattern lets whitespace surround a value whose own
# first and last characters are neither whitespace nor control characters, and counts only those
# between them: a plain maxLength would refuse a padded value the gateway accepts.
_CONTROL = UNPRINTABLE
_BLANK = r"\x20\x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"  # whitespace, not control
_PADDING = rf"[\t-\r\x1c-\x1f{_BLANK}]*"
_EDGE = rf"[^{_CONTROL}{_BLANK}]"
# Real calendar days only, as strptime checks them: years 0001-9999, 29 February in leap years.
_YEAR = r"(?:000[1-9]|00[1-9][0-9]|0[1-9][0-9]{2}|[1-9][0-9]{3})"
_MONTH_DAY = r"(?:(?:0[1-9]|1[0-2])-(?:0[1-9]|1[0-9]|2[0-8])|(?:0[13-9]|1[0-2])-(?:29|30)|(?:0[13578]|1[02])-31)"
_LEAP_YEAR = r"(?:[0-9]{2}(?:0[48]|[2468][048]|[13579][26])|(?:0[48]|[2468][048]|[13579][26])00)"
_DAY = rf"(?:{_YEAR}-{_MONTH_DAY}|{_LEAP_YEAR}-02-29)"
_TIME = r"T(?:[01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9]Z"
_STAMP: Schema = {"type": "string", "pattern": rf"^{_DAY}{_TIME}$", "description": "UTC, to the second", "examples": [
    "2026-11-26T10:00:00Z"]}
_COUNT: Schema = {"type": "integer", "minimum": 0}
_FLAG: Schema = {"type": "string", "pattern": "^(?:[Tt][Rr][Uu][Ee]|[Ff][Aa][Ll][Ss][Ee]|[01])?$",
          "description": "true or false (any case), 1 or 0; empty means not given."}

# Status → (response component, error codes the gateway answers with under it).
_ERRORS: dict[int, tuple[str, tuple[str, ...], str]] = {
    400: ("BadRequest", ("invalid_request",), "The body or a query parameter is invalid; `param` names the field "
                                              "when one is at fault."),
    401: ("Unauthorized", ("invalid_management_token",), "The management token is missing or wrong."),
    403: ("Forbidden", ("ip_not_allowed",), "The client IP is outside MANAGEMENT_ALLOWED_IPS."),
    404: ("NotFound", ("not_found",), "No such project or token."),
    405: ("MethodNotAllowed", ("method_not_allowed",), "Projects are deactivated, never deleted."),
    408: ("RequestTimeout", ("request_timeout",), "The body did not arrive within REQUEST_TIMEOUT."),
    409: ("Conflict", ("conflict",), "The change conflicts with the current state."),
    413: ("PayloadTooLarge", ("request_too_large",), "The body is larger than MAX_REQUEST_SIZE."),
    429: ("TooManyRequests", ("rate_limited",), "Too many failed authentications from this IP; wait Retry-After "
                                               "seconds."),
}
_ERROR_HEADERS = {401: "WWW-Authenticate", 405: "Allow", 429: "Retry-After"}
_MANAGEMENT_ERRORS = (401, 403, 429)
_BODY_ERRORS = (400, 408, 413)


def build_document(settings: Settings | None = None) -> dict[str, Any]:
    """Return the OpenAPI document, reflecting the token lifetime limits of `settings` (defaults when None)."""
    if settings is None:
        settings = Settings(management_tokens=(), encryption_key=b"")
    duration: Schema = {"type": "integer", "minimum": 1, "maximum": settings.max_token_duration_minutes,
                "description": f"Token lifetime; default {settings.default_token_duration_minutes}."}
    limit: Schema = {"type": ["integer", "null"], "minimum": 0, "maximum": LIMIT_MAX}
    paths: dict[str, Any] = {
        "/manage/projects": {
            "post": _operation(
                "create_project", "projects", "Create a project holding an upstream API key.",
                body=_body({"name": _text(NAME_MAX_LENGTH), "api_key": _text(API_KEY_MAX_LENGTH,
                                                                   "The upstream key; stored encrypted.")},
                           required=("name", "api_key")),
                ok={201: _json("The project.", "Project")}, errors=(*_BODY_ERRORS, 409),
                error_codes={409: ("conflict",)}),
            "get": _operation(
                "list_projects", "projects", "List projects, oldest first.",
                query=[_query("active", _FLAG, "Only active (true) or inactive (false) projects.")],
                ok={200: _json("The projects.", _list_of("Project"))}, errors=(400,)),
        },
        "/manage/projects/{id}": {
            "parameters": [_ID],
            "get": _operation("get_project", "projects", "Read one project.",
                              ok={200: _json("The project.", "Project")}, errors=(404,)),
            "patch": _operation(
                "update_project", "projects", "Rename a project, replace its key, or (de)activate it.",
                body=_body({"name": _text(NAME_MAX_LENGTH), "api_key": _text(API_KEY_MAX_LENGTH),
                            "is_active": {"type": "boolean"}},
                           min_properties=1),
                ok={200: _json("The changed project.", "Project")}, errors=(*_BODY_ERRORS, 404, 409),
                error_codes={409: ("conflict",)}),
            "delete": _operation("delete_project", "projects",
                                 "Always refused: deactivate with PATCH is_active=false instead.",
                                 ok={}, errors=(405,)),
        },
        "/manage/projects/{id}/tokens/revoke": {
            "parameters": [_ID],
            "post": _operation("revoke_project_tokens", "projects", "Revoke every token of a project.",
                               ok={200: _json("How many tokens were revoked.", "RevokeSummary")}, errors=(404,)),
        },
        "/manage/projects/{id}/usage": {
            "parameters": [_ID],
            "get": _operation(
                "project_usage", "projects", "Daily request and token totals of a project, oldest day first.",
                query=[_query("since", _TIMESTAMP, "First day included."),
                       _query("until", _TIMESTAMP, "First day excluded.")],
                ok={200: _json("The usage.", "ProjectUsage")}, errors=(400, 404)),
        },
        "/manage/tokens": {
            "post": _operation(
                "create_token", "tokens", "Issue a token for an active project; the plaintext is shown only here.",
                body=_body({"project_id": _text(64), "duration_minutes": duration, "max_requests": limit,
                            "rate_limit_per_minute": limit, "max_tokens_total": limit}, required=("project_id",)),
                ok={201: _json("The token, with its plaintext.", "TokenWithSecret")},
                errors=(*_BODY_ERRORS, 404), error_codes={403: ("ip_not_allowed", "project_inactive")}),
            "get": _operation(
                "list_tokens", "tokens", "List tokens, oldest first, never with their plaintext.",
                query=[_query("project_id", {"type": "string"}, "Only this project's tokens."),
                       _query("active_only", _FLAG, "Leave out revoked, inactive and expired tokens."),
                       _query("expired", _FLAG, "Only expired (true) or unexpired (false) tokens.")],
                ok={200: _json("The tokens.", _list_of("Token"))}, errors=(400,)),
        },
        "/manage/tokens/{id}": {
            "parameters": [_ID],
            "get": _operation("get_token", "tokens", "Read one token.",
                              ok={200: _json("The token.", "Token")}, errors=(404,)),
            "patch": _operation(
                "update_token", "tokens", "Pause or resume a token, or change its limits.",
                body=_body({"is_active": {"type": "boolean"}, "max_requests": limit, "rate_limit_per_minute": limit,
                            "max_tokens_total": limit}, min_properties=1),
                ok={200: _json("The changed token.", "Token")}, errors=(*_BODY_ERRORS, 404, 409),
                error_codes={409: ("conflict",)}),
            "delete": _operation("revoke_token", "tokens", "Revoke a token for good (idempotent).",
                                 ok={204: {"description": "Revoked.", "headers": _REQUEST_ID}}, errors=(404,)),
        },
        "/manage/tokens/{id}/refresh": {
            "parameters": [_ID],
            "post": _operation(
                "refresh_token", "tokens",
                "Issue a successor with the same project and limits; the old token stops after grace_seconds.",
                body=_body({"duration_minutes": duration,
                            "grace_seconds": {"type": "integer", "minimum": 0, "maximum": MAX_GRACE_SECONDS}}),
                ok={201: _json("The new token, with its plaintext.", "TokenWithSecret")},
                errors=(*_BODY_ERRORS, 404, 409), error_codes={403: ("ip_not_allowed", "project_inactive"),
                                                               409: ("conflict", "token_expired")}),
        },
        "/manage/audit": {
            "get": _operation(
                "list_audit", "audit", "Audit events of every instance's chain, newest first; pass next_before as "
                "before for the next page.",
                query=[_query("action", {"type": "string"}, "Exact action, e.g. token.create."),
                       _query("project_id", {"type": "string"}, "Exact project id."),
                       _query("result", {"type": "string"}, "success, failure, denied or error."),
                       _query("since", _TIMESTAMP, "Events at or after."),
                       _query("until", _TIMESTAMP, "Events before."),
                       _query("limit", {"type": "integer", "minimum": 1, "maximum": 1000, "default": 100},
                              "Page size."),
                       _query("before", {"type": "integer", "minimum": 1, "maximum": 2**62},
                              "Only events stored before this position (the next_before of the previous page).")],
                ok={200: _json("A page of events.", "AuditPage")}, errors=(400,)),
        },
        "/manage/openapi.json": {
            "get": _operation("openapi_document", "meta", "This document.",
                              ok={200: _json("The OpenAPI document.", {"type": "object"})}, errors=()),
        },
        "/health": {
            "get": {"operationId": "health", "tags": ["health"], "summary": "Liveness: the process answers.",
                    "security": [], "responses": {"200": _json("Alive.", "Health")}},
        },
        "/ready": {
            "get": {"operationId": "ready", "tags": ["health"], "summary": "Readiness: the database answers too.",
                    "security": [], "responses": {
                        "200": _json("Ready.", "Ready"),
                        "503": {**_json("The database is not answering.", _error({"not_ready"})),
                                "headers": {**_REQUEST_ID, **_header("Retry-After")}}}},
        },
        "/metrics": {
            "get": {"operationId": "metrics", "tags": ["health"],
                    "summary": "Prometheus metrics: with the management token, or from MANAGEMENT_ALLOWED_IPS.",
                    "responses": {
                        "200": {"description": "Prometheus text exposition.", "headers": _REQUEST_ID,
                                "content": {"text/plain": {"schema": {"type": "string"}}}},
                        "401": {"$ref": "#/components/responses/Unauthorized"}}},
        },
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "llm-proxy management API", "version": __version__,
                 "description": "Projects, tokens, usage and audit of an llm-proxy gateway, and its health "
                                "endpoints. Every error has the OpenAI shape; every response carries X-Request-ID."},
        "security": [{"managementToken": []}],
        "tags": [{"name": name} for name in ("projects", "tokens", "audit", "meta", "health")],
        "paths": paths,
        "components": {
            "securitySchemes": {"managementToken": {"type": "http", "scheme": "bearer",
                                                    "description": "MANAGEMENT_TOKEN (or one of its list)."}},
            "schemas": _schemas(),
            "responses": {name: {**_json(description, _error(set(codes))),
                                 "headers": {**_REQUEST_ID, **_header(_ERROR_HEADERS.get(status))}}
                          for status, (name, codes, description) in _ERRORS.items()},
            "headers": {"X-Request-ID": {"description": "The client's own id when sane, else a generated one.",
                                         "required": True, "schema": {"type": "string", "maxLength": 128}}},
        },
    }


_ID: Schema = {"name": "id", "in": "path", "required": True, "schema": {"type": "string", "minLength": 1}}
_TIMESTAMP: Schema = {"type": "string", "pattern": rf"^(?:{_DAY}(?:{_TIME})?)?$",
                      "description": "YYYY-MM-DD or YYYY-MM-DDTHH:MM:SSZ (UTC), a real date; empty means none."}
_REQUEST_ID: Schema = {"X-Request-ID": {"$ref": "#/components/headers/X-Request-ID"}}


def _header(name: str | None) -> dict[str, Any]:
    return {} if name is None else {name: {"required": True, "schema": {"type": "string"}}}


def _text(max_length: int, description: str | None = None) -> Schema:
    pattern = rf"^{_PADDING}{_EDGE}(?:[^{_CONTROL}]{{0,{max_length - 2}}}{_EDGE})?{_PADDING}$"
    rule = (f"Surrounding whitespace is trimmed; then 1 to {max_length} characters, none a control character, "
            "line separator or bidirectional override.")
    return {"type": "string", "pattern": pattern, "description": " ".join(filter(None, [description, rule]))}


def _body(properties: dict[str, Schema], *, required: tuple[str, ...] = (), min_properties: int = 0) -> Schema:
    schema: Schema = {"type": "object", "properties": properties, "additionalProperties": False}
    if required:
        schema["required"] = list(required)
    if min_properties:
        schema["minProperties"] = min_properties
    return {"required": bool(required or min_properties), "content": {"application/json": {"schema": schema}}}


def _query(name: str, schema: Schema, description: str) -> Schema:
    return {"name": name, "in": "query", "required": False, "schema": schema, "description": description}


def _json(description: str, schema: Schema | str) -> Schema:
    if isinstance(schema, str):
        schema = {"$ref": f"#/components/schemas/{schema}"}
    return {"description": description, "headers": _REQUEST_ID, "content": {"application/json": {"schema": schema}}}


def _list_of(name: str) -> Schema:
    return {"type": "object", "required": ["data"], "additionalProperties": False,
            "properties": {"data": {"type": "array", "items": {"$ref": f"#/components/schemas/{name}"}}}}


def _error(codes: set[str]) -> Schema:
    return {"allOf": [{"$ref": "#/components/schemas/Error"},
                      {"properties": {"error": {"properties": {"code": {"enum": sorted(codes)}}}}}]}


def _operation(operation_id: str, tag: str, summary: str, *, ok: dict[int, Schema], errors: tuple[int, ...],
               body: Schema | None = None, query: list[Schema] | None = None,
               error_codes: dict[int, tuple[str, ...]] | None = None) -> Schema:
    responses: dict[str, Any] = {str(status): response for status, response in ok.items()}
    for status in sorted({*errors, *_MANAGEMENT_ERRORS}):
        name, _, description = _ERRORS[status]
        if error_codes and status in error_codes:
            responses[str(status)] = {**_json(description, _error(set(error_codes[status]))),
                                      "headers": {**_REQUEST_ID, **_header(_ERROR_HEADERS.get(status))}}
        else:
            responses[str(status)] = {"$ref": f"#/components/responses/{name}"}
    operation: Schema = {"operationId": operation_id, "tags": [tag], "summary": summary}
    if query:
        operation["parameters"] = query
    if body is not None:
        operation["requestBody"] = body
    operation["responses"] = responses
    return operation


def _schemas() -> dict[str, Schema]:
    nullable_stamp: Schema = {**_STAMP, "type": ["string", "null"]}
    limit: Schema = {"type": ["integer", "null"], "minimum": 0,
                     "description": "null: no limit (for the rate: the server default)"}
    types: dict[str, Schema] = {
        "id": {"type": "string"}, "project_id": {"type": "string"},
        "token_hint": {"type": "string", "description": "The token, obfuscated."},
        "expires_at": _STAMP, "is_active": {"type": "boolean"},
        "max_requests": limit, "rate_limit_per_minute": limit, "max_tokens_total": limit,
        "request_count": _COUNT, "prompt_tokens": _COUNT, "completion_tokens": _COUNT, "total_tokens": _COUNT,
        "last_used_at": nullable_stamp, "created_at": _STAMP, "revoked_at": nullable_stamp,
        "replaced_by": {"type": ["string", "null"], "description": "The id of the token that refreshed this one."},
    }
    token = {name: types[name] for name in TOKEN_FIELDS}  # the answer's order
    totals = {name: _COUNT for name in ("requests", "prompt_tokens", "completion_tokens", "total_tokens")}
    return {
        "Error": _object({"error": _object({
            "message": {"type": "string"},
            "type": {"enum": ["invalid_request_error", "authentication_error", "permission_error", "rate_limit_error",
                              "server_error", "upstream_error"]},
            "code": {"type": "string"},
            "param": {"type": "string", "description": "The request field at fault."}}, optional=("param",))}),
        "Project": _object({
            "id": {"type": "string"}, "name": {"type": "string"},
            "api_key": {"type": "string", "description": "The upstream key, obfuscated."},
            "is_active": {"type": "boolean"}, "created_at": _STAMP, "updated_at": _STAMP}),
        "Token": _object(token),
        "TokenWithSecret": _object({**token, "token": {"type": "string", "pattern": "^tok-[A-Za-z0-9_-]{43}$",
                                                       "description": "The plaintext; shown only once."}}),
        "RevokeSummary": _object({name: _COUNT for name in ("revoked_count", "already_revoked_count",
                                                            "total_tokens")}),
        "ProjectUsage": _object({
            "project_id": {"type": "string"},
            "data": {"type": "array", "items": _object({"date": {"type": "string", "pattern": rf"^{_DAY}$"},
                                                        **totals})},
            "totals": _object(totals)}),
        "AuditEvent": _object({
            "timestamp": _STAMP, "action": {"type": "string"},
            "actor": {"enum": ["management", "client", "system"]},
            "project_id": {"type": "string"}, "request_id": {"type": "string"}, "client_ip": {"type": "string"},
            "result": {"enum": ["success", "failure", "denied", "error"]},
            "details": {"type": "object"},
            "instance": {"type": "string", "description": "INSTANCE_ID of the process that wrote it (its chain)"},
            "seq": {"type": "integer", "minimum": 1, "description": "position in its instance's chain"},
            "hash": {"type": "string", "pattern": "^[0-9a-f]{64}$"}},
            optional=("project_id", "request_id", "client_ip", "details", "instance")),
        "AuditPage": _object({"data": {"type": "array", "items": {"$ref": "#/components/schemas/AuditEvent"}},
                              "next_before": {"type": ["integer", "null"], "minimum": 1}}),
        "Health": _object({"status": {"const": "ok"}, "version": {"type": "string"}}),
        "Ready": _object({"status": {"const": "ready"}}),
    }


def _object(properties: dict[str, Schema], *, optional: tuple[str, ...] = ()) -> Schema:
    required = [name for name in properties if name not in optional]
    return {"type": "object", "properties": properties, "required": required, "additionalProperties": False}


def openapi_handler(settings: Settings) -> Callable[[web.Request], Awaitable[web.Response]]:
    """Build the handler of GET /manage/openapi.json, the document serialised once."""
    body = orjson.dumps(build_document(settings))

    async def openapi_document(request: web.Request) -> web.Response:
        return web.Response(body=body, content_type="application/json")

    return openapi_document


def render(document: dict[str, Any]) -> str:
    """Serialise the document the way it is committed: indented, in build order, one trailing newline."""
    return json.dumps(document, indent=2, ensure_ascii=True) + "\n"


def main() -> None:
    """Print the document with default settings (`python -m llm_proxy.manage.openapi > …/openapi.json`)."""
    sys.stdout.write(render(build_document()))


if __name__ == "__main__":
    main()
