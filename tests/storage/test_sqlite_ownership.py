"""The owner lock beside a SQLite database: one serving process at a time, never a lock left behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from llm_proxy.storage.errors import DatabaseOwned, StorageError
from llm_proxy.storage.sqlite.ownership import OwnerLock, owner_lock_path
from tests.fakes import REPO

HOLDER = """
import sys, time
from pathlib import Path
from llm_proxy.storage.sqlite.ownership import OwnerLock
lock = OwnerLock(Path(sys.argv[1]))
lock.claim(sys.argv[2])
print("claimed", flush=True)
time.sleep(600)
"""


def test_a_second_claim_is_refused_naming_the_owner(tmp_path: Path) -> None:
    database = tmp_path / "gateway.db"
    first, second = OwnerLock(database), OwnerLock(database)
    first.claim("pid 1 on host-a since 2026-12-02T10:00:00Z")
    with pytest.raises(DatabaseOwned) as refused:
        second.claim("pid 2 on host-b")
    assert refused.value.holder == "pid 1 on host-a since 2026-12-02T10:00:00Z"
    assert isinstance(refused.value, StorageError)
    assert owner_lock_path(database).read_text() == "pid 1 on host-a since 2026-12-02T10:00:00Z"
    first.claim("again")  # claiming what it holds does nothing
    assert owner_lock_path(database).read_text() == "pid 1 on host-a since 2026-12-02T10:00:00Z"


def test_a_released_lock_can_be_claimed_and_names_nobody(tmp_path: Path) -> None:
    database = tmp_path / "gateway.db"
    first, second = OwnerLock(database), OwnerLock(database)
    first.claim("first")
    first.release()
    first.release()  # releasing an unheld lock does nothing
    assert owner_lock_path(database).read_text() == ""
    second.claim("second")
    assert owner_lock_path(database).read_text() == "second"
    assert oct(owner_lock_path(database).stat().st_mode & 0o777) == "0o600"


def test_a_lock_in_a_missing_directory_is_created(tmp_path: Path) -> None:
    lock = OwnerLock(tmp_path / "new" / "dir" / "gateway.db")
    lock.claim("me")
    assert (tmp_path / "new" / "dir" / "gateway.db.owner").read_text() == "me"
    lock.release()


@pytest.mark.system
def test_a_killed_owner_leaves_no_lock_behind(tmp_path: Path) -> None:
    """Another process holds the lock; `kill -9` it and the database is free at once (the kernel drops flock)."""
    database = tmp_path / "gateway.db"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(database), "the other process"],
                              stdout=subprocess.PIPE, text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "claimed\n"
        lock = OwnerLock(database)
        with pytest.raises(DatabaseOwned, match="the other process"):
            lock.claim("me")
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=10)
        lock.claim("me")  # never waits (LOCK_NB): it succeeds only because the lock went with the process
        assert owner_lock_path(database).read_text() == "me"
        lock.release()
    finally:
        holder.kill()
        holder.wait()
        if holder.stdout is not None:
            holder.stdout.close()
