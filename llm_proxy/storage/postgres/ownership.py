"""Who serves a PostgreSQL database: a session-level advisory lock, held on a connection of its own while a
process serves.

As on SQLite (storage/sqlite/ownership.py), two serving processes on one database would each trust their
own memory and silently disagree. So a serving process takes pg_try_advisory_lock(OWNER_LOCK) on a
dedicated connection (never one of the pool's, which are lent to anyone and reset) and writes who it is
into serving_owner; a second one, refused the lock, names the holder from that row, believed only while
the row's session holds the lock (pg_locks). PostgreSQL drops a session's locks when the session ends,
however the process ends (`kill -9` included: the server sees its socket close), so none is left behind.

If that connection is lost while serving (PostgreSQL restarted, an administrator ended the session), the
lock went with it: the process goes on serving, takes the lock back once the database answers, and logs
an ERROR naming whoever took it meanwhile. CLI commands never claim.

Processes sharing a Redis (REDIS_URL) serve one database together: they take the same lock shared
(pg_try_advisory_lock_shared) and record nothing, so they keep out, and are kept out by, a process that
would own the database alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass

from asyncpg import Connection

from llm_proxy.settings import database_url_passwords
from llm_proxy.storage.errors import SHARED_OWNER, DatabaseOwned, StorageError
from llm_proxy.storage.postgres.database import CONNECT_TIMEOUT, close_alone, connect_alone, now_text, translated

log = logging.getLogger(__name__)

# The key of the session-level advisory lock a serving process holds ("llm-ownr"); advisory locks
# are per database, so one server may host several gateways' databases.
OWNER_LOCK = 0x6C6C6D2D6F776E72
# How often the held connection is checked, and how often a lost claim is tried again.
CHECK_INTERVAL = 5.0
APPLICATION_NAME = "llm-proxy owner"  # what pg_stat_activity shows for the lock's session

# pg_locks shows a bigint advisory key as two 32-bit halves, with objsubid 1.
_HOLDER = ("SELECT l.pid, {owner}, l.mode = 'ShareLock' FROM pg_locks l {join}"
           " WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1 AND l.classid = $1 AND l.objid = $2"
           " AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())")
_HOLDER_NAMED = _HOLDER.format(owner="o.owner", join="LEFT JOIN serving_owner o ON o.backend_pid = l.pid")
_HOLDER_UNNAMED = _HOLDER.format(owner="NULL", join="")  # a database not migrated to serving_owner yet
_RECORD = ("INSERT INTO serving_owner (id, owner, backend_pid, claimed_at) VALUES (1, $1, pg_backend_pid(), $2)"
           " ON CONFLICT (id) DO UPDATE SET owner = excluded.owner, backend_pid = excluded.backend_pid,"
           " claimed_at = excluded.claimed_at")
_FORGET = "DELETE FROM serving_owner WHERE backend_pid = pg_backend_pid()"
# Tries of lock-then-look before naming nobody in particular: the lock may be freed and taken again
# between the two.
_TRIES = 3


@dataclass(frozen=True, slots=True)
class Holder:
    """The session holding the claim, and who its process said it is (None: it said nothing yet)."""

    pid: int
    owner: str | None
    shared: bool = False  # one of the processes sharing a Redis

    def describe(self) -> str:
        """Name the holder for the operator."""
        if self.shared:
            return SHARED_OWNER
        if self.owner:
            return self.owner
        return f"another process (PostgreSQL session {self.pid})" if self.pid else "another process"


async def read_holder(conn: Connection) -> Holder | None:
    """Who holds the claim on conn's database; None when no process does. Takes no lock."""
    named = await conn.fetchval("SELECT to_regclass('serving_owner')") is not None
    row = await conn.fetchrow(_HOLDER_NAMED if named else _HOLDER_UNNAMED, OWNER_LOCK >> 32, OWNER_LOCK & 0xFFFFFFFF)
    return None if row is None else Holder(row[0], row[1], bool(row[2]))


async def _take(conn: Connection, owner: str, shared: bool = False) -> Holder | None:
    """Try to take the claim on conn (shared: beside the others that take it shared), recording `owner` when
    it is exclusive; None when taken, else who holds it."""
    for _ in range(_TRIES):
        if shared:
            if await conn.fetchval("SELECT pg_try_advisory_lock_shared($1)", OWNER_LOCK):
                return None
        elif await conn.fetchval("SELECT pg_try_advisory_lock($1)", OWNER_LOCK):
            await conn.execute(_RECORD, owner, now_text())
            return None
        holder = await read_holder(conn)
        if holder is not None:
            return holder
    return Holder(0, None)


def _report_end(watch: asyncio.Task[None]) -> None:
    """Log a watch that ended other than by release(): a bug, and the claim is no longer looked after."""
    if not watch.cancelled() and (exc := watch.exception()) is not None:
        # The exception's type only: an untranslated driver message might hold the URL's password.
        log.error("DATABASE_URL: the watch over this process's claim on the database stopped (%s); the claim "
                  "is no longer taken back if its connection is lost", type(exc).__name__)


class OwnerLock:
    """The claim of one serving process on one PostgreSQL database."""

    def __init__(self, url: str, *, check_interval: float = CHECK_INTERVAL) -> None:
        self.url = url
        self.check_interval = check_interval
        self._passwords = database_url_passwords(url)
        self._owner: str | None = None
        self._shared = False
        self._conn: Connection | None = None
        self._session: int | None = None  # the server pid of the session that held the lock last
        self._lost = asyncio.Event()
        self._watch: asyncio.Task[None] | None = None

    @property
    def held(self) -> bool:
        """Tell whether this process holds the claim now (not while its connection is lost)."""
        return self._conn is not None and not self._conn.is_closed()

    async def claim(self, owner: str, *, shared: bool = False) -> None:
        """Take the lock (shared: beside the others that take it shared) and record `owner`; raise
        DatabaseOwned naming the holder when it is taken.

        Claiming a lock this object already holds does nothing.
        """
        if self._owner is not None:
            return
        conn = await self._connect()
        try:
            with translated(self._passwords):
                holder = await _take(conn, owner, shared)
        except BaseException:
            conn.terminate()
            raise
        if holder is not None:
            await self._close(conn)
            raise DatabaseOwned(holder.describe(), shared=holder.shared)
        self._owner, self._shared = owner, shared
        self._hold(conn)
        self._watch = asyncio.get_running_loop().create_task(self._keep(owner), name="postgres-owner-lock")
        self._watch.add_done_callback(_report_end)

    async def release(self) -> None:
        """Give the claim up (ending its session releases the lock); releasing an unheld one does nothing."""
        watch, self._watch = self._watch, None
        if watch is not None:
            watch.cancel()
            await asyncio.wait([watch])
        conn, self._conn = self._conn, None
        self._owner = None
        if conn is None:
            return
        with contextlib.suppress(TimeoutError, StorageError, OSError):
            with translated(self._passwords):
                # Nobody serves it any more: a later reader must not name this process.
                await asyncio.wait_for(conn.execute(_FORGET), timeout=CONNECT_TIMEOUT)
        await self._close(conn)

    async def _connect(self) -> Connection:
        return await connect_alone(self.url, APPLICATION_NAME)

    async def _close(self, conn: Connection) -> None:
        await close_alone(conn, self._passwords)

    def _hold(self, conn: Connection) -> None:
        self._conn = conn
        self._session = conn.get_server_pid()
        self._lost.clear()
        conn.add_termination_listener(lambda _conn: self._lost.set())

    # ---- while serving ----

    async def _keep(self, owner: str) -> None:
        """Watch the lock's connection; when it is lost, take the claim back (for as long as this serves)."""
        while True:
            await self._until_lost()
            log.warning("DATABASE_URL: lost the connection that holds this process's claim on the database; "
                        "serving on, and taking the claim back once the database answers")
            await self._take_back(owner)

    async def _until_lost(self) -> None:
        conn = self._conn
        assert conn is not None
        while not (self._lost.is_set() or conn.is_closed()):
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._lost.wait(), timeout=self.check_interval)
                break
            # A connection whose server vanished without a word (a host gone, a half-open socket) only
            # shows when it is used.
            try:
                with translated(self._passwords):
                    await asyncio.wait_for(conn.fetchval("SELECT 1"), timeout=CONNECT_TIMEOUT)
            except (TimeoutError, StorageError, OSError):
                break
        self._conn = None
        conn.terminate()

    async def _take_back(self, owner: str) -> None:
        reported: Holder | None = None
        while True:
            await asyncio.sleep(self.check_interval)
            try:
                conn = await self._connect()
            except StorageError:
                continue  # still down: try again later, quietly (the pool's errors already say so)
            try:
                with translated(self._passwords):
                    holder = await asyncio.wait_for(_take(conn, owner, self._shared), timeout=CONNECT_TIMEOUT)
                    if holder is not None and holder.pid == self._session and holder.owner == owner:
                        # This process's own old session, which the server has not seen end (a
                        # half-open connection): end it, and take the claim on the next try.
                        await conn.fetchval("SELECT pg_terminate_backend($1)", holder.pid)
            except (TimeoutError, StorageError, OSError):
                conn.terminate()
                continue
            if holder is None:
                self._hold(conn)
                log.warning("DATABASE_URL: this process holds its claim on the database again")
                return
            await self._close(conn)
            if holder.owner != owner and holder != reported:
                reported = holder
                log.error("DATABASE_URL: while this process's claim on the database was lost, %s claimed it: two "
                          "processes now serve it and may disagree; stop one of them (this one serves on, and "
                          "takes the claim back once it is free)", holder.describe())
