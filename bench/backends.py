"""Private PostgreSQL and Redis servers for the several-processes rows: 127.0.0.1, a free port, a password.

The same recipe as the test suite's (tests/servers.py), without pytest: PostgreSQL's programs from
PATH or Debian's /usr/lib/postgresql/<version>/bin (run as the `postgres` user when this is root,
which PostgreSQL refuses to be), redis-server from PATH. PostgreSQL commits without waiting for the
disk (`synchronous_commit=off`), as SQLite's WAL mode with `synchronous=NORMAL` does; Redis keeps
nothing on disk.
"""

from __future__ import annotations

import os
import pwd
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from services import free_port

START_TIMEOUT = 30.0


@dataclass
class Backend:
    """A running database or Redis: its URL (password included), the process whose tree does its work, a stop."""
    name: str
    url: str
    pid: int
    stop: Callable[[], None]


def missing() -> list[str]:
    """Name the programs the several-processes rows need and cannot find."""
    absent = [] if postgres_bindir() is not None else ["PostgreSQL (initdb, pg_ctl)"]
    if shutil.which("redis-server") is None:
        absent.append("Redis (redis-server)")
    return absent


def postgres_bindir() -> Path | None:
    """Where initdb and pg_ctl are: on PATH, or Debian's /usr/lib/postgresql/<newest>/bin."""
    found = shutil.which("pg_ctl")
    if found:
        return Path(found).resolve().parent
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"),
                      key=lambda path: int(path.parent.parent.name) if path.parent.parent.name.isdigit() else 0)
    return versions[-1].parent if versions else None


def _as_postgres(command: list[str]) -> list[str]:
    return command if os.geteuid() != 0 else ["runuser", "-u", "postgres", "--", *command]


def _wait_for_port(port: int, alive: Callable[[], bool], log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if not alive():
            raise RuntimeError(f"the server exited; see {log}:\n{log.read_text(errors='replace')[-2000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listened on port {port} within {START_TIMEOUT:.0f} s; see {log}")


def start_postgres() -> Backend:
    """Start a private PostgreSQL in a directory of its own (the postgres user must be able to enter it)."""
    bindir = postgres_bindir()
    if bindir is None:
        raise RuntimeError("PostgreSQL is not installed (make bench installs it: apt-get install postgresql)")
    root = Path(tempfile.mkdtemp(prefix="llm-proxy-bench-postgres-"))
    password, port = secrets.token_hex(16), free_port()
    data, log, pwfile = root / "data", root / "server.log", root / "password"
    pwfile.write_text(password + "\n")
    if os.geteuid() == 0:
        owner = pwd.getpwnam("postgres")
        for path in (root, pwfile):
            os.chown(path, owner.pw_uid, owner.pw_gid)
    pg_ctl = [str(bindir / "pg_ctl"), "-D", str(data)]

    def stop() -> None:
        subprocess.run(_as_postgres([*pg_ctl, "-m", "fast", "-w", "stop"]), capture_output=True, check=False)  # noqa: S603
        shutil.rmtree(root, ignore_errors=True)

    try:
        subprocess.run(_as_postgres([str(bindir / "initdb"), "-D", str(data), "-U", "llm", "--pwfile", str(pwfile),  # noqa: S603
                                     "--auth=scram-sha-256", "-E", "UTF8", "--no-sync"]),
                       check=True, capture_output=True)
        options = (f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c synchronous_commit=off"
                   " -c max_connections=100")
        subprocess.run(_as_postgres([*pg_ctl, "-l", str(log), "-o", options, "-w", "-t",  # noqa: S603
                                     str(int(START_TIMEOUT)), "start"]), check=True, capture_output=True)
        _wait_for_port(port, lambda: True, log)
        # pg_ctl leaves the server running on its own: the first line of postmaster.pid names it.
        pid = int((data / "postmaster.pid").read_text().split()[0])
    except BaseException:
        stop()
        raise
    return Backend("postgresql", f"postgresql://llm:{password}@127.0.0.1:{port}/postgres", pid, stop)


def start_redis(workdir: Path) -> Backend:
    """Start a private redis-server, no persistence, logging into `workdir`."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("Redis is not installed (make bench installs it: apt-get install redis-server)")
    password, port = secrets.token_hex(16), free_port()
    log = workdir / "redis.log"
    with log.open("wb") as out:
        process = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(workdir),  # noqa: S603
                                    "--save", "", "--appendonly", "no", "--requirepass", password,
                                    "--daemonize", "no"], stdout=out, stderr=subprocess.STDOUT)

    def stop() -> None:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)

    try:
        _wait_for_port(port, lambda: process.poll() is None, log)
    except BaseException:
        stop()
        raise
    return Backend("redis", f"redis://:{password}@127.0.0.1:{port}/0", process.pid, stop)


def version(program: str) -> str:
    """Return the first line `program --version` prints (PostgreSQL's from its bindir), or why there is none."""
    bindir = postgres_bindir()
    path = str(bindir / program) if program == "postgres" and bindir is not None else shutil.which(program)
    if path is None:
        return f"{program}: not installed"
    done = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=10, check=False)  # noqa: S603
    return (done.stdout + done.stderr).strip().splitlines()[0] if (done.stdout + done.stderr).strip() else program


def create_database(url: str, name: str) -> str:
    """Create database `name` on the server of `url` (a PostgreSQL URL); return the URL of the new database."""
    import asyncio

    import asyncpg

    async def create() -> None:
        connection = await asyncpg.connect(url)
        try:
            await connection.execute(f'CREATE DATABASE "{name}"')  # a name of ours, never a user's
        finally:
            await connection.close()

    asyncio.run(create())
    return url.rsplit("/", 1)[0] + "/" + name
