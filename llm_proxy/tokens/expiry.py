"""Background jobs: mark expired tokens inactive (audited as token.expire by the system actor)."""

from __future__ import annotations

from llm_proxy.audit.writer import AuditWriter
from llm_proxy.tokens.periodic import Periodic
from llm_proxy.tokens.service import TokenService

EXPIRY_INTERVAL = 60.0


class ExpiryJob:
    """Every minute, deactivate the tokens whose expiry has passed and audit each one."""

    def __init__(self, service: TokenService, audit: AuditWriter) -> None:
        self._service = service
        self._audit = audit
        self._job = Periodic("token-expiry", EXPIRY_INTERVAL, self.run_once)

    async def run_once(self) -> int:
        """Deactivate what has expired now; return how many tokens changed."""
        expired = await self._service.deactivate_expired()
        for token in expired:
            self._audit.emit("token.expire", actor="system", result="success", project_id=token.project_id,
                             details={"token_id": token.token_hint, "token_uuid": token.id})
        return len(expired)

    def start(self) -> None:
        """Start the periodic job."""
        self._job.start()

    async def close(self) -> None:
        """Stop the periodic job."""
        await self._job.close()
