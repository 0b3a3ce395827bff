"""`llm-proxy serve` failing to start: it must exit at once with one line, never hang on what it had opened."""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from llm_proxy.crypto import KeyRing
from llm_proxy.storage.sqlite.store import SqliteStore
from tests.fakes import ENCRYPTION_KEY, MANAGEMENT_TOKEN, REPO, UPSTREAM_KEY, free_port


def _serve(tmp_path: Path, **overrides: str) -> subprocess.CompletedProcess[str]:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(REPO),
           "MANAGEMENT_TOKEN": MANAGEMENT_TOKEN, "ENCRYPTION_KEY": ENCRYPTION_KEY, "OPENAI_API_URL": "http://127.0.0.1:9",
           "LISTEN_ADDR": f"127.0.0.1:{free_port()}", "DATABASE_PATH": str(tmp_path / "data" / "gateway.db"),
           "AUDIT_LOG_FILE": str(tmp_path / "data" / "audit.log"), **overrides}
    # A gateway that hangs instead of exiting fails here, after a bound far above a normal start.
    return subprocess.run([sys.executable, "-m", "llm_proxy", "serve"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=30, check=False)


@pytest.mark.system
@pytest.mark.parametrize("audit_file", ["missing-dir/audit.log", "."])
def test_a_start_that_fails_after_the_database_opened_exits_at_once(tmp_path: Path, audit_file: str) -> None:
    """The database (and its worker threads) started before the audit file failed to open; the
    process must still end, with one line and a non-zero code, instead of waiting on those threads."""
    finished = _serve(tmp_path, AUDIT_LOG_FILE=str(tmp_path / audit_file), AUDIT_CREATE_DIR="false")

    assert finished.returncode != 0
    lines = [line for line in finished.stderr.splitlines() if line.startswith("llm-proxy:")]
    assert len(lines) == 1 and "audit" in lines[0].lower(), finished.stderr
    assert "Traceback" not in finished.stderr and MANAGEMENT_TOKEN not in finished.stderr
    assert (tmp_path / "data" / "gateway.db").is_file()  # it did get that far


OTHER_KEY = base64.b64encode(bytes(range(100, 132))).decode()


async def _projects(database: Path, key: str, count: int) -> list[str]:
    """Store `count` projects with their upstream keys encrypted under `key`, as a gateway would."""
    store = SqliteStore(database)
    await store.open()
    try:
        keyring = KeyRing(base64.b64decode(key), ())
        return [(await store.projects.create(f"{key[:8]}-{n}", keyring.encrypt(UPSTREAM_KEY), "sk-****",
                                             time.time())).id for n in range(count)]
    finally:
        await store.close()


@pytest.mark.system
async def test_an_encryption_key_that_opens_no_stored_key_stops_the_start(tmp_path: Path) -> None:
    """The likeliest cause is the wrong ENCRYPTION_KEY after a restart; refusing to start says so at
    once, where serving would answer every request with a 500 and point at nothing."""
    await _projects(tmp_path / "data" / "gateway.db", OTHER_KEY, 2)
    finished = await asyncio.to_thread(_serve, tmp_path)

    assert finished.returncode == 2
    (line,) = [line for line in finished.stderr.splitlines() if line.startswith("llm-proxy:")]
    assert line.startswith("llm-proxy: configuration error: ENCRYPTION_KEY: opens none of the 2 stored")
    for secret in (ENCRYPTION_KEY, OTHER_KEY, UPSTREAM_KEY):
        assert secret not in finished.stderr


async def test_projects_whose_keys_no_configured_key_opens_are_named_at_start(
        make_gateway: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    database = tmp_path / "gateway.db"
    (lost,) = await _projects(database, OTHER_KEY, 1)
    kept_project = (await _projects(database, ENCRYPTION_KEY, 1))[0]
    gateway = await make_gateway(DATABASE_PATH=str(database))

    errors = [record.getMessage() for record in caplog.records if record.levelno >= logging.ERROR]
    assert any("1 project(s)" in message and lost in message and kept_project not in message for message in errors)
    token = await gateway.token(kept_project)
    assert (await gateway.client.get("/v1/models", headers={"Authorization": f"Bearer {token['token']}"})).status == 200
