"""Static checks of the container recipe (no Docker engine here): the hardening the README promises."""

from __future__ import annotations

import configparser
import re

import pytest

from tests.fakes import REPO

pytestmark = pytest.mark.system  # reads the container recipe

ROOT = REPO
DOCKERFILE = (ROOT / "Dockerfile").read_text()
INSTRUCTIONS = [line.strip() for line in re.sub(r"\\\n", " ", DOCKERFILE).splitlines()
                if line.strip() and not line.lstrip().startswith("#")]


def _final_stage() -> list[str]:
    last_from = max(i for i, line in enumerate(INSTRUCTIONS) if line.startswith("FROM "))
    return INSTRUCTIONS[last_from:]


def test_base_images_are_pinned_slim_and_multi_stage() -> None:
    bases = [line.split()[1] for line in INSTRUCTIONS if line.startswith("FROM ")]
    assert len(bases) >= 2, "expected a build stage and a final stage"
    for base in bases:
        assert re.fullmatch(r"python:\d+\.\d+\.\d+-slim-[a-z]+", base), f"unpinned or non-slim base {base}"


def test_final_stage_runs_as_a_fixed_non_root_user() -> None:
    final = _final_stage()
    users = [line.split()[1] for line in final if line.startswith("USER ")]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert re.search(r"useradd .*--uid \$\{APP_UID\}", DOCKERFILE) and re.search(r"ARG APP_UID=\d+", DOCKERFILE)
    assert re.search(r"chown appuser:appuser /app/data", DOCKERFILE)


def test_one_image_serves_sqlite_or_postgresql_and_redis() -> None:
    """The build installs the extras whose drivers DATABASE_URL=postgresql://… and REDIS_URL load (asyncpg,
    redis), so deploy/compose.yaml's gateways run the same image as a lone SQLite one; never test or dev."""
    build = INSTRUCTIONS[:len(INSTRUCTIONS) - len(_final_stage())]
    installs = [re.search(r'pip install [^&]*"\.\[([a-z,]+)\]"', line) for line in build if line.startswith("RUN ")]
    (extras,) = [set(found[1].split(",")) for found in installs if found]
    setup = configparser.ConfigParser()
    setup.read(ROOT / "setup.cfg")
    declared = {name: value.split() for name, value in setup["options.extras_require"].items()}
    assert {"fast", "postgres", "redis"} <= extras <= set(declared) - {"test", "dev"}
    assert any(requirement.startswith("asyncpg") for requirement in declared["postgres"])
    assert any(requirement.startswith("redis") for requirement in declared["redis"])


def test_no_remote_add_no_build_tools_or_caches_in_the_final_image() -> None:
    assert not any(line.startswith("ADD ") for line in INSTRUCTIONS)
    final = " ".join(_final_stage())
    for tool in ("apt-get install", "gcc", "build-essential", "pip install"):
        assert tool not in final
    assert "PIP_NO_CACHE_DIR=1" in DOCKERFILE


def test_healthcheck_probes_health_and_data_is_the_only_volume() -> None:
    health = [line for line in _final_stage() if line.startswith("HEALTHCHECK ")]
    assert health and "/health" in health[0]
    assert [line for line in INSTRUCTIONS if line.startswith("VOLUME ")] == ['VOLUME ["/app/data"]']


def test_dockerignore_keeps_secrets_and_history_out() -> None:
    rules = (ROOT / ".dockerignore").read_text().split()
    assert rules[rules.index("*")] == "*", "default-deny"
    assert not any(rule in ("!.env", "!.git", "!data/") for rule in rules)
    # deploy/ holds the compose file and, beside it, the operator's .env with its secrets.
    assert not any(rule.startswith(("!deploy", "!**")) for rule in rules)


def test_readme_shows_a_hardened_docker_run() -> None:
    readme = (ROOT / "README.md").read_text()
    run = next(line for line in readme.splitlines() if line.startswith("docker run"))
    block = readme[readme.index(run):readme.index("```", readme.index(run))]
    for flag in ("--read-only", "--tmpfs /tmp", "--cap-drop ALL", "--memory", "--cpus", "-v "):
        assert flag in block, flag
