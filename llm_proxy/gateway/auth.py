"""Check credentials: the management token on /manage, client tokens on /v1; audit every rejection."""

from __future__ import annotations

import hmac

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from llm_proxy.audit.masking import obfuscate
from llm_proxy.audit.writer import AuditWriter
from llm_proxy.errors import ApiError, InvalidManagementToken, InvalidToken, IPNotAllowed
from llm_proxy.gateway.context import ip_in
from llm_proxy.keys import CLIENT_IP, REQUEST_ID
from llm_proxy.limiting.memory import FailureCounter
from llm_proxy.models import Credential
from llm_proxy.settings import IPNetwork
from llm_proxy.tokens.anomaly import AnomalyDetector
from llm_proxy.tokens.cache import TokenCache


def bearer(request: web.Request) -> str | None:
    """Return the credential of an `Authorization: Bearer …` header, if any."""
    header = request.headers.get("Authorization")
    if header is None or header[:7].lower() != "bearer ":
        return None
    return header[7:].strip() or None


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


def _rejection_details(request: web.Request, reason: str, presented: str | None) -> dict[str, object]:
    return {"http_method": request.method, "endpoint": request.path, "reason": reason,
            # Only ever the obfuscated form of what was presented.
            "credential": obfuscate(presented) if presented else None,
            "user_agent": request.headers.get("User-Agent")}


class ManagementAuth:
    """The management credential check, shared by /manage and /metrics; every rejection is audited."""

    def __init__(self, tokens: ManagementTokens, allowed_ips: tuple[IPNetwork, ...], audit: AuditWriter,
                 failures: FailureCounter) -> None:
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
                             client_ip=request[CLIENT_IP], details=_rejection_details(request, "ip_not_allowed", None))
            raise IPNotAllowed()

    def authenticate(self, request: web.Request) -> None:
        """Raise InvalidManagementToken (401) unless the bearer is a management token; audit and count the failure."""
        presented = bearer(request)
        if not self._tokens.accepts(presented):
            reason = "missing_credential" if presented is None else "invalid_management_token"
            # Counted toward the per-IP block on every route that takes the management token,
            # so that none of them is a side door for guessing it.
            self._failures.record_failure(request[CLIENT_IP])
            self._audit.emit("auth.failure", actor="management", result="failure", request_id=request[REQUEST_ID],
                             client_ip=request[CLIENT_IP], details=_rejection_details(request, reason, presented))
            raise InvalidManagementToken(headers={"WWW-Authenticate": "Bearer"})


def management_auth_middleware(auth: ManagementAuth) -> Middleware:
    """Build the middleware guarding the management API: IP allow-list first, then the bearer token."""
    @web.middleware
    async def management_auth(request: web.Request, handler: Handler) -> web.StreamResponse:
        auth.check_ip(request)
        auth.authenticate(request)
        return await handler(request)

    return management_auth


class ClientAuth:
    """Admit /v1 requests only with a live client token; audit every rejection."""

    def __init__(self, store: TokenCache, audit: AuditWriter, failures: FailureCounter,
                 anomalies: AnomalyDetector) -> None:
        self._store = store
        self._audit = audit
        self._failures = failures
        self._anomalies = anomalies

    async def authenticate(self, request: web.Request) -> Credential:
        """Return the request's live credential, or raise the matching 401/403 (audited, counted as a failure)."""
        presented = bearer(request)
        try:
            if presented is None:
                raise InvalidToken("missing bearer token")
            credential = await self._store.lookup(presented)
        except InvalidToken as exc:
            self._failures.record_failure(request[CLIENT_IP])
            self._audit.emit("auth.failure", actor="client", result="failure", request_id=request[REQUEST_ID],
                             client_ip=request[CLIENT_IP], details=_rejection_details(request, exc.code, presented))
            exc.headers["x-should-retry"] = "false"
            raise
        try:
            self._store.check(credential)
        except ApiError as exc:
            # A revoked or expired token being replayed is a failed authentication too, and
            # repeated, the sign of a leaked token. A token its operator paused (is_active=false),
            # or one of an inactive project, is neither: its holder retrying is expected, and
            # counting it would get the whole address blocked, its other clients' tokens included.
            if exc.code in ("token_revoked", "token_expired") and self._store.is_dead(credential):
                self._failures.record_failure(request[CLIENT_IP])
                self._anomalies.observe_dead_token(credential, request[CLIENT_IP], exc.code)
            self._audit.emit("token.validate", actor="client", result="denied", project_id=credential.project.id,
                             request_id=request[REQUEST_ID], client_ip=request[CLIENT_IP],
                             details={"http_method": request.method, "endpoint": request.path, "reason": exc.code,
                                      "token_id": credential.hint, "user_agent": request.headers.get("User-Agent")})
            exc.headers["x-should-retry"] = "false"
            raise
        return credential
