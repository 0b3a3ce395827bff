"""deploy/compose.yaml, the scale-out example (SPEC §7): checked statically, then rehearsed without Docker.

No Docker engine runs here, so nothing starts the file itself. It is read with PyYAML (installed with the
test extra, through schemathesis) and its `${…}` references are resolved by `interpolate` below, a strict
subset of Compose's rules that refuses any form it does not know; the checks see what Compose would hand
each container. The rehearsal then runs what those containers would run, on this machine: a gateway with
a gateway service's environment on the test suite's PostgreSQL and Redis, and that service's healthcheck
against it (passing, failing while the database refuses connections, passing again); redis-server with
the redis service's arguments and its healthcheck; the postgres service's pg_isready against PostgreSQL.
The images, the network, the volumes and the hardening options are not exercised.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import pytest
import yaml

from llm_proxy.settings import VARIABLES, Settings, load_settings
from tests.fakes import ENCRYPTION_KEY, MANAGEMENT_TOKEN, REPO, UPSTREAM_KEY, child_env, free_port
from tests.servers import Server, missing, postgres_bindir

pytestmark = pytest.mark.system  # reads the deployment recipe; the rehearsals start processes

COMPOSE = REPO / "deploy" / "compose.yaml"
TEXT = COMPOSE.read_text()
DOC: dict[str, Any] = yaml.safe_load(TEXT)
SERVICES: dict[str, dict[str, Any]] = DOC["services"]
GATEWAYS = {name: service for name, service in SERVICES.items() if "build" in service}
POSTGRES, REDIS = SERVICES["postgres"], SERVICES["redis"]

# What the operator must provide; Compose must refuse to start without any one of them.
SECRETS = ("MANAGEMENT_TOKEN", "ENCRYPTION_KEY", "POSTGRES_PASSWORD", "REDIS_PASSWORD")
OPERATOR = {"MANAGEMENT_TOKEN": MANAGEMENT_TOKEN, "ENCRYPTION_KEY": ENCRYPTION_KEY,
            "POSTGRES_PASSWORD": "5e" * 32, "REDIS_PASSWORD": "7a" * 32}  # what `openssl rand -hex 32` gives


# ---- Compose's interpolation, the forms this file may use ----

REFERENCE = re.compile(r"\$(?:(?P<escaped>\$)"
                       r"|\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<operator>:?[-?+])(?P<argument>[^${}]*))?\}"
                       r"|(?P<bare>[A-Za-z_][A-Za-z0-9_]*)"
                       r"|(?P<unreadable>))")


class MissingVariable(Exception):
    """A `${NAME:?message}` whose variable is unset or empty: Compose stops with the message."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(f"required variable {name} is missing a value: {message}")
        self.name = name


def interpolate(text: str, env: Mapping[str, str]) -> str:
    """Resolve `$$`, `$NAME`, `${NAME}`, `${NAME-x}`, `${NAME:-x}`, `${NAME?x}`, `${NAME:?x}`, `${NAME:+x}`."""

    def resolve(match: re.Match[str]) -> str:
        if match["escaped"]:
            return "$"
        if match["unreadable"] is not None:  # nested or malformed: Compose may read it, this file must not need it
            raise ValueError(f"a $ this reader does not know: {text!r}")
        name, operator, argument = match["name"] or match["bare"], match["operator"], match["argument"]
        value = env.get(name)
        given = value is not None and (value != "" or not (operator or "").startswith(":"))
        if operator is None:
            return value or ""
        if operator.endswith("?"):
            if not given:
                raise MissingVariable(name, argument)
            return value or ""
        if operator.endswith("+"):
            return argument if given else ""
        return (value or "") if given else argument

    return REFERENCE.sub(resolve, text)


def resolved(node: Any, env: Mapping[str, str]) -> Any:
    """The node with every string in it interpolated."""
    if isinstance(node, str):
        return interpolate(node, env)
    if isinstance(node, dict):
        return {key: resolved(value, env) for key, value in node.items()}
    if isinstance(node, list):
        return [resolved(value, env) for value in node]
    return node


def strings(node: Any) -> Iterator[str]:
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for value in node.values():
            yield from strings(value)
    elif isinstance(node, list):
        for value in node:
            yield from strings(value)


def references(node: Any) -> list[re.Match[str]]:
    return [match for text in strings(node) for match in REFERENCE.finditer(text) if match["name"] or match["bare"]]


def environment(service: dict[str, Any], env: Mapping[str, str] = OPERATOR) -> dict[str, str]:
    return dict(resolved(service["environment"], env))


def healthcheck(service: dict[str, Any]) -> list[str]:
    test = service["healthcheck"]["test"]
    assert isinstance(test, list) and test[0] in ("CMD", "CMD-SHELL"), test
    return list(test)


@pytest.mark.parametrize(("text", "env", "expected"), [
    ("$$HOME and $${X}", {}, "$HOME and ${X}"),
    ("${A}/$A/${B}", {"A": "a"}, "a/a/"),
    ("${A:-d} ${A-d}", {"A": ""}, "d "),
    ("${A:-d} ${A-d}", {}, "d d"),
    ("${A:+on}|${B:+on}", {"A": "x", "B": ""}, "on|"),
    ("${A?gone}", {"A": ""}, ""),
    ("x${A:?must be set (see README)}y", {"A": "v"}, "xvy"),
])
def test_the_reader_interpolates_as_compose_does(text: str, env: dict[str, str], expected: str) -> None:
    assert interpolate(text, env) == expected


@pytest.mark.parametrize(("text", "env"), [("${A:?set it}", {}), ("${A:?set it}", {"A": ""}), ("${A?set it}", {})])
def test_the_reader_refuses_a_missing_required_variable(text: str, env: dict[str, str]) -> None:
    with pytest.raises(MissingVariable, match="required variable A is missing a value: set it"):
        interpolate(text, env)


@pytest.mark.parametrize("text", ["${A:-${B}}", "${A", "$", "${1A}", "${A:=x}"])
def test_the_reader_refuses_what_it_does_not_know(text: str) -> None:
    with pytest.raises(ValueError, match="does not know"):
        interpolate(text, {})


# ---- the file ----


def test_the_file_reads_the_same_to_compose_and_to_this_test() -> None:
    """Only Compose's own top-level keys and x- extensions; every value Compose hands a process is a string,
    so YAML 1.1 (PyYAML: `no` is false, `8081:8080` a number) and 1.2 (Compose) cannot read it differently."""
    assert set(DOC) - {"name", "services", "volumes", "networks"} <= {key for key in DOC if key.startswith("x-")}
    assert "version" not in DOC  # obsolete; Compose warns
    assert len(GATEWAYS) >= 2 and {"postgres", "redis"} <= set(SERVICES)
    for name, service in SERVICES.items():
        assert isinstance(service["environment"], dict), f"{name}: environment as a mapping, one key each"
        for key in ("command", "ports", "volumes", "tmpfs", "cap_drop", "security_opt"):
            assert all(isinstance(item, str) for item in service.get(key, [])), (name, key)
        assert all(isinstance(value, str) for value in service["environment"].values()), name
        assert all(isinstance(word, str) for word in healthcheck(service)), name
    for text in strings(DOC):  # every $ is one this reader (and so the checks below) understands
        interpolate(text, OPERATOR)


def test_the_gateways_are_one_image_built_from_the_repositorys_dockerfile() -> None:
    for name, service in GATEWAYS.items():
        build = service["build"]
        assert (COMPOSE.parent / build["context"]).resolve() == REPO, name
        assert build["dockerfile"] == "Dockerfile" and (REPO / "Dockerfile").is_file()
        assert "deploy" not in service and "scale" not in service, f"{name}: one container per service"
    assert len({service["image"] for service in GATEWAYS.values()}) == 1


def test_a_gateway_sets_only_settings_the_gateway_reads_and_they_load() -> None:
    for name, service in GATEWAYS.items():
        unknown = set(service["environment"]) - set(VARIABLES)
        assert not unknown, f"{name} sets variables the gateway does not read: {sorted(unknown)}"
        assert "env_file" not in service, f"{name}: an env_file would pass variables nobody checks"
        settings = load_settings(environment(service), env_file=None)
        assert settings.management_tokens == (MANAGEMENT_TOKEN,)
        assert urlsplit(settings.database_url).scheme == "postgresql"
        assert urlsplit(settings.redis_url).scheme == "redis"
        assert settings.redis_failure_mode == "closed"  # the default, until the operator says otherwise
        assert settings.instance_id == name
        open_mode = load_settings(environment(service, {**OPERATOR, "REDIS_FAILURE_MODE": "open"}), env_file=None)
        assert open_mode.redis_failure_mode == "open"


def test_the_gateways_reach_postgres_and_redis_by_service_name_with_the_operators_passwords() -> None:
    database = POSTGRES["environment"]
    redis_password = REDIS["command"][REDIS["command"].index("--requirepass") + 1]
    for name, service in GATEWAYS.items():
        env = environment(service)
        url = urlsplit(env["DATABASE_URL"])
        assert (url.hostname, url.port) == ("postgres", 5432), name
        assert url.username == database["POSTGRES_USER"] and url.path == f"/{database['POSTGRES_DB']}"
        assert url.password == OPERATOR["POSTGRES_PASSWORD"] == interpolate(database["POSTGRES_PASSWORD"], OPERATOR)
        url = urlsplit(env["REDIS_URL"])
        assert (url.hostname, url.port, url.path) == ("redis", 6379, "/0"), name
        assert url.password == OPERATOR["REDIS_PASSWORD"] == interpolate(redis_password, OPERATOR)


def test_each_gateway_has_its_own_instance_id_audit_volume_and_port() -> None:
    seen: dict[str, set[str]] = {"instance": set(), "audit": set(), "volume": set(), "port": set()}
    for name, service in GATEWAYS.items():
        env = service["environment"]
        assert env["INSTANCE_ID"] == name, "a literal, stable across restarts"
        assert env["AUDIT_LOG_FILE"].startswith("/app/data/")
        (volume,) = [mount for mount in service["volumes"] if mount.split(":")[1] == "/app/data"]
        assert volume.split(":")[0] in DOC["volumes"], f"{name}: a named volume, kept by `compose down`"
        (port,) = service["ports"]
        host, container = port.rsplit(":", 1)
        assert container == "8080"
        for kind, value in (("instance", env["INSTANCE_ID"]), ("audit", env["AUDIT_LOG_FILE"]),
                            ("volume", volume.split(":")[0]), ("port", host)):
            assert value not in seen[kind], f"{name} shares its {kind} {value}"
            seen[kind].add(value)


def test_the_secrets_are_required_and_none_is_written_in_the_file() -> None:
    found = references(DOC)
    for secret in SECRETS:
        uses = [match for match in found if (match["name"] or match["bare"]) == secret]
        assert uses, f"{secret} is never used"
        assert all(match["operator"] == ":?" and match["argument"].strip() for match in uses), \
            f"{secret} must be ${{{secret}:?message}} wherever it is used, so Compose refuses to start without it"
        for absent in ({k: v for k, v in OPERATOR.items() if k != secret}, {**OPERATOR, secret: ""}):
            with pytest.raises(MissingVariable) as refused:
                resolved(DOC, absent)
            assert refused.value.name == secret
    # A secret-bearing value is nothing but references.
    for name, service in SERVICES.items():
        for key, value in service["environment"].items():
            if re.search(r"TOKEN|KEY|PASSWORD|SECRET|AUTH", key):
                assert REFERENCE.sub("", value) == "", f"{name}: {key} is written into the file"
    redis_password = REDIS["command"][REDIS["command"].index("--requirepass") + 1]
    assert REFERENCE.fullmatch(redis_password)
    # Nothing that looks like a key, a token or a password anywhere in the text, comments included.
    for pattern in (r"[A-Za-z0-9+/]{43}=", r"[0-9a-fA-F]{32}", r"\b(tok|sk|mgmt)-[A-Za-z0-9]"):
        assert not re.search(pattern, TEXT), pattern
    assert OPERATOR["REDIS_PASSWORD"] in str(resolved(DOC, OPERATOR))  # the scan would see a written one


def test_the_gateways_start_once_postgres_and_redis_are_healthy() -> None:
    for name, service in GATEWAYS.items():
        assert service["depends_on"] == {"postgres": {"condition": "service_healthy"},
                                         "redis": {"condition": "service_healthy"}}, name


def test_every_service_has_a_healthcheck_that_asks_the_right_question() -> None:
    for name, service in SERVICES.items():
        check = service["healthcheck"]
        assert not check.get("disable") and {"interval", "timeout", "retries"} <= set(check), name
    image_check = next(line for line in (REPO / "Dockerfile").read_text().splitlines() if "/health'" in line)
    assert "/health'" in image_check  # the image's own asks /health; the file's gateways ask /ready
    for name, service in GATEWAYS.items():
        assert "'http://127.0.0.1:8080/ready'" in healthcheck(service)[-1], name
    postgres = healthcheck(POSTGRES)
    assert postgres[:2] == ["CMD", "pg_isready"]
    # Over TCP: the image's first-start server listens on the socket only, and would pass a socket check.
    assert postgres[postgres.index("-h") + 1] == "127.0.0.1"
    assert postgres[postgres.index("-U") + 1] == POSTGRES["environment"]["POSTGRES_USER"]
    assert postgres[postgres.index("-d") + 1] == POSTGRES["environment"]["POSTGRES_DB"]
    redis = healthcheck(REDIS)
    assert redis[0] == "CMD-SHELL" and "redis-cli ping" in redis[1] and "PONG" in redis[1]
    assert REDIS["environment"]["REDISCLI_AUTH"] == REDIS["command"][REDIS["command"].index("--requirepass") + 1]


def test_pulled_images_are_pinned_and_postgres_keeps_its_data_in_a_volume() -> None:
    for name, service in SERVICES.items():
        if name in GATEWAYS:
            continue
        image = service["image"]
        assert re.fullmatch(r"[a-z0-9]+:\d+(\.\d+)?(-[a-z0-9]+)?", image), f"{name}: {image} is not pinned"
    major = int(POSTGRES["image"].split(":")[1].split("-")[0].split(".")[0])
    (mount,) = POSTGRES["volumes"]
    source, target = mount.split(":")
    assert source in DOC["volumes"] and target == "/var/lib/postgresql/data"
    assert major <= 17, "from 18 on the image keeps its data under /var/lib/postgresql, not .../data"
    assert "ports" not in POSTGRES and "ports" not in REDIS, "only the gateways reach them"


def test_the_gateways_are_hardened_like_the_readmes_docker_run() -> None:
    readme = (REPO / "README.md").read_text()
    line = next(line for line in readme.splitlines() if line.startswith("docker run"))
    run = readme[readme.index(line):readme.index("```", readme.index(line))]
    limits = dict(re.findall(r"(--memory|--cpus|--pids-limit) (\S+)", run))
    grace = Settings.__dataclass_fields__["shutdown_grace"].default
    for name, service in GATEWAYS.items():
        assert service["read_only"] is True and service["tmpfs"] == ["/tmp"], name
        assert service["cap_drop"] == ["ALL"] and "cap_add" not in service and not service.get("privileged")
        assert "no-new-privileges:true" in service["security_opt"]
        assert (service["mem_limit"], str(service["cpus"]), str(service["pids_limit"])) == (
            limits["--memory"], limits["--cpus"], limits["--pids-limit"])
        assert float(service["stop_grace_period"].removesuffix("s")) > grace, "docker stop must outwait SHUTDOWN_GRACE"
    for service in (POSTGRES, REDIS):
        assert "no-new-privileges:true" in service["security_opt"]


# ---- rehearsals: what the containers run, on this machine ----


async def run(*argv: str, env: Mapping[str, str] | None = None, timeout: float = 10.0) -> int:
    process = await asyncio.create_subprocess_exec(*argv, env=env, stdout=asyncio.subprocess.DEVNULL,
                                                   stderr=asyncio.subprocess.DEVNULL)
    try:
        return await asyncio.wait_for(process.wait(), timeout=timeout)
    finally:
        if process.returncode is None:
            process.kill()  # only the process started here
            await process.wait()


async def until(command: list[str], healthy: bool, env: Mapping[str, str] | None = None, within: float = 20.0) -> None:
    """Run a healthcheck (bounded) until it passes, or fails, as Docker would every interval."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while (await run(*command, env=env) == 0) != healthy:
        assert loop.time() < deadline, f"{command[-1][:60]}… never {'passed' if healthy else 'failed'}"
        await asyncio.sleep(0.2)


async def ready_status(base: str) -> int:
    async with aiohttp.ClientSession() as session, session.get(f"{base}/ready") as response:
        return response.status


@contextlib.asynccontextmanager
async def gateway_process(name: str, env: dict[str, str], top: Path) -> AsyncIterator[tuple[str, list[str]]]:
    """`llm-proxy serve` as the service `name` would run it, on a free port; yields its URL and healthcheck."""
    data = top / name / "app" / "data"  # the service's volume
    data.mkdir(parents=True)
    env = {**env, "AUDIT_LOG_FILE": env["AUDIT_LOG_FILE"].replace("/app/data", str(data))}
    port = free_port()
    log = top / name / "serve.log"
    with log.open("wb") as sink:  # a file, not a pipe nobody drains while it serves
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "llm_proxy", "serve", cwd=top / name, stdin=asyncio.subprocess.DEVNULL,
            stdout=sink, stderr=subprocess.STDOUT,
            env=child_env(**env, LISTEN_ADDR=f"127.0.0.1:{port}", SHUTDOWN_GRACE="1s"))
    try:
        yield f"http://127.0.0.1:{port}", [
            sys.executable if word == "python" else word.replace("127.0.0.1:8080", f"127.0.0.1:{port}")
            for word in healthcheck(GATEWAYS[name])[1:]]
        assert process.returncode is None, f"{name} exited: {log.read_text()}"
        assert Path(env["AUDIT_LOG_FILE"]).is_file()
    finally:
        if process.returncode is None:
            process.terminate()
            try:
                await asyncio.wait_for(process.wait(), timeout=15)
            except TimeoutError:
                process.kill()  # only the process this test started
                await process.wait()
    assert process.returncode == 0, log.read_text()


async def test_the_gateways_with_the_files_environment_share_one_database_and_their_healthchecks_follow_ready(
        tmp_path: Path, postgres_server: Server, postgres_url: str, redis_url: str) -> None:
    """Every gateway service's environment (the passwords the operator gave, the hosts this machine's servers)
    runs `llm-proxy serve`, all at once on one PostgreSQL and one Redis; a project made through one is read
    through another; each healthcheck passes, fails while the database refuses connections, passes again."""
    asyncpg = pytest.importorskip("asyncpg")  # the postgres extra (under CI a skip fails the run)
    test_db, test_redis = urlsplit(postgres_url), urlsplit(redis_url)
    operator = {**OPERATOR, "POSTGRES_PASSWORD": test_db.password or "", "REDIS_PASSWORD": test_redis.password or ""}
    envs = {}
    for name, service in GATEWAYS.items():
        env = environment(service, operator)
        # Only where the servers are changes; the passwords reach them through the file's own URLs.
        database = urlsplit(env["DATABASE_URL"])
        env["DATABASE_URL"] = database._replace(
            netloc=f"{test_db.username}:{database.password}@{test_db.hostname}:{test_db.port}",
            path=test_db.path).geturl()
        redis = urlsplit(env["REDIS_URL"])
        env["REDIS_URL"] = redis._replace(netloc=f":{redis.password}@{test_redis.hostname}:{test_redis.port}").geturl()
        envs[name] = env
    admin = await asyncpg.connect(postgres_server.url)
    database_name = test_db.path.lstrip("/")
    try:
        async with contextlib.AsyncExitStack() as running:
            gateways = [await running.enter_async_context(gateway_process(name, env, tmp_path))
                        for name, env in envs.items()]
            checks = [check for _, check in gateways]
            for check in checks:
                await until(check, healthy=True)
            first, *others = [url for url, _ in gateways]
            management = {"Authorization": f"Bearer {MANAGEMENT_TOKEN}"}
            async with aiohttp.ClientSession(headers=management) as session:
                body = {"name": "compose", "api_key": UPSTREAM_KEY}
                async with session.post(f"{first}/manage/projects", json=body) as made:
                    assert made.status == 201
                    project = await made.json()
                for url in others:
                    async with session.get(f"{url}/manage/projects/{project['id']}") as read:
                        assert read.status == 200, url

            await admin.execute(f'ALTER DATABASE "{database_name}" WITH ALLOW_CONNECTIONS false')
            await admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1",
                                database_name)
            for check in checks:
                await until(check, healthy=False)
            assert await ready_status(first) == 503

            await admin.execute(f'ALTER DATABASE "{database_name}" WITH ALLOW_CONNECTIONS true')
            for check in checks:
                await until(check, healthy=True)
    finally:
        await admin.execute(f'ALTER DATABASE "{database_name}" WITH ALLOW_CONNECTIONS true')
        await admin.close()
    logged = "".join(path.read_text() for path in tmp_path.glob("*/serve.log"))
    for secret in (test_db.password, test_redis.password, MANAGEMENT_TOKEN, ENCRYPTION_KEY, UPSTREAM_KEY):
        assert secret and secret not in logged


async def test_redis_started_with_the_files_command_answers_its_healthcheck_only_with_the_password(
        tmp_path: Path) -> None:
    """redis-server with the redis service's arguments (on a free port here); its healthcheck passes with
    REDISCLI_AUTH as the file sets it, and fails with a wrong one or none: redis-cli alone would exit 0."""
    server, cli = shutil.which("redis-server"), shutil.which("redis-cli")
    if server is None or cli is None:
        missing("Redis (redis-server, redis-cli)")
    command = resolved(REDIS["command"], OPERATOR)
    assert command[0] == "redis-server"
    port = free_port()
    with (tmp_path / "redis.log").open("wb") as log:
        process = subprocess.Popen([str(server), *command[1:], "--port", str(port), "--bind", "127.0.0.1",
                                    "--dir", str(tmp_path)], stdout=log, stderr=subprocess.STDOUT)
    shell = ["sh", "-c", healthcheck(REDIS)[1].replace("redis-cli", f"{cli} -p {port}")]
    auth = interpolate(REDIS["environment"]["REDISCLI_AUTH"], OPERATOR)
    path = {"PATH": "/usr/bin:/bin"}
    try:
        await until(shell, healthy=True, env={**path, "REDISCLI_AUTH": auth})
        assert await run(*shell, env={**path, "REDISCLI_AUTH": "wrong"}) != 0
        assert await run(*shell, env=path) != 0
        assert await run(str(cli), "-p", str(port), "ping", env=path) == 0  # refused, yet 0: why PONG is checked
    finally:
        process.terminate()  # only the server this test started
        process.wait(timeout=10)
    assert process.returncode == 0, (tmp_path / "redis.log").read_text()
    assert not list(tmp_path.glob("*.rdb")) and not list(tmp_path.glob("appendonly*")), "Redis kept no file"


async def test_pg_isready_as_the_postgres_service_runs_it(postgres_server: Server) -> None:
    bindir = postgres_bindir()
    binary = shutil.which("pg_isready") or (str(bindir / "pg_isready") if bindir else None)
    if binary is None or not Path(binary).exists():
        missing("PostgreSQL's pg_isready")
    check = healthcheck(POSTGRES)[1:]
    check[0] = str(binary)

    def at(host: str, port: int) -> list[str]:
        return [host if word == "127.0.0.1" else str(port) if word == "5432" else word for word in check]

    assert await run(*at(postgres_server.host, postgres_server.port)) == 0
    assert await run(*at("127.0.0.1", free_port())) != 0
