"""Run a job every so many seconds in one background task, and stop it cleanly."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)


class Periodic:
    """Await `job` every `interval` seconds (after the first wait, when `wait_first`); a failure is
    logged and the job runs again at its next turn."""

    def __init__(self, name: str, interval: float, job: Callable[[], Awaitable[object]], *,
                 wait_first: bool = False) -> None:
        self._name = name
        self._interval = interval
        self._job = job
        self._wait_first = wait_first
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start the task (in the running loop)."""
        self._task = asyncio.create_task(self._run(), name=self._name)

    async def close(self) -> None:
        """Stop the task; a run in progress is cancelled."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        if self._wait_first:
            await asyncio.sleep(self._interval)
        while True:
            try:
                await self._job()
            except Exception:
                log.exception("%s failed; will retry", self._name)
            await asyncio.sleep(self._interval)
