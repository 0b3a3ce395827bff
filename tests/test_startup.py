"""`llm-proxy serve` failing to start: it must exit at once with one line, never hang on what it had opened."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fakes import ENCRYPTION_KEY, MANAGEMENT_TOKEN


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _serve(tmp_path: Path, **overrides: str) -> subprocess.CompletedProcess[str]:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "MANAGEMENT_TOKEN": MANAGEMENT_TOKEN,
           "ENCRYPTION_KEY": ENCRYPTION_KEY, "OPENAI_API_URL": "http://127.0.0.1:9",
           "LISTEN_ADDR": f"127.0.0.1:{_free_port()}", "DATABASE_PATH": str(tmp_path / "data" / "gateway.db"),
           "AUDIT_LOG_FILE": str(tmp_path / "data" / "audit.log"), **overrides}
    # A gateway that hangs instead of exiting fails here, after a bound far above a normal start.
    return subprocess.run([sys.executable, "-m", "llm_proxy", "serve"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=30, check=False)


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
