"""The change feed: what the tokens service publishes after every write, for every token cache to apply.

In one process the feed hands each change straight to its subscribers; several processes will
share one through Redis. A change names what moved; it never carries a plaintext token or key.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from llm_proxy.models import Project, TokenRecord


@dataclass(frozen=True, slots=True)
class TokenChanged:
    """A token row was written; `project` is given for a new token, so the cache can take it at once."""
    token: TokenRecord
    project: Project | None = None


@dataclass(frozen=True, slots=True)
class TokensRevoked:
    token_ids: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class TokensDeactivated:
    token_ids: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class ProjectChanged:
    """A project row was written (its activity or its upstream key may have changed)."""
    project: Project


Change = TokenChanged | TokensRevoked | TokensDeactivated | ProjectChanged
Listener = Callable[[Change], None]


class ChangeFeed(Protocol):
    def publish(self, change: Change) -> None:
        """Deliver a change to every subscriber (in this process, before returning)."""
    def subscribe(self, listener: Listener) -> None: ...


class LocalFeed:
    """The feed of one process: publish() calls each subscriber in turn."""

    def __init__(self) -> None:
        self._listeners: list[Listener] = []

    def publish(self, change: Change) -> None:
        for listener in self._listeners:
            listener(change)

    def subscribe(self, listener: Listener) -> None:
        self._listeners.append(listener)
