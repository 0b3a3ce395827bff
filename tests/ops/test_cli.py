"""The `llm-proxy` command, in-process and as a real subprocess against a live gateway."""

from __future__ import annotations

import asyncio
import base64
import gzip
import re
import signal
import socket
import sqlite3
import stat
import sys
from collections.abc import Callable
from contextlib import closing
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple

import aiohttp
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from llm_proxy.app import AUDIT
from llm_proxy.audit.writer import AuditWriter
from llm_proxy.crypto import KeyRing
from llm_proxy.ops.cli import main
from llm_proxy.ops.cli.output import format_record, format_table
from llm_proxy.settings import VARIABLES, load_settings
from llm_proxy.storage.sqlite.audit import SqliteAudit
from llm_proxy.storage.sqlite.database import Database
from tests.fakes import ENCRYPTION_KEY, MANAGEMENT_TOKEN, UPSTREAM_KEY, Gateway, child_env

OTHER_KEY = base64.b64encode(bytes(range(50, 82))).decode()
THIRD_KEY = base64.b64encode(bytes(range(150, 182))).decode()


class Result(NamedTuple):
    code: int | None  # None: still running after the deadline (killed)
    out: str
    err: str

    def json(self) -> Any:
        return orjson.loads(self.out)


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No gateway variable leaks in from the developer's shell, and no stray .env is read."""
    monkeypatch.chdir(tmp_path)
    for name in (*VARIABLES, "LLM_PROXY_URL"):
        monkeypatch.delenv(name, raising=False)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> Result:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return Result(code, out, err)


async def run_async(capsys: pytest.CaptureFixture[str], *argv: str) -> Result:
    """Run the CLI in a worker thread, so this test's event loop keeps serving the gateway."""
    code = await asyncio.to_thread(main, list(argv))
    out, err = capsys.readouterr()
    return Result(code, out, err)


async def run_process(*argv: str, env: dict[str, str], stdin: bytes | None = None, cwd: Path | None = None,
                      deadline: float = 30.0) -> Result:
    """Run `python -m llm_proxy ARGV` as a process; one still running after `deadline` seconds is killed."""
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


def assert_one_line_error(result: Result, code: int, *fragments: str) -> None:
    assert result.code == code, result
    assert result.err.startswith("llm-proxy: ") and result.err.count("\n") == 1, result.err
    assert "Traceback" not in result.err
    for fragment in fragments:
        assert fragment in result.err


def assert_one_line(result: Result, *fragments: str) -> None:
    """A failed command (any non-zero code): one line saying what is wrong, whatever JSON log lines precede it."""
    assert result.code is not None, f"still running after the deadline; stderr so far: {result.err!r}"
    assert result.code != 0, result
    assert "Traceback" not in result.err, result.err
    # Application log lines (JSON, LOG_FILE unset) may precede it; the error itself is one line.
    lines = [line for line in result.err.strip().splitlines() if not line.startswith('{"time"')]
    assert len(lines) == 1, f"expected one error line on stderr, got {lines!r}"
    assert lines[0].startswith("llm-proxy: "), lines
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def assert_aligned(table: str) -> list[list[str]]:
    """Every value starts exactly under its column's header; return the cells."""
    lines = table.rstrip("\n").splitlines()
    starts = [match.start() for match in re.finditer(r"\S+", lines[0])]
    rows = []
    for line in lines[1:]:
        for start in starts[1:]:
            assert line[start - 2:start] == "  " and line[start] != " ", (line, start)
        rows.append([line[a:b].strip() for a, b in zip(starts, [*starts[1:], None], strict=True)])
    return rows


def gateway_url(gateway: Gateway) -> str:
    return str(gateway.client.make_url("")).rstrip("/")


# ---- no gateway needed ----

@pytest.mark.parametrize("argv", [
    [], ["serve"], ["init"], ["gen-secret"], ["rotate-key"],
    ["project"], ["project", "create"], ["project", "list"], ["project", "get"], ["project", "update"],
    ["token"], ["token", "create"], ["token", "list"], ["token", "get"], ["token", "revoke"], ["token", "refresh"],
    ["audit"], ["audit", "prune"], ["audit", "verify"],
])
def test_help_on_every_level(capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
    result = run(capsys, *argv, "--help")
    assert result.code == 0 and result.out.startswith(f"usage: llm-proxy {' '.join(argv)}".rstrip())
    assert result.err == ""


@pytest.mark.parametrize("argv", [
    [], ["frobnicate"], ["project"], ["token", "create"], ["token", "create", "p", "--duration", "0"],
    ["token", "create", "p", "--duration", "soon"], ["token", "create", "p", "--max-requests", "-1"],
    ["project", "list", "--active", "--inactive"], ["project", "update", "some-id"],
    ["token", "revoke"], ["token", "revoke", "some-id", "--project", "p"], ["audit", "prune", "--batch-size", "0"],
    ["project", "list", "--url", "ftp://example.com"], ["project", "list", "--timeout", "-1"],
    ["gen-secret", "--bogus"],
])
def test_bad_usage_exits_2_with_one_line(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
                                         argv: list[str]) -> None:
    monkeypatch.setenv("MANAGEMENT_TOKEN", MANAGEMENT_TOKEN)
    result = run(capsys, *argv)
    assert_one_line_error(result, 2)
    assert result.out == ""


def test_management_commands_need_a_management_token(capsys: pytest.CaptureFixture[str]) -> None:
    assert_one_line_error(run(capsys, "project", "list"), 2, "MANAGEMENT_TOKEN")


def test_gen_secret(capsys: pytest.CaptureFixture[str]) -> None:
    first, second = run(capsys, "gen-secret"), run(capsys, "gen-secret")
    assert first.code == 0 and len(first.out.strip()) == 48 and first.out != second.out
    assert re.fullmatch(r"[A-Za-z0-9_-]{48}\n", first.out)
    key = run(capsys, "gen-secret", "--encryption-key")
    assert len(key.out.strip()) == 44 and len(base64.b64decode(key.out.strip(), validate=True)) == 32
    # Both are accepted by the gateway's own validation.
    load_settings({"MANAGEMENT_TOKEN": first.out.strip(), "ENCRYPTION_KEY": key.out.strip()}, env_file=None)


def test_init_writes_a_private_env_and_never_overwrites(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    result = run(capsys, "init")
    env_file = tmp_path / ".env"
    assert result.code == 0 and stat.S_IMODE(env_file.stat().st_mode) == 0o600
    content = env_file.read_text()
    settings = load_settings({}, env_file=env_file)
    assert f"\n  {settings.management_tokens[0]}\n" in result.out  # shown once, as the README says
    assert base64.b64encode(settings.encryption_key).decode() not in result.out
    assert len(settings.encryption_key) == 32

    again = run(capsys, "init")
    assert_one_line_error(again, 1, "exists already")
    assert env_file.read_text() == content

    other = tmp_path / "other.env"
    assert run(capsys, "init", "--path", str(other)).code == 0
    assert other.read_text() != content


@pytest.mark.parametrize(("variable", "value"), [
    ("ENCRYPTION_KEY", "not-base64-but-a-secret-value!!"),
    ("MANAGEMENT_TOKEN", "short-secret-value"),
    ("LOG_LEVEL", "verbose"),
    ("TLS_MIN_VERSION", "1.1"),
    ("LOG_FILE", "/nonexistent-dir/for/llm-proxy.log"),
    ("TLS_CERT_FILE", "/nonexistent-cert.pem"),
])
def test_serve_with_invalid_config_prints_one_line_and_exits_2(
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, variable: str, value: str) -> None:
    monkeypatch.setenv("MANAGEMENT_TOKEN", MANAGEMENT_TOKEN)
    monkeypatch.setenv("ENCRYPTION_KEY", ENCRYPTION_KEY)
    if variable == "TLS_CERT_FILE":
        monkeypatch.setenv("TLS_KEY_FILE", "/nonexistent-key.pem")
    monkeypatch.setenv(variable, value)
    result = run(capsys, "serve")
    assert_one_line_error(result, 2, variable)
    assert value not in result.err or variable in ("LOG_FILE", "TLS_CERT_FILE")  # paths are not secrets


@pytest.mark.system
async def test_serve_with_invalid_config_as_a_process() -> None:
    secret = "this-is-the-secret-value-which-is-not-base64!"
    result = await run_process("serve", env=child_env(MANAGEMENT_TOKEN=MANAGEMENT_TOKEN, ENCRYPTION_KEY=secret))
    assert_one_line_error(result, 2, "ENCRYPTION_KEY")
    assert secret not in result.err and result.out == ""


def test_format_table_aligns_columns() -> None:
    table = format_table(["id", "name", "is_active"], [["1", "a-long-name", True], ["22", None, False]])
    assert table.splitlines() == ["ID  NAME         IS_ACTIVE", "1   a-long-name  yes", "22  -            no"]


# A name stored before names were checked at input (review: U+009B, the 8-bit CSI, in a project
# name made `project list` clear the operator's screen).
HOSTILE_NAMES = ("p\x9b2J", "\x1b[31mred", "two\nlines\u2028")


def no_raw_control(text: str) -> bool:
    return all(line.isprintable() for line in text.split("\n"))


def test_format_table_and_record_escape_control_characters() -> None:
    table = format_table(["id", "name"], [[str(n), name] for n, name in enumerate(HOSTILE_NAMES)])
    record = format_record({"id": "1", "name": HOSTILE_NAMES[0], "note": HOSTILE_NAMES[1]}, ["id", "name", "note"])

    assert no_raw_control(table) and no_raw_control(record)
    assert table.splitlines() == ["ID  NAME",
                                  "0   p\\x9b2J",
                                  "1   \\x1b[31mred",
                                  "2   two\\nlines\\u2028"]
    assert record.splitlines() == ["id    1", "name  p\\x9b2J", "note  \\x1b[31mred"]


async def test_rows_stored_earlier_and_error_messages_cannot_drive_the_terminal(
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    async def projects(request: web.Request) -> web.Response:
        return web.json_response({"data": [{"id": f"p-{n}", "name": name, "is_active": True}
                                           for n, name in enumerate(HOSTILE_NAMES)]})

    async def refused(request: web.Request) -> web.Response:
        return web.json_response({"error": {"message": "no project \x1b]0;owned\x07\x9b2J", "code": "not_found"}},
                                 status=404)

    app = web.Application()
    app.router.add_get("/manage/projects", projects)
    app.router.add_get("/manage/projects/{id}", refused)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        monkeypatch.setenv("MANAGEMENT_TOKEN", MANAGEMENT_TOKEN)
        url = str(server.make_url("")).rstrip("/")
        listed = await run_async(capsys, "project", "list", "--url", url)
        failed = await run_async(capsys, "project", "get", "p-0", "--url", url)
    finally:
        await server.close()

    assert listed.code == 0 and no_raw_control(listed.out) and "p\\x9b2J" in listed.out
    assert len(listed.out.splitlines()) == 1 + len(HOSTILE_NAMES)
    assert_one_line_error(failed, 1, "HTTP 404 not_found: no project \\x1b]0;owned\\x07\\x9b2J")
    assert no_raw_control(failed.err)


# ---- against a live gateway, in-process ----

async def test_projects_and_tokens_in_process(make_gateway: Callable[..., Any], capsys: pytest.CaptureFixture[str],
                                              monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    gateway = await make_gateway()
    monkeypatch.setenv("MANAGEMENT_TOKEN", MANAGEMENT_TOKEN)
    monkeypatch.setenv("LLM_PROXY_URL", gateway_url(gateway))
    key_file = tmp_path / "upstream.key"
    key_file.write_text(UPSTREAM_KEY + "\n")

    created = await run_async(capsys, "project", "create", "alpha", "--api-key-file", str(key_file), "--json")
    assert created.code == 0, created
    project = created.json()
    assert project["name"] == "alpha" and project["is_active"] is True
    assert UPSTREAM_KEY not in created.out and project["api_key"].startswith("sk-u")
    other = await run_async(capsys, "project", "create", "beta", "--api-key-file", str(key_file))
    assert other.code == 0 and re.search(r"^name\s+beta$", other.out, re.MULTILINE)

    listed = await run_async(capsys, "project", "list")
    assert listed.code == 0 and listed.out.startswith("ID ")
    rows = assert_aligned(listed.out)
    # Oldest first, then by id: both were created in the same second.
    assert sorted(row[1] for row in rows) == ["alpha", "beta"] and project["id"] in {row[0] for row in rows}
    assert UPSTREAM_KEY not in listed.out
    assert (await run_async(capsys, "project", "list", "--inactive", "--json")).json() == {"data": []}

    fetched = await run_async(capsys, "project", "get", project["id"], "--json")
    assert fetched.json()["id"] == project["id"]
    updated = await run_async(capsys, "project", "update", project["id"], "--name", "gamma", "--deactivate",
                              "--json")
    assert updated.json()["name"] == "gamma" and updated.json()["is_active"] is False
    inactive = await run_async(capsys, "token", "create", project["id"])
    assert_one_line_error(inactive, 1, "HTTP 403 project_inactive")
    await run_async(capsys, "project", "update", project["id"], "--activate")

    issued = await run_async(capsys, "token", "create", project["id"], "--duration", "30", "--max-requests", "5",
                             "--json")
    token = issued.json()
    assert re.fullmatch(r"tok-[A-Za-z0-9_-]{43}", token["token"]) and token["max_requests"] == 5
    shown = await run_async(capsys, "token", "create", project["id"], "--rate-limit", "0")
    plaintext = re.search(r"^token: (tok-\S+)$", shown.out, re.MULTILINE)
    assert shown.code == 0 and plaintext is not None and "only time" in shown.err
    models = await gateway.client.get("/v1/models", headers={"Authorization": f"Bearer {plaintext.group(1)}"})
    assert models.status == 200

    tokens = await run_async(capsys, "token", "list", "--project", project["id"])
    rows = assert_aligned(tokens.out)
    assert len(rows) == 2 and [row[2] for row in rows if row[0] == token["id"]] == [token["token_hint"]]
    assert token["token"] not in tokens.out and plaintext.group(1) not in tokens.out
    assert len((await run_async(capsys, "token", "list", "--json")).json()["data"]) == 2
    got = await run_async(capsys, "token", "get", token["id"])
    assert re.search(r"^max_requests\s+5$", got.out, re.MULTILINE) and token["token"] not in got.out

    refreshed = await run_async(capsys, "token", "refresh", token["id"], "--duration", "10", "--json")
    successor = refreshed.json()
    assert successor["token"] != token["token"] and successor["max_requests"] == 5
    assert (await run_async(capsys, "token", "get", token["id"], "--json")).json()["is_active"] is False

    revoked = await run_async(capsys, "token", "revoke", successor["id"])
    assert revoked.code == 0 and revoked.out == f"revoked token {successor['id']}\n"
    assert (await run_async(capsys, "token", "get", successor["id"], "--json")).json()["revoked_at"]
    batch = await run_async(capsys, "token", "revoke", "--project", project["id"], "--json")
    assert batch.json() == {"revoked_count": 1, "already_revoked_count": 2, "total_tokens": 3}

    assert_one_line_error(await run_async(capsys, "project", "get", "no-such-id"), 1, "HTTP 404", "not found")
    assert_one_line_error(await run_async(capsys, "token", "revoke", "no-such-id"), 1, "HTTP 404")
    wrong = tmp_path / "wrong-token"
    wrong.write_text("x" * 40)
    denied = await run_async(capsys, "project", "list", "--token-file", str(wrong))
    assert_one_line_error(denied, 1, "HTTP 401 invalid_management_token")
    assert "x" * 40 not in denied.err
    with closing(socket.socket()) as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    down = await run_async(capsys, "project", "list", "--url", f"http://127.0.0.1:{closed_port}")
    assert_one_line_error(down, 1, "cannot connect to the gateway")


# ---- against a live gateway, as a subprocess ----

@pytest.mark.system
async def test_commands_as_a_subprocess(make_gateway: Callable[..., Any], tmp_path: Path) -> None:
    gateway = await make_gateway()
    env = child_env(MANAGEMENT_TOKEN=MANAGEMENT_TOKEN, LLM_PROXY_URL=gateway_url(gateway))

    created = await run_process("project", "create", "piped", "--json", env=env, stdin=UPSTREAM_KEY.encode() + b"\n")
    assert created.code == 0, created
    project = created.json()
    assert project["name"] == "piped" and UPSTREAM_KEY not in created.out

    issued = await run_process("token", "create", project["id"], env=env)
    assert issued.code == 0, issued
    plaintext = re.search(r"^token: (tok-\S+)$", issued.out, re.MULTILINE)
    assert plaintext is not None
    models = await gateway.client.get("/v1/models", headers={"Authorization": f"Bearer {plaintext.group(1)}"})
    assert models.status == 200

    listed = await run_process("token", "list", env=env)
    assert listed.code == 0 and assert_aligned(listed.out)[0][1] == project["id"]

    missing = await run_process("token", "get", "no-such-token", env=env)
    assert_one_line_error(missing, 1, "HTTP 404")
    # The management token can also come from a .env in the working directory.
    (tmp_path / "cli").mkdir()
    (tmp_path / "cli" / ".env").write_text(f"MANAGEMENT_TOKEN={'y' * 40}\n")
    denied = await run_process("project", "list", env=child_env(LLM_PROXY_URL=gateway_url(gateway)),
                               cwd=tmp_path / "cli")
    assert_one_line_error(denied, 1, "HTTP 401")
    assert "y" * 40 not in denied.err


@pytest.mark.parametrize(("status", "argv"), [
    (301, ["project", "list"]),
    (302, ["token", "revoke", "0b7d3c9e-1111-4222-8333-944455556666"]),
    (307, ["token", "revoke", "0b7d3c9e-1111-4222-8333-944455556666"]),
    (308, ["token", "revoke", "--project", "p-1"]),
])
async def test_a_redirect_is_a_failure_naming_where_it_points(capsys: pytest.CaptureFixture[str],
                                                             monkeypatch: pytest.MonkeyPatch,
                                                             status: int, argv: list[str]) -> None:
    """An http:// URL behind a proxy that redirects to https://: nothing was done, so never report success."""
    seen: list[str] = []

    async def redirect(request: web.Request) -> web.Response:
        seen.append(f"{request.method} {request.path}")
        return web.Response(status=status, headers={"Location": "https://gateway.invalid" + request.path})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", redirect)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        monkeypatch.setenv("MANAGEMENT_TOKEN", MANAGEMENT_TOKEN)
        result = await run_async(capsys, *argv, "--url", str(server.make_url("")).rstrip("/"))
    finally:
        await server.close()
    assert len(seen) == 1  # asked once, never followed
    assert_one_line_error(result, 1, f"HTTP {status}", "https://gateway.invalid/manage/")
    assert result.out == "" and "revoked" not in result.err and MANAGEMENT_TOKEN not in result.err


async def _odd_server(handler: Callable[[web.Request], Any]) -> TestServer:
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    return server


@pytest.mark.system
@pytest.mark.parametrize(("status", "body", "headers", "fragment"), [
    (500, b"<html>oops</html>", {}, "500"),
    (502, b"Bad Gateway", {}, "502"),
    (301, b"", {"Location": "https://example.invalid/manage/projects"}, "301"),
    (200, b"<html>login</html>", {"Content-Type": "text/html"}, "not JSON"),
])
async def test_cli_against_a_misbehaving_gateway_gives_a_clear_line(
        tmp_path: Path, status: int, body: bytes, headers: dict[str, str], fragment: str) -> None:
    """From the third review (the operator's side)."""
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


@pytest.mark.system
async def test_cli_gateway_answering_401_and_500_json(tmp_path: Path) -> None:
    """From the third review (the operator's side)."""
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


@pytest.mark.parametrize("option", ["--api-key-file", "--token-file"])
def test_a_binary_input_file_is_a_usage_error(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
                                              tmp_path: Path, option: str) -> None:
    binary = tmp_path / "secret.bin"
    binary.write_bytes(b"\xff\xfesk-binary-junk-0123456789\n")
    monkeypatch.setenv("MANAGEMENT_TOKEN", MANAGEMENT_TOKEN)
    with closing(socket.socket()) as probe:
        probe.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{probe.getsockname()[1]}"  # never reached: the input is refused first
    argv = (["project", "create", "x", "--api-key-file", str(binary)] if option == "--api-key-file"
            else ["project", "list", "--token-file", str(binary)])
    result = run(capsys, *argv, "--url", url)
    assert_one_line_error(result, 2, option, "not UTF-8")
    assert "binary-junk" not in result.err and "\\x" not in result.err


# ---- key rotation ----

def stored_key_ciphertexts(database: Path) -> list[str]:
    with closing(sqlite3.connect(database)) as conn:
        return [row[0] for row in conn.execute("SELECT api_key_encrypted FROM projects ORDER BY name")]


def audit_rows(database: Path, action: str) -> list[dict[str, Any]]:
    with closing(sqlite3.connect(database)) as conn:
        conn.row_factory = sqlite3.Row
        return [dict(row) for row in conn.execute("SELECT * FROM audit_events WHERE action = ? ORDER BY seq",
                                                  (action,))]


@pytest.mark.system
async def test_rotate_key_while_serving(make_gateway: Callable[..., Any], capsys: pytest.CaptureFixture[str],
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    old = await make_gateway(ENCRYPTION_KEY=ENCRYPTION_KEY)
    token = await old.token()
    await old.project("second", api_key="sk-second-upstream-key-0123456789")
    database = old.settings.database_path
    before = stored_key_ciphertexts(database)

    rotated = await run_process("rotate-key", env=child_env(
        MANAGEMENT_TOKEN=MANAGEMENT_TOKEN, ENCRYPTION_KEY=OTHER_KEY, ENCRYPTION_KEY_PREVIOUS=ENCRYPTION_KEY,
        DATABASE_PATH=str(database), AUDIT_LOG_FILE=str(old.settings.audit_log_file)))
    assert rotated.code == 0, rotated
    assert rotated.out == "re-encrypted 2 project key(s) under the current ENCRYPTION_KEY\n"
    after = stored_key_ciphertexts(database)
    assert after != before and all(KeyRing(base64.b64decode(OTHER_KEY)).is_current(value) for value in after)

    # The running gateway keeps its decrypted keys; a fresh one knows only the new key.
    headers = {"Authorization": f"Bearer {token['token']}"}
    assert (await old.client.get("/v1/models", headers=headers)).status == 200
    await old.close()  # its audit events are written as it stops; then another process may serve the database
    fresh = await make_gateway(ENCRYPTION_KEY=OTHER_KEY)
    assert (await fresh.client.get("/v1/models", headers=headers)).status == 200
    assert fresh.upstream.requests[-1].headers["Authorization"] == f"Bearer {UPSTREAM_KEY}"

    for name, value in (("MANAGEMENT_TOKEN", MANAGEMENT_TOKEN), ("ENCRYPTION_KEY", OTHER_KEY),
                        ("ENCRYPTION_KEY_PREVIOUS", ENCRYPTION_KEY), ("DATABASE_PATH", str(database)),
                        ("AUDIT_LOG_FILE", str(old.settings.audit_log_file))):
        monkeypatch.setenv(name, value)
    again = await run_async(capsys, "rotate-key", "--json")
    assert again.code == 0 and again.json() == {"reencrypted": 0}
    assert stored_key_ciphertexts(database) == after

    monkeypatch.setenv("ENCRYPTION_KEY", THIRD_KEY)
    monkeypatch.setenv("ENCRYPTION_KEY_PREVIOUS", ENCRYPTION_KEY)  # not the key the rows are under now
    failed = await run_async(capsys, "rotate-key")
    assert_one_line_error(failed, 1, "nothing was changed")
    assert stored_key_ciphertexts(database) == after

    await fresh.app[AUDIT].flush()
    events = audit_rows(database, "key.rotate")
    assert [(event["actor"], event["result"]) for event in events] == [
        ("system", "success"), ("system", "success"), ("system", "failure")]
    assert [orjson.loads(event["details"]).get("reencrypted") for event in events] == [2, 0, None]
    verified = await run_async(capsys, "audit", "verify", "--db")
    assert verified.code == 0 and verified.out.startswith("audit_events: OK"), verified


@pytest.mark.system
async def test_rotate_key_reads_rows_under_either_previous_key(make_gateway: Callable[..., Any],
                                                               tmp_path: Path) -> None:
    """From the third review (the operator's side)."""
    first = await make_gateway(ENCRYPTION_KEY=ENCRYPTION_KEY)
    await first.project("under-first")
    await first.close()  # one serving process per database
    second = await make_gateway(ENCRYPTION_KEY=OTHER_KEY, ENCRYPTION_KEY_PREVIOUS=ENCRYPTION_KEY)
    await second.project("under-second")
    await second.close()
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


# ---- audit verify and prune ----

async def write_events(database: Path, audit_file: Path, count: int, when: datetime) -> None:
    db = await Database.open(database)
    # As a gateway on this host writes them: the chain of its instance, the host name, which the CLI's
    # own events (audit.prune) continue.
    writer = AuditWriter(SqliteAudit(db), enabled=True, file_path=audit_file, create_dir=True, store_in_db=True,
                         mask_client_ip=False, clock=lambda: when, instance=socket.gethostname())
    await writer.start()
    for number in range(count):
        writer.emit("token.create", actor="management", result="success", project_id=f"p{number}",
                    details={"token_id": "tok-1234****cdef"})
    await writer.close()
    await db.close()


@pytest.mark.system
async def test_audit_verify_and_prune(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
                                      tmp_path: Path) -> None:
    database, audit_file = tmp_path / "data" / "gateway.db", tmp_path / "data" / "audit.log"
    await write_events(database, audit_file, 5, datetime(2020, 1, 1, tzinfo=UTC))
    for name, value in (("MANAGEMENT_TOKEN", MANAGEMENT_TOKEN), ("ENCRYPTION_KEY", ENCRYPTION_KEY),
                        ("DATABASE_PATH", str(database)), ("AUDIT_LOG_FILE", str(audit_file))):
        monkeypatch.setenv(name, value)

    files = await run_async(capsys, "audit", "verify")
    assert files.code == 0 and files.out.startswith("files: OK: 5 events, seq 1..5"), files
    table = await run_async(capsys, "audit", "verify", "--db", "--json")
    assert table.code == 0 and table.json()["db"]["ok"] is True and "files" not in table.json()

    audit_file.rename(audit_file.with_name("audit.log.1"))  # logrotate's rename; the writer creates a new file
    pruned = await run_async(capsys, "audit", "prune", "--older-than-days", "30", "--batch-size", "2", "--json")
    assert pruned.code == 0, pruned
    host = socket.gethostname()
    assert pruned.json()["deleted"] == 5 and pruned.json()["batches"] == 3
    assert pruned.json()["chains"][host]["last_pruned_seq"] == 5
    (event,) = audit_rows(database, "audit.prune")
    details = orjson.loads(event["details"])
    assert event["actor"] == "system" and event["result"] == "success" and event["seq"] == 6
    assert event["instance"] == host
    assert details["chains"][host]["last_pruned_seq"] == 5 and len(details["chains"][host]["last_pruned_hash"]) == 64
    assert details["older_than_days"] == 30 and details["deleted"] == 5

    default_age = await run_async(capsys, "audit", "prune")  # AUDIT_RETENTION_DAYS (90): nothing that old is left
    assert default_age.code == 0 and default_age.out.startswith("pruned 0 audit event(s) older than 90 day(s)")

    # The table still verifies from the prune's anchor, and the rotated + current files as one chain.
    table = await run_async(capsys, "audit", "verify", "--db")
    assert table.code == 0 and "from the anchor seq 5" in table.out, table
    both = await run_async(capsys, "audit", "verify")
    assert both.code == 0 and "OK: 7 events, seq 1..7" in both.out, both

    rotated = audit_file.with_name("audit.log.1")
    lines = rotated.read_bytes().splitlines(keepends=True)
    lines[1] = lines[1].replace(b'"project_id":"p1"', b'"project_id":"pX"')
    rotated.write_bytes(b"".join(lines))
    broken = await run_process("audit", "verify", str(rotated), str(audit_file), env=child_env())
    assert broken.code == 1 and f"BROKEN at {rotated}:2: altered" in broken.out, broken
    assert (await run_async(capsys, "audit", "verify", "--db")).code == 0  # the table is a separate copy

    assert_one_line_error(await run_async(capsys, "audit", "verify", str(tmp_path / "nope.log")), 2, "nope.log")
    monkeypatch.setenv("DATABASE_PATH", str(tmp_path / "missing.db"))
    assert_one_line_error(await run_async(capsys, "audit", "prune"), 2, "DATABASE_PATH")
    assert not (tmp_path / "missing.db").exists()


async def test_audit_verify_checks_the_files_against_the_databases_chain_head(
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Deleting the newest lines leaves a chain that holds; only the head kept in the database shows the loss."""
    database, audit_file = tmp_path / "data" / "gateway.db", tmp_path / "data" / "audit.log"
    await write_events(database, audit_file, 3, datetime(2024, 1, 1, tzinfo=UTC))
    for name, value in (("MANAGEMENT_TOKEN", MANAGEMENT_TOKEN), ("ENCRYPTION_KEY", ENCRYPTION_KEY),
                        ("DATABASE_PATH", str(database)), ("AUDIT_LOG_FILE", str(audit_file))):
        monkeypatch.setenv(name, value)
    intact = await run_async(capsys, "audit", "verify")
    assert intact.code == 0 and f"chain heads: {socket.gethostname()} at seq 3" in intact.out, intact

    # A backup of the database taken now, then the gateway writes on: a head read just before the
    # files grew must not make a sound chain look tampered with.
    earlier = tmp_path / "earlier.db"
    with closing(sqlite3.connect(database)) as source, closing(sqlite3.connect(earlier)) as copy:
        source.backup(copy)
    await write_events(database, audit_file, 1, datetime(2024, 1, 2, tzinfo=UTC))
    monkeypatch.setenv("DATABASE_PATH", str(earlier))
    assert (await run_async(capsys, "audit", "verify")).code == 0
    monkeypatch.setenv("DATABASE_PATH", str(database))

    lines = audit_file.read_bytes().splitlines(keepends=True)
    audit_file.write_bytes(b"".join(lines[:-2]))  # the two newest events deleted
    truncated = await run_async(capsys, "audit", "verify", "--json")
    assert truncated.code == 1, truncated
    problem = truncated.json()["files"]["problem"]
    assert problem["kind"] == "removed" and "3..4" in problem["message"]

    # Without a database the files are still verified, and the output says what could not be checked.
    monkeypatch.setenv("DATABASE_PATH", str(tmp_path / "elsewhere" / "none.db"))
    alone = await run_async(capsys, "audit", "verify")
    assert alone.code == 0 and alone.out.startswith("files: OK: 2 events") and "verified alone" in alone.out
    assert not (tmp_path / "elsewhere").exists()
    (tmp_path / "garbage.db").write_bytes(b"not a database at all" * 100)
    monkeypatch.setenv("DATABASE_PATH", str(tmp_path / "garbage.db"))
    unreadable = await run_async(capsys, "audit", "verify")
    assert unreadable.code == 0 and "unreadable" in unreadable.out and "verified alone" in unreadable.out


@pytest.mark.system
async def test_audit_verify_gz_rotation_with_dateext_in_order(tmp_path: Path) -> None:
    """logrotate with dateext + compress: audit.log-YYYYMMDD.gz files and the current file verify as one chain.

    From the third review (the operator's side)."""
    from llm_proxy.audit.writer import AuditWriter
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


# ---- serve, for real ----

@pytest.mark.system
async def test_serve_runs_logs_and_stops_on_sigterm(tmp_path: Path) -> None:
    with closing(socket.socket()) as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log_file = tmp_path / "app.log"
    env = child_env(MANAGEMENT_TOKEN=MANAGEMENT_TOKEN, ENCRYPTION_KEY=ENCRYPTION_KEY, LISTEN_ADDR=f"127.0.0.1:{port}",
                    DATABASE_PATH=str(tmp_path / "gateway.db"), AUDIT_LOG_FILE=str(tmp_path / "audit.log"),
                    LOG_FILE=str(log_file), LOG_FORMAT="json", SHUTDOWN_GRACE="5s")
    process = await asyncio.create_subprocess_exec(sys.executable, "-m", "llm_proxy", "serve", env=env,
                                                   stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        async with aiohttp.ClientSession() as session:
            for _ in range(200):
                try:
                    async with session.get(f"http://127.0.0.1:{port}/health") as response:
                        if response.status == 200:
                            break
                except aiohttp.ClientConnectionError:
                    pass
                if process.returncode is not None:
                    break
                await asyncio.sleep(0.05)  # polling a process we do not control
            async with session.get(f"http://127.0.0.1:{port}/manage/projects?api_key=sk-in-query-0123456789",
                                   headers={"Authorization": f"Bearer {MANAGEMENT_TOKEN}",
                                            "X-Request-ID": "req-serve-1"}) as response:
                assert response.status == 200
        process.send_signal(signal.SIGTERM)
        out, err = await asyncio.wait_for(process.communicate(), timeout=15)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode == 0, err
    assert out == b"" and err == b""
    lines = [orjson.loads(line) for line in log_file.read_bytes().splitlines()]
    assert lines[0]["message"].startswith("llm-proxy ") and f"127.0.0.1:{port}" in lines[0]["message"]
    access = [line for line in lines if line["logger"] == "llm_proxy.access" and line["path"] == "/manage/projects"]
    assert access and access[0]["request_id"] == "req-serve-1" and access[0]["status"] == 200
    assert lines[-1]["message"] == "llm-proxy stopped"
    text = log_file.read_text()
    assert MANAGEMENT_TOKEN not in text and "sk-in-query-0123456789" not in text
