"""What a storage backend raises: its own exceptions are translated into these once, at its boundary.

    StorageError            the backend failed (a driver error not named below)
    ├── StorageBusy         another process held the database past the busy timeout: retry shortly
    ├── StorageUnavailable  the database cannot be reached, opened or used (closed, I/O error, gone)
    └── DuplicateKey        a unique constraint refused the write (a taken name, a seq already stored)
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
