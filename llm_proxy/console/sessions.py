"""Console sessions: opened by a management token, kept server-side by the digest of a random id, timed out.

The cookie holds a 256-bit random id; the store holds its SHA-256 and the SHA-256 of the management
token that signed in (never the token), so a stolen database row opens nothing. A session ends when
it has been idle 30 minutes, is 12 hours old, is signed out, or its management token is no longer
in MANAGEMENT_TOKEN. The CSRF token is derived from the id, so it needs no storage and dies with it.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

from llm_proxy.models import AdminSession
from llm_proxy.storage.base import SessionStore

IDLE_TIMEOUT = 30 * 60.0
ABSOLUTE_TIMEOUT = 12 * 3600.0
# A session seen again within this is not written again: one write a minute at most per session.
TOUCH_EVERY = 60.0


def digest(value: str) -> str:
    """Return the hex SHA-256 of a session id or a management token."""
    return hashlib.sha256(value.encode("utf-8", "surrogateescape")).hexdigest()


def csrf_token(session_id: str) -> str:
    """Return the CSRF token bound to a session: a keyed hash of its id (one-way, so it does not reveal it)."""
    return hmac.new(session_id.encode(), b"llm-proxy console csrf", hashlib.sha256).hexdigest()


@dataclass(frozen=True, slots=True)
class Session:
    """A live session, as a request sees it."""
    id: str
    csrf: str
    created_at: float


class ConsoleSessions:
    """Open, find and end console sessions in the store."""

    def __init__(self, store: SessionStore, management_tokens: tuple[str, ...],
                 clock: Callable[[], float] = time.time) -> None:
        self._store = store
        self._accepted = tuple(digest(token) for token in management_tokens)
        self._clock = clock

    async def open(self, management_token: str) -> Session:
        """Open a session for a management token the caller has checked; a fresh id every time (no fixation)."""
        now = self._clock()
        await self._store.delete_expired(idle_since=now - IDLE_TIMEOUT, created_since=now - ABSOLUTE_TIMEOUT)
        session_id = secrets.token_urlsafe(32)  # 256 bits
        await self._store.create(AdminSession(digest(session_id), digest(management_token), now, now))
        return Session(session_id, csrf_token(session_id), now)

    async def find(self, session_id: str | None) -> Session | None:
        """Return the live session with this id, touching it; None (and the row deleted) when it has ended."""
        if not session_id:
            return None
        id_hash = digest(session_id)
        stored = await self._store.get(id_hash)
        if stored is None:
            return None
        now = self._clock()
        if (now - stored.last_seen_at > IDLE_TIMEOUT or now - stored.created_at > ABSOLUTE_TIMEOUT
                or not self._still_configured(stored.token_hash)):
            await self._store.delete(id_hash)
            return None
        if now - stored.last_seen_at >= TOUCH_EVERY:
            await self._store.touch(id_hash, now)
        return Session(session_id, csrf_token(session_id), stored.created_at)

    async def use_once(self, session: Session, value: str) -> bool:
        """Record a single-use form value as sent by this session; False when it had been sent already."""
        return await self._store.use_once(digest(value), digest(session.id), self._clock())

    async def forget_once(self, value: str) -> None:
        """Let a single-use form value be sent again: what it asked for was refused."""
        await self._store.forget_once(digest(value))

    async def end(self, session_id: str) -> bool:
        """Sign out: delete the session; tell whether it was there."""
        return await self._store.delete(digest(session_id))

    def _still_configured(self, token_hash: str) -> bool:
        found = False
        for accepted in self._accepted:  # every one compared: no early exit
            found |= hmac.compare_digest(token_hash, accepted)
        return found
