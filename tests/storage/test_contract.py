"""The storage contract: what every backend's Store does, checked through storage.base's Protocols only.

One suite for every backend, so that none can drift: each test runs once per entry of BACKENDS,
on a database of its own. A test speaks only the Protocols' methods (no SQL, no backend's
internals) and asserts what base.py's docstrings (and the README where they point to it) promise.
The one exception is Backend.corrupt_details, a backend-specific way to make an event unreadable.

Adding a backend is one entry in BACKENDS: a function that gives the Backend on this test's database,
taking it from the test's fixtures, which also drop it afterwards (SQLite: tmp_path; PostgreSQL:
postgres_url, a new database on a real server, tests/servers.py). A bug a backend is known to have
is listed in KNOWN_BUGS, next to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import itertools
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest

from llm_proxy.models import AdminSession, Project, TokenRecord, epoch, iso
from llm_proxy.storage.base import ChainHead, InsertEvents, PruneResult, Store
from llm_proxy.storage.errors import DuplicateKey, StorageError, StorageUnavailable
from llm_proxy.storage.sqlite.store import SqliteStore

# ---- the backends ----


@dataclass(frozen=True)
class Backend:
    """One backend under test, on this test's database."""

    name: str
    connect: Callable[[], Store]  # a new, unopened store on this test's database (the same one every call)
    # Backend-specific: make the details of the event with this seq unreadable, as a damaged row would be.
    corrupt_details: Callable[[Store, int], Awaitable[None]]


async def _sqlite_corrupt_details(store: Store, seq: int) -> None:
    """SQLite only: write details that are not JSON, through the store's own connection."""
    assert isinstance(store, SqliteStore)
    assert await store.db.execute("UPDATE audit_events SET details = '{\"torn' WHERE seq = ?", (seq,)) == 1


def sqlite_backend(request: pytest.FixtureRequest) -> Backend:
    path: Path = request.getfixturevalue("tmp_path") / "llm-proxy.db"
    return Backend("sqlite", lambda: SqliteStore(path), _sqlite_corrupt_details)


async def _postgres_corrupt_details(store: Store, seq: int) -> None:
    """PostgreSQL only: write details that are not JSON (details is TEXT, not jsonb, so it takes them)."""
    from llm_proxy.storage.postgres.store import PostgresStore
    assert isinstance(store, PostgresStore)
    assert await store.db.execute("UPDATE audit_events SET details = '{\"torn' WHERE seq = $1", seq) == 1


def postgres_backend(request: pytest.FixtureRequest) -> Backend:
    url: str = request.getfixturevalue("postgres_url")  # skipped (failed under CI) without a server or asyncpg
    from llm_proxy.storage.postgres.store import PostgresStore  # the `postgres` extra: imported only here
    return Backend("postgres", lambda: PostgresStore(url), _postgres_corrupt_details)


BACKENDS: dict[str, Callable[[pytest.FixtureRequest], Backend]] = {
    "postgres": postgres_backend,
    "sqlite": sqlite_backend,
}

# (backend, test) -> why it fails: each is run as xfail(strict=True), so a fix makes it fail until removed here.
KNOWN_BUGS: dict[tuple[str, str], str] = {
}


@pytest.fixture(params=sorted(BACKENDS))
def backend(request: pytest.FixtureRequest) -> Backend:
    return BACKENDS[request.param](request)


@pytest.fixture
async def store(backend: Backend) -> AsyncIterator[Store]:
    opened = backend.connect()
    await opened.open()
    yield opened
    await opened.close()


@pytest.fixture(autouse=True)
def _known_bugs(request: pytest.FixtureRequest) -> None:
    callspec = getattr(request.node, "callspec", None)
    backend = str(callspec.params.get("backend", "")) if callspec else ""
    reason = KNOWN_BUGS.get((backend, request.node.originalname))
    if reason is not None:
        request.applymarker(pytest.mark.xfail(strict=True, reason=reason))


# ---- helpers ----

NOW = epoch("2024-03-01T12:00:00Z")
HOUR = 3600.0
ZERO_HEAD: ChainHead = (0, "0" * 64)
_digests = itertools.count(1)


class Refused(Exception):
    """What a test's own callback raises to refuse or abort."""


async def make_project(store: Store, name: str = "alpha", now: float = NOW) -> Project:
    return await store.projects.create(name, f"enc:v1:{name}", f"sk-{name[:4]}****wxyz", now)


async def make_token(store: Store, project: Project, *, expires_at: float = NOW + HOUR, now: float = NOW,
                     max_requests: int | None = None, rate_limit_per_minute: int | None = None,
                     max_tokens_total: int | None = None, token_hash: str | None = None) -> TokenRecord:
    return await store.tokens.create(
        token_hash=token_hash or digest(), token_hint="tok-abcd****wxyz", project_id=project.id,
        expires_at=expires_at, max_requests=max_requests, rate_limit_per_minute=rate_limit_per_minute,
        max_tokens_total=max_tokens_total, now=now)


def digest() -> str:
    """A fresh token digest (64 hex characters), unique within the run."""
    return f"{next(_digests):064x}"


async def current(store: Store, record: TokenRecord) -> TokenRecord:
    token = await store.tokens.get(record.id)
    assert token is not None
    return token


def event(seq: int, timestamp: str = "2024-01-01T00:00:00Z", action: str = "token.access", *,
          result: str = "success", project_id: str | None = "proj-a", details: dict[str, Any] | None = None
          ) -> dict[str, Any]:
    """An audit event as the writer inserts it: the file's key order, keys without a value left out."""
    values = {"timestamp": timestamp, "action": action, "actor": "client", "project_id": project_id,
              "request_id": f"req-{seq}", "client_ip": "192.0.2.7", "result": result,
              "details": {"status": 200, "n": seq} if details is None else details,
              "seq": seq, "hash": chain_hash(seq)}
    return {key: value for key, value in values.items() if value is not None}


def chain_hash(seq: int) -> str:
    """Stands in for the event's hash: the store keeps hashes, it never checks them."""
    return f"{seq:x}".rjust(64, "e")


def events_at(*timestamps: str, first: int = 1) -> list[dict[str, Any]]:
    return [event(seq, timestamp) for seq, timestamp in enumerate(timestamps, first)]


async def append(store: Store, events: Sequence[dict[str, Any]]) -> ChainHead | None:
    """Extend the chain with these events, storing the last one as the head."""
    async def step(head: ChainHead, insert: InsertEvents) -> ChainHead:
        await insert(events)
        return events[-1]["seq"], events[-1]["hash"]
    return await store.audit.extend("", step)


async def stored_seqs(store: Store) -> list[int]:
    return [seq for seq, _ in await store.audit.walk("", 0, 10_000)]


async def listed(store: Store, **kwargs: Any) -> list[tuple[int, dict[str, Any]]]:
    arguments: dict[str, Any] = {"filters": {}, "since": None, "until": None, "before": None, "limit": 100}
    return await store.audit.query(**{**arguments, **kwargs})


async def query(store: Store, **kwargs: Any) -> list[dict[str, Any]]:
    return [event for _, event in await listed(store, **kwargs)]


async def position_of(store: Store, seq: int, instance: str = "") -> int:
    """The store's position (query's cursor) of an event, found by its chain and seq."""
    return next(position for position, event in await listed(store, limit=1000)
                if (event.get("instance", ""), event["seq"]) == (instance, seq))


@contextlib.contextmanager
def unclosed_connections() -> Iterator[list[str]]:
    """Collect the ResourceWarnings of connections dropped without being closed.

    Garbage is collected on the way out: that finalises such connections, whose threads would
    otherwise keep the test run from exiting.
    """
    found: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            yield found
        finally:
            gc.collect()
    found.extend(str(warning.message) for warning in caught if issubclass(warning.category, ResourceWarning))


# ---- projects ----


async def test_create_returns_an_active_project_that_get_reads_back(store: Store) -> None:
    project = await store.projects.create("alpha", "enc:v1:abc", "sk-abcd****wxyz", NOW)
    assert project == Project(project.id, "alpha", "enc:v1:abc", "sk-abcd****wxyz", True, iso(NOW), iso(NOW))
    assert await store.projects.get(project.id) == project
    assert await store.projects.get("no-such-project") is None


async def test_create_refuses_a_taken_name_and_the_store_goes_on(store: Store) -> None:
    first = await make_project(store, "alpha")
    with pytest.raises(DuplicateKey):
        await store.projects.create("alpha", "enc:v1:other", "sk-othe****wxyz", NOW + 1)
    second = await make_project(store, "beta")  # the failed write released the store
    assert await store.projects.all() == [first, second]


async def test_all_is_oldest_first_keeping_creation_order_within_a_second(store: Store) -> None:
    later = await make_project(store, "b-later", now=NOW + 10)
    early = await make_project(store, "z-early", now=NOW)
    early_too = await make_project(store, "a-early-too", now=NOW)  # same second: after z-early
    later_too = await make_project(store, "c-later-too", now=NOW + 10)
    assert [p.name for p in await store.projects.all()] == ["z-early", "a-early-too", "b-later", "c-later-too"]
    paused = await store.projects.update(early_too.id, {"is_active": False}, NOW + 20)
    assert await store.projects.all(active=True) == [early, later, later_too]
    assert await store.projects.all(active=False) == [paused]
    assert await store.projects.all(active=None) == [early, paused, later, later_too]


@pytest.mark.parametrize("columns", [
    {"name": "renamed"},
    {"api_key_encrypted": "enc:v1:new"},
    {"api_key_hint": "sk-newk****abcd"},
    {"is_active": False},
    {"name": "alpha"},  # its own name is not taken
    {"name": "both", "is_active": False, "api_key_encrypted": "enc:v1:both", "api_key_hint": "sk-both****1234"},
], ids=lambda columns: ",".join(f"{name}={value}" for name, value in columns.items()))
async def test_update_sets_the_columns_given_and_moves_updated_at(store: Store, columns: dict[str, Any]) -> None:
    project = await make_project(store, "alpha")
    updated = await store.projects.update(project.id, columns, NOW + 60)
    assert updated == replace(project, **columns, updated_at=iso(NOW + 60))
    assert await store.projects.get(project.id) == updated


async def test_update_resumes_a_paused_project(store: Store) -> None:
    project = await make_project(store)
    await store.projects.update(project.id, {"is_active": False}, NOW + 1)
    resumed = await store.projects.update(project.id, {"is_active": True}, NOW + 2)
    assert resumed == replace(project, updated_at=iso(NOW + 2))


async def test_update_of_an_unknown_project_is_none(store: Store) -> None:
    project = await make_project(store)
    assert await store.projects.update("no-such-project", {"name": "x"}, NOW + 1) is None
    assert await store.projects.all() == [project]


async def test_update_to_a_taken_name_is_a_duplicate_and_changes_nothing(store: Store) -> None:
    alpha, beta = await make_project(store, "alpha"), await make_project(store, "beta")
    with pytest.raises(DuplicateKey):
        await store.projects.update(beta.id, {"name": "alpha", "api_key_hint": "sk-xxxx****xxxx"}, NOW + 1)
    assert await store.projects.all() == [alpha, beta]


async def test_rekey_replaces_only_the_keys_reencrypt_gives_a_new_value_for(store: Store) -> None:
    projects = [await make_project(store, name) for name in ("alpha", "beta", "gamma")]
    seen: list[str] = []

    def reencrypt(stored: str) -> str | None:
        seen.append(stored)
        return None if stored == "enc:v1:beta" else stored.replace("v1", "v2")

    assert await store.projects.rekey(reencrypt) == 2
    assert sorted(seen) == ["enc:v1:alpha", "enc:v1:beta", "enc:v1:gamma"]  # each stored key, once
    after = {p.name: p for p in await store.projects.all()}
    assert {name: p.api_key_encrypted for name, p in after.items()} == {
        "alpha": "enc:v2:alpha", "beta": "enc:v1:beta", "gamma": "enc:v2:gamma"}
    assert [replace(p, api_key_encrypted=f"enc:v1:{p.name}") for p in after.values()] == projects


async def test_rekey_with_nothing_to_change_is_zero(store: Store) -> None:
    assert await store.projects.rekey(lambda stored: "never called") == 0
    project = await make_project(store)
    assert await store.projects.rekey(lambda stored: None) == 0
    assert await store.projects.all() == [project]


async def test_rekey_is_one_transaction_an_exception_leaves_every_key(store: Store) -> None:
    projects = [await make_project(store, name) for name in ("alpha", "beta", "gamma")]
    calls = itertools.count(1)

    def reencrypt(stored: str) -> str:
        if next(calls) == 3:
            raise Refused("the key does not decrypt")
        return "enc:v2:" + stored

    with pytest.raises(Refused):
        await store.projects.rekey(reencrypt)
    assert await store.projects.all() == projects


# ---- tokens ----


async def test_create_returns_an_active_token_that_get_reads_back(store: Store) -> None:
    project = await make_project(store)
    token_hash = digest()
    token = await make_token(store, project, token_hash=token_hash, expires_at=NOW + HOUR, max_requests=10,
                             rate_limit_per_minute=0, max_tokens_total=5000)
    assert token == TokenRecord(
        id=token.id, token_hash=token_hash, token_hint="tok-abcd****wxyz", project_id=project.id,
        expires_at=iso(NOW + HOUR), is_active=True, max_requests=10, rate_limit_per_minute=0, max_tokens_total=5000,
        request_count=0, prompt_tokens=0, completion_tokens=0, total_tokens=0, last_used_at=None,
        created_at=iso(NOW), revoked_at=None, replaced_by=None)
    assert await store.tokens.get(token.id) == token
    assert await store.tokens.get("no-such-token") is None


async def test_create_refuses_a_digest_already_stored(store: Store) -> None:
    project = await make_project(store)
    token = await make_token(store, project)
    with pytest.raises(DuplicateKey):
        await make_token(store, project, token_hash=token.token_hash)
    assert await store.tokens.all() == [token]


async def test_create_for_an_unknown_project_is_a_storage_error(store: Store) -> None:
    with pytest.raises(StorageError) as raised:
        await store.tokens.create(token_hash=digest(), token_hint="tok-abcd****wxyz", project_id="no-such-project",
                                  expires_at=NOW + HOUR, max_requests=None, rate_limit_per_minute=None,
                                  max_tokens_total=None, now=NOW)
    assert not isinstance(raised.value, DuplicateKey)
    assert await store.tokens.all() == []


async def test_find_gives_the_token_of_a_digest_and_its_project_as_it_is_now(store: Store) -> None:
    alpha, beta = await make_project(store, "alpha"), await make_project(store, "beta")
    token = await make_token(store, alpha)
    await make_token(store, beta)
    paused = await store.projects.update(alpha.id, {"is_active": False}, NOW + 5)
    assert await store.tokens.find(token.token_hash) == (token, paused)
    assert await store.tokens.find(digest()) is None


async def test_all_is_oldest_first_and_filters_by_project(store: Store) -> None:
    alpha, beta = await make_project(store, "alpha"), await make_project(store, "beta")
    later = await make_token(store, alpha, now=NOW + 10)
    early = await make_token(store, beta, now=NOW)
    early_too = await make_token(store, alpha, now=NOW)  # same second: after `early`
    assert await store.tokens.all() == [early, early_too, later]
    assert await store.tokens.all(alpha.id) == [early_too, later]
    assert await store.tokens.all(beta.id) == [early]
    assert await store.tokens.all("no-such-project") == []


async def test_all_active_only_leaves_out_revoked_paused_and_expired_tokens_at_now(store: Store) -> None:
    alpha, beta = await make_project(store, "alpha"), await make_project(store, "beta")
    live = await make_token(store, alpha, expires_at=NOW + 1)
    revoked = await make_token(store, alpha)
    paused = await make_token(store, alpha)
    expiring_now = await make_token(store, alpha, expires_at=NOW)
    expired = await make_token(store, alpha, expires_at=NOW - HOUR)
    other = await make_token(store, beta)
    resumed_after_revoking = await make_token(store, alpha)
    await store.tokens.revoke([revoked.id, resumed_after_revoking.id], NOW - 5)
    await store.tokens.update(paused.id, {"is_active": False})
    # The service refuses this; the store need not, but a revoked token stays revoked whatever is_active says.
    await store.tokens.update(resumed_after_revoking.id, {"is_active": True})
    assert await store.tokens.all(active_only=True, now=NOW) == [live, other]
    assert await store.tokens.all(alpha.id, active_only=True, now=NOW) == [live]
    # An hour earlier, the expired ones were live; revoked and paused ones stay out.
    assert await store.tokens.all(alpha.id, active_only=True, now=NOW - HOUR - 1) == [live, expiring_now, expired]
    assert len(await store.tokens.all(alpha.id)) == 6


@pytest.mark.parametrize("columns", [
    {"is_active": False},
    {"max_requests": 5},
    {"max_requests": None},
    {"rate_limit_per_minute": 0},
    {"rate_limit_per_minute": None},
    {"max_tokens_total": 123},
    {"expires_at": NOW + 2 * HOUR},  # given as epoch seconds, stored as the others are
    {"expires_at": NOW + 90.0, "is_active": False, "max_requests": 1},
    {},
], ids=lambda columns: ",".join(f"{name}={value}" for name, value in columns.items()) or "nothing")
async def test_token_update_sets_the_columns_given(store: Store, columns: dict[str, Any]) -> None:
    project = await make_project(store)
    token = await make_token(store, project, max_requests=10, rate_limit_per_minute=60, max_tokens_total=1000)
    updated = await store.tokens.update(token.id, columns)
    changed: dict[str, Any] = {name: iso(value) if name == "expires_at" else value for name, value in columns.items()}
    assert updated == replace(token, **changed)
    assert await store.tokens.get(token.id) == updated


async def test_token_update_resumes_a_paused_token(store: Store) -> None:
    token = await make_token(store, await make_project(store))
    await store.tokens.update(token.id, {"is_active": False})
    assert await store.tokens.update(token.id, {"is_active": True}) == token


@pytest.mark.parametrize("columns", [{"is_active": False}, {"expires_at": NOW}, {}], ids=["is_active", "expires_at",
                                                                                        "nothing"])
async def test_token_update_of_an_unknown_token_is_none(store: Store, columns: dict[str, Any]) -> None:
    token = await make_token(store, await make_project(store))
    assert await store.tokens.update("no-such-token", columns) is None
    assert await store.tokens.all() == [token]


async def test_revoke_returns_only_the_ids_this_call_revoked(store: Store) -> None:
    project = await make_project(store)
    fresh, fresh_too, earlier, untouched = [await make_token(store, project) for _ in range(4)]
    assert await store.tokens.revoke([earlier.id], NOW + 1) == [earlier.id]
    revoked = await store.tokens.revoke([fresh.id, earlier.id, "no-such-token", fresh_too.id, fresh.id], NOW + 2)
    assert sorted(revoked) == sorted([fresh.id, fresh_too.id])
    assert await current(store, fresh) == replace(fresh, is_active=False, revoked_at=iso(NOW + 2))
    assert await current(store, earlier) == replace(earlier, is_active=False, revoked_at=iso(NOW + 1))
    assert await current(store, untouched) == untouched


async def test_revoke_is_idempotent(store: Store) -> None:
    token = await make_token(store, await make_project(store))
    assert await store.tokens.revoke([token.id], NOW + 1) == [token.id]
    assert await store.tokens.revoke([token.id], NOW + 2) == []
    assert await current(store, token) == replace(token, is_active=False, revoked_at=iso(NOW + 1))
    assert await store.tokens.revoke([], NOW + 3) == []


async def test_revoke_project_revokes_its_tokens_and_counts_them_all(store: Store) -> None:
    alpha, beta = await make_project(store, "alpha"), await make_project(store, "beta")
    first, second, earlier = [await make_token(store, alpha) for _ in range(3)]
    other = await make_token(store, beta)
    await store.tokens.revoke([earlier.id], NOW + 1)
    revoked, total = await store.tokens.revoke_project(alpha.id, NOW + 2)
    assert (sorted(revoked), total) == (sorted([first.id, second.id]), 3)
    assert await current(store, first) == replace(first, is_active=False, revoked_at=iso(NOW + 2))
    assert await current(store, earlier) == replace(earlier, is_active=False, revoked_at=iso(NOW + 1))
    assert await current(store, other) == other
    assert await store.tokens.revoke_project(alpha.id, NOW + 3) == ([], 3)
    assert await store.tokens.revoke_project("no-such-project", NOW + 3) == ([], 0)


async def refresh(store: Store, token_id: str, *, old_stops_at: float, now: float = NOW + 60,
                  check: Callable[[TokenRecord], None] = lambda old: None,
                  token_hash: str | None = None) -> TokenRecord | None:
    return await store.tokens.refresh(token_id, check=check, token_hash=token_hash or digest(),
                                      token_hint="tok-newt****oken", expires_at=now + 2 * HOUR,
                                      old_stops_at=old_stops_at, now=now)


async def test_refresh_issues_a_successor_with_the_old_tokens_project_and_limits(store: Store) -> None:
    alpha = await make_project(store, "alpha")
    old = await make_token(store, alpha, max_requests=10, rate_limit_per_minute=0, max_tokens_total=500)
    await store.usage.save([(4, 10, 20, 30, iso(NOW + 30), old.id)], [])
    token_hash = digest()
    successor = await refresh(store, old.id, old_stops_at=NOW + 60, now=NOW + 60, token_hash=token_hash)
    assert successor is not None
    assert successor == TokenRecord(
        id=successor.id, token_hash=token_hash, token_hint="tok-newt****oken", project_id=alpha.id,
        expires_at=iso(NOW + 60 + 2 * HOUR), is_active=True, max_requests=10, rate_limit_per_minute=0,
        max_tokens_total=500, request_count=0, prompt_tokens=0, completion_tokens=0, total_tokens=0,
        last_used_at=None, created_at=iso(NOW + 60), revoked_at=None, replaced_by=None)
    assert successor.id != old.id
    assert await store.tokens.get(successor.id) == successor
    assert await store.tokens.find(token_hash) == (successor, alpha)


@pytest.mark.parametrize(("old_expires_at", "stops_at", "expected_expiry"), [
    (NOW + HOUR, NOW + 120, NOW + 120),  # the grace ends first
    (NOW + 100, NOW + 120, NOW + 100),  # never past its own expiry
    (NOW + 120, NOW + 120, NOW + 120),
], ids=["grace-ends-first", "own-expiry-first", "both-at-once"])
async def test_refresh_with_grace_keeps_the_old_token_until_it_stops(
        store: Store, old_expires_at: float, stops_at: float, expected_expiry: float) -> None:
    old = await make_token(store, await make_project(store), expires_at=old_expires_at)
    successor = await refresh(store, old.id, old_stops_at=stops_at, now=NOW + 60)
    assert successor is not None
    assert await current(store, old) == replace(old, expires_at=iso(expected_expiry), replaced_by=successor.id)


@pytest.mark.parametrize("stops_at", [NOW + 60, NOW + 59, NOW - HOUR], ids=["now", "a-second-ago", "long-ago"])
async def test_refresh_without_grace_revokes_the_old_token(store: Store, stops_at: float) -> None:
    old = await make_token(store, await make_project(store))
    successor = await refresh(store, old.id, old_stops_at=stops_at, now=NOW + 60)
    assert successor is not None
    assert await current(store, old) == replace(old, is_active=False, revoked_at=iso(NOW + 60),
                                                replaced_by=successor.id)
    assert await store.tokens.all(active_only=True, now=NOW + 60) == [successor]


async def test_refresh_checks_the_old_token_as_it_is_inside_the_write(store: Store) -> None:
    old = await make_token(store, await make_project(store), max_requests=10)
    changed = await store.tokens.update(old.id, {"max_requests": 3})
    seen: list[TokenRecord] = []
    successor = await refresh(store, old.id, old_stops_at=NOW + 60, check=seen.append)
    assert seen == [changed]
    assert successor is not None and successor.max_requests == 3


async def test_refresh_refused_by_check_writes_nothing(store: Store) -> None:
    old = await make_token(store, await make_project(store))
    token_hash = digest()

    def refuse(token: TokenRecord) -> None:
        raise Refused(token.id)

    with pytest.raises(Refused):
        await refresh(store, old.id, old_stops_at=NOW + 60, check=refuse, token_hash=token_hash)
    assert await store.tokens.all() == [old]
    assert await store.tokens.find(token_hash) is None
    # The digest is still free: the aborted successor left nothing behind.
    assert await refresh(store, old.id, old_stops_at=NOW + 60, token_hash=token_hash) is not None


async def test_refresh_of_an_unknown_token_is_none(store: Store) -> None:
    token = await make_token(store, await make_project(store))
    checked: list[TokenRecord] = []
    assert await refresh(store, "no-such-token", old_stops_at=NOW + 60, check=checked.append) is None
    assert checked == []
    assert await store.tokens.all() == [token]


def refuse_replaced(token: TokenRecord) -> None:
    if token.replaced_by is not None:
        raise Refused("already refreshed")


@pytest.mark.parametrize("stores", [1, 2], ids=["one-store", "two-stores"])
async def test_concurrent_refreshes_of_one_token_give_one_successor(backend: Backend, store: Store,
                                                                    stores: int) -> None:
    """With a check refusing a replaced token, as the tokens service's: the check runs inside the
    write, so two refreshes that both started before either wrote cannot both succeed (also from
    two stores on one database, as two processes would be)."""
    old = await make_token(store, await make_project(store), max_requests=100)
    other = backend.connect()
    await other.open()
    try:
        racers = [store, other if stores == 2 else store] * 2
        results = await asyncio.gather(
            *(refresh(racer, old.id, old_stops_at=NOW + 120, check=refuse_replaced) for racer in racers),
            return_exceptions=True)
    finally:
        await other.close()
    successors = [result for result in results if isinstance(result, TokenRecord)]
    assert len(successors) == 1
    assert all(isinstance(result, Refused) for result in results if result is not successors[0])
    assert (await current(store, old)).replaced_by == successors[0].id
    assert await store.tokens.all() == [await current(store, old), successors[0]]


async def test_deactivate_expired_returns_the_expired_tokens_as_they_were(store: Store) -> None:
    project = await make_project(store)
    expired = await make_token(store, project, expires_at=NOW - HOUR)
    expiring_now = await make_token(store, project, expires_at=NOW)
    live = await make_token(store, project, expires_at=NOW + 1)
    revoked = await make_token(store, project, expires_at=NOW - HOUR)
    paused = await make_token(store, project, expires_at=NOW - HOUR)
    resumed_after_revoking = await make_token(store, project, expires_at=NOW - HOUR)
    await store.tokens.revoke([revoked.id, resumed_after_revoking.id], NOW - 2 * HOUR)
    await store.tokens.update(paused.id, {"is_active": False})
    await store.tokens.update(resumed_after_revoking.id, {"is_active": True})  # still revoked: not "active"
    unchanged = [live] + [await current(store, t) for t in (revoked, paused, resumed_after_revoking)]

    deactivated = await store.tokens.deactivate_expired(NOW)
    assert sorted(deactivated, key=lambda t: t.id) == sorted([expired, expiring_now], key=lambda t: t.id)
    assert await current(store, expired) == replace(expired, is_active=False)
    assert await current(store, expiring_now) == replace(expiring_now, is_active=False)
    assert [await current(store, t) for t in unchanged] == unchanged
    assert await store.tokens.deactivate_expired(NOW) == []


# ---- usage ----


async def test_save_adds_counters_and_daily_deltas(store: Store) -> None:
    project = await make_project(store)
    token, other = await make_token(store, project), await make_token(store, project)
    await store.usage.save([(3, 10, 20, 30, "2024-03-01T12:00:05Z", token.id)],
                           [(project.id, "2024-03-01", 3, 10, 20, 30)])
    await store.usage.save([(2, 1, 2, 3, "2024-03-02T00:00:01Z", token.id)],
                           [(project.id, "2024-03-01", 1, 1, 2, 3), (project.id, "2024-03-02", 1, 0, 0, 0)])
    assert await current(store, token) == replace(token, request_count=5, prompt_tokens=11, completion_tokens=22,
                                                  total_tokens=33, last_used_at="2024-03-02T00:00:01Z")
    assert await current(store, other) == other
    assert await store.usage.daily(project.id, None, None) == [
        {"date": "2024-03-01", "requests": 4, "prompt_tokens": 11, "completion_tokens": 22, "total_tokens": 33},
        {"date": "2024-03-02", "requests": 1, "prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
    ]


async def test_saves_from_several_processes_add_up_and_last_use_only_moves_forward(store: Store) -> None:
    """Two processes counting one token each save what they counted, in either order: nothing is lost,
    and an older last use saved late (or none, from a refund) never moves last_used_at back."""
    project = await make_project(store)
    token = await make_token(store, project)
    await store.usage.save([(4, 10, 20, 30, "2024-03-01T12:00:09Z", token.id)], [])
    await store.usage.save([(3, 1, 1, 2, "2024-03-01T12:00:05Z", token.id)], [])
    await store.usage.save([(-1, 0, 0, 0, None, token.id)], [])
    assert await current(store, token) == replace(token, request_count=6, prompt_tokens=11, completion_tokens=21,
                                                  total_tokens=32, last_used_at="2024-03-01T12:00:09Z")


async def test_save_keeps_projects_apart_and_ignores_unknown_tokens(store: Store) -> None:
    alpha, beta = await make_project(store, "alpha"), await make_project(store, "beta")
    token = await make_token(store, alpha)
    await store.usage.save([(1, 1, 1, 2, None, "no-such-token")],
                           [(alpha.id, "2024-03-01", 1, 1, 1, 2), (beta.id, "2024-03-01", 7, 7, 7, 14)])
    assert await current(store, token) == token
    assert await store.usage.daily(alpha.id, None, None) == [
        {"date": "2024-03-01", "requests": 1, "prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}]
    assert [day["requests"] for day in await store.usage.daily(beta.id, None, None)] == [7]
    assert await store.usage.daily("no-such-project", None, None) == []


@pytest.mark.parametrize("bad", ["daily", "counters"])
async def test_save_is_one_transaction(store: Store, bad: str) -> None:
    """A row the database refuses (a NULL where a value is required: the one failure every backend
    can be made to show) fails the whole save, whichever part it is in."""
    project = await make_project(store)
    token = await make_token(store, project)
    await store.usage.save([], [(project.id, "2024-03-01", 1, 1, 1, 2)])
    counters: list[Any] = [(9, 9, 9, 18, iso(NOW), token.id)]
    daily: list[Any] = [(project.id, "2024-03-01", 5, 5, 5, 10), (project.id, "2024-03-02", 5, 5, 5, 10)]
    if bad == "daily":
        daily.append((None, "2024-03-03", 1, 1, 1, 2))
    else:
        counters.append((None, 1, 1, 2, None, token.id))
    with pytest.raises(StorageError):
        await store.usage.save(counters, daily)
    assert await current(store, token) == token
    assert await store.usage.daily(project.id, None, None) == [
        {"date": "2024-03-01", "requests": 1, "prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}]


@pytest.fixture
async def four_days(store: Store) -> Project:
    project = await make_project(store)
    other = await make_project(store, "other")
    await store.usage.save([], [(project.id, f"2024-01-0{day}", day, 0, 0, 0) for day in (1, 2, 3, 4)]
                           + [(other.id, "2024-01-02", 99, 0, 0, 0)])
    return project


@pytest.mark.parametrize(("since", "until", "days"), [
    (None, None, [1, 2, 3, 4]),
    ("2024-01-02T00:00:00Z", None, [2, 3, 4]),
    ("2024-01-02T18:30:00Z", None, [2, 3, 4]),  # the rest of that day overlaps
    ("2024-01-02", None, [2, 3, 4]),
    (None, "2024-01-03T00:00:00Z", [1, 2]),  # at midnight: the day starts there and is left out
    (None, "2024-01-03T00:00:01Z", [1, 2, 3]),  # later in a day: part of it is before `until`
    (None, "2024-01-03T23:59:59Z", [1, 2, 3]),
    ("2024-01-02T06:00:00Z", "2024-01-02T18:00:00Z", [2]),
    ("2024-01-02T00:00:00Z", "2024-01-04T00:00:00Z", [2, 3]),
    ("2024-01-02T00:00:00Z", "2024-01-02T00:00:00Z", []),
    ("2024-01-05T00:00:00Z", None, []),
    (None, "2024-01-01T00:00:00Z", []),
])
async def test_daily_gives_the_days_that_overlap_since_until(store: Store, four_days: Project, since: str | None,
                                                             until: str | None, days: list[int]) -> None:
    rows = await store.usage.daily(four_days.id, since, until)
    assert rows == [{"date": f"2024-01-0{day}", "requests": day, "prompt_tokens": 0, "completion_tokens": 0,
                     "total_tokens": 0} for day in days]


async def test_daily_until_a_date_leaves_that_day_out(store: Store, four_days: Project) -> None:
    """README, Usage and budgets: "a date or a midnight `until` leaves its day out"."""
    assert [row["date"] for row in await store.usage.daily(four_days.id, None, "2024-01-03")] == [
        "2024-01-01", "2024-01-02"]


# ---- audit: the chain head and extend ----


async def test_head_of_an_empty_chain_is_zero(store: Store) -> None:
    assert await store.audit.head("") == ZERO_HEAD
    assert await store.audit.prune_anchors() == {}
    assert await store.audit.walk("", 0, 10) == []


async def test_extend_stores_the_inserted_events_and_the_head_the_step_returns(store: Store) -> None:
    heads: list[ChainHead] = []
    first, second = events_at("2024-01-01T00:00:00Z", "2024-01-01T00:00:01Z"), events_at("2024-01-01T00:00:02Z",
                                                                                          first=3)

    async def step(head: ChainHead, insert: InsertEvents) -> ChainHead:
        heads.append(head)
        await insert(first)
        await insert(second)  # the step may insert several times
        return 3, chain_hash(3)

    assert await store.audit.extend("", step) == (3, chain_hash(3))
    assert heads == [ZERO_HEAD]
    assert await store.audit.head("") == (3, chain_hash(3))
    assert await store.audit.walk("", 0, 10) == [(e["seq"], e) for e in first + second]
    assert await query(store) == (first + second)[::-1]


async def test_the_next_step_is_given_the_stored_head(store: Store) -> None:
    """The head is stored as returned, even with no event inserted (events kept only in the file)."""
    async def jump(head: ChainHead, insert: InsertEvents) -> ChainHead:
        return 41, chain_hash(41)
    assert await store.audit.extend("", jump) == (41, chain_hash(41))
    given: list[ChainHead] = []

    async def step(head: ChainHead, insert: InsertEvents) -> ChainHead:
        given.append(head)
        await insert([event(head[0] + 1)])
        return head[0] + 1, chain_hash(head[0] + 1)

    assert await store.audit.extend("", step) == (42, chain_hash(42))
    assert given == [(41, chain_hash(41))]
    assert await store.audit.head("") == (42, chain_hash(42))
    assert await stored_seqs(store) == [42]


async def test_a_step_returning_none_leaves_the_head(store: Store) -> None:
    await append(store, events_at("2024-01-01T00:00:00Z", "2024-01-01T00:00:01Z"))

    async def nothing(head: ChainHead, insert: InsertEvents) -> None:
        return None

    assert await store.audit.extend("", nothing) is None
    assert await store.audit.head("") == (2, chain_hash(2))
    assert await stored_seqs(store) == [1, 2]


@pytest.mark.parametrize("before", [0, 2])
async def test_an_exception_from_the_step_rolls_back_its_events_and_the_head(store: Store, before: int) -> None:
    if before:
        await append(store, events_at(*["2024-01-01T00:00:00Z"] * before))
    head = await store.audit.head("")

    async def step(head: ChainHead, insert: InsertEvents) -> ChainHead:
        await insert(events_at("2024-01-02T00:00:00Z", "2024-01-02T00:00:01Z", first=head[0] + 1))
        await insert([event(head[0] + 3)])
        raise Refused("the audit file could not be written")

    with pytest.raises(Refused):
        await store.audit.extend("", step)
    assert await store.audit.head("") == head
    assert await stored_seqs(store) == list(range(1, before + 1))
    assert await append(store, [event(before + 1)]) == (before + 1, chain_hash(before + 1))  # the store goes on


@pytest.mark.parametrize("inserts", [
    [[3, 1]],  # a seq stored by an earlier extend
    [[3, 3]],  # one seq twice in one insert
    [[3], [4], [3]],  # a seq this step inserted already
], ids=["stored-before", "twice-in-one-insert", "twice-in-one-step"])
async def test_a_seq_already_stored_is_a_duplicate_and_rolls_back(store: Store, inserts: list[list[int]]) -> None:
    await append(store, events_at("2024-01-01T00:00:00Z", "2024-01-01T00:00:01Z"))

    async def step(head: ChainHead, insert: InsertEvents) -> ChainHead:
        for seqs in inserts:
            await insert([event(seq) for seq in seqs])
        return 4, chain_hash(4)

    with pytest.raises(DuplicateKey):
        await store.audit.extend("", step)
    assert await store.audit.head("") == (2, chain_hash(2))
    assert await stored_seqs(store) == [1, 2]


async def test_insert_raises_duplicate_key_into_the_step(store: Store) -> None:
    """base.py: callers never see a driver's exception; the step is the caller's code."""
    await append(store, [event(1)])
    seen: list[BaseException] = []

    async def step(head: ChainHead, insert: InsertEvents) -> ChainHead:
        try:
            await insert([event(1)])
        except BaseException as exc:
            seen.append(exc)
            raise
        return head

    with pytest.raises(DuplicateKey):
        await store.audit.extend("", step)
    assert [type(exc) for exc in seen] == [DuplicateKey]


async def test_extend_stores_a_large_batch_whole(store: Store) -> None:
    events = [event(seq, f"2024-01-01T00:{seq // 60:02d}:{seq % 60:02d}Z") for seq in range(1, 251)]
    assert await append(store, events) == (250, chain_hash(250))
    assert await stored_seqs(store) == list(range(1, 251))
    assert await store.audit.walk("", 98, 3) == [(seq, events[seq - 1]) for seq in (99, 100, 101)]


@pytest.mark.parametrize("stores", [1, 2], ids=["one-store", "two-stores"])
async def test_concurrent_extends_follow_one_chain(backend: Backend, store: Store, stores: int) -> None:
    """While a step runs, no other writer moves the head: each step is given the head the one before stored
    (also from two stores on one database, as two processes would be)."""
    other = backend.connect()
    await other.open()

    async def step(head: ChainHead, insert: InsertEvents) -> ChainHead:
        seq, previous = head
        await insert([event(seq + 1, details={"previous": previous})])
        await insert([event(seq + 2, details={"previous": chain_hash(seq + 1)})])
        return seq + 2, chain_hash(seq + 2)

    try:
        writers = [store, other if stores == 2 else store] * 10
        heads = await asyncio.gather(*(writer.audit.extend("", step) for writer in writers))
    finally:
        await other.close()
    assert sorted(head for head in heads if head is not None) == [(seq, chain_hash(seq)) for seq in range(2, 41, 2)]
    walked = await store.audit.walk("", 0, 100)
    assert [seq for seq, _ in walked] == list(range(1, 41))
    assert all(e is not None and e["details"]["previous"] == chain_hash(seq - 1) for seq, e in walked[1:])
    assert await store.audit.head("") == (40, chain_hash(40))


# ---- audit: reading ----


async def test_events_read_back_as_inserted_keys_without_value_left_out(store: Store) -> None:
    """The file's key order (SPEC §5: seq and hash follow details), and nested details kept as written."""
    full = event(1, details={"endpoint": "/v1/chat", "usage": {"total_tokens": 3}, "tags": ["a", "é"], "ok": True})
    bare = {"timestamp": "2024-01-01T00:00:01Z", "action": "audit.list", "actor": "management",
            "result": "success", "seq": 2, "hash": chain_hash(2)}
    await append(store, [full, bare])
    walked = await store.audit.walk("", 0, 10)
    assert walked == [(1, full), (2, bare)]
    assert [list(e or {}) for _, e in walked] == [list(full), list(bare)]
    assert [list(e) for e in await query(store)] == [list(bare), list(full)]


@pytest.fixture
async def five_events(store: Store) -> list[dict[str, Any]]:
    events = [
        event(1, "2024-01-01T00:00:00Z", "token.create", project_id="proj-a"),
        event(2, "2024-01-02T00:00:00Z", "token.access", project_id="proj-a", result="denied"),
        event(3, "2024-01-02T12:00:00Z", "token.access", project_id="proj-b"),
        event(4, "2024-01-03T00:00:00Z", "project.create", project_id=None),
        event(5, "2024-01-04T00:00:00Z", "token.access", project_id="proj-a"),
    ]
    await append(store, events)
    return events


@pytest.mark.parametrize(("arguments", "seqs"), [
    ({}, [5, 4, 3, 2, 1]),
    ({"filters": {"action": "token.access"}}, [5, 3, 2]),
    ({"filters": {"project_id": "proj-a"}}, [5, 2, 1]),
    ({"filters": {"result": "denied"}}, [2]),
    ({"filters": {"action": "token.access", "result": "success"}}, [5, 3]),
    ({"filters": {"action": "token.acc"}}, []),  # exact, not a prefix
    ({"since": "2024-01-02T00:00:00Z"}, [5, 4, 3, 2]),  # since is inclusive
    ({"until": "2024-01-03T00:00:00Z"}, [3, 2, 1]),  # until is exclusive
    ({"since": "2024-01-02T00:00:01Z", "until": "2024-01-04T00:00:00Z"}, [4, 3]),
    ({"before": 4}, [3, 2, 1]),  # here: the position of seq 4
    ({"before": 1}, []),
    ({"limit": 2}, [5, 4]),
    ({"before": 5, "limit": 2, "filters": {"action": "token.access"}}, [3, 2]),
], ids=str)
async def test_query_is_newest_first_with_filters_a_range_and_a_cursor(
        store: Store, five_events: list[dict[str, Any]], arguments: dict[str, Any], seqs: list[int]) -> None:
    if "before" in arguments:
        arguments = {**arguments, "before": await position_of(store, arguments["before"])}
    assert await query(store, **arguments) == [five_events[seq - 1] for seq in seqs]


async def test_query_pages_with_the_before_cursor(store: Store, five_events: list[dict[str, Any]]) -> None:
    pages, before = [], None
    while page := await listed(store, before=before, limit=2):
        pages.append([e["seq"] for _, e in page])
        before = page[-1][0]
    assert pages == [[5, 4], [3, 2], [1]]


@pytest.mark.parametrize(("after", "limit", "seqs"), [
    (0, 2, [1, 2]),
    (2, 2, [3, 4]),
    (4, 2, [5]),
    (5, 2, []),
    (-1, 10, [1, 2, 3, 4, 5]),
    (3, 1, [4]),
])
async def test_walk_is_oldest_first_after_a_seq(store: Store, five_events: list[dict[str, Any]], after: int,
                                                limit: int, seqs: list[int]) -> None:
    assert await store.audit.walk("", after, limit) == [(seq, five_events[seq - 1]) for seq in seqs]


async def test_walk_gives_none_for_an_event_whose_details_are_unreadable(
        backend: Backend, store: Store, five_events: list[dict[str, Any]]) -> None:
    await backend.corrupt_details(store, 3)
    assert await store.audit.walk("", 0, 10) == [(1, five_events[0]), (2, five_events[1]), (3, None),
                                             (4, five_events[3]), (5, five_events[4])]
    assert await store.audit.walk("", 2, 1) == [(3, None)]


async def test_query_lists_an_event_whose_details_are_unreadable_without_them(
        backend: Backend, store: Store, five_events: list[dict[str, Any]]) -> None:
    await backend.corrupt_details(store, 3)
    damaged = {key: value for key, value in five_events[2].items() if key != "details"}
    assert await query(store) == [five_events[4], five_events[3], {**damaged, "details_unreadable": True},
                                  five_events[1], five_events[0]]


# ---- audit: pruning ----


def prune_event(seq: int, result: PruneResult, action: str = "audit.prune") -> dict[str, Any]:
    return event(seq, "2024-02-01T00:00:00Z", action, project_id=None, details=result.details())


async def test_prune_anchor_is_the_newest_prune_that_deleted_rows(backend: Backend, store: Store) -> None:
    await append(store, [event(1)])
    assert await store.audit.prune_anchors() == {}
    await append(store, [prune_event(2, PruneResult(3, 1, {"": (7, "h7")}))])
    assert await store.audit.prune_anchors() == {"": (7, "h7")}
    await append(store, [prune_event(3, PruneResult(5, 2, {"": (12, "h12")}))])
    assert await store.audit.prune_anchors() == {"": (12, "h12")}
    await append(store, [prune_event(4, PruneResult(0, 0)),  # deleted nothing
                         prune_event(5, PruneResult(1, 1, {"": (20, "h20")}), action="token.access")])  # not a prune
    assert await store.audit.prune_anchors() == {"": (12, "h12")}
    await append(store, [prune_event(6, PruneResult(1, 1, {"": (30, "h30")}))])
    await backend.corrupt_details(store, 6)  # unreadable: the one before counts
    assert await store.audit.prune_anchors() == {"": (12, "h12")}


DAYS = [f"2024-01-0{day}T00:00:00Z" for day in range(1, 7)]


@pytest.mark.parametrize(("batch_size", "batches"), [(1, 3), (2, 2), (3, 1), (1000, 1)])
async def test_prune_deletes_the_events_before_the_cutoff_in_batches(store: Store, batch_size: int,
                                                                     batches: int) -> None:
    events = events_at(*DAYS)
    await append(store, events)
    result = await store.audit.prune("2024-01-04T00:00:00Z", batch_size)  # an event at the cutoff stays
    assert result == PruneResult(3, batches, {"": (3, chain_hash(3))})
    assert await store.audit.walk("", 0, 10) == [(e["seq"], e) for e in events[3:]]
    assert await store.audit.head("") == (6, chain_hash(6))


async def test_prune_deletes_only_a_prefix_of_the_chain(store: Store) -> None:
    """A clock step gave seq 3 an older timestamp than seq 2: it stays, or the chain would have a hole."""
    await append(store, events_at("2024-01-01T00:00:00Z", "2024-01-05T00:00:00Z", "2024-01-02T00:00:00Z",
                                  "2024-01-01T12:00:00Z", "2024-01-06T00:00:00Z"))
    assert await store.audit.prune("2024-01-03T00:00:00Z", 1) == PruneResult(1, 1, {"": (1, chain_hash(1))})
    assert await stored_seqs(store) == [2, 3, 4, 5]


async def test_prune_of_everything_keeps_the_head(store: Store) -> None:
    await append(store, events_at(*DAYS))
    assert await store.audit.prune("2024-02-01T00:00:00Z", 4) == PruneResult(6, 2, {"": (6, chain_hash(6))})
    assert await store.audit.walk("", 0, 10) == []
    assert await store.audit.head("") == (6, chain_hash(6))
    given: list[ChainHead] = []

    async def step(head: ChainHead, insert: InsertEvents) -> None:
        given.append(head)

    await store.audit.extend("", step)
    assert given == [(6, chain_hash(6))]


async def test_prune_with_nothing_old_deletes_nothing(store: Store) -> None:
    assert await store.audit.prune("2024-01-04T00:00:00Z", 10) == PruneResult(0, 0)
    await append(store, events_at(*DAYS[3:], first=4))
    assert await store.audit.prune("2024-01-04T00:00:00Z", 10) == PruneResult(0, 0)
    assert await store.audit.prune("2024-01-01T00:00:00Z", 10) == PruneResult(0, 0)
    assert await stored_seqs(store) == [4, 5, 6]


async def test_prune_again_continues_after_the_last_pruned_event(store: Store) -> None:
    await append(store, events_at(*DAYS))
    assert await store.audit.prune("2024-01-03T00:00:00Z", 10) == PruneResult(2, 1, {"": (2, chain_hash(2))})
    assert await store.audit.prune("2024-01-03T00:00:00Z", 10) == PruneResult(0, 0)
    assert await store.audit.prune("2024-01-05T12:00:00Z", 1) == PruneResult(3, 3, {"": (5, chain_hash(5))})
    assert await stored_seqs(store) == [6]


# ---- audit: one chain per instance (SPEC §7) ----


def of(instance: str, *events: dict[str, Any]) -> list[dict[str, Any]]:
    """The events as the writer of that instance makes them: `instance` before seq and hash."""
    made = []
    for original in events:
        copy = {key: value for key, value in original.items() if key not in ("seq", "hash")}
        made.append({**copy, "instance": instance, "seq": original["seq"], "hash": original["hash"]})
    return made


async def append_to(store: Store, instance: str, events: Sequence[dict[str, Any]]) -> ChainHead | None:
    async def step(head: ChainHead, insert: InsertEvents) -> ChainHead:
        await insert(events)
        return events[-1]["seq"], events[-1]["hash"]
    return await store.audit.extend(instance, step)


async def test_each_instance_extends_its_own_chain_and_the_listing_merges_them(store: Store) -> None:
    """Two instances both count from seq 1; heads, walks and the listing tell their events apart."""
    old = events_at(DAYS[0])  # written before instances were named: the chain of ''
    await append(store, old)
    a = of("gw-a", *events_at(DAYS[1], DAYS[3]))
    b = of("gw-b", *events_at(DAYS[2], DAYS[4], DAYS[5]))
    await append_to(store, "gw-a", a[:1])
    await append_to(store, "gw-b", b[:2])
    await append_to(store, "gw-a", a[1:])
    await append_to(store, "gw-b", b[2:])
    assert await store.audit.heads() == {"": (1, chain_hash(1)), "gw-a": (2, chain_hash(2)),
                                         "gw-b": (3, chain_hash(3))}
    assert await store.audit.head("gw-b") == (3, chain_hash(3))
    assert await store.audit.head("nobody") == ZERO_HEAD
    assert await store.audit.walk("gw-a", 0, 10) == [(1, a[0]), (2, a[1])]
    assert await store.audit.walk("gw-b", 1, 10) == [(2, b[1]), (3, b[2])]
    assert await store.audit.walk("", 0, 10) == [(1, old[0])]
    # Newest stored first, across chains, each event as its chain wrote it (key order included).
    assert await query(store) == [b[2], a[1], b[1], b[0], a[0], old[0]]
    assert [list(event) for event in await query(store, limit=2)] == [list(b[2]), list(a[1])]
    pages, before = [], None
    while page := await listed(store, before=before, limit=4):
        pages.append([(event.get("instance", ""), event["seq"]) for _, event in page])
        before = page[-1][0]
    assert pages == [[("gw-b", 3), ("gw-a", 2), ("gw-b", 2), ("gw-b", 1)], [("gw-a", 1), ("", 1)]]


async def test_a_seq_may_repeat_across_chains_but_not_within_one(store: Store) -> None:
    await append_to(store, "gw-a", of("gw-a", event(1)))
    await append_to(store, "gw-b", of("gw-b", event(1)))
    with pytest.raises(DuplicateKey):
        await append_to(store, "gw-a", of("gw-a", event(1)))
    assert await store.audit.heads() == {"gw-a": (1, chain_hash(1)), "gw-b": (1, chain_hash(1))}


async def test_a_chain_head_is_recorded_without_events(store: Store) -> None:
    """AUDIT_STORE_IN_DB off: no rows, yet each chain's head is kept."""
    async def step(head: ChainHead, insert: InsertEvents) -> ChainHead:
        return head[0] + 5, chain_hash(head[0] + 5)

    await store.audit.extend("gw-a", step)
    await store.audit.extend("gw-a", step)
    await store.audit.extend("gw-b", step)
    assert await store.audit.heads() == {"gw-a": (10, chain_hash(10)), "gw-b": (5, chain_hash(5))}


async def test_prune_deletes_a_prefix_of_every_chain(store: Store) -> None:
    await append_to(store, "gw-a", of("gw-a", *events_at(*DAYS)))
    await append_to(store, "gw-b", of("gw-b", *events_at(DAYS[0], DAYS[5])))
    await append_to(store, "gw-c", of("gw-c", *events_at(DAYS[4])))
    result = await store.audit.prune("2024-01-04T00:00:00Z", 2)
    assert result == PruneResult(4, 3, {"gw-a": (3, chain_hash(3)), "gw-b": (1, chain_hash(1))})
    assert [seq for seq, _ in await store.audit.walk("gw-a", 0, 10)] == [4, 5, 6]
    assert [seq for seq, _ in await store.audit.walk("gw-b", 0, 10)] == [2]
    assert [seq for seq, _ in await store.audit.walk("gw-c", 0, 10)] == [1]
    assert result.details() == {"deleted": 4, "chains": {
        "gw-a": {"last_pruned_seq": 3, "last_pruned_hash": chain_hash(3)},
        "gw-b": {"last_pruned_seq": 1, "last_pruned_hash": chain_hash(1)}}}


async def test_prune_anchors_come_from_the_newest_prune_that_records_any(store: Store) -> None:
    legacy = event(1, "2024-02-01T00:00:00Z", "audit.prune", project_id=None,
                   details={"deleted": 3, "last_pruned_seq": 7, "last_pruned_hash": "h7"})
    await append(store, [legacy])
    assert await store.audit.prune_anchors() == {"": (7, "h7")}  # written before instances were named
    both = PruneResult(4, 2, {"gw-a": (3, "h3")}, {"": (7, "h7"), "gw-a": (3, "h3")})
    await append_to(store, "cli", of("cli", prune_event(1, both)))
    assert await store.audit.prune_anchors() == {"": (7, "h7"), "gw-a": (3, "h3")}
    await append_to(store, "cli", of("cli", prune_event(2, PruneResult(0, 0))))  # records none: not it
    assert await store.audit.prune_anchors() == {"": (7, "h7"), "gw-a": (3, "h3")}


async def test_hourly_status_counts_access_events_by_hour_and_status_class(
        backend: Backend, store: Store) -> None:
    def access(seq: int, timestamp: str, status: int | None) -> dict[str, Any]:
        details = {"status": status, "duration_ms": 3} if status is not None else {"reason": "x"}
        return event(seq, timestamp, "token.access", details=details)

    await append(store, [
        access(1, "2024-01-01T09:59:59Z", 200),  # before `since`
        access(2, "2024-01-01T10:00:00Z", 200), access(3, "2024-01-01T10:30:00Z", 201),
        access(4, "2024-01-01T10:45:00Z", 429), access(5, "2024-01-01T11:00:00Z", 502),
        access(6, "2024-01-01T11:05:00Z", None),
        event(7, "2024-01-01T11:06:00Z", "token.create", details={"status": 201}),  # not an access
    ])
    await backend.corrupt_details(store, 5)
    assert await store.audit.hourly_status("2024-01-01T10:00:00Z") == [
        ("2024-01-01T10", 2, 2), ("2024-01-01T10", 4, 1), ("2024-01-01T11", None, 2)]


# ---- admin console sessions ----


async def test_a_session_is_stored_found_touched_and_ended(store: Store) -> None:
    session = AdminSession("a" * 64, "b" * 64, 1000.0, 1000.0)
    await store.sessions.create(session)
    assert await store.sessions.get("a" * 64) == session
    assert await store.sessions.get("c" * 64) is None
    await store.sessions.touch("a" * 64, 1500.5)
    await store.sessions.touch("a" * 64, 1200.0)  # a late touch never moves it back
    assert await store.sessions.get("a" * 64) == AdminSession("a" * 64, "b" * 64, 1000.0, 1500.5)
    with pytest.raises(DuplicateKey):
        await store.sessions.create(session)
    assert await store.sessions.delete("a" * 64) is True
    assert await store.sessions.delete("a" * 64) is False
    assert await store.sessions.get("a" * 64) is None


async def test_a_single_use_form_value_is_used_once_unless_forgotten(store: Store) -> None:
    assert await store.sessions.use_once("o" * 64, "s" * 64, 100.0) is True
    assert await store.sessions.use_once("o" * 64, "s" * 64, 101.0) is False
    await store.sessions.forget_once("o" * 64)
    assert await store.sessions.use_once("o" * 64, "s" * 64, 102.0) is True
    # Gone once no session that sent it can be alive.
    await store.sessions.delete_expired(idle_since=0.0, created_since=200.0)
    assert await store.sessions.use_once("o" * 64, "s" * 64, 300.0) is True


async def test_expired_sessions_are_deleted_by_idle_or_absolute_age(store: Store) -> None:
    for name, created, seen in (("idle", 100.0, 200.0), ("old", 50.0, 900.0), ("live", 500.0, 900.0)):
        await store.sessions.create(AdminSession(name, "t" * 64, created, seen))
    assert await store.sessions.delete_expired(idle_since=300.0, created_since=60.0) == 2
    assert [await store.sessions.get(name) is not None for name in ("idle", "old", "live")] == [False, False, True]


# ---- the store itself ----


async def test_ping_answers_while_open_and_not_once_closed(backend: Backend) -> None:
    store = backend.connect()
    assert await store.ping() is False
    await store.open()
    assert await store.ping() is True
    await store.close()
    assert await store.ping() is False
    await store.close()  # closing twice is harmless
    assert await store.ping() is False


async def test_a_closed_store_is_unavailable(backend: Backend) -> None:
    store = backend.connect()
    await store.open()
    project = await make_project(store)
    await store.close()
    with pytest.raises(StorageUnavailable):
        await store.projects.get(project.id)
    with pytest.raises(StorageUnavailable):
        await make_project(store, "beta")
    with pytest.raises(StorageUnavailable):
        await store.audit.head("")


async def test_a_reopened_database_has_everything_written_before(backend: Backend) -> None:
    first = backend.connect()
    await first.open()
    project = await make_project(first)
    token = await make_token(first, project)
    await first.usage.save([(1, 2, 3, 5, iso(NOW), token.id)], [(project.id, "2024-03-01", 1, 2, 3, 5)])
    await append(first, [event(1)])
    await first.close()

    second = backend.connect()
    await second.open()
    try:
        assert await second.projects.all() == [project]
        assert await second.tokens.find(token.token_hash) == (await current(second, token), project)
        assert [day["total_tokens"] for day in await second.usage.daily(project.id, None, None)] == [5]
        assert await second.audit.head("") == (1, chain_hash(1))
    finally:
        await second.close()


async def test_opening_an_open_store_again_keeps_it_working(backend: Backend) -> None:
    with unclosed_connections():  # whether any are left is the next test's business
        store = backend.connect()
        await store.open()
        project = await make_project(store)
        await store.open()
        assert await store.ping() is True
        assert await store.projects.all() == [project]
        assert await append(store, [event(1)]) == (1, chain_hash(1))
        await store.close()
        assert await store.ping() is False


async def test_opening_an_open_store_again_leaves_no_connection_behind(backend: Backend) -> None:
    with unclosed_connections() as unclosed:
        store = backend.connect()
        await store.open()
        await store.open()
        await store.close()
    assert unclosed == []
