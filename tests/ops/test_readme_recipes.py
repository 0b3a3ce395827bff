"""The README run for real: its jq recipes on an audit file the gateway wrote, its walk-through with curl."""

from __future__ import annotations

import asyncio
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from llm_proxy.app import AUDIT
from llm_proxy.ops.cli import main
from tests.fakes import REPO, Gateway, child_env, free_port, wait_healthy

pytestmark = pytest.mark.system  # jq, curl and `llm-proxy serve` run for real

README = REPO / "README.md"


def _recipes() -> list[str]:
    section = README.read_text().split("**With jq**", 1)[1].split("```sh", 1)[1].split("```", 1)[0]
    return [line for line in section.splitlines() if line.strip() and not line.startswith("#")]


def _run(command: str, cwd: Path) -> list[Any]:
    jq = shutil.which("jq")
    assert jq, "jq is missing: `make test` installs it (make system-deps)"
    result = subprocess.run(["bash", "-c", command], cwd=cwd, capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 0, result.stderr
    return [orjson.loads(line) for line in result.stdout.splitlines()]


async def test_jq_recipes_answer_their_questions(gateway: Gateway, tmp_path: Path) -> None:
    token = await gateway.token()
    other = await gateway.project("other")
    await gateway.client.get("/v1/models", headers={"Authorization": f"Bearer {token['token']}"})
    await gateway.client.get("/v1/models", headers={"Authorization": "Bearer tok-" + "W" * 43})
    await gateway.manage("DELETE", f"/tokens/{token['id']}", expect=204)
    await gateway.app[AUDIT].flush()
    workdir = tmp_path / "ops"
    (workdir / "data").mkdir(parents=True)
    assert gateway.settings.audit_log_file is not None
    shutil.copy(gateway.settings.audit_log_file, workdir / "data" / "audit.log")

    token_events, failures, project_events, revokes = _recipes()

    actions = [row[1] for row in _run(token_events, workdir)]
    assert actions == ["token.create", "token.access", "token.revoke"]
    assert _run(failures, workdir) == [[_run(failures, workdir)[0][0], "127.0.0.1", "invalid_token"]]
    mine = _run(project_events.replace("PROJECT_ID", token["project_id"]), workdir)
    assert [row[1] for row in mine] == ["project.create", "token.create", "token.access", "token.revoke"]
    assert all(row[1] != "project.create" or row[0] < mine[-1][0] for row in mine)
    assert other["id"] not in str(mine)
    assert len(_run(revokes, workdir)) == 1
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", _run(failures, workdir)[0][0])


async def test_jq_project_spend_recipe_sums_usage(gateway: Gateway, tmp_path: Path) -> None:
    token = await gateway.token()
    client = gateway.openai(token["token"])
    await client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
    await client.embeddings.create(model="text-embedding-3-small", input="hi")
    await gateway.client.get("/v1/models", headers={"Authorization": f"Bearer {token['token']}"})
    await gateway.app[AUDIT].flush()
    (tmp_path / "data").mkdir()
    assert gateway.settings.audit_log_file is not None
    shutil.copy(gateway.settings.audit_log_file, tmp_path / "data" / "audit.log")
    recipe = README.read_text().split("What one project spent, from the audit log:", 1)[1]
    command = recipe.split("```sh", 1)[1].split("```", 1)[0].strip().replace("PROJECT_ID", token["project_id"])

    result = subprocess.run(["bash", "-c", command], cwd=tmp_path, capture_output=True, text=True, timeout=30,
                            check=False)

    assert result.returncode == 0, result.stderr
    assert orjson.loads(result.stdout) == {"requests": 3, "prompt_tokens": 8, "completion_tokens": 2,
                                           "total_tokens": 10}


# ---- the walk-through, with curl against `llm-proxy serve` ----

async def test_readme_walkthrough_with_curl(upstream: Any, tmp_path: Path) -> None:
    """From the third review (the operator's side)."""
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
        await wait_healthy(port, process)
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
