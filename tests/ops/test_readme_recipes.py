"""The README's jq recipes, run with the real jq against an audit file the gateway wrote."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import orjson

from llm_proxy.keys import AUDIT
from tests.fakes import REPO, Gateway

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
