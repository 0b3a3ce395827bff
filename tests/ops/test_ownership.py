"""One serving process per database: a second `serve` on an owned database refuses to start.

Found by a new user (issue 15): two `serve` processes on one SQLite file each trusted their own
memory, and a token revoked through the first was still forwarded upstream by the second.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from llm_proxy.app import create_app
from llm_proxy.storage.errors import DatabaseOwned
from tests.fakes import UpstreamState, bearer, make_settings
from tests.ops.test_process import CHAT, Served, _error_line, _serve_until_exit, serving_env, serving_process


async def test_a_second_gateway_on_an_owned_database_does_not_start(tmp_path: Path, make_gateway: Any) -> None:
    first = await make_gateway()
    second = TestServer(create_app(make_settings(tmp_path)), host="127.0.0.1")
    with pytest.raises(DatabaseOwned, match=rf"^pid {os.getpid()} on .+ since \d{{4}}-\d\d-\d\dT"):
        await second.start_server()
    await second.close()
    assert (await first.manage("GET", "/projects", expect=200))["data"] == []  # the owner is untouched


@pytest.mark.system
async def test_a_second_serve_refuses_with_one_line_naming_the_owner(
        tmp_path: Path, upstream: tuple[UpstreamState, TestServer]) -> None:
    _, server = upstream
    upstream_url = str(server.make_url("")).rstrip("/")
    async with serving_process(tmp_path, upstream_url) as (process, url), aiohttp.ClientSession() as session:
        token = await Served(process, url, tmp_path / "data").token(session)

        code, err = await _serve_until_exit(tmp_path, OPENAI_API_URL=upstream_url)
        line = _error_line(err)
        database = tmp_path / "data" / "gateway.db"
        assert code == 1, err
        assert line.startswith(f"llm-proxy: cannot start: DATABASE_PATH {database} is already served by "
                               f"pid {process.pid} on "), line
        assert line.endswith("; stop that process first (one serving process per database)"), line
        assert "listening on" not in err

        # The owner goes on serving, and a CLI command may still read the database beside it.
        async with session.post(f"{url}/v1/chat/completions", json=CHAT, headers=bearer(token)) as response:
            assert response.status == 200
        verify = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "llm_proxy", "audit", "verify", cwd=tmp_path,
            env=serving_env(tmp_path, upstream_url), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, verify_err = await asyncio.wait_for(verify.communicate(), timeout=30)
        assert verify.returncode == 0, (out, verify_err)

        # Once the owner has stopped (SIGTERM) the database is free, and another process serves it.
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), timeout=30) == 0
    async with serving_process(tmp_path, upstream_url) as (_, url), aiohttp.ClientSession() as session:
        async with session.post(f"{url}/v1/chat/completions", json=CHAT, headers=bearer(token)) as response:
            assert response.status == 200


@pytest.mark.system
async def test_an_owner_killed_with_9_leaves_the_database_free(
        tmp_path: Path, upstream: tuple[UpstreamState, TestServer]) -> None:
    _, server = upstream
    upstream_url = str(server.make_url("")).rstrip("/")
    async with serving_process(tmp_path, upstream_url) as (process, _):
        process.kill()
        await process.wait()
    async with serving_process(tmp_path, upstream_url) as (_, url), aiohttp.ClientSession() as session:
        async with session.get(f"{url}/health") as response:
            assert response.status == 200
