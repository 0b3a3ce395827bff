"""How long a revocation takes to reach another process: revoke through one gateway, poll the other until it refuses.

Each revocation is measured on a token of its own: created through the first gateway, used once
through the second (which then holds it in memory, the case the change feed exists for), revoked
with `DELETE /manage/tokens/{id}` through the first while the second is asked again and again on
one keep-alive connection. The figure is the time from sending the DELETE to receiving the
second's 401 `token_revoked`: it includes the revoking process's own write, so it is what an
operator waits, and it is late by at most one poll (a proxied request, well under a millisecond
on an idle gateway). Pairs alternate direction when both processes are idle.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field

import aiohttp
from probes import PATH, PLAIN_BODY

GIVE_UP_S = 5.0  # the promise is 1 s (SPEC §7); past this the revocation counts as never seen


@dataclass(frozen=True)
class Gateway:
    """One gateway process of the pair: where it listens."""
    url: str


@dataclass
class Propagation:
    """Milliseconds from each DELETE sent to the other process's first refusal, the ones never seen, and
    the DELETE's own round trip (the revoking process's write and answer)."""
    values: list[float] = field(default_factory=list)
    unseen: int = 0
    answered: list[float] = field(default_factory=list)


async def _json(response: aiohttp.ClientResponse, expected: int) -> dict[str, object]:
    text = await response.text()
    if response.status != expected:
        raise RuntimeError(f"{response.method} {response.url.path}: {response.status} (expected {expected}): "
                           f"{text[:300]}")
    result: dict[str, object] = json.loads(text) if text else {}
    return result


async def _proxied(session: aiohttp.ClientSession, gateway: Gateway, token: str) -> tuple[int, str]:
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    async with session.post(gateway.url + PATH, data=PLAIN_BODY, headers=headers) as response:
        body = await response.read()
    if response.status == 401:
        error = json.loads(body).get("error", {})
        return 401, str(error.get("code"))
    return response.status, ""


async def _one(session: aiohttp.ClientSession, revoker: Gateway, other: Gateway, management_token: str,
               project_id: str, answered: list[float]) -> float | None:
    """Measure one revocation; return its milliseconds, or None when `other` still served it after GIVE_UP_S.

    The DELETE's round trip is appended to `answered`.
    """
    manage = {"Authorization": f"Bearer {management_token}"}
    async with session.post(revoker.url + "/manage/tokens", headers=manage,
                            json={"project_id": project_id, "duration_minutes": 60,
                                  "rate_limit_per_minute": 100_000_000}) as response:
        created = await _json(response, 201)
    token, token_id = str(created["token"]), str(created["id"])
    status, code = await _proxied(session, other, token)
    if status != 200:
        raise RuntimeError(f"{other.url}: a new token was answered {status} {code}")

    async def revoke() -> None:
        async with session.delete(f"{revoker.url}/manage/tokens/{token_id}", headers=manage) as answer:
            await _json(answer, 204)
        answered.append((time.perf_counter() - sent) * 1000)

    sent = time.perf_counter()
    revoking = asyncio.create_task(revoke())
    try:
        while True:
            status, code = await _proxied(session, other, token)
            seen = time.perf_counter()
            if status == 401 and code == "token_revoked":
                return (seen - sent) * 1000
            if status != 200:
                raise RuntimeError(f"{other.url}: a token being revoked was answered {status} {code}")
            if seen - sent > GIVE_UP_S:
                return None
    finally:
        await revoking


async def measure(pair: tuple[Gateway, Gateway], management_token: str, project_id: str, count: int,
                  *, alternate: bool = True) -> Propagation:
    """Revoke `count` tokens, through pair[0] (and pair[1] every other time when `alternate`), each measured."""
    result = Propagation()
    async with aiohttp.ClientSession(trust_env=False, timeout=aiohttp.ClientTimeout(total=30)) as session:
        for number in range(count):
            revoker, other = pair if not alternate or number % 2 == 0 else pair[::-1]
            milliseconds = await _one(session, revoker, other, management_token, project_id, result.answered)
            if milliseconds is None:
                result.unseen += 1
            else:
                result.values.append(milliseconds)
    return result
