"""The one writer of projects and tokens: every change is written to the store, then published to the feed.

The management API, the console, the expiry job and the anomaly rules all change tokens and
projects through this service, and no caller touches a token cache by hand: each cache (one per
process) learns of a change from the feed.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from llm_proxy.audit.masking import obfuscate
from llm_proxy.crypto import KeyRing
from llm_proxy.errors import Conflict, ExpiredTokenConflict, NotFound, ProjectInactive
from llm_proxy.models import Project, TokenRecord, epoch
from llm_proxy.storage.base import Store
from llm_proxy.storage.errors import DuplicateKey
from llm_proxy.tokens.credentials import generate_token, hash_token
from llm_proxy.tokens.feed import ChangeFeed, ProjectChanged, TokenChanged, TokensDeactivated, TokensRevoked

_NAME_TAKEN = "a project with this name already exists"


@dataclass(frozen=True, slots=True)
class IssuedToken:
    """A token just created or refreshed: its record and, this once, its plaintext."""
    record: TokenRecord
    plaintext: str


@dataclass(frozen=True, slots=True)
class Limits:
    """What a token may spend; None means no limit (for the rate: the server default)."""
    max_requests: int | None = None
    rate_limit_per_minute: int | None = None
    max_tokens_total: int | None = None


def check_refreshable(token: TokenRecord, now: float) -> None:
    """Raise Conflict unless the token may be refreshed: not already replaced, not expired, not revoked, active.

    Expiry is decided by expires_at, not by whether the expiry job has marked the token yet: a
    stolen token past its expiry must be worth nothing, not a minute's chance of a fresh one.
    """
    if token.replaced_by is not None:
        raise Conflict("this token was already refreshed; refresh its successor instead")
    if epoch(token.expires_at) <= now:
        raise ExpiredTokenConflict()
    if token.revoked_at is not None or not token.is_active:
        raise Conflict("a revoked or inactive token cannot be refreshed")


class TokenService:
    """Read, write and publish projects and tokens."""

    def __init__(self, store: Store, keyring: KeyRing, feed: ChangeFeed,
                 clock: Callable[[], float] = time.time) -> None:
        self._store = store
        self._keyring = keyring
        self._feed = feed
        self._clock = clock

    # ---- projects ----

    async def create_project(self, name: str, api_key: str) -> Project:
        """Create an active project holding `api_key` encrypted; 409 when the name is taken."""
        try:
            return await self._store.projects.create(name, self._keyring.encrypt(api_key), obfuscate(api_key),
                                                     self._clock())
        except DuplicateKey:
            raise Conflict(_NAME_TAKEN, param="name") from None

    async def project(self, project_id: str) -> Project:
        """Return a project; 404 when there is none."""
        project = await self._store.projects.get(project_id)
        if project is None:
            raise NotFound("project not found")
        return project

    async def projects(self, active: bool | None = None) -> list[Project]:
        """List projects, oldest first (only active or only inactive ones when `active` says)."""
        return await self._store.projects.all(active)

    async def update_project(self, project_id: str, changes: Mapping[str, Any]) -> Project:
        """Rename, re-key or (de)activate a project; 404 when absent, 409 on a taken name."""
        columns = {name: value for name, value in changes.items() if name in ("name", "is_active")}
        if "api_key" in changes:
            columns["api_key_encrypted"] = self._keyring.encrypt(changes["api_key"])
            columns["api_key_hint"] = obfuscate(changes["api_key"])
        try:
            project = await self._store.projects.update(project_id, columns, self._clock())
        except DuplicateKey:
            raise Conflict(_NAME_TAKEN, param="name") from None
        if project is None:
            raise NotFound("project not found")
        self._feed.publish(ProjectChanged(project))
        return project

    async def revoke_project_tokens(self, project_id: str) -> tuple[list[str], int]:
        """Revoke every token of a project; return the ids this call revoked and how many it has."""
        await self.project(project_id)
        revoked, total = await self._store.tokens.revoke_project(project_id, self._clock())
        self._feed.publish(TokensRevoked(tuple(revoked)))
        return revoked, total

    # ---- tokens ----

    async def create_token(self, project_id: str, duration_minutes: int, limits: Limits) -> IssuedToken:
        """Issue a token for an active project; 404 for an unknown project, 403 for an inactive one."""
        project = await self.project(project_id)
        if not project.is_active:
            raise ProjectInactive("cannot create a token for an inactive project")
        plaintext = generate_token()
        now = self._clock()
        token = await self._store.tokens.create(
            token_hash=hash_token(plaintext), token_hint=obfuscate(plaintext), project_id=project.id,
            expires_at=now + duration_minutes * 60, max_requests=limits.max_requests,
            rate_limit_per_minute=limits.rate_limit_per_minute, max_tokens_total=limits.max_tokens_total, now=now)
        self._feed.publish(TokenChanged(token, project))
        return IssuedToken(token, plaintext)

    async def token(self, token_id: str) -> TokenRecord:
        """Return a token's record; 404 when there is none."""
        token = await self._store.tokens.get(token_id)
        if token is None:
            raise NotFound("token not found")
        return token

    async def tokens(self, project_id: str | None = None, *, active_only: bool = False,
                     expired: bool | None = None) -> list[TokenRecord]:
        """List tokens oldest first: of one project, only live ones, only expired or only unexpired ones."""
        now = self._clock()
        tokens = await self._store.tokens.all(project_id, active_only=active_only, now=now)
        if expired is None:
            return tokens
        return [token for token in tokens if (epoch(token.expires_at) <= now) == expired]

    async def update_token(self, token_id: str, changes: Mapping[str, Any]) -> TokenRecord:
        """Pause, resume or change a token's limits; a revoked token cannot be resumed (409)."""
        if changes.get("is_active") and (await self.token(token_id)).revoked_at is not None:
            raise Conflict("a revoked token cannot be reactivated; create a new one", param="is_active")
        token = await self._store.tokens.update(token_id, changes)
        if token is None:
            raise NotFound("token not found")
        self._feed.publish(TokenChanged(token))
        return token

    async def revoke_token(self, token_id: str) -> bool:
        """Revoke a token for good; return False when it was revoked already (404 when absent)."""
        await self.token(token_id)
        revoked = await self._store.tokens.revoke([token_id], self._clock())
        self._feed.publish(TokensRevoked((token_id,)))
        return bool(revoked)

    async def refresh_token(self, token_id: str, duration_minutes: int, grace_seconds: int) -> IssuedToken:
        """Issue a successor with the same project and limits; the old token stops after `grace_seconds`.

        409 when the old token is already refreshed, expired, revoked or paused (checked again inside
        the write, so two concurrent refreshes give one successor); 403 when its project is inactive.
        """
        now = self._clock()
        old = await self.token(token_id)
        check_refreshable(old, now)
        project = await self.project(old.project_id)
        if not project.is_active:
            raise ProjectInactive("cannot refresh a token of an inactive project")
        plaintext = generate_token()
        token = await self._store.tokens.refresh(
            old.id, check=lambda current: check_refreshable(current, now), token_hash=hash_token(plaintext),
            token_hint=obfuscate(plaintext), expires_at=now + duration_minutes * 60, old_stops_at=now + grace_seconds,
            now=now)
        if token is None:
            raise NotFound("token not found")
        self._feed.publish(TokenChanged(await self.token(old.id)))
        self._feed.publish(TokenChanged(token, project))
        return IssuedToken(token, plaintext)

    async def deactivate_expired(self) -> list[TokenRecord]:
        """Mark tokens past their expiry inactive (the expiry job); return them."""
        expired = await self._store.tokens.deactivate_expired(self._clock())
        self._feed.publish(TokensDeactivated(tuple(token.id for token in expired)))
        return expired

    def suspend(self, token_id: str) -> Awaitable[TokenRecord | None]:
        """Stop a token at once (the anomaly rules); return the write that records it, for the caller to await.

        The change is published before it is written, unlike every other: a token that looks
        leaked must be refused from the very next request, not from when the database answers.
        """
        self._feed.publish(TokensDeactivated((token_id,)))
        return self._record_suspension(token_id)

    async def _record_suspension(self, token_id: str) -> TokenRecord | None:
        token = await self._store.tokens.update(token_id, {"is_active": False})
        if token is not None:
            self._feed.publish(TokenChanged(token))
        return token
