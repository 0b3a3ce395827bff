"""The words of an audit event: its actions, actors and results (SPEC §5), as types the checker enforces."""

from __future__ import annotations

from typing import Literal

Action = Literal[
    "project.create", "project.read", "project.list", "project.update", "project.delete",
    "token.create", "token.read", "token.list", "token.update", "token.revoke", "token.revoke_batch",
    "token.refresh", "token.validate", "token.access", "token.expire", "token.anomaly", "token.suspend",
    "auth.failure", "audit.list", "audit.prune", "key.rotate",
]
# management: the management API; client: proxied requests; system: jobs and the CLI.
Actor = Literal["management", "client", "system"]
# failure: bad credentials or invalid input; denied: a policy said no; error: ours or the upstream's fault.
Result = Literal["success", "failure", "denied", "error"]
