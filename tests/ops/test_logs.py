"""Application logs: JSON and text lines, masking of secrets from any logger, logrotate, the access line, and a real
`serve` at debug level."""

from __future__ import annotations

import asyncio
import base64
import io
import logging
import os
import re
import stat
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from llm_proxy.app import create_app
from llm_proxy.audit.masking import mask_secrets
from llm_proxy.ops.access_log import ACCESS_LOGGER, AccessLogger, AccessSink
from llm_proxy.ops.logs import LogListener, configure_logging
from llm_proxy.settings import ConfigError
from tests.fakes import ENCRYPTION_KEY as GATEWAY_ENCRYPTION_KEY
from tests.fakes import (
    MANAGEMENT_TOKEN,
    UPSTREAM_KEY,
    UpstreamState,
    free_port,
    make_settings,
    serve_env,
    wait_healthy,
)

CLIENT_TOKEN = "tok-" + "Zq9_x-Lm3Pw7Rt2Vb8Nc4Hd6Jf1Ks5Ga0Ye3Ui7Oo2Aa"
ENCRYPTION_KEY = base64.b64encode(bytes(range(100, 132))).decode()  # 44 characters; not the gateway's own
HEX_KEY = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
SECRETS = (CLIENT_TOKEN, UPSTREAM_KEY, MANAGEMENT_TOKEN, ENCRYPTION_KEY, HEX_KEY)

Configure = Callable[..., tuple[LogListener, Path]]


@pytest.fixture
def configure(tmp_path: Path) -> Iterator[Configure]:
    """Configure logging to tmp_path/app.log (or as overridden); undo it afterwards."""
    root = logging.getLogger()
    level = root.level
    listeners: list[LogListener] = []

    def start(**overrides: str) -> tuple[LogListener, Path]:
        settings = make_settings(tmp_path, **{"LOG_FILE": str(tmp_path / "app.log"), **overrides})
        listeners.append(configure_logging(settings))
        return listeners[-1], settings.log_file or tmp_path / "stderr"

    yield start
    for listener in listeners:
        listener.stop()
    root.setLevel(level)


def json_lines(path: Path) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines()]


def test_json_lines_carry_time_level_logger_message_and_extras(configure: Configure) -> None:
    listener, path = configure(LOG_FORMAT="json", LOG_LEVEL="info")
    logging.getLogger("llm_proxy.test").info("hello %s", "world", extra={"request_id": "req-1", "status": 200})
    logging.getLogger("llm_proxy.test").debug("not at info level")
    try:
        raise ValueError("broken")
    except ValueError:
        logging.getLogger("llm_proxy.test").exception("it failed")
    listener.stop()

    first, second = json_lines(path)
    assert first["message"] == "hello world"
    assert first["level"] == "info" and first["logger"] == "llm_proxy.test"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", first["time"])
    assert first["request_id"] == "req-1" and first["status"] == 200
    assert second["level"] == "error" and second["message"] == "it failed"
    assert "ValueError: broken" in second["exception"]


def test_text_lines_are_readable_and_keep_extras(configure: Configure) -> None:
    listener, path = configure(LOG_FORMAT="text", LOG_LEVEL="warning")
    logging.getLogger("llm_proxy.test").info("below the level")
    logging.getLogger("llm_proxy.test").warning("disk almost full", extra={"request_id": "req-2"})
    listener.stop()

    (line,) = path.read_text().splitlines()
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z WARNING llm_proxy.test: disk almost full "
                        r"request_id=req-2", line), line


@pytest.mark.parametrize("log_format", ["json", "text"])
def test_every_line_names_the_instance_when_one_is_set(configure: Configure, log_format: str) -> None:
    listener, path = configure(LOG_FORMAT=log_format, INSTANCE_ID="gw-2")
    logging.getLogger("llm_proxy.test").warning("one")
    logging.getLogger("llm_proxy.test").warning("two", extra={"instance": "named-by-caller"})
    listener.access.append((1_700_000_000.0, "req-1", "GET", "/health", 200, 0.001, "127.0.0.1", None))
    listener.stop()
    if log_format == "json":
        assert sorted(line["instance"] for line in json_lines(path)) == ["gw-2", "gw-2", "named-by-caller"]
    else:
        lines = path.read_text().splitlines()
        assert sorted(line.rsplit(" instance=", 1)[-1] for line in lines) == ["gw-2", "gw-2", "named-by-caller"]


def test_no_instance_is_named_when_none_is_set(configure: Configure) -> None:
    listener, path = configure(LOG_FORMAT="json")
    logging.getLogger("llm_proxy.test").warning("one")
    listener.access.append((1_700_000_000.0, "req-1", "GET", "/health", 200, 0.001, "127.0.0.1", None))
    listener.stop()
    assert all("instance" not in line for line in json_lines(path))


def test_stderr_is_the_default_destination(configure: Configure, capsys: pytest.CaptureFixture[str]) -> None:
    listener, _ = configure(LOG_FILE="", LOG_FORMAT="json")
    logging.getLogger("llm_proxy.test").warning("to stderr")
    listener.stop()
    assert orjson.loads(capsys.readouterr().err)["message"] == "to stderr"


def test_an_unopenable_log_file_is_a_config_error(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, LOG_FILE=str(tmp_path / "missing-dir" / "app.log"))
    with pytest.raises(ConfigError, match=r"^LOG_FILE: cannot open"):
        configure_logging(settings)


@pytest.mark.parametrize("log_format", ["json", "text"])
async def test_secrets_logged_at_debug_from_any_module_never_reach_the_output(
        configure: Configure, log_format: str) -> None:
    listener, path = configure(LOG_FORMAT=log_format, LOG_LEVEL="debug")
    anywhere = logging.getLogger("some.third_party.module")
    anywhere.debug("presented %s for key %s", CLIENT_TOKEN, UPSTREAM_KEY)
    anywhere.debug("headers: %r", {"Authorization": f"Bearer {MANAGEMENT_TOKEN}"})
    anywhere.debug("ENCRYPTION_KEY=%s hex=%s", ENCRYPTION_KEY, HEX_KEY,
                   extra={"key": ENCRYPTION_KEY, "headers": {"authorization": [f"Bearer {CLIENT_TOKEN}"]}})
    anywhere.debug(f"already formatted: {CLIENT_TOKEN}", stack_info=True)
    for name in ("aiohttp.server", "aiohttp.client", "aiohttp.access", "aiohttp.web"):
        logging.getLogger(name).debug("Authorization: Bearer %s", CLIENT_TOKEN)
    try:
        raise RuntimeError(f"upstream rejected {UPSTREAM_KEY}")
    except RuntimeError:
        anywhere.exception("failed with %s", MANAGEMENT_TOKEN)

    # And a real aiohttp code path: its server logs a handler's exception with the traceback.
    async def handler(request: web.Request) -> web.Response:
        raise RuntimeError(f"boom {CLIENT_TOKEN} {ENCRYPTION_KEY}")

    app = web.Application()
    app.router.add_get("/", handler)
    async with TestClient(TestServer(app)) as client:
        assert (await client.get("/")).status == 500
    listener.stop()

    output = path.read_text()
    for secret in SECRETS:
        assert secret not in output
        assert secret[6:30] not in output  # not even a long fragment
    assert "tok-Zq9_****o2Aa" in output  # obfuscated, still recognisable
    assert "Bearer " in output and "Error handling request" in output and "RuntimeError: boom" in output


@pytest.mark.parametrize(("text", "expected"), [
    ("path /usr/lib/python3.11/site-packages/aiohttp/web_protocol.py", None),
    ("/manage/tokens/3f2a0c1e-1234-4abc-9def-0123456789ab/refresh", None),
    ("hint tok-abcd****wxyz stays as it is", None),
    ("disk-usage, task-force, the api_key field, a bearer token", None),
    ("key sk-proj-abcDEF123456789xyz", "key sk-proj****9xyz"),
    (f"Authorization: Bearer {MANAGEMENT_TOKEN}", "Authorization: Bearer mg********d4"),
    ("0123456789abcdef0123456789abcdef", "01********ef"),
    ('"GET /v1/models?api_key=query-secret-value&x=1 HTTP/1.1"', '"GET /v1/models?api_key=qu********ue&x=1 HTTP/1.1"'),
])
def test_masking_keeps_ordinary_text_readable(text: str, expected: str | None) -> None:
    assert mask_secrets(text) == (text if expected is None else expected)


def test_log_file_survives_rotation(configure: Configure) -> None:
    old_umask = os.umask(0o022)  # the usual one, which would make a plain open() give 0644
    try:
        listener, path = configure(LOG_FORMAT="text")
        logging.getLogger("llm_proxy.test").warning("before rotation")
        assert listener.flush()
        assert stat.S_IMODE(path.stat().st_mode) == 0o640  # as the audit file; logs hold client IPs and paths
        rotated = path.with_name("app.log.1")
        path.rename(rotated)  # what logrotate does (no copytruncate, no signal)
        logging.getLogger("llm_proxy.test").warning("after rotation")
        listener.stop()
    finally:
        os.umask(old_umask)

    assert "before rotation" in rotated.read_text() and "after rotation" not in rotated.read_text()
    assert "after rotation" in path.read_text() and "before rotation" not in path.read_text()
    assert stat.S_IMODE(path.stat().st_mode) == 0o640  # the file the handler made anew


PATH_SECRET = "sk-proj-" + "Zq9" * 14


async def test_access_line_per_request(configure: Configure, tmp_path: Path,
                                       upstream: tuple[UpstreamState, TestServer]) -> None:
    listener, path = configure(LOG_FORMAT="json")
    _, upstream_server = upstream
    settings = make_settings(tmp_path, str(upstream_server.make_url("")).rstrip("/"))
    server = TestServer(create_app(settings))
    await server.start_server(access_log_class=AccessLogger, access_log=logging.getLogger(ACCESS_LOGGER))
    async with TestClient(server) as client:
        auth = {"Authorization": f"Bearer {MANAGEMENT_TOKEN}"}
        project = await (await client.post("/manage/projects", json={"name": "p", "api_key": UPSTREAM_KEY},
                                           headers=auth)).json()
        token = await (await client.post("/manage/tokens", json={"project_id": project["id"]}, headers=auth)).json()
        response = await client.get("/v1/models", params={"api_key": "query-secret-value"},
                                    headers={"Authorization": f"Bearer {token['token']}", "X-Request-ID": "req-abc"})
        assert response.status == 200
        for _ in range(2):  # the second time too: paths are only ever remembered when they hold no secret
            await client.get(f"/v1/models/{PATH_SECRET}", headers={"Authorization": f"Bearer {token['token']}"})
    listener.stop()

    lines = [line for line in json_lines(path) if line["logger"] == ACCESS_LOGGER]
    assert [line["path"] for line in lines[:3]] == ["/manage/projects", "/manage/tokens", "/v1/models"]
    assert len(lines) == 5 and lines[3]["path"] == lines[4]["path"] != f"/v1/models/{PATH_SECRET}"
    assert lines[3]["path"].startswith("/v1/models/sk-proj")
    proxied = lines[2]
    assert proxied["request_id"] == "req-abc" and proxied["method"] == "GET" and proxied["status"] == 200
    assert proxied["client_ip"] == "127.0.0.1" and isinstance(proxied["duration_ms"], float)
    assert proxied["token_id"] == token["token_hint"] and proxied["message"] == "GET /v1/models 200"
    assert lines[0]["token_id"] is None and lines[0]["status"] == 201
    assert len(lines[0]["request_id"]) == 32  # generated ids are not mistaken for secrets
    output = path.read_text()
    assert "query-secret-value" not in output and token["token"] not in output and PATH_SECRET not in output


def test_access_logger_is_off_below_info() -> None:
    logger = logging.getLogger("llm_proxy.access.test-disabled")
    logger.setLevel(logging.WARNING)
    try:
        assert AccessLogger(logger, "").enabled is False
    finally:
        logger.setLevel(logging.NOTSET)


def test_the_masking_filter_also_works_without_the_queue() -> None:
    from llm_proxy.ops.log_format import JsonFormatter, SecretMaskingFilter

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(SecretMaskingFilter())
    logger = logging.getLogger("llm_proxy.test.direct")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        try:
            raise KeyError(CLIENT_TOKEN)
        except KeyError:
            logger.error("bad %s", UPSTREAM_KEY, exc_info=True)
    finally:
        logger.removeHandler(handler)
        logger.propagate = True
    line = orjson.loads(stream.getvalue())
    assert CLIENT_TOKEN not in stream.getvalue() and UPSTREAM_KEY not in stream.getvalue()
    assert "KeyError" in line["exception"] and line["message"].startswith("bad sk-upst")


@pytest.mark.parametrize("log_format", ["json", "text"])
def test_access_entries_render_masked_in_either_format(log_format: str) -> None:
    """Entries are rendered in the sink's thread: the path is masked there, None fields are left out of text."""
    sink = AccessSink(logging.StreamHandler(io.StringIO()), json=log_format == "json")
    entry = (1_800_000_000.25, "req-1", "POST", f"/v1/files/{PATH_SECRET}", 404, 0.0123456, "203.0.113.9", None)

    line = sink.render(entry)

    assert PATH_SECRET not in line
    if log_format == "json":
        fields = orjson.loads(line)
        assert fields["time"] == "2027-01-15T08:00:00.250Z" and fields["logger"] == ACCESS_LOGGER
        assert (fields["method"], fields["status"], fields["duration_ms"]) == ("POST", 404, 12.346)
        assert fields["token_id"] is None and fields["client_ip"] == "203.0.113.9"
        assert fields["path"].startswith("/v1/files/sk-proj") and fields["message"] == f"POST {fields['path']} 404"
    else:
        assert line.startswith(f"2027-01-15T08:00:00.250Z INFO {ACCESS_LOGGER}: POST /v1/files/sk-proj")
        assert line.endswith(" 404 request_id=req-1 duration_ms=12.346 client_ip=203.0.113.9")


def test_an_entry_that_cannot_be_rendered_is_reported_and_the_rest_written(caplog: pytest.LogCaptureFixture) -> None:
    stream = io.StringIO()
    sink = AccessSink(logging.StreamHandler(stream), json=True)
    good = (1_800_000_000.0, "req-2", "GET", "/v1/models", 200, 0.001, "127.0.0.1", None)
    sink.append((1_800_000_000.0, object(), "GET", "/v1/models", 200, 0.001, "127.0.0.1", None))  # type: ignore[arg-type]
    sink.append(good)

    with caplog.at_level(logging.ERROR, logger="llm_proxy.ops.logs"):
        sink.flush()

    assert [orjson.loads(line)["request_id"] for line in stream.getvalue().splitlines()] == ["req-2"]
    assert "could not be rendered" in caplog.text


@pytest.mark.parametrize("log_format", ["json", "text"])
def test_a_client_request_id_is_masked_and_the_gateways_own_kept_whole(log_format: str) -> None:
    """The access line echoes X-Request-ID, which the client chose: a secret sent there is masked; an
    id of the gateway's own shape (32 hex) stays whole, so it can be grepped across logs and audit."""
    sink = AccessSink(logging.StreamHandler(io.StringIO()), json=log_format == "json")
    own = "0123456789abcdef0123456789abcdef"
    secret_line = sink.render((1_800_000_000.0, MANAGEMENT_TOKEN, "GET", "/v1/models", 200, 0.001, "127.0.0.1", None))
    own_line = sink.render((1_800_000_000.0, own, "GET", "/v1/models", 200, 0.001, "127.0.0.1", None))

    assert MANAGEMENT_TOKEN not in secret_line and MANAGEMENT_TOKEN[:2] in secret_line
    assert own in own_line


# Decoded, `%0a` is a newline: written as it came, the path would end this request's line and
# start one the client wrote (review: log forging in LOG_FORMAT=text). C1 controls (U+0085 is a
# newline to some readers, U+009B a terminal's CSI) and U+2028 split lines too.
FORGING_PATHS = ("/v1/models%0aFORGED%20INFO%20llm_proxy.access:%20x",
                 "/v1/models%0d%0aFORGED%20INFO%20llm_proxy.access:%20x",
                 "/v1/models%C2%85FORGED%20INFO%20llm_proxy.access:%20x",
                 "/v1/models%E2%80%A8FORGED%20INFO%20llm_proxy.access:%20x",
                 "/v1/models%C2%9B2J%1b[31mFORGED")


async def test_a_path_cannot_forge_a_text_log_line(configure: Configure, tmp_path: Path,
                                                   upstream: tuple[UpstreamState, TestServer]) -> None:
    listener, path = configure(LOG_FORMAT="text")
    _, upstream_server = upstream
    server = TestServer(create_app(make_settings(tmp_path, str(upstream_server.make_url("")).rstrip("/"))))
    await server.start_server(access_log_class=AccessLogger, access_log=logging.getLogger(ACCESS_LOGGER))
    async with TestClient(server) as client:
        assert listener.flush()
        before = len(path.read_text().splitlines())
        for forging in FORGING_PATHS:
            await client.get(forging)  # unauthenticated, as the review's was
    listener.stop()

    # str.splitlines() splits at every line boundary a reader might honour: \r, \x85, \u2028 ...
    lines = path.read_text(encoding="utf-8").splitlines()[before:]
    assert len(lines) == len(FORGING_PATHS), lines
    assert all(line.isprintable() for line in lines), lines  # no control character left at all
    assert not any(line.startswith("FORGED") for line in lines)
    assert [line.split(": ", 1)[1].split(" request_id=")[0].rsplit(" ", 1)[0] for line in lines] == [
        "GET /v1/models\\nFORGED INFO llm_proxy.access: x", "GET /v1/models\\x0d\\nFORGED INFO llm_proxy.access: x",
        "GET /v1/models\\x85FORGED INFO llm_proxy.access: x", "GET /v1/models\\u2028FORGED INFO llm_proxy.access: x",
        "GET /v1/models\\x9b2J\\x1b[31mFORGED"]


def test_a_text_record_is_one_line_whatever_its_message_extras_and_traceback_hold(configure: Configure) -> None:
    listener, path = configure(LOG_FORMAT="text")
    try:
        raise ValueError("bad\ninput\x1b[2J")
    except ValueError:
        logging.getLogger("llm_proxy.test").exception("first line\nFORGED INFO llm_proxy.access: x",
                                                      extra={"model": "gpt\u2028FORGED\x9b"})
    listener.stop()

    (line,) = path.read_text(encoding="utf-8").splitlines()
    assert line.isprintable()
    assert "ERROR llm_proxy.test: first line\\nFORGED INFO llm_proxy.access: x model=gpt\\u2028FORGED\\x9b" in line
    assert "\\nTraceback (most recent call last):\\n" in line and "ValueError: bad\\ninput\\x1b[2J" in line


# ---- a real `serve` ----

@pytest.mark.system
@pytest.mark.parametrize("log_format", ["json", "text"])
async def test_serve_at_debug_level_never_logs_a_secret(upstream: Any, tmp_path: Path, log_format: str) -> None:
    """From the third review (the operator's side)."""
    _, upstream_server = upstream
    port = free_port()
    log_file = tmp_path / "app.log"
    env = serve_env(tmp_path, LISTEN_ADDR=f"127.0.0.1:{port}", LOG_LEVEL="debug", LOG_FORMAT=log_format,
                    LOG_FILE=str(log_file), OPENAI_API_URL=str(upstream_server.make_url("")).rstrip("/"))
    process = await asyncio.create_subprocess_exec(sys.executable, "-m", "llm_proxy", "serve", env=env,
                                                   stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    secrets: list[str] = [MANAGEMENT_TOKEN, UPSTREAM_KEY, GATEWAY_ENCRYPTION_KEY]
    try:
        await wait_healthy(port, process)
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
