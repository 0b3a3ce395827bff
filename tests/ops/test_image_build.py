"""The container image rehearsed without Docker: CI machines have no engine and no registry access.

The steps come from the Dockerfile's own lines. The build stage's COPY sources go into a fresh
directory, and the package is built from that directory alone, as `pip install ".[fast]"` does in
the image: a file the package needs but the COPY lines miss fails the build or the start. The
wheel is installed by itself (not the checkout). Then the final stage's ENTRYPOINT + CMD run with
its ENV and WORKDIR, the HEALTHCHECK command probes it, a management call exercises the packaged
schema, and STOPSIGNAL stops it. The hardening tests in test_dockerfile.py cover the rest.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
import zipfile
from pathlib import Path

import pytest

from tests.fakes import ENCRYPTION_KEY, MANAGEMENT_TOKEN, REPO, UPSTREAM_KEY, free_port

pytestmark = pytest.mark.system  # builds and installs the wheel, runs the image's entry point

ROOT = REPO
DOCKERFILE = ROOT / "Dockerfile"


def _instructions() -> list[tuple[str, str]]:
    """The Dockerfile as (INSTRUCTION, arguments), continuation lines joined, comments dropped."""
    joined, pending = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        pending += line.rstrip().removesuffix("\\") + " "
        if not line.rstrip().endswith("\\"):
            joined.append(pending.strip())
            pending = ""
    return [(text.split(None, 1)[0].upper(), text.split(None, 1)[1]) for text in joined]


def _stages() -> list[list[tuple[str, str]]]:
    stages: list[list[tuple[str, str]]] = []
    for instruction in _instructions():
        if instruction[0] == "FROM":
            stages.append([])
        if stages:
            stages[-1].append(instruction)
    return stages


def _final_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for name, arguments in _stages()[-1]:
        if name == "ENV":
            for assignment in arguments.split():
                key, _, value = assignment.partition("=")
                env[key] = value
    return env


def _exec_form(instruction: str) -> list[str]:
    (arguments,) = [arguments for name, arguments in _stages()[-1] if name == instruction]
    if instruction == "HEALTHCHECK":
        arguments = arguments[arguments.index("CMD ") + 4:]
    form = json.loads(arguments)
    assert isinstance(form, list) and all(isinstance(word, str) for word in form), f"{instruction} not in exec form"
    return form


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The build stage: its COPY sources in a bare directory, built into a wheel and installed alone."""
    work = tmp_path_factory.mktemp("image")
    context = work / "src"
    context.mkdir()
    build_stage = _stages()[0]
    copies = [arguments.split() for name, arguments in build_stage if name == "COPY"]
    assert copies, "the build stage copies nothing"
    for *sources, destination in copies:
        for source in sources:
            target = context / destination / source if destination.endswith("/") else context / destination
            if (ROOT / source).is_dir():
                # Symlinks stay links, as COPY keeps them; .dockerignore drops the caches.
                shutil.copytree(ROOT / source, target, symlinks=True,
                                ignore=shutil.ignore_patterns("__pycache__"))
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / source, target, follow_symlinks=False)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input", "--no-cache-dir"]
    wheels = work / "wheels"
    # No build isolation and no dependencies: the test environment already has the build backend and
    # every dependency, so nothing is fetched (the image's own build gets them from PyPI).
    subprocess.run([*pip, "wheel", "--quiet", "--no-deps", "--no-build-isolation", "--wheel-dir", str(wheels),
                    str(context)], check=True, timeout=120, cwd=work)
    (wheel,) = wheels.glob("llm_proxy-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        # The schema is read at startup; the OpenAPI document is built in Python.
        assert "llm_proxy/storage/sqlite/schema.sql" in names
        assert archive.read("llm_proxy/storage/sqlite/schema.sql") == (
            ROOT / "llm_proxy" / "storage" / "sqlite" / "schema.sql").read_bytes()
        (entry_points,) = [name for name in names if name.endswith(".dist-info/entry_points.txt")]
        assert "llm-proxy = " in archive.read(entry_points).decode()
    site = work / "site"
    subprocess.run([*pip, "install", "--quiet", "--no-deps", "--no-compile", "--target", str(site), str(wheel)],
                   check=True, timeout=120, cwd=work)
    return site


def test_the_packaged_gateway_starts_answers_its_healthcheck_and_stops_on_stopsignal(
        installed: Path, tmp_path: Path) -> None:
    entrypoint, command = _exec_form("ENTRYPOINT"), _exec_form("CMD")
    assert entrypoint == ["llm-proxy"] and command == ["serve"]
    image_env = _final_env()
    port = free_port()
    data = tmp_path / "app" / "data"  # the VOLUME; WORKDIR is its parent
    data.mkdir(parents=True)
    env = {
        **{key: value.replace("/app/data", str(data)) for key, value in image_env.items()},
        # The image's PATH would find /opt/venv; here the console script comes from the installed wheel.
        "PATH": f"{installed / 'bin'}:{os.environ.get('PATH', '/usr/bin:/bin')}",
        "PYTHONPATH": str(installed),
        "LISTEN_ADDR": f"127.0.0.1:{port}",  # the image's :8080, on a free port of this machine
        # What `docker run --env-file .env` adds:
        "MANAGEMENT_TOKEN": MANAGEMENT_TOKEN, "ENCRYPTION_KEY": ENCRYPTION_KEY,
        "OPENAI_API_URL": "http://127.0.0.1:9", "SHUTDOWN_GRACE": "5s",
    }
    assert image_env["LISTEN_ADDR"] == ":8080" and image_env["DATABASE_PATH"].startswith("/app/data/")
    probe = subprocess.run([sys.executable, "-c", "import llm_proxy; print(llm_proxy.__file__)"], env=env,
                           cwd=tmp_path, capture_output=True, text=True, check=True, timeout=30)
    assert probe.stdout.startswith(str(installed)), "the checkout, not the wheel, would be tested"

    script = installed / "bin" / entrypoint[0]
    output = tmp_path / "serve.log"  # a file, not a pipe nobody drains while the gateway runs
    with output.open("wb") as sink:
        process = subprocess.Popen([sys.executable, str(script), *command], env=env, cwd=tmp_path / "app",
                                   stdin=subprocess.DEVNULL, stdout=sink, stderr=subprocess.STDOUT)
    try:
        healthcheck = [word.replace("127.0.0.1:8080", f"127.0.0.1:{port}") for word in _exec_form("HEALTHCHECK")]
        assert healthcheck[0] == "python"
        deadline = time.monotonic() + 10  # the HEALTHCHECK's start period
        while True:
            verdict = subprocess.run([sys.executable, *healthcheck[1:]], env=env, capture_output=True, timeout=10)
            if verdict.returncode == 0:
                break
            assert process.poll() is None, f"serve exited: {output.read_text()}"
            assert time.monotonic() < deadline, f"healthcheck kept failing: {verdict.stderr.decode()}"
            time.sleep(0.1)

        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/manage/projects", method="POST",
            data=json.dumps({"name": "image", "api_key": UPSTREAM_KEY}).encode(),
            headers={"Authorization": f"Bearer {MANAGEMENT_TOKEN}", "Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310 (our own 127.0.0.1 URL)
            assert response.status == 201
        assert (data / "llm-proxy.db").is_file() and (data / "audit.log").is_file()
        # The console's templates and assets are in the wheel.
        for path, text in (("/admin/login", b"Management token"), ("/admin/static/console.css", b"--accent")):
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
                assert response.status == 200 and text in response.read(), path

        (stop_signal,) = [arguments for name, arguments in _stages()[-1] if name == "STOPSIGNAL"]
        process.send_signal(getattr(signal, stop_signal))
        assert process.wait(timeout=15) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    logged = output.read_text()
    assert "llm-proxy stopped" in logged
    assert UPSTREAM_KEY not in logged and MANAGEMENT_TOKEN not in logged and ENCRYPTION_KEY not in logged
    assert b'"project.create"' in (data / "audit.log").read_bytes()
