"""The store every backend implements: projects, tokens, usage and audit events, each a small Protocol.

A backend translates its own exceptions into storage.errors once, at this boundary; callers above
never see a driver's exception. Records are the frozen dataclasses of llm_proxy.models; a missing
row is None, not an exception (what that means to a client is the caller's decision).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from llm_proxy.models import AdminSession, Project, TokenRecord

ChainHead = tuple[int, str]  # (seq, hash) of a chain's newest audit event; (0, 64 zeros) before the first
# Stores events (dicts carrying their seq and hash, in seq order) in the transaction it is given to.
InsertEvents = Callable[[Sequence[dict[str, Any]]], Awaitable[None]]
# Given the head and a way to insert events after it, extend the chain; return the new head (None: unchanged).
ChainStep = Callable[[ChainHead, InsertEvents], Awaitable[ChainHead | None]]


@dataclass(frozen=True, slots=True)
class PruneResult:
    """What a prune deleted; `details()` is what the caller's audit.prune event carries.

    pruned: the (seq, hash) of the last event deleted from each chain it deleted from, by instance.
    anchors: every chain's anchor after the prune, those of earlier prunes included (audit.verify's
    prune() adds them), so the newest audit.prune event alone tells verify where each chain starts.
    """

    deleted: int
    batches: int
    pruned: dict[str, ChainHead] = field(default_factory=dict)
    anchors: dict[str, ChainHead] = field(default_factory=dict)

    def details(self) -> dict[str, Any]:
        """Return the details of the audit.prune event that records this prune."""
        anchors = self.anchors or self.pruned
        return {"deleted": self.deleted,
                "chains": {instance: {"last_pruned_seq": seq, "last_pruned_hash": digest}
                           for instance, (seq, digest) in sorted(anchors.items())}}


class ProjectStore(Protocol):
    async def create(self, name: str, api_key_encrypted: str, api_key_hint: str, now: float) -> Project:
        """Insert an active project; DuplicateKey when the name is taken."""
    async def get(self, project_id: str) -> Project | None: ...
    async def all(self, active: bool | None = None) -> list[Project]:
        """Every project (or only active / only inactive ones), oldest first (ties in the order created)."""
    async def update(self, project_id: str, columns: Mapping[str, Any], now: float) -> Project | None:
        """Set any of name, api_key_encrypted, api_key_hint, is_active; DuplicateKey on a taken name."""
    async def rekey(self, reencrypt: Callable[[str], str | None]) -> int:
        """In one transaction, replace each stored key that reencrypt() gives a new value for; return how many."""


class TokenStore(Protocol):
    async def create(self, *, token_hash: str, token_hint: str, project_id: str, expires_at: float,
                     max_requests: int | None, rate_limit_per_minute: int | None, max_tokens_total: int | None,
                     now: float) -> TokenRecord:
        """Insert an active token (its digest only)."""
    async def get(self, token_id: str) -> TokenRecord | None: ...
    async def find(self, token_hash: str) -> tuple[TokenRecord, Project] | None:
        """The token with this digest, and its project."""
    async def all(self, project_id: str | None = None, *, active_only: bool = False,
                   now: float = 0.0) -> list[TokenRecord]:
        """Tokens oldest first (ties in the order created); active_only leaves out revoked, inactive and
        (at `now`) expired ones."""
    async def update(self, token_id: str, columns: Mapping[str, Any]) -> TokenRecord | None:
        """Set any of is_active, max_requests, rate_limit_per_minute, max_tokens_total, expires_at."""
    async def revoke(self, token_ids: Sequence[str], now: float) -> list[str]:
        """Revoke each token not revoked yet; return the ids this call revoked."""
    async def revoke_project(self, project_id: str, now: float) -> tuple[list[str], int]:
        """In one transaction, revoke every token of a project; return the ids this call revoked and how
        many tokens the project has in all (revoked before included)."""
    async def refresh(self, token_id: str, *, check: Callable[[TokenRecord], None], token_hash: str,
                      token_hint: str, expires_at: float, old_stops_at: float, now: float) -> TokenRecord | None:
        """In one transaction: check(old) (it raises to refuse), issue a successor with the old token's
        project and limits, and retire the old token at old_stops_at. None when there is no such token."""
    async def deactivate_expired(self, now: float) -> list[TokenRecord]:
        """Mark active, unrevoked tokens past their expiry inactive; return them as they were."""


class UsageStore(Protocol):
    async def save(self, counters: Sequence[tuple[int, int, int, int, str | None, str]],
                   daily: Sequence[tuple[str, str, int, int, int, int]]) -> None:
        """In one transaction, add to token counters (requests, prompt, completion, total, last_used_at, id:
        the counts are deltas, last_used_at moves only forward, None leaves it) and to the daily totals
        (project_id, day, requests, prompt, completion, total).

        Deltas, not values: several processes counting the same token each add what they counted, in
        any order, and no write can put back an older total another process already moved past.
        """
    async def daily(self, project_id: str, since: str | None, until: str | None) -> list[dict[str, Any]]:
        """A project's daily totals, oldest first, for the UTC days that overlap [since, until).

        Each bound is a date (YYYY-MM-DD, meaning its midnight) or a timestamp (YYYY-MM-DDTHH:MM:SSZ);
        days are whole, so an `until` within a day keeps that day and one at its midnight leaves it out.
        """


class AuditStore(Protocol):
    """Audit events in hash chains, one per instance (INSTANCE_ID; '' for events written before
    instances were named). `seq` counts within a chain; the store also numbers events across chains
    in the order they were stored (the `before` cursor of query)."""

    async def head(self, instance: str) -> ChainHead: ...
    async def heads(self) -> dict[str, ChainHead]:
        """Every chain's head, by instance: those recorded and those of stored events."""
    async def extend(self, instance: str, step: ChainStep) -> ChainHead | None:
        """Run step(head, insert) in one write transaction and store the head it returns before COMMIT.

        The step may also write elsewhere (the audit file): while it runs, no other writer of this
        instance's chain, in any process, can move its head, so its events follow one chain.
        """
    async def query(self, *, filters: Mapping[str, str], since: str | None, until: str | None,
                    before: int | None, limit: int) -> list[tuple[int, dict[str, Any]]]:
        """(position, event) newest first, every chain merged, on exact action/project_id/result, a time
        range and a position cursor.

        `since` and `until` are timestamps (YYYY-MM-DDTHH:MM:SSZ), `until` exclusive; `before` a
        position, exclusive. An event whose details are unreadable is listed without them, with
        "details_unreadable": true, so one damaged row never hides the others.
        """
    async def walk(self, instance: str, after: int, limit: int) -> list[tuple[int, dict[str, Any] | None]]:
        """Up to `limit` events of a chain with seq > after, oldest first; None for one whose details are
        unreadable."""
    async def hourly_status(self, since: str) -> list[tuple[str, int | None, int]]:
        """Count token.access events at or after `since` (a timestamp) by UTC hour (YYYY-MM-DDTHH) and status
        class (2 for 2xx…; None when the event has no readable status), every chain together."""
    async def prune_anchors(self) -> dict[str, ChainHead]:
        """Each chain's last pruned (seq, hash), as the newest audit.prune event that records any has them."""
    async def prune(self, cutoff: str, batch_size: int) -> PruneResult:
        """Delete each chain's oldest events, in batches, up to its first one at or after `cutoff` (a timestamp)."""


class SessionStore(Protocol):
    """The admin console's sessions, by the digest of their id."""

    async def create(self, session: AdminSession) -> None: ...
    async def get(self, id_hash: str) -> AdminSession | None: ...
    async def touch(self, id_hash: str, when: float) -> None:
        """Record that the session was used at `when` (never moves it back)."""
    async def delete(self, id_hash: str) -> bool:
        """End a session; tell whether it existed."""
    async def delete_expired(self, *, idle_since: float, created_since: float) -> int:
        """Delete sessions last seen before `idle_since` or created before `created_since`, and single-use
        form values used before `created_since`; return how many sessions."""
    async def use_once(self, once_hash: str, session_hash: str, when: float) -> bool:
        """Record a single-use form value as used; False when it already was."""
    async def forget_once(self, once_hash: str) -> None:
        """Make a single-use form value usable again (what it was to make was refused)."""


class Store(Protocol):
    @property
    def projects(self) -> ProjectStore: ...
    @property
    def tokens(self) -> TokenStore: ...
    @property
    def usage(self) -> UsageStore: ...
    @property
    def audit(self) -> AuditStore: ...
    @property
    def sessions(self) -> SessionStore: ...

    async def open(self) -> None:
        """Connect, creating what is missing and applying the schema; opening an open store does nothing."""
    async def claim(self, owner: str, *, shared: bool = False) -> None:
        """Make this process the database's one serving process until close(), recording `owner` (who
        it is); raise DatabaseOwned naming the process that already is. CLI commands never claim.

        `shared` (processes with REDIS_URL): serve beside the others that claim shared, and keep out a
        process that would own the database alone (and be kept out by one that does)."""
    async def close(self) -> None: ...
    async def ping(self) -> bool:
        """Tell whether the database answers (for /ready)."""
