"""The exception tree every handler raises, and the one OpenAI error body they are answered with.

    ApiError                       500 server_error       internal_error
    ├── BadRequest                 400 invalid_request_error  invalid_request  (names the field)
    ├── AuthenticationError        401 authentication_error
    │   ├── InvalidToken                                   invalid_token
    │   ├── TokenExpired                                   token_expired
    │   ├── TokenRevoked                                   token_revoked
    │   └── InvalidManagementToken                         invalid_management_token
    ├── PermissionDenied           403 permission_error
    │   ├── ProjectInactive                                project_inactive
    │   ├── ModelNotAllowed                                model_not_allowed
    │   └── IPNotAllowed                                   ip_not_allowed
    ├── NotFound                   404 invalid_request_error  not_found
    │   └── EndpointNotAllowed                             endpoint_not_allowed
    ├── MethodNotAllowed           405 invalid_request_error  method_not_allowed (sets Allow)
    ├── RequestTimeout             408 invalid_request_error  request_timeout
    ├── Conflict                   409 invalid_request_error  conflict
    │   └── ExpiredTokenConflict                           token_expired
    ├── PayloadTooLarge            413 invalid_request_error  request_too_large
    ├── TooManyRequests            429 rate_limit_error       (sets Retry-After)
    │   ├── RateLimited                                    rate_limited
    │   ├── QuotaExceeded                                  quota_exceeded
    │   └── BudgetExceeded                                 budget_exceeded
    ├── UpstreamUnavailable        502 upstream_error         upstream_unavailable
    │   └── UpstreamAuthFailed                             upstream_auth_failed
    ├── Overloaded                 503 server_error           overloaded
    ├── DatabaseUnavailable        503 server_error           database_unavailable (sets Retry-After)
    └── UpstreamTimeout            504 upstream_error         upstream_timeout
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import orjson
from aiohttp import web


class ApiError(Exception):
    status = 500
    type = "server_error"
    code = "internal_error"
    message = "internal error"

    def __init__(self, message: str | None = None, *, headers: Mapping[str, str] | None = None,
                 param: str | None = None) -> None:
        super().__init__(message or self.message)
        self.message = message or self.message
        self.headers = dict(headers or {})
        self.param = param


class BadRequest(ApiError):
    status, type, code, message = 400, "invalid_request_error", "invalid_request", "invalid request"


class AuthenticationError(ApiError):
    status, type, code, message = 401, "authentication_error", "invalid_token", "authentication failed"


class InvalidToken(AuthenticationError):
    code, message = "invalid_token", "invalid or missing token"


class TokenExpired(AuthenticationError):
    code, message = "token_expired", "token has expired"


class TokenRevoked(AuthenticationError):
    code, message = "token_revoked", "token has been revoked"


class InvalidManagementToken(AuthenticationError):
    code, message = "invalid_management_token", "invalid or missing management token"


class PermissionDenied(ApiError):
    status, type, code, message = 403, "permission_error", "forbidden", "forbidden"


class ProjectInactive(PermissionDenied):
    code, message = "project_inactive", "project is inactive"


class ModelNotAllowed(PermissionDenied):
    code, message = "model_not_allowed", "model is not allowed"


class IPNotAllowed(PermissionDenied):
    code, message = "ip_not_allowed", "client IP is not allowed"


class NotFound(ApiError):
    status, type, code, message = 404, "invalid_request_error", "not_found", "not found"


class EndpointNotAllowed(NotFound):
    code, message = "endpoint_not_allowed", "endpoint is not allowed"


class MethodNotAllowed(ApiError):
    status, type, code, message = 405, "invalid_request_error", "method_not_allowed", "method not allowed"


class RequestTimeout(ApiError):
    status, type, code, message = 408, "invalid_request_error", "request_timeout", "request body arrived too slowly"


class Conflict(ApiError):
    status, type, code, message = 409, "invalid_request_error", "conflict", "conflict"


class ExpiredTokenConflict(Conflict):
    code, message = "token_expired", "an expired token cannot be refreshed; create a new token instead"


class PayloadTooLarge(ApiError):
    status, type, code, message = 413, "invalid_request_error", "request_too_large", "request body too large"


class TooManyRequests(ApiError):
    status, type, message = 429, "rate_limit_error", "too many requests"
    code: Literal["rate_limited", "quota_exceeded", "budget_exceeded"] = "rate_limited"


class RateLimited(TooManyRequests):
    code, message = "rate_limited", "rate limit exceeded"


class QuotaExceeded(TooManyRequests):
    code, message = "quota_exceeded", "token request quota exhausted"


class BudgetExceeded(TooManyRequests):
    code, message = "budget_exceeded", "token usage budget exhausted"


class UpstreamUnavailable(ApiError):
    status, type, code, message = 502, "upstream_error", "upstream_unavailable", "upstream unreachable"


class UpstreamAuthFailed(UpstreamUnavailable):
    code = "upstream_auth_failed"

    def __init__(self, upstream_status: int, *, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(f"the upstream refused the gateway's credentials for this token's project (upstream "
                         f"status {upstream_status}); the gateway's operator must replace the project's API key",
                         headers=headers)
        self.upstream_status = upstream_status


class Overloaded(ApiError):
    status, type, code, message = 503, "server_error", "overloaded", "gateway is at capacity"


class DatabaseUnavailable(ApiError):
    status, type, code, message = 503, "server_error", "database_unavailable", "the database cannot be reached"


class UpstreamTimeout(ApiError):
    status, type, code, message = 504, "upstream_error", "upstream_timeout", "upstream timed out"


def error_body(message: str, type_: str, code: str, param: str | None = None) -> bytes:
    """Serialise the OpenAI error shape."""
    error: dict[str, str | None] = {"message": message, "type": type_, "code": code}
    if param is not None:
        error["param"] = param
    return orjson.dumps({"error": error})


def error_response(exc: ApiError) -> web.Response:
    """Render an ApiError as an OpenAI-shaped JSON response."""
    return web.Response(status=exc.status, body=error_body(exc.message, exc.type, exc.code, exc.param),
                        content_type="application/json", headers=exc.headers)
