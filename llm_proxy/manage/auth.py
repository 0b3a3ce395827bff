"""Check the management token (and MANAGEMENT_ALLOWED_IPS) on /manage and /metrics; audit every rejection."""

from __future__ import annotations

import hmac

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from llm_proxy.audit.writer import AuditWriter
from llm_proxy.errors import InvalidManagementToken, IPNotAllowed
from llm_proxy.gateway.client_auth import bearer, rejection_details
from llm_proxy.gateway.context import CLIENT_IP, REQUEST_ID, ip_in
from llm_proxy.limiting.base import FailureLimiter
from llm_proxy.settings import IPNetwork


class ManagementTokens:
    """The accepted management tokens, compared in constant time against every one (no early exit)."""

    def __init__(self, tokens: tuple[str, ...]) -> None:
        self._expected = tuple(token.encode() for token in tokens)

    def accepts(self, presented: str | None) -> bool:
        """Tell whether a presented bearer value is one of the management tokens."""
        if presented is None:
            return False
        candidate = presented.encode("utf-8", "surrogateescape")
        valid = False
        for token in self._expected:
            valid |= hmac.compare_digest(candidate, token)
        return valid


class ManagementAuth:
    """The management credential check, shared by /manage and /metrics; every rejection is audited."""

    def __init__(self, tokens: ManagementTokens, allowed_ips: tuple[IPNetwork, ...], audit: AuditWriter,
                 failures: FailureLimiter) -> None:
        self._tokens = tokens
        self._allowed_ips = allowed_ips
        self._audit = audit
        self._failures = failures

    def ip_listed(self, request: web.Request) -> bool:
        """Tell whether MANAGEMENT_ALLOWED_IPS is set and holds the request's client IP."""
        return bool(self._allowed_ips) and ip_in(request[CLIENT_IP], self._allowed_ips)

    def check_ip(self, request: web.Request) -> None:
        """Raise IPNotAllowed (403, audited) when MANAGEMENT_ALLOWED_IPS is set and lacks the client IP."""
        if self._allowed_ips and not self.ip_listed(request):
            self._audit.emit("auth.failure", actor="management", result="denied", request_id=request[REQUEST_ID],
                             client_ip=request[CLIENT_IP], details=rejection_details(request, "ip_not_allowed", None))
            raise IPNotAllowed()

    async def authenticate(self, request: web.Request) -> None:
        """Raise InvalidManagementToken (401) unless the bearer is a management token; audit and count the failure."""
        presented = bearer(request)
        if not self._tokens.accepts(presented):
            reason = "missing_credential" if presented is None else "invalid_management_token"
            # Counted toward the per-IP block on every route that takes the management token,
            # so that none of them is a side door for guessing it.
            await self._failures.record_failure(request[CLIENT_IP])
            self._audit.emit("auth.failure", actor="management", result="failure", request_id=request[REQUEST_ID],
                             client_ip=request[CLIENT_IP], details=rejection_details(request, reason, presented))
            raise InvalidManagementToken(headers={"WWW-Authenticate": "Bearer"})


def management_auth_middleware(auth: ManagementAuth) -> Middleware:
    """Build the middleware guarding the management API: IP allow-list first, then the bearer token."""
    @web.middleware
    async def management_auth(request: web.Request, handler: Handler) -> web.StreamResponse:
        auth.check_ip(request)
        await auth.authenticate(request)
        return await handler(request)

    return management_auth
