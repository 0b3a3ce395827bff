"""The repository's logrotate.conf, run with the real logrotate binary while the gateway serves traffic."""

from __future__ import annotations

import asyncio
import gzip
import re
import shutil
from pathlib import Path
from typing import Any

import orjson
import pytest

from llm_proxy.app import AUDIT
from llm_proxy.audit.verify import verify_files
from tests.fakes import REPO

RECIPE = REPO / "logrotate.conf"


def test_recipe_is_rename_and_create() -> None:
    text = RECIPE.read_text()
    directives = {line.split()[0] for line in text.splitlines()
                  if line.strip() and not line.lstrip().startswith("#") and line.startswith("    ")}
    assert {"daily", "rotate", "compress", "delaycompress", "missingok", "notifempty", "create"} <= directives
    assert "copytruncate" not in directives
    assert re.search(r"^\s+rotate 90$", text, re.MULTILINE) and re.search(r"^\s+create 0640$", text, re.MULTILINE)


def _lines(directory: Path) -> list[dict[str, Any]]:
    events = []
    for path in directory.iterdir():
        if not path.name.startswith("audit.log"):
            continue
        data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
        events.extend(orjson.loads(line) for line in data.splitlines() if line)
    return events


@pytest.mark.system
async def test_rotation_under_load_loses_no_line(make_gateway: Any, tmp_path: Path) -> None:
    logrotate = shutil.which("logrotate") or shutil.which("logrotate", path="/usr/sbin:/sbin")
    assert logrotate, "logrotate is missing: `make test` installs it (make system-deps)"
    logs = tmp_path / "logs"
    gateway = await make_gateway(AUDIT_LOG_FILE=str(logs / "audit.log"), RATE_LIMIT_PER_MINUTE="0")
    config = tmp_path / "logrotate.conf"
    config.write_text(re.sub(r"^/app/data/audit\.log.*\{$", f"{logs / 'audit.log'} {{", RECIPE.read_text(),
                             flags=re.MULTILINE))
    token = await gateway.token()
    headers = {"Authorization": f"Bearer {token['token']}"}

    async def request() -> int:
        response = await gateway.client.post("/v1/chat/completions", headers=headers,
                                             json={"model": "gpt-4o-mini", "messages": []})
        await response.read()
        return response.status

    async def rotate() -> None:
        process = await asyncio.create_subprocess_exec(
            logrotate, "-f", "-s", str(tmp_path / "state"), str(config),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        _, stderr = await process.communicate()
        assert process.returncode == 0, stderr

    served = 0
    for _ in range(4):
        statuses = await asyncio.gather(*(request() for _ in range(40)), rotate(), *(request() for _ in range(40)))
        served += sum(1 for status in statuses if status == 200)
        # The writer gathers events for a moment before writing: flush so that the next rotation
        # finds this round's lines in the file (logrotate's notifempty skips an empty one).
        await gateway.app[AUDIT].flush()

    events = _lines(logs)
    assert served == 320
    assert sum(1 for event in events if event["action"] == "token.access") == served
    rotated = sorted(p.name for p in logs.iterdir())
    assert any(name.endswith(".gz") for name in rotated), rotated
    assert oct((logs / "audit.log").stat().st_mode & 0o777) in ("0o640", "0o600")
    result = verify_files(list(logs.glob("audit.log*")))
    assert result.ok, result.describe()
