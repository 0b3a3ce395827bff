"""Serve token checks from memory: the database is read once per token, counters are written in batches."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Callable

from llm_proxy.crypto import KeyRing
from llm_proxy.errors import InvalidToken, ProjectInactive, TokenExpired, TokenRevoked
from llm_proxy.models import Credential, Project, ProjectState, TokenRecord, epoch, iso
from llm_proxy.storage.base import Store
from llm_proxy.storage.errors import StorageError
from llm_proxy.tokens.credentials import hash_token, is_token_shaped
from llm_proxy.tokens.feed import Change, ChangeFeed, TokenChanged, TokensDeactivated, TokensRevoked
from llm_proxy.tokens.periodic import Periodic

log = logging.getLogger(__name__)

# Unknown digests remembered so that a flood of bad tokens costs no database reads.
_UNKNOWN_CACHE_SIZE = 10_000
FLUSH_INTERVAL = 1.0


class TokenCache:
    """Authenticate tokens from memory, kept exact by the changes the tokens service publishes."""

    def __init__(self, store: Store, keyring: KeyRing, feed: ChangeFeed,
                 clock: Callable[[], float] = time.time) -> None:
        self._store = store
        self._keyring = keyring
        self._clock = clock
        self._by_hash: dict[str, Credential] = {}
        self._by_id: dict[str, Credential] = {}
        self._projects: dict[str, ProjectState] = {}
        self._unknown: OrderedDict[str, None] = OrderedDict()
        self._loading: dict[str, asyncio.Future[Credential | None]] = {}
        # token id -> [requests, prompt, completion, total] counted here and not yet written, and when
        # each token was last used: the database gets these as deltas (see UsageStore.save).
        self._counted: dict[str, list[int]] = {}
        self._last_used: dict[str, float] = {}
        # (project_id, UTC day) -> [requests, prompt, completion, total] not yet written.
        self._daily: dict[tuple[str, str], list[int]] = {}
        self._day_number = -1
        self._day = ""
        # Bumped by every published change, so a load that raced with one is redone.
        self._generation = 0
        # While changes may be missed (the shared feed is down), a token cached longer than this is
        # read again before it is trusted; None (the rule) trusts the feed.
        self.reread_after: float | None = None
        self._loaded_at: dict[str, float] = {}  # token digest -> monotonic time it was read, while re-reading
        self._flusher = Periodic("token-counter-flusher", FLUSH_INTERVAL, self.flush, wait_first=True)
        self._saving: asyncio.Future[None] | None = None  # the counter write in flight, if any
        feed.subscribe(self._apply_change)

    # ---- the hot path ----

    async def lookup(self, presented: str) -> Credential:
        """Return the credential a presented token names, or raise InvalidToken."""
        digest = hash_token(presented)
        # The lookup is keyed by the SHA-256 digest, so timing reveals nothing about stored tokens.
        credential = self._by_hash.get(digest)
        if credential is not None and self.reread_after is not None:
            credential = await self._reread(digest, credential)
        if credential is None:
            if (digest in self._unknown and self.reread_after is None) or not is_token_shaped(presented):
                raise InvalidToken()
            credential = await self._load(digest)
            if credential is None:
                raise InvalidToken()
        return credential

    async def _reread(self, digest: str, credential: Credential) -> Credential | None:
        """Return the token read again from the database if the cached one is older than reread_after;
        the cached one while the database cannot answer (warm tokens keep being served)."""
        read = self._loaded_at.get(digest)
        now = time.monotonic()
        if read is not None and now - read <= (self.reread_after or 0.0):
            return credential
        try:
            found = await self._load(digest, fresh_project=True)
        except StorageError:
            return credential
        self._loaded_at[digest] = now
        return found

    def forget_all(self) -> None:
        """Drop every cached token and project (changes may have been missed): each is read again on its next use.

        Counters counted here and not yet written stay pending: they are deltas, written whatever is cached.
        """
        self._generation += 1
        self._by_hash.clear()
        self._by_id.clear()
        self._projects.clear()
        self._unknown.clear()
        self._loaded_at.clear()

    def check(self, credential: Credential) -> None:
        """Raise the matching 401/403 unless the credential may be used right now."""
        if credential.revoked:
            raise TokenRevoked()
        # Expiry before activity: the housekeeping job deactivates expired tokens, and their
        # holders should still be told the token expired. A refreshed token past its grace was
        # refreshed away, not expired: the same answer as a refresh without grace.
        if credential.expires_at <= self._clock():
            if credential.replaced:
                raise TokenRevoked("token has been replaced by a refresh")
            raise TokenExpired()
        if not credential.is_active:
            raise TokenRevoked("token is inactive")
        if not credential.project.is_active:
            raise ProjectInactive()

    def is_dead(self, credential: Credential) -> bool:
        """Tell whether a token was revoked, refreshed away or has expired (not merely paused)."""
        return credential.revoked or credential.expires_at <= self._clock()

    def record_request(self, credential: Credential) -> None:
        """Note a request the limiter admitted (its quota counted there): last use, the project's day, a flush."""
        now = self._clock()
        credential.last_used_at = self._last_used[credential.id] = now
        self._counted_for(credential.id)[0] += 1
        self._day_totals(credential.project.id, now)[0] += 1

    def record_refund(self, credential: Credential) -> None:
        """Note a request the limiter gave its quota back: it no longer counts in the project's day."""
        self._counted_for(credential.id)[0] -= 1
        self._day_totals(credential.project.id, self._clock())[0] -= 1

    def add_usage(self, credential: Credential, prompt: int, completion: int, total: int) -> None:
        """Charge a request's token usage to its token and its project's day."""
        credential.prompt_tokens += prompt
        credential.completion_tokens += completion
        credential.total_tokens += total
        for totals in (self._counted_for(credential.id), self._day_totals(credential.project.id, self._clock())):
            totals[1] += prompt
            totals[2] += completion
            totals[3] += total

    def _counted_for(self, token_id: str) -> list[int]:
        counted = self._counted.get(token_id)
        if counted is None:
            counted = self._counted[token_id] = [0, 0, 0, 0]
        return counted

    def _day_totals(self, project_id: str, now: float) -> list[int]:
        day_number = int(now // 86400)
        if day_number != self._day_number:
            self._day_number, self._day = day_number, time.strftime("%Y-%m-%d", time.gmtime(now))
        key = (project_id, self._day)
        totals = self._daily.get(key)
        if totals is None:
            totals = self._daily[key] = [0, 0, 0, 0]
        return totals

    # ---- cache maintenance ----

    async def _load(self, digest: str, *, fresh_project: bool = False) -> Credential | None:
        pending = self._loading.get(digest)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[Credential | None] = asyncio.get_running_loop().create_future()
        self._loading[digest] = future
        try:
            while True:
                generation = self._generation
                found = await self._store.tokens.find(digest)
                if generation == self._generation:
                    break
            if found is not None and fresh_project:
                self._project_changed(found[1])
            credential = None if found is None else self._remember(*found)
            if credential is None:
                self._unknown[digest] = None
                if len(self._unknown) > _UNKNOWN_CACHE_SIZE:
                    self._unknown.popitem(last=False)
            future.set_result(credential)
            return credential
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # mark retrieved: waiters re-raise it themselves
            raise
        finally:
            del self._loading[digest]

    def _project_state(self, project: Project) -> ProjectState:
        """The cached state of a project, made from `project` only when there is none yet.

        The row may be stale: a token write reads its project before awaiting its own statement,
        and a deactivation or key change can land meanwhile. Once cached, a project's state
        changes only through a published ProjectChanged, which every project write publishes.
        """
        state = self._projects.get(project.id)
        if state is None:
            state = self._projects[project.id] = ProjectState(
                project.id, project.is_active, "Bearer " + self._keyring.decrypt(project.api_key_encrypted))
        return state

    def _remember(self, token: TokenRecord, project: Project) -> Credential:
        existing = self._by_id.get(token.id)
        if existing is not None:
            self._apply(existing, token)
            return existing
        credential = Credential(
            id=token.id, hint=token.token_hint, project=self._project_state(project),
            expires_at=epoch(token.expires_at), is_active=token.is_active,
            revoked=token.revoked_at is not None, replaced=token.replaced_by is not None,
            max_requests=token.max_requests,
            rate_limit_per_minute=token.rate_limit_per_minute, max_tokens_total=token.max_tokens_total,
            request_count=token.request_count, prompt_tokens=token.prompt_tokens,
            completion_tokens=token.completion_tokens, total_tokens=token.total_tokens,
            last_used_at=epoch(token.last_used_at) if token.last_used_at else None)
        self._by_hash[token.token_hash] = credential
        self._by_id[token.id] = credential
        if self.reread_after is not None:
            self._loaded_at[token.token_hash] = time.monotonic()
        self._unknown.pop(token.token_hash, None)
        return credential

    @staticmethod
    def _apply(credential: Credential, token: TokenRecord) -> None:
        credential.expires_at = epoch(token.expires_at)
        credential.is_active = token.is_active
        credential.revoked = token.revoked_at is not None
        credential.replaced = token.replaced_by is not None
        credential.max_requests = token.max_requests
        credential.rate_limit_per_minute = token.rate_limit_per_minute
        credential.max_tokens_total = token.max_tokens_total

    def _apply_change(self, change: Change) -> None:
        """Apply a change the tokens service published (called by the feed, in this process's loop)."""
        self._generation += 1
        if isinstance(change, TokenChanged):
            self._token_changed(change.token, change.project)
        elif isinstance(change, TokensRevoked | TokensDeactivated):
            revoked = isinstance(change, TokensRevoked)
            for token_id in change.token_ids:
                credential = self._by_id.get(token_id)
                if credential is not None:
                    credential.is_active = False
                    credential.revoked = credential.revoked or revoked
        else:
            self._project_changed(change.project)

    def _token_changed(self, token: TokenRecord, project: Project | None) -> None:
        # A new token (project given) is cached at once: its first request needs no database read.
        existing = self._by_id.get(token.id)
        if existing is not None:
            self._apply(existing, token)
        elif project is not None:
            self._remember(token, project)
        else:
            self._unknown.pop(token.token_hash, None)

    def _project_changed(self, project: Project) -> None:
        # The state is kept even for a project none of whose tokens is cached yet, so that a token
        # write that read the project before this change cannot bring the old row back.
        authorization = "Bearer " + self._keyring.decrypt(project.api_key_encrypted)
        state = self._projects.get(project.id)
        if state is None:
            self._projects[project.id] = ProjectState(project.id, project.is_active, authorization)
        else:
            state.is_active, state.authorization = project.is_active, authorization

    def overlay(self, token: TokenRecord) -> dict[str, int | str | None]:
        """Return the live counters for a token row, which may be up to one flush behind."""
        credential = self._by_id.get(token.id)
        return {} if credential is None else credential.counters()

    # ---- batched persistence ----

    async def flush(self) -> None:
        """Write every changed counter and the daily totals in one transaction."""
        # Each write runs in a task of its own that a cancelled caller (the flusher stopped by
        # shutdown, a management client hanging up) does not stop: the counters it took are then
        # either committed or put back, never dropped and never written twice. Waiting for the
        # write in flight also means that what was counted before this call is written when it returns.
        while self._saving is not None:
            await asyncio.shield(self._saving)
        if not self._counted and not self._daily:
            return
        counted, self._counted = self._counted, {}
        last_used, self._last_used = self._last_used, {}
        daily, self._daily = self._daily, {}
        self._saving = asyncio.ensure_future(self._save(counted, last_used, daily))
        await asyncio.shield(self._saving)

    async def _save(self, counted: dict[str, list[int]], last_used: dict[str, float],
                    daily: dict[tuple[str, str], list[int]]) -> None:
        rows = [(totals[0], totals[1], totals[2], totals[3],
                 iso(last_used[token_id]) if token_id in last_used else None, token_id)
                for token_id, totals in counted.items()]
        deltas = [(project_id, day, totals[0], totals[1], totals[2], totals[3])
                  for (project_id, day), totals in daily.items()]
        try:
            await self._store.usage.save(rows, deltas)
        except Exception:
            # Not committed (Database.write rolled back): keep everything pending, the next flush
            # retries, nothing is lost while the process lives.
            for token_id, totals in counted.items():
                _add_into(self._counted_for(token_id), totals)
            for token_id, when in last_used.items():
                self._last_used[token_id] = max(when, self._last_used.get(token_id, when))
            for key, totals in daily.items():
                _add_into(self._daily.setdefault(key, [0, 0, 0, 0]), totals)
            log.exception("could not persist token counters; will retry")
        finally:
            self._saving = None

    def start(self) -> None:
        """Start the background task that persists counters every second."""
        self._flusher.start()

    async def close(self) -> None:
        """Stop the flusher and persist what is left."""
        await self._flusher.close()
        await self.flush()


def _add_into(totals: list[int], more: list[int]) -> None:
    for index, value in enumerate(more):
        totals[index] += value
