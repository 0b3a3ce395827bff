"""Private PostgreSQL and Redis servers for the tests, started once per session and stopped after it.

Each lives in a temporary directory, listens on 127.0.0.1 on a free port, requires a password and
keeps nothing on disk it does not need (no fsync, no Redis persistence). A developer's own servers
can be used instead: LLM_PROXY_TEST_POSTGRES_URL (a role that may CREATE DATABASE; every test gets a
database of its own, dropped afterwards) and LLM_PROXY_TEST_REDIS_URL (a database number the tests
may FLUSHDB, before each test).

When a server's programs are missing the tests that need it are skipped, except under CI (the
variable CI set), where that is an error: `make test` installs them from Debian's packages.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

START_TIMEOUT = 30.0
PASSWORD_BYTES = 16


@dataclass(frozen=True)
class Server:
    """How to reach a running server: the URL (with its password) and its parts."""

    url: str
    host: str
    port: int
    password: str


def missing(what: str) -> None:
    """Skip the test that needs `what`, or fail it under CI, where nothing may be skipped."""
    if os.environ.get("CI"):
        pytest.fail(f"{what} is needed under CI and is missing (`make test` installs it)", pytrace=False)
    pytest.skip(f"{what} is not installed (`make test` installs it)")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_for_port(port: int, process: subprocess.Popen[bytes] | None, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode}: {log.read_text(errors='replace')}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return
        time.sleep(0.05)
    raise RuntimeError(f"the server did not listen on port {port} within {START_TIMEOUT} s: "
                       f"{log.read_text(errors='replace')}")


# ---- PostgreSQL ----


def postgres_bindir() -> Path | None:
    """Where initdb and pg_ctl are: on PATH, or Debian's /usr/lib/postgresql/<newest>/bin."""
    found = shutil.which("pg_ctl")
    if found:
        return Path(found).resolve().parent
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"),
                      key=lambda path: int(path.parent.parent.name) if path.parent.parent.name.isdigit() else 0)
    return versions[-1].parent if versions else None


def _as_postgres_user(command: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: as root, run it as Debian's `postgres` user."""
    if os.geteuid() != 0:
        return command
    return ["runuser", "-u", "postgres", "--", *command]


@contextlib.contextmanager
def private_postgres() -> Iterator[Server]:
    bindir = postgres_bindir()
    if bindir is None:
        missing("PostgreSQL (initdb, pg_ctl)")
        raise AssertionError("unreachable")
    if os.geteuid() == 0:
        try:
            owner = pwd.getpwnam("postgres")
        except KeyError:
            missing("the postgres system user (Debian's postgresql package makes it)")
            raise AssertionError("unreachable") from None
    password = secrets.token_hex(PASSWORD_BYTES)
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="llm-proxy-postgres-") as top:
        root = Path(top)
        data, log, pwfile = root / "data", root / "server.log", root / "password"
        pwfile.write_text(password + "\n")
        if os.geteuid() == 0:
            for path in (root, pwfile):
                os.chown(path, owner.pw_uid, owner.pw_gid)
        subprocess.run(_as_postgres_user([str(bindir / "initdb"), "-D", str(data), "-U", "llm", "--pwfile",
                                          str(pwfile), "--auth=scram-sha-256", "-E", "UTF8", "--no-sync"]),
                       check=True, capture_output=True)
        options = (f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off"
                   " -c full_page_writes=off -c max_connections=200")
        subprocess.run(_as_postgres_user([str(bindir / "pg_ctl"), "-D", str(data), "-l", str(log), "-o", options,
                                          "-w", "-t", str(int(START_TIMEOUT)), "start"]),
                       check=True, capture_output=True)
        try:
            _wait_for_port(port, None, log)
            yield Server(f"postgresql://llm:{password}@127.0.0.1:{port}/postgres", "127.0.0.1", port, password)
        finally:
            subprocess.run(_as_postgres_user([str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w",
                                              "stop"]), capture_output=True)


# ---- Redis ----


def _redis_command(binary: str, port: int, root: Path, password: str) -> list[str]:
    return [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(root), "--save", "",
            "--appendonly", "no", "--requirepass", password, "--daemonize", "no"]


@contextlib.contextmanager
def private_redis() -> Iterator[Server]:
    binary = shutil.which("redis-server")
    if binary is None:
        missing("Redis (redis-server)")
        raise AssertionError("unreachable")
    password = secrets.token_hex(PASSWORD_BYTES)
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="llm-proxy-redis-") as top:
        root = Path(top)
        log = root / "server.log"
        with log.open("wb") as out:
            process = subprocess.Popen(_redis_command(binary, port, root, password), stdout=out,
                                       stderr=subprocess.STDOUT)
        try:
            _wait_for_port(port, process, log)
            yield Server(f"redis://:{password}@127.0.0.1:{port}/0", "127.0.0.1", port, password)
        finally:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


class RedisProcess:
    """A private Redis of one test, which it may stop, stall and start again: same port, same password, empty."""

    def __init__(self, binary: str, root: Path, port: int) -> None:
        self._binary = binary
        self._root = root
        self._log = root / "server.log"
        password = secrets.token_hex(PASSWORD_BYTES)
        self.server = Server(f"redis://:{password}@127.0.0.1:{port}/0", "127.0.0.1", port, password)
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start the server and return once it listens."""
        assert self._process is None, "already running"
        with self._log.open("ab") as out:
            self._process = subprocess.Popen(
                _redis_command(self._binary, self.server.port, self._root, self.server.password),
                stdout=out, stderr=subprocess.STDOUT)
        _wait_for_port(self.server.port, self._process, self._log)

    def stop(self) -> None:
        """Stop the server (its clients' connections end) and wait until it is gone."""
        if self._process is None:
            return
        process, self._process = self._process, None
        process.send_signal(signal.SIGCONT)  # a stalled server acts on SIGTERM only once it runs again
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def stall(self) -> None:
        """Freeze the server (SIGSTOP): connections stay open and nothing is answered, as a hung host."""
        assert self._process is not None
        self._process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """Let a stalled server run again (SIGCONT)."""
        assert self._process is not None
        self._process.send_signal(signal.SIGCONT)


@contextlib.contextmanager
def restartable_redis(port: int | None = None) -> Iterator[RedisProcess]:
    """A RedisProcess on `port` (a free one by default), not yet started; stopped afterwards."""
    binary = shutil.which("redis-server")
    if binary is None:
        missing("Redis (redis-server)")
        raise AssertionError("unreachable")
    with tempfile.TemporaryDirectory(prefix="llm-proxy-redis-") as top:
        redis = RedisProcess(binary, Path(top), port or free_port())
        try:
            yield redis
        finally:
            redis.stop()


class PostgresProcess:
    """A private PostgreSQL of one test, which it may stop and start again: same port, same data, same password."""

    def __init__(self, bindir: Path, root: Path) -> None:
        self._bindir = bindir
        self._data, self._log = root / "data", root / "server.log"
        password = secrets.token_hex(PASSWORD_BYTES)
        port = free_port()
        pwfile = root / "password"
        pwfile.write_text(password + "\n")
        if os.geteuid() == 0:
            owner = pwd.getpwnam("postgres")
            for path in (root, pwfile):
                os.chown(path, owner.pw_uid, owner.pw_gid)
        subprocess.run(_as_postgres_user([str(bindir / "initdb"), "-D", str(self._data), "-U", "llm", "--pwfile",
                                          str(pwfile), "--auth=scram-sha-256", "-E", "UTF8", "--no-sync"]),
                       check=True, capture_output=True)
        # Commits are durable here (no synchronous_commit=off): a stopped server must come back with them.
        self._options = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off -c full_page_writes=off"
        self.server = Server(f"postgresql://llm:{password}@127.0.0.1:{port}/postgres", "127.0.0.1", port, password)

    def start(self) -> None:
        """Start the server and return once it accepts connections."""
        subprocess.run(_as_postgres_user([str(self._bindir / "pg_ctl"), "-D", str(self._data), "-l", str(self._log),
                                          "-o", self._options, "-w", "-t", str(int(START_TIMEOUT)), "start"]),
                       check=True, capture_output=True)
        _wait_for_port(self.server.port, None, self._log)

    def stop(self) -> None:
        """Stop the server as an administrator does (fast: its clients' sessions end) and wait until it is gone."""
        subprocess.run(_as_postgres_user([str(self._bindir / "pg_ctl"), "-D", str(self._data), "-m", "fast",
                                          "-w", "stop"]), capture_output=True)


@contextlib.contextmanager
def restartable_postgres() -> Iterator[PostgresProcess]:
    """A PostgresProcess, not yet started; stopped afterwards."""
    bindir = postgres_bindir()
    if bindir is None:
        missing("PostgreSQL (initdb, pg_ctl)")
        raise AssertionError("unreachable")
    with tempfile.TemporaryDirectory(prefix="llm-proxy-postgres-") as top:
        server = PostgresProcess(bindir, Path(top))
        try:
            yield server
        finally:
            server.stop()
