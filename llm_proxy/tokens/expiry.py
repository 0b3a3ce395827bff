"""Background jobs: mark expired tokens inactive (audited as token.expire by the system actor)."""

from __future__ import annotations

import asyncio
import logging

from llm_proxy.audit.writer import AuditWriter
from llm_proxy.tokens.service import TokenService

log = logging.getLogger(__name__)

EXPIRY_INTERVAL = 60.0


class ExpiryJob:
    """Every minute, deactivate the tokens whose expiry has passed and audit each one."""

    def __init__(self, service: TokenService, audit: AuditWriter) -> None:
        self._service = service
        self._audit = audit
        self._task: asyncio.Task[None] | None = None

    async def run_once(self) -> int:
        """Deactivate what has expired now; return how many tokens changed."""
        expired = await self._service.deactivate_expired()
        for token in expired:
            self._audit.emit("token.expire", actor="system", result="success", project_id=token.project_id,
                             details={"token_id": token.token_hint, "token_uuid": token.id})
        return len(expired)

    async def _forever(self) -> None:
        while True:
            try:
                await self.run_once()
            except Exception:
                log.exception("token expiry job failed; will retry")
            await asyncio.sleep(EXPIRY_INTERVAL)

    def start(self) -> None:
        """Start the periodic job."""
        self._task = asyncio.create_task(self._forever(), name="token-expiry")

    async def close(self) -> None:
        """Stop the periodic job."""
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
