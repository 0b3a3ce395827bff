"""The operator's side, from the third review: audit verify over gz/dateext rotations, real HTTPS,
the CLI against a misbehaving gateway, rotate-key with two previous keys, debug logs without
secrets, and the README walk-through run literally with curl. The review's probes that found
defects live on beside their fixes (test_cli, test_process, test_tls, test_settings, test_startup)."""

from __future__ import annotations

import asyncio
import base64
import datetime
import gzip
import ipaddress
import os
import socket
import sqlite3
import sys
from collections.abc import Callable
from contextlib import closing
from pathlib import Path
from typing import Any, NamedTuple

import aiohttp
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from llm_proxy.ops.cli import main
from llm_proxy.settings import VARIABLES
from tests.fakes import ENCRYPTION_KEY, MANAGEMENT_TOKEN, UPSTREAM_KEY

REPO = Path(__file__).resolve().parents[1]
OTHER_KEY = base64.b64encode(bytes(range(50, 82))).decode()
THIRD_KEY = base64.b64encode(bytes(range(150, 182))).decode()
BASE = {"MANAGEMENT_TOKEN": MANAGEMENT_TOKEN, "ENCRYPTION_KEY": ENCRYPTION_KEY}


class Result(NamedTuple):
    code: int | None  # None: still running after the deadline (killed)
    out: str
    err: str


def child_env(**values: str) -> dict[str, str]:
    env = {name: value for name, value in os.environ.items() if name not in VARIABLES and name != "LLM_PROXY_URL"}
    env["PYTHONPATH"] = str(REPO)
    env.update(values)
    return env


def free_port() -> int:
    with closing(socket.socket()) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def run_process(*argv: str, env: dict[str, str], stdin: bytes | None = None, cwd: Path | None = None,
                      deadline: float = 20.0) -> Result:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "llm_proxy", *argv, env=env, cwd=cwd,
        stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    assert process.stdout is not None and process.stderr is not None
    if stdin is not None:
        assert process.stdin is not None
        process.stdin.write(stdin)
        await process.stdin.drain()
        process.stdin.close()
    reading = asyncio.gather(process.stdout.read(), process.stderr.read())
    try:
        await asyncio.wait_for(process.wait(), timeout=deadline)
    except TimeoutError:
        process.kill()  # only the process this probe started
        await process.wait()
        out, err = await reading
        return Result(None, out.decode(), err.decode())
    out, err = await reading
    return Result(process.returncode, out.decode(), err.decode())


def serve_env(tmp_path: Path, **values: str) -> dict[str, str]:
    defaults = {"MANAGEMENT_TOKEN": MANAGEMENT_TOKEN, "ENCRYPTION_KEY": ENCRYPTION_KEY,
                "LISTEN_ADDR": f"127.0.0.1:{free_port()}", "DATABASE_PATH": str(tmp_path / "gw.db"),
                "AUDIT_LOG_FILE": str(tmp_path / "audit.log"), "SHUTDOWN_GRACE": "1s"}
    return child_env(**{**defaults, **values})


def assert_one_line(result: Result, *fragments: str) -> None:
    assert result.code is not None, f"still running after the deadline; stderr so far: {result.err!r}"
    assert result.code != 0, result
    assert "Traceback" not in result.err, result.err
    # Application log lines (JSON, LOG_FILE unset) may precede it; the error itself is one line.
    lines = [line for line in result.err.strip().splitlines() if not line.startswith('{"time"')]
    assert len(lines) == 1, f"expected one error line on stderr, got {lines!r}"
    assert lines[0].startswith("llm-proxy: "), lines
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


# ---------------------------------------------------------------- audit verify

async def test_audit_verify_gz_rotation_with_dateext_in_order(tmp_path: Path) -> None:
    """logrotate with dateext + compress: audit.log-YYYYMMDD.gz files and the current file verify as one chain."""
    from llm_proxy.audit.writer import AuditWriter
    from llm_proxy.storage.sqlite.audit import SqliteAudit
    from llm_proxy.storage.sqlite.database import Database

    database, audit_file = tmp_path / "gw.db", tmp_path / "audit.log"
    db = await Database.open(database)
    writer = AuditWriter(SqliteAudit(db), enabled=True, file_path=audit_file, create_dir=True, store_in_db=True,
                         mask_client_ip=False)
    await writer.start()
    for day in ("20260101", "20260102"):
        writer.emit("token.create", actor="management", result="success", details={"token_id": "tok-1234****cdef"})
        await writer.flush()
        rotated = tmp_path / f"audit.log-{day}.gz"
        rotated.write_bytes(gzip.compress(audit_file.read_bytes()))
        audit_file.unlink()
    writer.emit("token.create", actor="management", result="success")
    await writer.close()
    await db.close()
    env = child_env(MANAGEMENT_TOKEN=MANAGEMENT_TOKEN, ENCRYPTION_KEY=ENCRYPTION_KEY, DATABASE_PATH=str(database),
                    AUDIT_LOG_FILE=str(audit_file))
    result = await run_process("audit", "verify", "--json", env=env, cwd=tmp_path)
    assert result.code == 0, result
    assert orjson.loads(result.out)["files"]["events"] == 3


# ---------------------------------------------------------------- TLS

def _self_signed(directory: Path, passphrase: bytes | None) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "probe")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .sign(key, hashes.SHA256()))
    encryption = (serialization.BestAvailableEncryption(passphrase) if passphrase
                  else serialization.NoEncryption())
    cert_file, key_file = directory / "cert.pem", directory / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption))
    return cert_file, key_file


async def test_serve_https_for_real_with_hsts_and_min_version(tmp_path: Path) -> None:
    import ssl

    cert_file, key_file = _self_signed(tmp_path, None)
    port = free_port()
    env = serve_env(tmp_path, TLS_CERT_FILE=str(cert_file), TLS_KEY_FILE=str(key_file), TLS_MIN_VERSION="1.3",
                    HSTS_MAX_AGE="600", LISTEN_ADDR=f"127.0.0.1:{port}", LOG_FILE=str(tmp_path / "app.log"))
    process = await asyncio.create_subprocess_exec(sys.executable, "-m", "llm_proxy", "serve", env=env,
                                                   stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        context = ssl.create_default_context(cafile=str(cert_file))
        old = ssl.create_default_context(cafile=str(cert_file))
        old.maximum_version = ssl.TLSVersion.TLSv1_2
        headers = None
        async with aiohttp.ClientSession() as session:
            for _ in range(200):
                try:
                    async with session.get(f"https://127.0.0.1:{port}/health", ssl=context) as response:
                        headers = response.headers
                        break
                except aiohttp.ClientConnectionError:
                    await asyncio.sleep(0.05)
            assert headers is not None
            assert headers.get("Strict-Transport-Security") == "max-age=600"
            with pytest.raises(aiohttp.ClientError):
                async with session.get(f"https://127.0.0.1:{port}/health", ssl=old):
                    pass
            with pytest.raises(aiohttp.ClientError):
                async with session.get(f"http://127.0.0.1:{port}/health"):
                    pass
    finally:
        process.terminate()
        await asyncio.wait_for(process.communicate(), timeout=15)
    assert process.returncode == 0


# ---------------------------------------------------------------- CLI against odd gateways

async def _odd_server(handler: Callable[[web.Request], Any]) -> TestServer:
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    return server


@pytest.mark.parametrize(("status", "body", "headers", "fragment"), [
    (500, b"<html>oops</html>", {}, "500"),
    (502, b"Bad Gateway", {}, "502"),
    (301, b"", {"Location": "https://example.invalid/manage/projects"}, "301"),
    (200, b"<html>login</html>", {"Content-Type": "text/html"}, "not JSON"),
])
async def test_cli_against_a_misbehaving_gateway_gives_a_clear_line(
        tmp_path: Path, status: int, body: bytes, headers: dict[str, str], fragment: str) -> None:
    async def handler(request: web.Request) -> web.Response:
        return web.Response(status=status, body=body, headers=headers)

    server = await _odd_server(handler)
    try:
        url = str(server.make_url("")).rstrip("/")
        env = child_env(MANAGEMENT_TOKEN=MANAGEMENT_TOKEN, LLM_PROXY_URL=url)
        result = await run_process("project", "list", env=env, cwd=tmp_path)
    finally:
        await server.close()
    assert result.code == 1, result
    assert_one_line(result, fragment)
    assert "unexpected error" not in result.err, result.err
    assert MANAGEMENT_TOKEN not in result.err + result.out


async def test_cli_gateway_answering_401_and_500_json(tmp_path: Path) -> None:
    async def handler(request: web.Request) -> web.Response:
        code = 401 if request.path.endswith("/projects") else 500
        return web.json_response({"error": {"message": f"echo {request.headers.get('Authorization')}",
                                            "type": "x", "code": "c"}}, status=code)

    server = await _odd_server(handler)
    try:
        env = child_env(MANAGEMENT_TOKEN=MANAGEMENT_TOKEN, LLM_PROXY_URL=str(server.make_url("")).rstrip("/"))
        denied = await run_process("project", "list", env=env, cwd=tmp_path)
        broken = await run_process("token", "list", "--json", env=env, cwd=tmp_path)
    finally:
        await server.close()
    assert_one_line(denied, "HTTP 401")
    assert_one_line(broken, "HTTP 500")
    for result in (denied, broken):
        assert result.code == 1 and result.out == ""
        assert MANAGEMENT_TOKEN not in result.err  # even when the server echoes it back


# ---------------------------------------------------------------- rotate-key with two previous keys

async def test_rotate_key_reads_rows_under_either_previous_key(make_gateway: Callable[..., Any],
                                                               tmp_path: Path) -> None:
    first = await make_gateway(ENCRYPTION_KEY=ENCRYPTION_KEY)
    await first.project("under-first")
    second = await make_gateway(ENCRYPTION_KEY=OTHER_KEY, ENCRYPTION_KEY_PREVIOUS=ENCRYPTION_KEY)
    await second.project("under-second")
    database = first.settings.database_path
    env = child_env(MANAGEMENT_TOKEN=MANAGEMENT_TOKEN, ENCRYPTION_KEY=THIRD_KEY,
                    ENCRYPTION_KEY_PREVIOUS=f"{OTHER_KEY}, {ENCRYPTION_KEY}", DATABASE_PATH=str(database),
                    AUDIT_LOG_FILE=str(first.settings.audit_log_file))
    once = await run_process("rotate-key", "--json", env=env, cwd=tmp_path)
    assert once.code == 0 and orjson.loads(once.out) == {"reencrypted": 2}, once
    twice = await run_process("rotate-key", "--json", env=env, cwd=tmp_path)
    assert twice.code == 0 and orjson.loads(twice.out) == {"reencrypted": 0}, twice
    with closing(sqlite3.connect(database)) as conn:
        stored = [row[0] for row in conn.execute("SELECT api_key_encrypted FROM projects")]
    assert all(UPSTREAM_KEY not in value for value in stored)
    fresh = await make_gateway(ENCRYPTION_KEY=THIRD_KEY)
    token = await fresh.token((await fresh.manage("GET", "/projects"))["data"][0]["id"])
    assert (await fresh.client.get("/v1/models", headers={"Authorization": f"Bearer {token['token']}"})).status == 200


# ---------------------------------------------------------------- logs of a real `serve`

async def _wait_healthy(port: int, process: asyncio.subprocess.Process, scheme: str = "http") -> None:
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


@pytest.mark.parametrize("log_format", ["json", "text"])
async def test_serve_at_debug_level_never_logs_a_secret(upstream: Any, tmp_path: Path, log_format: str) -> None:
    _, upstream_server = upstream
    port = free_port()
    log_file = tmp_path / "app.log"
    env = serve_env(tmp_path, LISTEN_ADDR=f"127.0.0.1:{port}", LOG_LEVEL="debug", LOG_FORMAT=log_format,
                    LOG_FILE=str(log_file), OPENAI_API_URL=str(upstream_server.make_url("")).rstrip("/"))
    process = await asyncio.create_subprocess_exec(sys.executable, "-m", "llm_proxy", "serve", env=env,
                                                   stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    secrets: list[str] = [MANAGEMENT_TOKEN, UPSTREAM_KEY, ENCRYPTION_KEY]
    try:
        await _wait_healthy(port, process)
        base = f"http://127.0.0.1:{port}"
        manage = {"Authorization": f"Bearer {MANAGEMENT_TOKEN}"}
        async with aiohttp.ClientSession() as session:
            async with session.post(f"{base}/manage/projects", headers=manage,
                                    json={"name": "dbg", "api_key": UPSTREAM_KEY}) as response:
                project = await response.json()
            async with session.post(f"{base}/manage/tokens", headers=manage,
                                    json={"project_id": project["id"]}) as response:
                token = await response.json()
            secrets.append(token["token"])
            client = {"Authorization": f"Bearer {token['token']}"}
            async with session.post(f"{base}/v1/chat/completions", headers=client,
                                    json={"model": "m", "messages": [{"role": "user", "content": "hi"}]}) as response:
                assert response.status == 200
            async with session.post(f"{base}/v1/chat/completions", headers=client,
                                    json={"model": "m", "stream": True,
                                          "messages": [{"role": "user", "content": "hi"}]}) as response:
                await response.read()
            async with session.get(f"{base}/v1/models?api_key={UPSTREAM_KEY}", headers=client) as response:
                await response.read()
            async with session.get(f"{base}/manage/projects", headers={"Authorization": f"Basic {MANAGEMENT_TOKEN}"}):
                pass
            async with session.get(f"{base}/v1/models", headers={"Authorization": token["token"]}):
                pass  # no scheme
    finally:
        process.terminate()
        await asyncio.wait_for(process.communicate(), timeout=15)
    text = log_file.read_text()
    assert "llm-proxy stopped" in text
    for secret in secrets:
        assert secret not in text, f"a secret ({secret[:6]}…) is in the {log_format} log"
        assert secret[4:28] not in text, f"a long fragment of a secret ({secret[:6]}…) is in the log"
    access = [line for line in text.splitlines() if "llm_proxy.access" in line and "/v1/chat/completions" in line]
    assert len(access) == 2, access
    for line in access:
        for field in ("request_id", "duration_ms", "client_ip", "token_id"):
            assert field in line, (field, line)
        assert token["token_hint"] in line, line


# ---------------------------------------------------------------- CLI input files

# ---------------------------------------------------------------- README walk-through, with curl

async def test_readme_walkthrough_with_curl(upstream: Any, tmp_path: Path) -> None:
    import re
    import shutil

    assert shutil.which("curl")
    readme = (REPO / "README.md").read_text()
    walk = readme.split("## Walk-through", 1)[1].split("## Configuration", 1)[0]
    blocks = [block.split("```", 1)[0] for block in walk.split("```sh")[1:]]
    _, upstream_server = upstream
    port = free_port()
    workdir = tmp_path / "op"
    workdir.mkdir()
    assert main(["init", "--path", str(workdir / ".env")]) == 0
    env = child_env(LISTEN_ADDR=f"127.0.0.1:{port}", DATABASE_PATH=str(workdir / "data" / "gw.db"),
                    AUDIT_LOG_FILE=str(workdir / "data" / "audit.log"), LOG_FILE=str(workdir / "app.log"),
                    OPENAI_API_URL=str(upstream_server.make_url("")).rstrip("/"))
    process = await asyncio.create_subprocess_exec(sys.executable, "-m", "llm_proxy", "serve", env=env, cwd=workdir,
                                                   stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)

    async def sh(command: str) -> str:
        shell = await asyncio.create_subprocess_exec("bash", "-c", command, cwd=workdir, env=child_env(),
                                                     stdout=asyncio.subprocess.PIPE)
        out, _ = await shell.communicate()
        return out.decode()

    try:
        await _wait_healthy(port, process)
        first = blocks[0].replace("localhost:8080", f"127.0.0.1:{port}")
        commands = [line for line in first.replace("\\\n", " ").splitlines() if line.startswith(("export", "curl"))]
        export, create_project, create_token = commands
        project = orjson.loads(await sh(f"{export}; {create_project}"))
        assert project["name"] == "demo" and project["api_key"] == "sk-your****-key" and project["is_active"] is True
        token = orjson.loads(await sh(f"{export}; {create_token.replace('3f0c…', project['id'])}"))
        assert re.fullmatch(r"tok-[A-Za-z0-9_-]{43}", token["token"])
        assert token["token_hint"] == f"tok-{token['token'][4:8]}****{token['token'][-4:]}"
        assert token["max_requests"] == 1000 and token["rate_limit_per_minute"] == 30
        revoke = next(line for line in blocks[1].splitlines() if line.startswith("curl"))
        revoke = revoke.replace("localhost:8080", f"127.0.0.1:{port}").replace("a1b2…", token["id"])
        await sh(f"{export}; {revoke}")
        async with aiohttp.ClientSession() as session, session.get(
                f"http://127.0.0.1:{port}/v1/models", headers={"Authorization": f"Bearer {token['token']}"}) as answer:
            assert answer.status == 401 and (await answer.json())["error"]["code"] == "token_revoked"
    finally:
        process.terminate()
        await asyncio.wait_for(process.communicate(), timeout=15)
