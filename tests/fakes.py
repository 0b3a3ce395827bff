"""Test doubles: a fake OpenAI upstream (a real aiohttp app) and a Gateway handle with shortcuts; and the helpers
several test modules share, each here once."""

from __future__ import annotations

import asyncio
import base64
import os
import socket
import sqlite3
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import openai
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from llm_proxy.app import AUDIT, create_app
from llm_proxy.audit.writer import AuditWriter
from llm_proxy.limiting.memory import ConcurrencyLimiter
from llm_proxy.ops.metrics import Metrics
from llm_proxy.settings import VARIABLES, Settings, load_settings
from llm_proxy.storage.sqlite.audit import SqliteAudit
from llm_proxy.storage.sqlite.database import Database

REPO = Path(__file__).resolve().parent.parent  # the repository root, wherever a test module sits
MANAGEMENT_TOKEN = "mgmt-" + "A1b2C3d4" * 6
UPSTREAM_KEY = "sk-upstream-REAL-secret-key-0123456789abcdef"
ENCRYPTION_KEY = base64.b64encode(bytes(range(32))).decode()


class FakeClock:
    """A settable clock (wall or monotonic), so no test ever sleeps to let time pass."""

    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class Recorded:
    method: str
    path_qs: str
    headers: dict[str, str]
    body: bytes


@dataclass
class UpstreamState:
    """What the fake upstream saw, and how it should misbehave next."""
    requests: list[Recorded] = field(default_factory=list)
    chunk_delay: float = 0.0
    chunks: int = 3
    status: int | None = None            # answer every request with this status
    status_headers: dict[str, str] = field(default_factory=dict)
    status_message: str = "upstream says no"  # the error message sent with `status`
    hang: bool = False                   # accept and never answer
    break_after_chunks: int | None = None  # cut the connection mid-stream
    stream_started: asyncio.Event = field(default_factory=asyncio.Event)
    stream_closed: asyncio.Event = field(default_factory=asyncio.Event)


def _completion(model: str) -> dict[str, Any]:
    return {"id": "chatcmpl-1", "object": "chat.completion", "created": 1700000000, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello there"},
                         "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}}


def _chunk(model: str, index: int, content: str | None, finish: str | None = None, usage: bool = False) -> bytes:
    delta = {"content": content} if content is not None else {}
    payload: dict[str, Any] = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1700000000,
                               "model": model, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
    if usage:
        payload["usage"] = None  # what the real API sends on every chunk but the last when asked for usage
    return b"data: " + orjson.dumps(payload) + b"\n\n"


def make_upstream(state: UpstreamState) -> web.Application:
    """Build a fake OpenAI API that records what it receives."""

    async def record(request: web.Request) -> bytes:
        body = await request.read()
        state.requests.append(Recorded(request.method, request.path_qs, dict(request.headers), body))
        return body

    async def chat(request: web.Request) -> web.StreamResponse:
        body = orjson.loads(await record(request))
        if state.hang:
            await asyncio.Event().wait()
        if state.status is not None:
            return web.json_response({"error": {"message": state.status_message, "type": "server_error",
                                                "code": "upstream_code"}}, status=state.status,
                                     headers=state.status_headers)
        model = body.get("model", "gpt-4o-mini")
        if not body.get("stream"):
            return web.json_response(_completion(model), headers={"X-Request-ID": "upstream-req-1",
                                                                  "Set-Cookie": "__cf_bm=secret; Path=/",
                                                                  "openai-organization": "org-secret"})
        include_usage = (body.get("stream_options") or {}).get("include_usage") is True
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        state.stream_started.set()
        try:
            for index in range(state.chunks):
                if state.break_after_chunks is not None and index == state.break_after_chunks:
                    assert request.transport is not None
                    request.transport.close()
                    return response
                await response.write(_chunk(model, index, f"part{index} ", usage=include_usage))
                if state.chunk_delay:
                    await asyncio.sleep(state.chunk_delay)
            await response.write(_chunk(model, state.chunks, None, "stop", usage=include_usage))
            if include_usage:
                await response.write(b"data: " + orjson.dumps({
                    "id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1700000000, "model": model,
                    "choices": [], "usage": {"prompt_tokens": 11, "completion_tokens": state.chunks,
                                             "total_tokens": 11 + state.chunks}}) + b"\n\n")
            await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
        finally:
            state.stream_closed.set()
        return response

    async def embeddings(request: web.Request) -> web.Response:
        await record(request)
        return web.json_response({"object": "list", "model": "text-embedding-3-small",
                                  "data": [{"object": "embedding", "index": 0, "embedding": [0.1, 0.2, 0.3]}],
                                  "usage": {"prompt_tokens": 3, "total_tokens": 3}})

    async def models(request: web.Request) -> web.Response:
        await record(request)
        return web.json_response({"object": "list", "data": [
            {"id": "gpt-4o-mini", "object": "model", "created": 1700000000, "owned_by": "openai"}]})

    async def responses(request: web.Request) -> web.StreamResponse:
        body = orjson.loads(await record(request))
        usage = {"input_tokens": 9, "output_tokens": 4, "total_tokens": 13}
        if not body.get("stream"):
            return web.json_response({"id": "resp_1", "object": "response", "status": "completed",
                                      "model": body.get("model"), "output": [], "usage": usage})
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for kind, data in (("response.output_text.delta", {"type": "response.output_text.delta", "delta": "hi"}),
                           ("response.completed", {"type": "response.completed",
                                                   "response": {"id": "resp_1", "usage": usage}})):
            await response.write(f"event: {kind}\ndata: ".encode() + orjson.dumps(data) + b"\n\n")
        await response.write_eof()
        return response

    async def anything(request: web.Request) -> web.Response:
        await record(request)
        return web.json_response({"path": request.path_qs})

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_post("/v1/embeddings", embeddings)
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/responses", responses)
    app.router.add_route("*", "/{tail:.*}", anything)
    return app


def make_settings(tmp_path: Path, upstream_url: str = "http://127.0.0.1:9", **overrides: str) -> Settings:
    """Build Settings the way production does, from an environment mapping."""
    environ = {"MANAGEMENT_TOKEN": MANAGEMENT_TOKEN, "ENCRYPTION_KEY": ENCRYPTION_KEY,
               "OPENAI_API_URL": upstream_url, "DATABASE_PATH": str(tmp_path / "gateway.db"),
               "AUDIT_LOG_FILE": str(tmp_path / "audit.log"), **overrides}
    return load_settings(environ, env_file=None)


class Gateway:
    """A running gateway plus shortcuts for the management API and the OpenAI SDK."""

    def __init__(self, client: TestClient, settings: Settings, upstream: UpstreamState | None) -> None:
        self.client = client
        self.settings = settings
        self.upstream = upstream
        self.auth = {"Authorization": f"Bearer {MANAGEMENT_TOKEN}"}
        self._sdk_clients: list[openai.AsyncOpenAI] = []
        self._projects = 0

    @property
    def app(self) -> web.Application:
        return self.client.server.app  # type: ignore[return-value]

    async def manage(self, method: str, path: str, json: Any = None, expect: int | None = None) -> Any:
        response = await self.client.request(method, "/manage" + path, json=json, headers=self.auth)
        body = await response.read()
        if expect is not None:
            assert response.status == expect, (response.status, body)
        return orjson.loads(body) if body else None

    async def project(self, name: str | None = None, api_key: str = UPSTREAM_KEY) -> dict[str, Any]:
        self._projects += 1
        name = name or f"proj-{self._projects}"
        return await self.manage("POST", "/projects", {"name": name, "api_key": api_key}, expect=201)

    async def token(self, project_id: str | None = None, **fields: Any) -> dict[str, Any]:
        if project_id is None:
            project_id = (await self.project())["id"]
        return await self.manage("POST", "/tokens", {"project_id": project_id, **fields}, expect=201)

    def openai(self, token: str) -> openai.AsyncOpenAI:
        sdk = openai.AsyncOpenAI(base_url=str(self.client.make_url("/v1")), api_key=token, max_retries=0,
                                 timeout=10)
        self._sdk_clients.append(sdk)
        return sdk

    async def close(self) -> None:
        for sdk in self._sdk_clients:
            await sdk.close()
        await self.client.close()


def read_all_bytes(path: Path) -> bytes:
    """Read a file and its SQLite side files (WAL), for secret scans."""
    data = b""
    for candidate in (path, Path(str(path) + "-wal"), Path(str(path) + "-shm")):
        if candidate.exists():
            data += candidate.read_bytes()
    return data


def bare_metrics() -> Metrics:
    """Metrics for a bare test app (the audit writer behind them is never started, its database never opened)."""
    audit = AuditWriter(SqliteAudit(Database(Path("unused.db"))), enabled=False, file_path=None, create_dir=False,
                        store_in_db=False, mask_client_ip=False)
    return Metrics(audit, ConcurrencyLimiter(0))


# ---- requests, and what every answer must carry ----

def bearer(token: dict[str, Any] | str) -> dict[str, str]:
    """The Authorization header of a client token: the management API's answer, or the secret itself."""
    secret = token if isinstance(token, str) else token["token"]
    return {"Authorization": f"Bearer {secret}"}


async def call(gateway: Gateway, token: dict[str, Any] | str, headers: dict[str, str] | None = None,
               ) -> tuple[int, str | None, Any]:
    """GET /v1/models; return the status, the error code (if any) and the response headers."""
    async with gateway.client.get("/v1/models", headers={**bearer(token), **(headers or {})}) as response:
        body = await response.json()
        code = body.get("error", {}).get("code") if isinstance(body, dict) else None
        return response.status, code, response.headers


async def manage_status(gateway: Gateway, secret: str, headers: dict[str, str] | None = None,
                        ) -> tuple[int, str | None]:
    """GET /manage/projects with `secret`; return the status and the error code (if any)."""
    async with gateway.client.get("/manage/projects", headers={**bearer(secret), **(headers or {})}) as response:
        body = await response.json()
        return response.status, body.get("error", {}).get("code")


MANAGEMENT_AUTH = {"Authorization": f"Bearer {MANAGEMENT_TOKEN}"}


async def send(gw: Any, method: str, path: str, *, body: Any = None, raw: bytes | None = None,
               headers: dict[str, str] | None = None, auth: bool = True) -> tuple[int, Any, Any]:
    """Send any request (with the management token unless auth=False); return status, parsed body, headers."""
    hdrs = dict(MANAGEMENT_AUTH) if auth else {}
    hdrs.update(headers or {})
    data = raw if raw is not None else (orjson.dumps(body) if body is not None else None)
    if data is not None:
        hdrs.setdefault("Content-Type", "application/json")
    response = await gw.client.request(method, path, data=data, headers=hdrs)
    text = await response.read()
    try:
        doc = orjson.loads(text) if text else None
    except orjson.JSONDecodeError:
        doc = text
    return response.status, doc, response.headers


def assert_error(doc: Any, code: str | None = None, param: str | None = None) -> None:
    """An OpenAI-shaped error body: {"error": {"message", "type", "code"[, "param"]}}."""
    assert isinstance(doc, dict) and set(doc) == {"error"}, doc
    assert {"message", "type", "code"} <= set(doc["error"]), doc
    if code is not None:
        assert doc["error"]["code"] == code, doc
    if param is not None:
        assert doc["error"].get("param") == param, doc


def assert_security(headers: Any, management: bool) -> None:
    """The security headers of every answer, and those of management answers."""
    assert headers.get("X-Content-Type-Options") == "nosniff", dict(headers)
    assert "Server" not in headers, dict(headers)
    assert headers.get("X-Request-ID"), dict(headers)
    if management:
        assert headers.get("Cache-Control") == "no-store", dict(headers)
        assert headers.get("X-Frame-Options") == "DENY", dict(headers)
        assert headers.get("Referrer-Policy") == "no-referrer", dict(headers)


# ---- the audit file, the database, an upstream or a gateway of one's own ----

async def access_events(gateway: Gateway) -> list[dict[str, Any]]:
    """Return the token.access events of the audit file, once everything emitted so far is written."""
    await gateway.app[AUDIT].flush()
    path = gateway.settings.audit_log_file
    assert path is not None
    events = (orjson.loads(line) for line in path.read_bytes().splitlines())
    return [event for event in events if event["action"] == "token.access"]


async def eventually(check: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    """Poll `check` until it holds, failing after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        await asyncio.sleep(0.02)


def scalar(path: Path, sql: str, params: tuple[Any, ...] = ()) -> Any:
    """Read one value with a connection of our own, as an operator's sqlite3 shell would."""
    with closing(sqlite3.connect(path)) as conn:
        return conn.execute(sql, params).fetchone()[0]


@asynccontextmanager
async def serving(app: web.Application) -> AsyncIterator[str]:
    """Run an aiohttp app as the upstream on 127.0.0.1; yield its base URL."""
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        yield str(server.make_url("")).rstrip("/")
    finally:
        await server.close()


@asynccontextmanager
async def serving_like_serve(tmp_path: Path, upstream_url: str) -> AsyncIterator[Gateway]:
    """A gateway whose handlers are cancelled when their client leaves, as `llm-proxy serve` runs it."""
    settings = make_settings(tmp_path, upstream_url)
    server = TestServer(create_app(settings), host="127.0.0.1", handler_cancellation=True)
    gateway = Gateway(TestClient(server), settings, None)
    await gateway.client.start_server()
    try:
        yield gateway
    finally:
        await gateway.close()


LOCKER = """
import sqlite3, sys
conn = sqlite3.connect(sys.argv[1], timeout=5, isolation_level=None)
conn.execute("BEGIN EXCLUSIVE")
print("locked", flush=True)
sys.stdin.read()  # hold the lock until the test closes our stdin
conn.execute("ROLLBACK")
conn.close()
"""


@asynccontextmanager
async def locked(path: Path) -> AsyncIterator[None]:
    """Hold BEGIN EXCLUSIVE on the database from another process for the duration of the block."""
    process = await asyncio.create_subprocess_exec(sys.executable, "-c", LOCKER, str(path),
                                                   stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
    assert process.stdout is not None
    try:
        assert await asyncio.wait_for(process.stdout.readline(), 10) == b"locked\n"
        yield
    finally:
        await process.communicate(b"")  # closing stdin releases the lock
    assert process.returncode == 0


# ---- the gateway and the CLI as processes ----

def child_env(**values: str) -> dict[str, str]:
    """The environment of a child `python -m llm_proxy`: this checkout's code, no gateway variable of ours."""
    env = {name: value for name, value in os.environ.items() if name not in VARIABLES and name != "LLM_PROXY_URL"}
    env["PYTHONPATH"] = str(REPO)
    env.update(values)
    return env


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on just now."""
    with closing(socket.socket()) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def serve_env(tmp_path: Path, **values: str) -> dict[str, str]:
    """child_env for `llm-proxy serve` on a free port, with its files in tmp_path."""
    defaults = {"MANAGEMENT_TOKEN": MANAGEMENT_TOKEN, "ENCRYPTION_KEY": ENCRYPTION_KEY,
                "LISTEN_ADDR": f"127.0.0.1:{free_port()}", "DATABASE_PATH": str(tmp_path / "gw.db"),
                "AUDIT_LOG_FILE": str(tmp_path / "audit.log"), "SHUTDOWN_GRACE": "1s"}
    return child_env(**{**defaults, **values})


async def wait_healthy(port: int, process: asyncio.subprocess.Process, scheme: str = "http") -> None:
    """Poll /health of a `serve` process (bounded) until it answers 200 or the process has ended."""
    async with aiohttp.ClientSession() as session:
        for _ in range(200):
            if process.returncode is not None:
                return
            try:
                async with session.get(f"{scheme}://127.0.0.1:{port}/health") as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientConnectionError:
                pass
            await asyncio.sleep(0.05)
