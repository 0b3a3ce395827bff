"""The records every layer shares: projects and tokens as stored, and as the hot path holds them."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

_ISO = "%Y-%m-%dT%H:%M:%SZ"


def iso(epoch_seconds: float) -> str:
    """Format a Unix time as UTC ISO-8601 with `Z`, to the second."""
    return datetime.fromtimestamp(epoch_seconds, UTC).strftime(_ISO)


def epoch(text: str) -> float:
    """Parse a UTC ISO-8601 `Z` timestamp written by iso()."""
    return datetime.strptime(text, _ISO).replace(tzinfo=UTC).timestamp()


# ---- as stored ----

@dataclass(frozen=True, slots=True)
class Project:
    id: str
    name: str
    api_key_encrypted: str
    api_key_hint: str
    is_active: bool
    created_at: str
    updated_at: str

    def public(self) -> dict[str, Any]:
        """Return the API representation: the upstream key only ever obfuscated."""
        return {"id": self.id, "name": self.name, "api_key": self.api_key_hint, "is_active": self.is_active,
                "created_at": self.created_at, "updated_at": self.updated_at}


PROJECT_FIELDS = ("id", "name", "api_key", "is_active", "created_at", "updated_at")

# The token's public fields, in the order every answer, table and schema shows them: the one list.
TOKEN_FIELDS = ("id", "project_id", "token_hint", "expires_at", "is_active", "max_requests", "rate_limit_per_minute",
                "max_tokens_total", "request_count", "prompt_tokens", "completion_tokens", "total_tokens",
                "last_used_at", "created_at", "revoked_at", "replaced_by")


@dataclass(frozen=True, slots=True)
class TokenRecord:
    id: str
    token_hash: str
    token_hint: str
    project_id: str
    expires_at: str
    is_active: bool
    max_requests: int | None
    rate_limit_per_minute: int | None
    max_tokens_total: int | None
    request_count: int
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    last_used_at: str | None
    created_at: str
    revoked_at: str | None
    replaced_by: str | None

    def public(self, live: dict[str, Any] | None = None) -> dict[str, Any]:
        """Return the API representation (never the digest); `live` counters win over the stored ones."""
        document = {name: getattr(self, name) for name in TOKEN_FIELDS}
        document["is_active"] = self.is_active and self.revoked_at is None
        if live:
            document.update(live)
        return document


@dataclass(frozen=True, slots=True)
class AdminSession:
    """A console session as stored: digests only (the cookie holds the id; the management token is never kept)."""
    id_hash: str
    token_hash: str
    created_at: float  # Unix time
    last_seen_at: float


# ---- as the hot path holds them ----

@dataclass(slots=True)
class ProjectState:
    """What the hot path needs of a project; shared by all of its cached tokens."""
    id: str
    is_active: bool
    authorization: str  # "Bearer <upstream key>", decrypted once, kept only in memory


@dataclass(slots=True)
class Credential:
    """A token as the hot path sees it; the in-memory counters are authoritative while it is cached."""
    id: str
    hint: str
    project: ProjectState
    expires_at: float
    is_active: bool
    revoked: bool
    replaced: bool  # refreshed: a successor exists, and this token lives at most until its grace ends
    max_requests: int | None
    rate_limit_per_minute: int | None
    max_tokens_total: int | None
    request_count: int
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    last_used_at: float | None

    def counters(self) -> dict[str, Any]:
        """Return the live counters, as TokenRecord.public() takes them."""
        return {"request_count": self.request_count, "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens, "total_tokens": self.total_tokens,
                "last_used_at": iso(self.last_used_at) if self.last_used_at else None}
