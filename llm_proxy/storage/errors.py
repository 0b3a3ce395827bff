"""What a storage backend raises: its own exceptions are translated into these once, at its boundary.

    StorageError            the backend failed (a driver error not named below)
    ├── StorageBusy         another process held the database past the busy timeout: retry shortly
    ├── StorageUnavailable  the database cannot be reached, opened or used (closed, I/O error, gone)
    ├── DuplicateKey        a unique constraint refused the write (a taken name, a seq already stored)
    └── DatabaseOwned       another serving process owns the database (its args[0] says which)
"""

from __future__ import annotations


class StorageError(Exception):
    """The storage backend failed; the message is the backend's own, for the operator."""


class StorageBusy(StorageError):
    """The database stayed locked by another process past the busy timeout."""


class StorageUnavailable(StorageError):
    """The database cannot be reached, opened or used."""


class DuplicateKey(StorageError):
    """A unique constraint refused the write."""


# How an owner lock names the processes that hold it together (those sharing a Redis).
SHARED_OWNER = "processes sharing a Redis (REDIS_URL)"


class DatabaseOwned(StorageError):
    """Another serving process owns the database; args[0] describes it (pid, host, since when).

    `shared`: it is served by processes sharing a Redis (which a process without REDIS_URL must not
    join), not by one that owns it alone.
    """

    def __init__(self, holder: str, *, shared: bool = False) -> None:
        super().__init__(holder)
        self.shared = shared

    @property
    def holder(self) -> str:
        return str(self.args[0])
