"""Slow clients cannot pin connections: slow headers are cut by the idle timer, slow bodies get 408."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from aiohttp.test_utils import TestServer

from llm_proxy.app import create_app
from tests.fakes import MANAGEMENT_TOKEN, make_settings


async def _read_status(reader: asyncio.StreamReader) -> bytes:
    return await asyncio.wait_for(reader.readline(), timeout=5)


async def test_slow_headers_are_cut_by_the_connection_timer(tmp_path: Path) -> None:
    server = TestServer(create_app(make_settings(tmp_path)), host="127.0.0.1")
    await server.start_server(keepalive_timeout=0.5)
    try:
        reader, writer = await asyncio.open_connection(server.host, server.port)
        started = time.monotonic()
        writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        closed = False
        for _ in range(40):  # drip one header byte every 0.1 s: a slowloris would never finish
            try:
                writer.write(b"X")
                await writer.drain()
            except ConnectionError:
                closed = True
                break
            if reader.at_eof() or await _eof_within(reader, 0.1):
                closed = True
                break
        writer.close()
        assert closed, "the server kept a connection with unfinished headers open"
        assert time.monotonic() - started < 3
    finally:
        await server.close()


async def _eof_within(reader: asyncio.StreamReader, seconds: float) -> bool:
    try:
        data = await asyncio.wait_for(reader.read(1), timeout=seconds)
    except TimeoutError:
        return False
    return data == b""


async def _post_partial(port: int, host: str, path: str, headers: str) -> bytes:
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(f"POST {path} HTTP/1.1\r\nHost: x\r\n{headers}Content-Length: 100\r\n\r\n".encode() + b'{"mo')
    await writer.drain()
    try:
        return await _read_status(reader)
    finally:
        writer.close()


async def test_slow_json_body_gets_408_and_is_not_forwarded(make_gateway: Any) -> None:
    gateway = await make_gateway(REQUEST_TIMEOUT="300ms")
    token = await gateway.token()
    server = gateway.client.server

    status = await _post_partial(server.port, server.host, "/v1/chat/completions",
                                 f"Authorization: Bearer {token['token']}\r\nContent-Type: application/json\r\n")

    assert status.startswith(b"HTTP/1.1 408")
    assert gateway.upstream.requests == []


async def test_slow_streamed_body_gets_408(make_gateway: Any) -> None:
    gateway = await make_gateway(REQUEST_TIMEOUT="300ms")
    token = await gateway.token()
    server = gateway.client.server

    status = await _post_partial(server.port, server.host, "/v1/audio/transcriptions",
                                 f"Authorization: Bearer {token['token']}\r\n"
                                 "Content-Type: application/octet-stream\r\n")

    assert status.startswith(b"HTTP/1.1 408")


async def test_slow_management_body_gets_408(make_gateway: Any) -> None:
    gateway = await make_gateway(REQUEST_TIMEOUT="300ms")
    server = gateway.client.server

    status = await _post_partial(server.port, server.host, "/manage/projects",
                                 f"Authorization: Bearer {MANAGEMENT_TOKEN}\r\nContent-Type: application/json\r\n")

    assert status.startswith(b"HTTP/1.1 408")
