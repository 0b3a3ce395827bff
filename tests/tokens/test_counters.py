"""Token counters and daily usage survive a counter write that is interrupted, and are written exactly once."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestServer

from llm_proxy.storage.sqlite.usage import SqliteUsage
from llm_proxy.tokens import cache as tokenstore
from tests.fakes import Gateway, UpstreamState, bearer, eventually, locked, scalar, serving_like_serve

pytestmark = pytest.mark.system  # another process holds the database lock (tests.fakes.locked)


def _persisted(gateway: Gateway, token: dict[str, Any]) -> tuple[int, int]:
    """The token's request_count and its project's daily requests, as the database holds them."""
    path = gateway.settings.database_path
    return (scalar(path, "SELECT request_count FROM tokens WHERE id = ?", (token["id"],)),
            scalar(path, "SELECT coalesce(sum(requests), 0) FROM usage_daily WHERE project_id = ?",
                   (token["project_id"],)))


async def _three_requests(gateway: Gateway, token: dict[str, Any]) -> None:
    for _ in range(3):
        async with gateway.client.get("/v1/models", headers=bearer(token)) as response:
            assert response.status == 200


async def test_counters_a_shutdown_takes_from_a_waiting_flush_are_still_written(
        make_gateway: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """SIGTERM while the once-a-second flush waits on another process's lock: its counters are written on close."""
    writing = asyncio.Event()
    save = SqliteUsage.save

    async def noting_save(self: SqliteUsage, *args: Any) -> None:
        writing.set()
        await save(self, *args)

    monkeypatch.setattr(SqliteUsage, "save", noting_save)
    gateway = await make_gateway(RATE_LIMIT_PER_MINUTE="0")
    token = await gateway.token()
    flusher = next(task for task in asyncio.all_tasks() if task.get_name() == "token-counter-flusher")

    async with locked(gateway.settings.database_path):
        await _three_requests(gateway, token)
        await asyncio.wait_for(writing.wait(), 5)  # the flusher has taken counters and waits for the lock
        closing = asyncio.create_task(gateway.close())  # what SIGTERM does
        await eventually(flusher.done, "shutdown to stop the counter flusher")
    await asyncio.wait_for(closing, 15)

    assert _persisted(gateway, token) == (3, 3)


async def test_a_usage_read_abandoned_during_a_lock_loses_no_counters_and_writes_none_twice(
        tmp_path: Path, upstream: tuple[UpstreamState, TestServer], monkeypatch: pytest.MonkeyPatch) -> None:
    """GET …/usage flushes the counters first; a client that gives up while that flush waits for the lock
    cancels the handler (as `llm-proxy serve` runs it), and the counters it took are written once the lock goes."""
    monkeypatch.setattr(tokenstore, "FLUSH_INTERVAL", 3600.0)  # only the usage read flushes
    async with serving_like_serve(tmp_path, str(upstream[1].make_url("")).rstrip("/")) as gateway:
        token = await gateway.token()
        usage = f"/manage/projects/{token['project_id']}/usage"
        async with locked(gateway.settings.database_path):
            await _three_requests(gateway, token)
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.3):
                    await gateway.client.get(usage, headers=gateway.auth)
            server = gateway.client.server.runner.server  # type: ignore[union-attr]
            await eventually(lambda: not server.connections, "the server to cancel the abandoned usage read")

        assert (await gateway.manage("GET", usage[len("/manage"):], expect=200))["totals"]["requests"] == 3
    assert _persisted(gateway, token) == (3, 3)
