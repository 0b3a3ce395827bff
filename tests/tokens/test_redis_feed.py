"""The change feed of several processes (RedisFeed) on a real Redis: each change reaches the other processes
whole, once and in order, fast; a restarted, stalled or unreachable Redis is noticed and recovered from,
with every receiver told when changes may have been missed; garbage on the channel is skipped.

A "process" here is a feed with a Redis client (a connection pool) of its own."""

from __future__ import annotations

import asyncio
import os
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import asdict, replace
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest

pytest.importorskip("redis", reason="the redis extra is not installed (`make test` installs it)")

import orjson
from redis.asyncio import Connection, Redis

from llm_proxy.crypto import KeyRing
from llm_proxy.models import Project, TokenRecord
from llm_proxy.tokens.credentials import generate_token, hash_token
from llm_proxy.tokens.feed import Change, ProjectChanged, TokenChanged, TokensDeactivated, TokensRevoked
from llm_proxy.tokens.feed_messages import encode
from llm_proxy.tokens.redis_feed import RedisFeed
from tests.servers import RedisProcess, Server, restartable_redis

KEYRING = KeyRing(os.urandom(32))
PROJECT = Project(id="a1b2c3d4-project", name="research", api_key_encrypted=KEYRING.encrypt("sk-upstream-secret"),
                  api_key_hint="sk-u****cret", is_active=True, created_at="2025-01-02T03:04:05Z",
                  updated_at="2025-01-02T03:04:05Z")
PLAINTEXT = generate_token()
TOKEN = TokenRecord(id="e5f6a7b8-token", token_hash=hash_token(PLAINTEXT), token_hint="tok-abcd****wxyz",
                    project_id=PROJECT.id, expires_at="2025-01-03T03:04:05Z", is_active=True, max_requests=1000,
                    rate_limit_per_minute=None, max_tokens_total=50_000, request_count=7, prompt_tokens=120,
                    completion_tokens=80, total_tokens=200, last_used_at=None, created_at="2025-01-02T03:04:05Z",
                    revoked_at=None, replaced_by=None)


def revoked(name: object) -> TokensRevoked:
    return TokensRevoked((f"token-{name}",))


class Recorder:
    """What one process's feed told it, in order: the changes its subscriber got (and when), and the hooks."""

    def __init__(self) -> None:
        self.changes: list[Change] = []
        self.arrived: list[float] = []
        self.hooks: list[str] = []
        self._news = asyncio.Event()

    def change(self, change: Change) -> None:
        self.changes.append(change)
        self.arrived.append(time.perf_counter())
        self._news.set()

    def reconnect(self) -> None:
        self.hooks.append("reconnect")
        self._news.set()

    def state(self, up: bool) -> None:
        self.hooks.append("up" if up else "down")
        self._news.set()

    async def until(self, condition: Callable[[], bool], timeout: float = 5.0) -> None:
        """Wait until `condition` holds, re-checked whenever the feed tells something; fail after `timeout`."""
        try:
            async with asyncio.timeout(timeout):
                while not condition():
                    self._news.clear()
                    await self._news.wait()
        except TimeoutError:
            pytest.fail(f"not within {timeout} s; hooks {self.hooks}, last changes {self.changes[-3:]}")


MakeFeed = Callable[..., Awaitable[tuple[RedisFeed, Recorder]]]


@pytest.fixture
def redis_process() -> Iterator[RedisProcess]:
    """A Redis of this test alone, not yet started, that it may stop, stall and start again."""
    with restartable_redis() as redis:
        yield redis


@pytest.fixture
def channel() -> str:
    """A channel of this test's own (channels are not per database: a developer's Redis may be shared)."""
    return f"llm-proxy-test:{secrets.token_hex(4)}"


@pytest.fixture
async def make_feed(channel: str) -> AsyncIterator[MakeFeed]:
    """Start feeds on the test's channel, each on a Redis client of its own (a process)."""
    opened: list[tuple[RedisFeed, Redis]] = []

    async def make(url: str, *, start: bool = True, client: Redis | None = None,
                   **options: Any) -> tuple[RedisFeed, Recorder]:
        client = client or Redis.from_url(url)
        recorder = Recorder()
        feed = RedisFeed(client, instance=f"test-{len(opened)}", channel=channel, on_reconnect=recorder.reconnect,
                         on_state=recorder.state, **options)
        feed.subscribe(recorder.change)
        opened.append((feed, client))
        if start:
            await feed.start()
        return feed, recorder

    yield make
    for feed, client in opened:
        await feed.close()
        await client.aclose()


# ---- what crosses ----


@pytest.mark.parametrize("change", [
    TokenChanged(TOKEN, PROJECT),
    TokenChanged(TOKEN),
    TokenChanged(replace(TOKEN, rate_limit_per_minute=60, last_used_at="2025-01-02T04:00:00Z",
                         revoked_at="2025-01-02T05:00:00Z", replaced_by="c0ffee-successor")),
    TokensRevoked(("token-1", "token-2")),
    TokensDeactivated(("token-3",)),
    TokensDeactivated(()),
    ProjectChanged(PROJECT),
], ids=["token-with-project", "token", "token-every-field-set", "revoked", "deactivated", "deactivated-none",
        "project"])
async def test_each_change_reaches_another_process_whole(redis_url: str, make_feed: MakeFeed, change: Change) -> None:
    sender, _ = await make_feed(redis_url)
    _, receiver = await make_feed(redis_url)
    sender.publish(change)
    await receiver.until(lambda: len(receiver.changes) == 1)
    assert receiver.changes == [change]
    assert type(receiver.changes[0]) is type(change)


def test_a_message_carries_the_digest_and_the_ciphertext_never_a_plaintext() -> None:
    message = encode({"instance": "host-1", "feed": "f00d"}, TokenChanged(TOKEN, PROJECT))
    assert TOKEN.token_hash.encode() in message and PROJECT.api_key_encrypted.encode() in message
    assert PLAINTEXT.encode() not in message and b"sk-upstream-secret" not in message
    assert b" " not in message.replace(b'"name":"research"', b"")  # compact: no whitespace between tokens
    assert orjson.loads(message)["instance"] == "host-1"


async def test_a_process_gets_its_own_changes_once(redis_url: str, make_feed: MakeFeed) -> None:
    first, at_first = await make_feed(redis_url)
    second, at_second = await make_feed(redis_url)
    first.publish(revoked("mine"))
    assert at_first.changes == [revoked("mine")]  # delivered before publish() returned
    await at_second.until(lambda: len(at_second.changes) == 1)
    # Redis sends a subscriber the messages in the order it took them, so once the second process's
    # answer reached the first, the first's own message (taken before) has reached it too.
    second.publish(revoked("theirs"))
    await at_first.until(lambda: len(at_first.changes) == 2)
    assert at_first.changes == [revoked("mine"), revoked("theirs")]
    assert at_second.changes == [revoked("mine"), revoked("theirs")]


class CountingConnection(Connection):
    """Counts what a client writes to Redis: one write per round trip."""

    writes = 0

    async def send_packed_command(self, *args: Any, **kwargs: Any) -> None:
        CountingConnection.writes += 1
        await super().send_packed_command(*args, **kwargs)


async def test_a_burst_keeps_its_order_and_takes_few_round_trips(redis_url: str, make_feed: MakeFeed) -> None:
    sender, _ = await make_feed(redis_url, client=Redis.from_url(redis_url, connection_class=CountingConnection))
    _, receiver = await make_feed(redis_url)
    burst = [revoked(number) for number in range(500)]
    writes = CountingConnection.writes
    for change in burst:
        sender.publish(change)
    await receiver.until(lambda: len(receiver.changes) == len(burst))
    assert receiver.changes == burst
    assert CountingConnection.writes - writes <= 20, "changes that pile up are sent several per round trip"


async def test_a_change_reaches_another_process_within_100_ms_p99(redis_url: str, make_feed: MakeFeed) -> None:
    sender, _ = await make_feed(redis_url)
    _, receiver = await make_feed(redis_url)
    latencies = []
    for number in range(200):
        published = time.perf_counter()
        sender.publish(TokenChanged(TOKEN, PROJECT) if number % 2 else revoked(number))
        await receiver.until(lambda count=number + 1: len(receiver.changes) == count)
        latencies.append(receiver.arrived[-1] - published)
    latencies.sort()
    p50, p99 = latencies[99], latencies[197]
    assert p99 < 0.100, f"p50 {p50 * 1000:.2f} ms, p99 {p99 * 1000:.2f} ms, max {latencies[-1] * 1000:.2f} ms"


async def test_close_sends_what_is_queued(redis_url: str, make_feed: MakeFeed) -> None:
    sender, _ = await make_feed(redis_url)
    _, receiver = await make_feed(redis_url)
    changes = [revoked(number) for number in range(300)]
    for change in changes:
        sender.publish(change)
    await sender.close()
    await receiver.until(lambda: len(receiver.changes) == len(changes))
    assert receiver.changes == changes


# ---- Redis restarted, stalled, cut off or not there yet ----


async def test_a_restarted_redis_is_noticed_and_every_process_reloads(redis_process: RedisProcess,
                                                                       make_feed: MakeFeed) -> None:
    await asyncio.to_thread(redis_process.start)
    first, at_first = await make_feed(redis_process.server.url)
    second, at_second = await make_feed(redis_process.server.url)
    first.publish(revoked("before"))
    await at_second.until(lambda: at_second.changes == [revoked("before")])

    await asyncio.to_thread(redis_process.stop)
    for recorder in (at_first, at_second):
        await recorder.until(lambda recorder=recorder: recorder.hooks == ["down"])
    # Publishing while Redis is down: applied here at once, queued for the others, never raising or waiting.
    started = time.perf_counter()
    for number in range(1000):
        first.publish(revoked(f"while-down-{number}"))
    assert time.perf_counter() - started < 0.5
    assert at_first.changes[-1] == revoked("while-down-999")

    await asyncio.to_thread(redis_process.start)  # empty, on the same port
    for recorder in (at_first, at_second):
        await recorder.until(lambda recorder=recorder: recorder.hooks == ["down", "reconnect", "up"])
    assert first.subscribed and second.subscribed
    second.publish(revoked("after"))
    await at_first.until(lambda: at_first.changes[-1] == revoked("after"))
    first.publish(revoked("after, the other way"))
    await at_second.until(lambda: at_second.changes[-1] == revoked("after, the other way"))
    # What was queued during the outage went out in order, before what followed it.
    sent = [change for change in at_second.changes if change.token_ids[0].startswith("token-while-down")]
    assert sent == [revoked(f"while-down-{number}") for number in range(1000 - len(sent), 1000)]


async def test_a_stalled_redis_is_noticed_within_two_seconds(redis_process: RedisProcess,
                                                             make_feed: MakeFeed) -> None:
    await asyncio.to_thread(redis_process.start)
    first, at_first = await make_feed(redis_process.server.url)
    _, at_second = await make_feed(redis_process.server.url)
    redis_process.stall()
    stalled = time.perf_counter()
    for recorder in (at_first, at_second):
        await recorder.until(lambda recorder=recorder: recorder.hooks == ["down"])
        # Silence is noticed by an unanswered PING: at most PING_AFTER + ANSWER_WITHIN after the last word.
        assert time.perf_counter() - stalled < 2.0
    # Resumed only once both noticed: a stall shorter than that breaks nothing (Redis keeps what it owes).
    redis_process.resume()
    for recorder in (at_first, at_second):
        await recorder.until(lambda recorder=recorder: recorder.hooks == ["down", "reconnect", "up"])
    first.publish(revoked("after"))
    await at_second.until(lambda: at_second.changes[-1:] == [revoked("after")])


async def test_an_idle_subscription_is_kept_by_answered_pings(redis_process: RedisProcess,
                                                             make_feed: MakeFeed) -> None:
    """Silence is not death: an idle subscription PINGs, and a PING answered keeps it."""
    await asyncio.to_thread(redis_process.start)
    first, at_first = await make_feed(redis_process.server.url)
    _, at_second = await make_feed(redis_process.server.url)
    observer = Redis.from_url(redis_process.server.url)
    try:
        async with asyncio.timeout(10):
            while (await observer.info("commandstats")).get("cmdstat_ping", {}).get("calls", 0) < 8:
                await asyncio.sleep(0.05)  # polled: four PINGs each take the two feeds two seconds
    finally:
        await observer.aclose()
    assert (at_first.hooks, at_second.hooks) == ([], [])
    first.publish(revoked("after the silence"))
    await at_second.until(lambda: at_second.changes == [revoked("after the silence")])


async def test_a_killed_subscription_is_made_again(redis_url: str, make_feed: MakeFeed) -> None:
    first, at_first = await make_feed(redis_url)
    _, at_second = await make_feed(redis_url)
    admin = Redis.from_url(redis_url)
    try:
        assert await admin.execute_command("CLIENT", "KILL", "TYPE", "pubsub") == 2
    finally:
        await admin.aclose()
    for recorder in (at_first, at_second):
        await recorder.until(lambda recorder=recorder: recorder.hooks == ["down", "reconnect", "up"])
    first.publish(revoked("after"))
    await at_second.until(lambda: at_second.changes == [revoked("after")])


async def test_start_returns_at_once_without_redis_and_connects_when_it_appears(
        redis_process: RedisProcess, make_feed: MakeFeed) -> None:
    started = time.perf_counter()
    feed, recorder = await make_feed(redis_process.server.url)
    assert time.perf_counter() - started < 0.5
    assert (recorder.hooks, feed.subscribed) == (["down"], False)
    feed.publish(revoked("queued before Redis"))

    await asyncio.to_thread(redis_process.start)
    await recorder.until(lambda: recorder.hooks == ["down", "reconnect", "up"])
    other, at_other = await make_feed(redis_process.server.url)
    other.publish(revoked("from the other"))
    await recorder.until(lambda: recorder.changes[-1] == revoked("from the other"))
    feed.publish(revoked("to the other"))
    await at_other.until(lambda: at_other.changes[-1:] == [revoked("to the other")])


class Forwarder:
    """A TCP path to Redis a test can cut (its connections end, new ones are refused) and restore: a network
    fault between one process and Redis, while the others still reach it."""

    def __init__(self, server: Server) -> None:
        self._target = server
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self.port = 0

    def url(self, url: str) -> str:
        parts = urlsplit(url)
        return urlunsplit(parts._replace(netloc=f":{parts.password}@127.0.0.1:{self.port}"))

    async def restore(self) -> None:
        self._server = await asyncio.start_server(self._forward, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def cut(self) -> None:
        if self._server is None:
            return
        self._server.close()
        for writer in self._writers:
            writer.transport.abort()
        self._writers.clear()
        await self._server.wait_closed()
        self._server = None

    async def _forward(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            target_reader, target_writer = await asyncio.open_connection(self._target.host, self._target.port)
        except OSError:
            writer.transport.abort()
            return
        self._writers |= {writer, target_writer}
        await asyncio.gather(_pipe(reader, target_writer), _pipe(target_reader, writer))


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except OSError:
        pass
    finally:
        writer.transport.abort()


@pytest.fixture
async def path(redis_server: Server) -> AsyncIterator[Forwarder]:
    """A path to the test's Redis, open; cut afterwards."""
    forwarder = Forwarder(redis_server)
    await forwarder.restore()
    yield forwarder
    await forwarder.cut()


async def test_changes_dropped_while_cut_off_are_announced(redis_url: str, path: Forwarder,
                                                           make_feed: MakeFeed) -> None:
    """One process loses Redis while the others keep it: its queue keeps the newest changes, and once it is
    back it tells the others it dropped some (they never lost their subscription, so only that tells them)."""
    cut_off, at_cut_off = await make_feed(path.url(redis_url), max_queued=10)
    _, at_other = await make_feed(redis_url)
    cut_off.publish(revoked("before"))
    await at_other.until(lambda: at_other.changes == [revoked("before")])

    await path.cut()
    await at_cut_off.until(lambda: at_cut_off.hooks == ["down"])
    for number in range(25):
        cut_off.publish(revoked(number))
    assert cut_off.dropped == 15

    await path.restore()
    await at_other.until(lambda: len(at_other.changes) == 11)
    assert at_other.changes == [revoked("before"), *(revoked(number) for number in range(15, 25))]
    assert at_other.hooks == ["reconnect"]
    await at_cut_off.until(lambda: at_cut_off.hooks == ["down", "reconnect", "up"])


# ---- garbage on the channel ----


def _token_message(change: dict[str, Any]) -> bytes:
    document = orjson.loads(encode({"instance": "elsewhere", "feed": "0123"}, TokenChanged(TOKEN, PROJECT)))
    return orjson.dumps({**document, **change})


@pytest.mark.parametrize("message", [
    b"not JSON",
    b"[]",
    b'{"kind": "revoked", "token_ids": ["token-1"]}',
    b'{"feed": "0123", "kind": "renamed", "token_ids": ["token-1"]}',
    b'{"feed": "0123", "kind": "revoked", "token_ids": "token-1"}',
    b'{"feed": "0123", "kind": "deactivated", "token_ids": [1]}',
    b'{"feed": "0123", "kind": "project"}',
    _token_message({"token": {name: value for name, value in asdict(TOKEN).items() if name != "id"}}),
    _token_message({"token": {**asdict(TOKEN), "plaintext": "x"}}),
    _token_message({"token": {**asdict(TOKEN), "is_active": 1}}),
    _token_message({"token": {**asdict(TOKEN), "request_count": True}}),
    _token_message({"token": {**asdict(TOKEN), "max_requests": "1000"}}),
    _token_message({"project": {**asdict(PROJECT), "name": None}}),
], ids=["not-json", "not-an-object", "no-feed-id", "unknown-kind", "ids-not-a-list", "ids-not-strings",
        "project-missing", "token-field-missing", "token-field-extra", "bool-as-int", "int-as-bool",
        "int-as-string", "project-null-name"])
async def test_a_message_that_is_no_change_is_skipped_and_later_ones_arrive(
        redis_url: str, channel: str, make_feed: MakeFeed, message: bytes) -> None:
    sender, _ = await make_feed(redis_url)
    _, receiver = await make_feed(redis_url)
    stranger = Redis.from_url(redis_url)
    try:
        await stranger.publish(channel, message)
    finally:
        await stranger.aclose()
    sender.publish(revoked("after"))
    await receiver.until(lambda: len(receiver.changes) == 1)
    assert receiver.changes == [revoked("after")]
    # It may have been a change this version cannot read: the receiver reloads, as after a reconnection.
    assert receiver.hooks == ["reconnect"]
