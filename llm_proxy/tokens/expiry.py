"""Background jobs: mark expired tokens inactive (audited as token.expire by the system actor)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from llm_proxy.audit.writer import AuditWriter
from llm_proxy.storage.sqlite import repository as repo
from llm_proxy.storage.sqlite.database import Database
from llm_proxy.tokens.cache import TokenStore

log = logging.getLogger(__name__)

EXPIRY_INTERVAL = 60.0


class ExpiryJob:
    """Every minute, deactivate the tokens whose expiry has passed and audit each one."""

    def __init__(self, db: Database, store: TokenStore, audit: AuditWriter,
                 clock: Callable[[], float] = time.time) -> None:
        self._db = db
        self._store = store
        self._audit = audit
        self._clock = clock
        self._task: asyncio.Task[None] | None = None

    async def run_once(self) -> int:
        """Deactivate what has expired now; return how many tokens changed."""
        expired = await repo.deactivate_expired_tokens(self._db, self._clock())
        self._store.tokens_deactivated([token_id for token_id, _, _ in expired])
        for token_id, project_id, hint in expired:
            self._audit.emit("token.expire", actor="system", result="success", project_id=project_id,
                             details={"token_id": hint, "token_uuid": token_id})
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
