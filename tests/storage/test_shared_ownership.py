"""Serving processes with REDIS_URL claim their database shared: any number of them serve it together,
and none of them serves beside a process that owns it alone (without REDIS_URL), either way round.
On SQLite (flock, shared or exclusive) and PostgreSQL (an advisory lock, shared or exclusive)."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from llm_proxy.settings import Settings
from llm_proxy.storage.base import Store
from llm_proxy.storage.errors import SHARED_OWNER, DatabaseOwned
from llm_proxy.storage.factory import open_store
from tests.fakes import make_settings, serve_env, wait_healthy


@pytest.fixture(params=["sqlite", "postgresql"])
def settings(request: pytest.FixtureRequest, tmp_path: Path) -> Settings:
    """The settings of a serving process on this test's database, of each backend."""
    overrides = {"DATABASE_URL": request.getfixturevalue("postgres_url")} if request.param == "postgresql" else {}
    return make_settings(tmp_path, **overrides)


@pytest.fixture
async def stores(settings: Settings) -> AsyncIterator[Callable[[], Any]]:
    """Open stores on one database, as separate serving processes would."""
    opened: list[Store] = []

    async def open_one() -> Store:
        store = open_store(settings)
        await store.open()
        opened.append(store)
        return store

    yield open_one
    for store in opened:
        await store.close()


async def test_processes_sharing_a_redis_serve_together_and_keep_a_lone_owner_out(
        stores: Callable[[], Any]) -> None:
    first, second, lone = await stores(), await stores(), await stores()
    await first.claim("pid 1 on a", shared=True)
    await second.claim("pid 2 on b", shared=True)
    with pytest.raises(DatabaseOwned) as refused:
        await lone.claim("pid 3 on c")
    assert (refused.value.holder, refused.value.shared) == (SHARED_OWNER, True)
    # Until the last of them stops.
    await first.close()
    with pytest.raises(DatabaseOwned):
        await lone.claim("pid 3 on c")
    await second.close()
    await lone.claim("pid 3 on c")


async def test_a_lone_owner_keeps_processes_sharing_a_redis_out(stores: Callable[[], Any]) -> None:
    lone, joining = await stores(), await stores()
    await lone.claim("pid 3 on c since 2026-12-03T09:00:00Z")
    with pytest.raises(DatabaseOwned) as refused:
        await joining.claim("pid 4 on d", shared=True)
    assert (refused.value.holder, refused.value.shared) == ("pid 3 on c since 2026-12-03T09:00:00Z", False)
    await lone.close()
    await joining.claim("pid 4 on d", shared=True)


@pytest.mark.system
async def test_serve_without_redis_beside_gateways_with_it_refuses_in_one_line(
        tmp_path: Path, redis_url: str) -> None:
    database = tmp_path / "gw.db"
    env = serve_env(tmp_path, REDIS_URL=redis_url)
    port = int(env["LISTEN_ADDR"].rsplit(":", 1)[1])
    sharing = await asyncio.create_subprocess_exec(sys.executable, "-m", "llm_proxy", "serve", cwd=tmp_path, env=env,
                                                   stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
    try:
        await wait_healthy(port, sharing)
        assert sharing.returncode is None
        alone = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "llm_proxy", "serve", cwd=tmp_path, env=serve_env(tmp_path),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        _, err = await asyncio.wait_for(alone.communicate(), timeout=30)
        lines = [line for line in err.decode().splitlines() if not line.startswith('{"time"')]
        assert alone.returncode == 1
        assert lines == [f"llm-proxy: cannot start: DATABASE_PATH {database} is served by {SHARED_OWNER}; set the "
                         "same REDIS_URL to serve beside them"], err
    finally:
        sharing.terminate()
        await sharing.wait()
