"""Check client tokens on /v1; audit every rejection and count it against the client's IP."""

from __future__ import annotations

from aiohttp import web

from llm_proxy.audit.masking import obfuscate
from llm_proxy.audit.writer import AuditWriter
from llm_proxy.errors import ApiError, InvalidToken
from llm_proxy.gateway.context import CLIENT_IP, REQUEST_ID
from llm_proxy.limiting.base import FailureLimiter
from llm_proxy.models import Credential
from llm_proxy.tokens.anomaly import AnomalyDetector
from llm_proxy.tokens.cache import TokenCache

# The credential of an authenticated /v1 request.
CREDENTIAL: web.RequestKey[Credential] = web.RequestKey("credential")


def bearer(request: web.Request) -> str | None:
    """Return the credential of an `Authorization: Bearer …` header, if any."""
    header = request.headers.get("Authorization")
    if header is None or header[:7].lower() != "bearer ":
        return None
    return header[7:].strip() or None


def rejection_details(request: web.Request, reason: str, presented: str | None) -> dict[str, object]:
    return {"http_method": request.method, "endpoint": request.path, "reason": reason,
            # Only ever the obfuscated form of what was presented.
            "credential": obfuscate(presented) if presented else None,
            "user_agent": request.headers.get("User-Agent")}


class ClientAuth:
    """Admit /v1 requests only with a live client token; audit every rejection."""

    def __init__(self, cache: TokenCache, audit: AuditWriter, failures: FailureLimiter,
                 anomalies: AnomalyDetector) -> None:
        self._cache = cache
        self._audit = audit
        self._failures = failures
        self._anomalies = anomalies

    async def live(self, request: web.Request) -> Credential | None:
        """Return the request's credential if it is live, else None; nothing is audited or counted."""
        presented = bearer(request)
        if presented is None:
            return None
        try:
            credential = await self._cache.lookup(presented)
            self._cache.check(credential)
        except ApiError:
            return None
        return credential

    async def authenticate(self, request: web.Request) -> Credential:
        """Return the request's live credential, or raise the matching 401/403 (audited, counted as a failure)."""
        presented = bearer(request)
        try:
            if presented is None:
                raise InvalidToken("missing bearer token")
            credential = await self._cache.lookup(presented)
        except InvalidToken as exc:
            await self._failures.record_failure(request[CLIENT_IP])
            self._audit.emit("auth.failure", actor="client", result="failure", request_id=request[REQUEST_ID],
                             client_ip=request[CLIENT_IP], details=rejection_details(request, exc.code, presented))
            exc.headers["x-should-retry"] = "false"
            raise
        try:
            self._cache.check(credential)
        except ApiError as exc:
            # A revoked or expired token being replayed is a failed authentication too, and
            # repeated, the sign of a leaked token. A token its operator paused (is_active=false),
            # or one of an inactive project, is neither: its holder retrying is expected, and
            # counting it would get the whole address blocked, its other clients' tokens included.
            if exc.code in ("token_revoked", "token_expired") and self._cache.is_dead(credential):
                await self._failures.record_failure(request[CLIENT_IP])
                self._anomalies.observe_dead_token(credential, request[CLIENT_IP], exc.code)
            self._audit.emit("token.validate", actor="client", result="denied", project_id=credential.project.id,
                             request_id=request[REQUEST_ID], client_ip=request[CLIENT_IP],
                             details={"http_method": request.method, "endpoint": request.path, "reason": exc.code,
                                      "token_id": credential.hint, "user_agent": request.headers.get("User-Agent")})
            exc.headers["x-should-retry"] = "false"
            raise
        return credential
