"""Shared fixtures: the fake upstream server and gateways on a real SQLite file in tmp_path."""

from __future__ import annotations

import importlib
import os
import secrets
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest
from aiohttp.test_utils import TestClient, TestServer

from llm_proxy.app import create_app

pytest.register_assert_rewrite("tests.fakes")  # its shared assert helpers report like a test's own asserts

from tests.fakes import Gateway, UpstreamState, make_settings, make_upstream  # noqa: E402
from tests.servers import Server, missing, private_postgres, private_redis  # noqa: E402


@pytest.fixture
async def upstream() -> AsyncIterator[tuple[UpstreamState, TestServer]]:
    state = UpstreamState()
    server = TestServer(make_upstream(state), host="127.0.0.1")
    await server.start_server()
    yield state, server
    await server.close()


@pytest.fixture
async def make_gateway(tmp_path: Path, upstream: tuple[UpstreamState, TestServer]) -> AsyncIterator[Any]:
    """Start gateways (default: pointed at the fake upstream) with environment overrides."""
    gateways: list[Gateway] = []

    async def start(clock: Callable[[], float] = time.time, monotonic: Callable[[], float] = time.monotonic,
                    upstream_url: str | None = None, **overrides: str) -> Gateway:
        state, server = upstream
        url = upstream_url or str(server.make_url("")).rstrip("/")
        settings = make_settings(tmp_path, url, **overrides)
        client = TestClient(TestServer(create_app(settings, clock=clock, monotonic=monotonic), host="127.0.0.1"))
        await client.start_server()
        gateways.append(Gateway(client, settings, state))
        return gateways[-1]

    yield start
    for gateway in gateways:
        await gateway.close()


@pytest.fixture
async def gateway(make_gateway: Any) -> Gateway:
    return await make_gateway()




# ---- real PostgreSQL and Redis (tests/servers.py) ----


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Under CI nothing may be skipped: a skipped test there is a server or a package CI failed to set up."""
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = reporter.stats.get("skipped", []) if reporter is not None else []
    if os.environ.get("CI") and skipped and exitstatus == 0:
        reporter.ensure_newline()
        reporter.write_line(f"CI: {len(skipped)} test(s) skipped, and nothing may be skipped under CI", red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def _client_library(name: str) -> ModuleType:
    try:
        return importlib.import_module(name)
    except ImportError:
        missing(f"the Python package {name} (`make test` installs the postgres and redis extras)")
        raise AssertionError("unreachable") from None


def _given(variable: str) -> Server | None:
    url = os.environ.get(variable)
    if not url:
        return None
    parts = urlsplit(url)
    return Server(url, parts.hostname or "127.0.0.1", parts.port or 0, parts.password or "")


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[Server]:
    """A PostgreSQL server: LLM_PROXY_TEST_POSTGRES_URL, or a private one for this session."""
    given = _given("LLM_PROXY_TEST_POSTGRES_URL")
    if given is not None:
        yield given
        return
    with private_postgres() as server:
        yield server


@pytest.fixture
async def postgres_url(postgres_server: Server) -> AsyncIterator[str]:
    """The URL of a new, empty database of its own for this test, dropped afterwards."""
    asyncpg = _client_library("asyncpg")
    name = f"llm_proxy_test_{secrets.token_hex(6)}"
    admin = await asyncpg.connect(postgres_server.url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        yield urlunsplit(urlsplit(postgres_server.url)._replace(path=f"/{name}"))
        await admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
    finally:
        await admin.close()


@pytest.fixture(scope="session")
def redis_server() -> Iterator[Server]:
    """A Redis server: LLM_PROXY_TEST_REDIS_URL, or a private one for this session."""
    given = _given("LLM_PROXY_TEST_REDIS_URL")
    if given is not None:
        yield given
        return
    with private_redis() as server:
        yield server


@pytest.fixture
async def redis_url(redis_server: Server) -> AsyncIterator[str]:
    """The Redis URL, its database emptied before the test."""
    redis = _client_library("redis.asyncio")
    client = redis.from_url(redis_server.url)
    try:
        await client.flushdb()
    finally:
        await client.aclose()
    yield redis_server.url
