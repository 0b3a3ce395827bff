"""Shared fixtures: the fake upstream server and gateways on a real SQLite file in tmp_path."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from llm_proxy.app import create_app

pytest.register_assert_rewrite("tests.fakes")  # its shared assert helpers report like a test's own asserts

from tests.fakes import Gateway, UpstreamState, make_settings, make_upstream  # noqa: E402


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


