"""What only the PostgreSQL backend has: migrations under a lock, its errors translated, details kept as text.

Everything a Store promises is in test_contract.py, run on PostgreSQL too; these are the backend's own
mechanics, on a real server (tests/servers.py), a fresh database per test.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest

from llm_proxy.storage.base import ChainHead, InsertEvents
from llm_proxy.storage.errors import DuplicateKey, StorageBusy, StorageError, StorageUnavailable

asyncpg = pytest.importorskip("asyncpg")  # the `postgres` extra (under CI a skip fails the run)

from llm_proxy.storage.postgres.database import MIGRATION_LOCK, migrations, translated  # noqa: E402
from llm_proxy.storage.postgres.store import PostgresStore  # noqa: E402
from tests.servers import free_port  # noqa: E402

pytestmark = pytest.mark.usefixtures("postgres_url")


@pytest.fixture
async def store(postgres_url: str) -> AsyncIterator[PostgresStore]:
    opened = PostgresStore(postgres_url)
    await opened.open()
    yield opened
    await opened.close()


async def rows(url: str, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    """Read through a connection of the test's own, not the store's."""
    conn = await asyncpg.connect(url)
    try:
        return [tuple(row) for row in await conn.fetch(sql, *args)]
    finally:
        await conn.close()


def with_password(url: str, password: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(netloc=f"{parts.username}:{password}@{parts.hostname}:{parts.port}"))


def chain_of_causes(exc: BaseException) -> list[BaseException]:
    found: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in found:
        found.append(current)
        current = current.__cause__ or (None if current.__suppress_context__ else current.__context__)
    return found


# ---- migrations ----


async def test_stores_opening_a_fresh_database_at_once_apply_each_migration_once(postgres_url: str) -> None:
    """Eight stores (eight pools: eight server sessions, as eight processes would have) open one empty
    database together: the advisory lock lets one apply the migrations, the others find them applied."""
    stores = [PostgresStore(postgres_url) for _ in range(8)]
    try:
        await asyncio.gather(*(store.open() for store in stores))
        applied = [store.db.migrated for store in stores]
        assert sorted(len(migrated) for migrated in applied) == [0] * 7 + [len(migrations())]
        recorded = await rows(postgres_url, "SELECT version FROM schema_migrations ORDER BY version")
        assert recorded == [(m.version,) for m in migrations()]
        for number, store in enumerate(stores):  # every one of them works on the one schema
            await store.projects.create(f"p{number}", "enc:v1:x", "sk-****", 1_700_000_000)
        assert len(await stores[0].projects.all()) == 8
    finally:
        await asyncio.gather(*(store.close() for store in stores))


async def test_opening_a_migrated_database_applies_nothing(postgres_url: str, store: PostgresStore) -> None:
    assert [m.version for m in store.db.migrated] == [m.version for m in migrations()]
    again = PostgresStore(postgres_url)
    await again.open()
    try:
        assert again.db.migrated == []
    finally:
        await again.close()
    assert len(await rows(postgres_url, "SELECT * FROM schema_migrations")) == len(migrations())


async def test_migrations_wait_for_the_lock_another_session_holds(postgres_url: str) -> None:
    """While another session holds the migration lock (a process migrating), open() waits for it."""
    holder = await asyncpg.connect(postgres_url)
    try:
        transaction = holder.transaction()
        await transaction.start()
        await holder.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK)
        store = PostgresStore(postgres_url)
        opening = asyncio.create_task(store.open())
        for _ in range(500):  # until open() is seen waiting for the lock
            waiting = await rows(postgres_url,
                                 "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted")
            if waiting == [(1,)]:
                break
            await asyncio.sleep(0.01)
        assert waiting == [(1,)] and not opening.done()
        await transaction.rollback()
        await opening
        await store.close()
    finally:
        await holder.close()


async def test_a_database_migrated_past_this_version_is_refused(postgres_url: str, store: PostgresStore) -> None:
    newer = len(migrations()) + 1
    await store.db.execute("INSERT INTO schema_migrations (version, applied_at) VALUES ($1, '2030-01-01T00:00:00Z')",
                           newer)
    await store.close()
    with pytest.raises(StorageError, match=f"schema is at version {newer}, newer than this llm-proxy knows"):
        await PostgresStore(postgres_url).open()


# ---- what is stored how ----


async def test_details_are_stored_as_the_json_text_given(postgres_url: str, store: PostgresStore) -> None:
    """Not jsonb, which would reorder the keys (and drop duplicates) the chain's hash was taken over."""
    details = {"zeta": 1, "alpha": {"y": [1, 2.5, "é"], "b": None}, "mid": True}

    async def step(head: ChainHead, insert: InsertEvents) -> ChainHead:
        await insert([{"timestamp": "2024-01-01T00:00:00Z", "action": "token.access", "actor": "client",
                       "result": "success", "details": details, "seq": 1, "hash": "f" * 64}])
        return 1, "f" * 64

    await store.audit.extend("", step)
    stored = await rows(postgres_url, "SELECT details, pg_typeof(details)::text FROM audit_events")
    assert stored == [('{"zeta":1,"alpha":{"y":[1,2.5,"é"],"b":null},"mid":true}', "text")]


async def test_timestamps_compare_bytewise_whatever_the_locale(postgres_url: str, store: PostgresStore) -> None:
    """They are compared as text (expiry, since/until, prune's cutoff), as in SQLite: in the C collation."""
    collations = await rows(postgres_url, "SELECT table_name, column_name, collation_name FROM"
                            " information_schema.columns WHERE table_schema = 'public' AND column_name IN"
                            " ('created_at', 'updated_at', 'expires_at', 'revoked_at', 'last_used_at', 'timestamp',"
                            " 'day') AND data_type = 'text' ORDER BY 1, 2")  # not the console sessions' numbers
    assert len(collations) == 8 and all(collation == "C" for _, _, collation in collations), collations


# ---- errors ----


async def test_a_wrong_password_is_a_storage_error_that_never_shows_it(postgres_url: str) -> None:
    wrong = "Wr0ng-pa55word-of-the-test"
    store = PostgresStore(with_password(postgres_url, wrong))
    with pytest.raises(StorageError) as raised:
        await store.open()
    assert "password authentication failed" in str(raised.value)
    assert all(wrong not in str(exc) and wrong not in repr(exc) for exc in chain_of_causes(raised.value))
    assert await store.ping() is False


async def test_a_server_that_is_not_there_is_unavailable(postgres_url: str) -> None:
    secret = "s3cret-of-a-server-that-is-not-there"
    parts = urlsplit(postgres_url)
    url = urlunsplit(parts._replace(netloc=f"llm:{secret}@127.0.0.1:{free_port()}"))
    with pytest.raises(StorageUnavailable) as raised:
        await PostgresStore(url).open()
    assert all(secret not in str(exc) for exc in chain_of_causes(raised.value))


def test_a_driver_message_holding_the_password_is_masked_and_not_chained() -> None:
    """Belt and braces: whatever a driver's message says, the password is not in what leaves translated()."""
    with pytest.raises(StorageError) as raised, translated(("hunter2-secret",)):
        raise asyncpg.PostgresError('cannot use "postgresql://u:hunter2-secret@db/x"')
    assert str(raised.value) == 'cannot use "postgresql://u:***@db/x"'
    assert raised.value.__cause__ is None and raised.value.__suppress_context__


@pytest.mark.parametrize(("raised", "kind"), [
    (asyncpg.UniqueViolationError("duplicate key"), DuplicateKey),
    (asyncpg.DeadlockDetectedError("deadlock detected"), StorageBusy),
    (asyncpg.SerializationError("could not serialize access"), StorageBusy),
    (asyncpg.LockNotAvailableError("canceling statement due to lock timeout"), StorageBusy),
    (asyncpg.CannotConnectNowError("the database system is starting up"), StorageUnavailable),
    (asyncpg.TooManyConnectionsError("too many clients"), StorageUnavailable),
    (asyncpg.ConnectionDoesNotExistError("connection was closed"), StorageUnavailable),
    (asyncpg.InterfaceError("pool is closing"), StorageUnavailable),
    (asyncpg.UndefinedTableError("relation does not exist"), StorageError),
], ids=lambda value: type(value).__name__ if isinstance(value, Exception) else value.__name__)
def test_each_driver_error_has_its_kind(raised: Exception, kind: type[StorageError]) -> None:
    with pytest.raises(StorageError) as caught, translated():
        raise raised
    assert type(caught.value) is kind


def test_os_errors_are_unavailable_only_while_connecting() -> None:
    """A socket's error means the database is out of reach; the same error from a caller's own code
    (the audit step writing its file) is the caller's, and passes through as it is."""
    with pytest.raises(StorageUnavailable), translated(connecting=True):
        raise ConnectionRefusedError(111, "Connection refused")
    with pytest.raises(OSError, match="No space left") as caught, translated():
        raise OSError(28, "No space left on device")
    assert not isinstance(caught.value, StorageError)


async def test_a_row_lock_held_past_the_lock_timeout_is_busy(postgres_url: str) -> None:
    """The chain head locked by another session (another process's audit write) for longer than the
    lock timeout: StorageBusy, as SQLite's busy timeout gives; once it is free, writes go on."""
    store = PostgresStore(postgres_url, lock_timeout_ms=200)
    await store.open()
    holder = await asyncpg.connect(postgres_url)
    try:
        async def step(head: ChainHead, insert: InsertEvents) -> ChainHead:
            return head[0] + 1, "a" * 64

        assert await store.audit.extend("here", step) == (1, "a" * 64)  # the chain's row now exists
        transaction = holder.transaction()
        await transaction.start()
        await holder.execute("SELECT * FROM audit_chain WHERE instance = 'here' FOR UPDATE")
        with pytest.raises(StorageBusy):
            await store.audit.extend("here", step)
        assert await store.audit.extend("elsewhere", step) == (1, "a" * 64)  # another chain does not wait
        await transaction.rollback()
        assert await store.audit.extend("here", step) == (2, "a" * 64)
    finally:
        await holder.close()
        await store.close()


async def test_connections_the_server_ends_are_replaced(postgres_url: str, store: PostgresStore) -> None:
    """An administrator (or a failover) ends every session of the gateway: the pool opens new ones."""
    await store.projects.create("before", "enc:v1:x", "sk-****", 1_700_000_000)
    ended = await rows(postgres_url, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                       " WHERE application_name = 'llm-proxy' AND pid <> pg_backend_pid()")
    assert ended and all(done for (done,) in ended)
    outcomes: list[str] = []
    # A call may still meet a connection whose end the pool has not seen yet: each ended connection
    # can fail at most one call, and then the pool replaces it.
    for _ in range(len(ended) + 1):
        try:
            outcomes.append(",".join(p.name for p in await store.projects.all()))
        except StorageUnavailable:
            outcomes.append("unavailable")
    assert outcomes[-1] == "before" and outcomes.count("unavailable") <= len(ended), outcomes
    assert await store.ping() is True
