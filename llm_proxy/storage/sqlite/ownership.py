"""Who serves a SQLite database: an exclusive lock on a file beside it, held while a process serves.

Two serving processes on one database would each trust their own memory (token counters, rates,
the audit chain's head) and silently disagree: a token revoked through one would still be served
by the other. So a serving process claims `<database>.owner` with flock(2) and writes who it is
into it; a second one finds the lock taken, reads who holds it, and refuses to start. The kernel
drops the lock when the holder's file is closed, however the process ends (`kill -9` included), so
a lock can never be left behind. CLI commands do not claim: they may run beside a server.

Processes sharing a Redis (REDIS_URL) serve one database together: each takes the lock shared
(LOCK_SH) and writes SHARED_OWNER into the file, so they keep out, and are kept out by, a process
that would own the database alone.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from llm_proxy.storage.errors import SHARED_OWNER, DatabaseOwned

_MAX_OWNER_TEXT = 512
_KERNEL_LOCKS = Path("/proc/locks")


def owner_lock_path(database: Path) -> Path:
    """The lock file of a database: beside it, named after it."""
    return database.with_name(database.name + ".owner")


class OwnerLock:
    """The claim of one serving process on one SQLite database."""

    def __init__(self, database: Path) -> None:
        self.path = owner_lock_path(database)
        self._fd: int | None = None
        self._shared = False

    def claim(self, owner: str, *, shared: bool = False) -> None:
        """Take the lock (shared: beside the others that take it shared) and record who holds it; raise
        DatabaseOwned naming the holder when it is taken.

        Claiming a lock this object already holds does nothing.
        """
        if self._fd is not None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, _MAX_OWNER_TEXT, 0).decode("utf-8", "replace").strip()
            os.close(fd)
            # A shared claimant is kept out only by one that owns it alone; an exclusive one by either.
            raise DatabaseOwned(holder or "another process", shared=not shared and holder == SHARED_OWNER) from None
        except BaseException:
            os.close(fd)
            raise
        self._shared = shared
        # Written, then cut to length: the other shared holders write the same bytes, and a reader never
        # finds the file empty while one of them holds it.
        text = (SHARED_OWNER if shared else owner).encode()[:_MAX_OWNER_TEXT]
        os.pwrite(fd, text, 0)
        os.ftruncate(fd, len(text))
        self._fd = fd

    def release(self) -> None:
        """Give the lock up (closing the file releases it); releasing an unheld lock does nothing."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        if not self._shared:  # nobody serves it any more: a later reader must not name this process
            os.ftruncate(fd, 0)  # (a shared holder leaves the text: others may still serve)
        os.close(fd)


def current_owner(database: Path) -> str | None:
    """Who serves the database now, told without taking the lock (a serve starting meanwhile must never be
    refused because someone looked): the owner text while a process holds it, None while none does.

    Reads the kernel's table of locks (Linux's /proc/locks); raises OSError where there is none.
    """
    path = owner_lock_path(database)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        _KERNEL_LOCKS.stat()  # on a system that cannot tell, say so even here
        return None
    try:
        status = os.fstat(fd)
        device = f"{os.major(status.st_dev):02x}:{os.minor(status.st_dev):02x}:{status.st_ino}"
        # "1: FLOCK  ADVISORY  WRITE 4121 fe:00:2149076 0 EOF"; a waiter's line has "->" after the number.
        held = any(fields[1:3] == ["FLOCK", "ADVISORY"] and fields[5] == device
                   for fields in (line.split() for line in _KERNEL_LOCKS.read_text().splitlines())
                   if len(fields) > 5)
        if not held:
            return None
        return os.pread(fd, _MAX_OWNER_TEXT, 0).decode("utf-8", "replace").strip() or "another process"
    finally:
        os.close(fd)
