"""The change feed of processes sharing one Redis: each change is applied here at once and sent to the others.

Each change is one message on the channel (`llm-proxy:changes` by default; the format is in
feed_messages.py) carrying the records in full, so a receiver applies it without reading the
database. A feed ignores the messages carrying its own `feed` id (its subscribers had them at
publish()); the id is random per feed, so two processes misconfigured with one INSTANCE_ID still
hear each other.

Delivery is at least once and in order per publisher: a batch whose round trip failed is sent
again (a change applied twice ends where it ended once). A process may still miss changes, and
then it is told so through `on_reconnect()`, after which its cache must forget every token:

- its subscription broke (Redis restarted, a network blip, a stalled server noticed by a PING
  unanswered within a second): on_state(False) when found broken; once subscribed again,
  on_reconnect() and then on_state(True);
- another feed dropped changes it could not send (its bounded queue overflowed while it could not
  reach Redis): that feed sends `{"kind": "lost"}` first when it can, and every receiver calls
  on_reconnect();
- a message it cannot read (a newer version's format, or garbage): logged, skipped, on_reconnect().
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import secrets
from collections import deque
from collections.abc import Callable
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from llm_proxy.tokens.feed import Change, Listener
from llm_proxy.tokens.feed_messages import MalformedMessage, decode, encode, encode_lost

log = logging.getLogger(__name__)

CHANNEL = "llm-proxy:changes"
MAX_QUEUED = 10_000  # changes waiting for Redis; past it the oldest are dropped (and receivers told)
BATCH = 256  # messages per round trip at most
CONNECT_TIMEOUT = 2.0  # connect, authenticate and subscribe (a stalled server accepts TCP and says nothing)
SEND_TIMEOUT = 2.0
CLOSE_WITHIN = 1.0  # close() waits this long at most for the queue to be sent
PING_AFTER = 0.5  # silence on the subscription before a PING...
ANSWER_WITHIN = 1.0  # ...and how long its answer may take before the connection counts as dead
FIRST_RETRY, MAX_RETRY = 0.05, 1.0  # doubling back-off between attempts
STABLE_AFTER = 10.0  # a subscription that lasted this long starts the back-off afresh when it breaks


class RedisFeed:
    """The ChangeFeed of processes sharing one Redis (see the module's docstring for what crosses and when).

    publish() is synchronous: this process's subscribers have the change before it returns, and a
    background task sends it to Redis (in order, batched when changes pile up). It never blocks and
    never raises for Redis: while Redis cannot be reached at most `max_queued` changes wait, the
    oldest dropped first. The feed is presumed connected until start() finds otherwise: on_state is
    called only when that changes.
    """

    def __init__(self, client: Redis, *, instance: str, channel: str = CHANNEL,
                 on_reconnect: Callable[[], None] | None = None, on_state: Callable[[bool], None] | None = None,
                 max_queued: int = MAX_QUEUED) -> None:
        self._client = client
        self._channel = channel
        self._on_reconnect = on_reconnect
        self._on_state = on_state
        self._max_queued = max_queued
        self._id = secrets.token_hex(8)
        self._sender = {"instance": instance, "feed": self._id}
        self._listeners: list[Listener] = []
        self._queue: deque[tuple[int, Change]] = deque()
        self._numbers = itertools.count()
        self._lost = 0  # dropped and not yet announced
        self._dropped = 0
        self._wake = asyncio.Event()
        self._settled = asyncio.Event()  # the first subscription attempt is over, either way
        self._up = True
        self._subscribed = False
        self._closing = False
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def subscribed(self) -> bool:
        """Tell whether the subscription is established now."""
        return self._subscribed

    @property
    def dropped(self) -> int:
        """Return how many changes were dropped unsent since the feed was made (the queue was full)."""
        return self._dropped

    def publish(self, change: Change) -> None:
        # Queued before the local delivery: a subscriber that raises must not keep the change from the others.
        if not self._closing:
            if len(self._queue) >= self._max_queued:
                self._queue.popleft()
                if not self._lost:
                    log.warning("change feed: %d changes wait for Redis; dropping the oldest (every process "
                                "reloads its tokens once they are announced)", self._max_queued)
                self._lost += 1
                self._dropped += 1
            self._queue.append((next(self._numbers), change))
            self._wake.set()
        for listener in self._listeners:
            listener(change)

    def subscribe(self, listener: Listener) -> None:
        self._listeners.append(listener)

    async def start(self) -> None:
        """Subscribe and start sending; return once subscribed, or once the first attempt failed (retried in
        the background)."""
        if self._tasks:
            return
        self._tasks = [asyncio.create_task(self._listen_forever(), name="change-feed-listener"),
                       asyncio.create_task(self._send_forever(), name="change-feed-sender")]
        await self._settled.wait()

    async def close(self) -> None:
        """Stop listening, send what is queued within CLOSE_WITHIN seconds, then stop."""
        self._closing = True
        self._wake.set()
        if not self._tasks:
            return
        listener, sender = self._tasks
        listener.cancel()
        await asyncio.wait([sender], timeout=CLOSE_WITHIN)
        if not sender.done():
            log.warning("change feed: %d changes unsent at close (Redis did not take them within %s s)",
                        len(self._queue), CLOSE_WITHIN)
        await _stop(self._tasks)

    # ---- receiving ----

    async def _listen_forever(self) -> None:
        loop = asyncio.get_running_loop()
        delay = FIRST_RETRY
        while not self._closing:
            connection = self._subscriber_connection()
            try:
                async with asyncio.timeout(CONNECT_TIMEOUT):
                    await self._subscribe(connection)
            except Exception as exc:
                await _disconnect(connection)
                self._went_down(exc)
                self._settled.set()
                await asyncio.sleep(delay)
                delay = min(2 * delay, MAX_RETRY)
                continue
            subscribed_at = loop.time()
            self._subscribed = True
            self._came_up()
            self._settled.set()
            try:
                await self._receive(connection)
            except Exception as exc:
                self._went_down(exc)
            finally:
                self._subscribed = False
                await _disconnect(connection)
            if loop.time() - subscribed_at > STABLE_AFTER:
                delay = FIRST_RETRY
            await asyncio.sleep(delay)
            delay = min(2 * delay, MAX_RETRY)

    def _subscriber_connection(self) -> AbstractConnection:
        """Make a connection of its own, as the client's pool would, that this feed watches and reconnects itself."""
        pool = self._client.connection_pool
        # No retries inside redis-py (a reconnection there would hide that changes were missed), RESP2
        # pub/sub replies as bytes, and the feed's own PINGs instead of redis-py's health check.
        options = {**pool.connection_kwargs, "retry": Retry(NoBackoff(), 0), "health_check_interval": 0,
                   "decode_responses": False, "protocol": 2}
        connection: AbstractConnection = pool.connection_class(**options)
        return connection

    async def _subscribe(self, connection: AbstractConnection) -> None:
        await connection.connect()  # type: ignore[no-untyped-call]  # redis-py leaves it unannotated
        await connection.send_command("SUBSCRIBE", self._channel, check_health=False)
        while True:
            reply = await connection.read_response(timeout=CONNECT_TIMEOUT)
            if isinstance(reply, list) and reply[:1] == [b"subscribe"]:
                return

    async def _receive(self, connection: AbstractConnection) -> None:
        """Apply other feeds' messages until the connection breaks or stays silent past a PING's answer."""
        loop = asyncio.get_running_loop()
        pinged_at: float | None = None
        while not self._closing:
            wait = PING_AFTER if pinged_at is None else pinged_at + ANSWER_WITHIN - loop.time()
            if wait <= 0:
                raise ConnectionError(f"no answer to a PING within {ANSWER_WITHIN} s")
            reply = await connection.read_response(timeout=wait)
            if reply is None:  # silence: a stalled server or a dead network path says nothing at all
                if pinged_at is None:
                    await connection.send_command("PING", check_health=False)
                    pinged_at = loop.time()
                continue
            pinged_at = None  # anything heard proves the connection alive
            if isinstance(reply, list) and len(reply) == 3 and reply[0] == b"message":
                self._deliver(reply[2])

    def _deliver(self, message: bytes) -> None:
        try:
            feed, change = decode(message)
        except MalformedMessage as exc:
            log.warning("change feed: skipped a message on %s that is not a change (%s); reloading tokens",
                        self._channel, exc)
            self._call(self._on_reconnect)
            return
        if feed == self._id:
            return
        if change is None:
            log.warning("change feed: another process dropped changes it could not send; reloading tokens")
            self._call(self._on_reconnect)
            return
        for listener in self._listeners:
            self._call(listener, change)

    def _went_down(self, error: BaseException) -> None:
        if not self._up:
            log.debug("change feed: Redis is still unreachable: %s", _describe(error))
            return
        self._up = False
        if isinstance(error, RedisError | OSError):
            log.warning("change feed: lost Redis (%s); retrying", _describe(error))
        else:
            log.error("change feed: the subscription failed; retrying", exc_info=error)
        self._call(self._on_state, False)

    def _came_up(self) -> None:
        if self._up:
            return
        log.warning("change feed: subscribed again; tokens cached before are reloaded")
        self._call(self._on_reconnect)
        self._up = True
        self._call(self._on_state, True)

    @staticmethod
    def _call(callback: Callable[..., None] | None, *args: Any) -> None:
        """Call a subscriber or a hook; what it raises is logged, never the listener's end."""
        if callback is None:
            return
        try:
            callback(*args)
        except Exception:
            log.exception("change feed: %r failed", callback)

    # ---- sending ----

    async def _send_forever(self) -> None:
        delay = FIRST_RETRY
        failing = False
        while True:
            if not self._queue:
                if self._closing:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            batch = list(itertools.islice(self._queue, BATCH))
            lost = self._lost
            messages = [encode_lost(self._sender, lost)] if lost else []
            messages += [encode(self._sender, change) for _, change in batch]
            try:
                async with asyncio.timeout(SEND_TIMEOUT):
                    async with self._client.pipeline(transaction=False) as pipe:
                        for message in messages:
                            pipe.publish(self._channel, message)
                        await pipe.execute()
            except Exception as exc:
                if not failing:
                    log.warning("change feed: cannot send to Redis (%s); %d changes wait", _describe(exc),
                                len(self._queue))
                    failing = True
                await asyncio.sleep(delay)
                delay = min(2 * delay, MAX_RETRY)
                continue
            if failing:
                log.warning("change feed: sending to Redis again")
                failing = False
            delay = FIRST_RETRY
            self._lost -= lost
            last = batch[-1][0]
            while self._queue and self._queue[0][0] <= last:
                self._queue.popleft()


async def _stop(tasks: list[asyncio.Task[None]]) -> None:
    """Cancel the tasks and wait for their end, asking again while one runs on: on Python 3.11 a cancellation
    can be lost inside redis-py (asyncio.wait_for swallows one that meets the awaited result)."""
    pending = {task for task in tasks if not task.done()}
    for _ in range(50):
        if not pending:
            break
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=0.1)
    if pending:
        log.error("change feed: %d tasks did not stop within 5 s; left behind", len(pending))
    for task in tasks:
        if task.done() and not task.cancelled() and task.exception() is not None:
            log.error("change feed: %s failed", task.get_name(), exc_info=task.exception())


async def _disconnect(connection: AbstractConnection) -> None:
    with contextlib.suppress(Exception):
        await connection.disconnect(nowait=True)


def _describe(error: BaseException) -> str:
    return str(error) or type(error).__name__
