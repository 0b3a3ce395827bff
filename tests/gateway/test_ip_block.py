"""Brute-force blocking per client IP (IP_RATE_LIMIT failed authentications a minute), through real HTTP."""

from __future__ import annotations

from typing import Any

from tests.fakes import MANAGEMENT_TOKEN, FakeClock, bearer, call, manage_status

BOGUS = "tok-" + "Z" * 43


async def test_an_ip_that_failed_too_often_is_blocked_even_with_a_valid_token(make_gateway: Any) -> None:
    monotonic = FakeClock(1000.0)
    gateway = await make_gateway(monotonic=monotonic, IP_RATE_LIMIT="3")
    token = await gateway.token()

    for _ in range(3):
        assert (await call(gateway, BOGUS))[:2] == (401, "invalid_token")

    # A valid token is refused too: answering it normally would tell a brute-forcing client which
    # guess was right (an oracle), defeating the block.
    status, code, headers = await call(gateway, token)
    assert (status, code) == (429, "rate_limited")
    assert headers["Retry-After"] == "20"
    # The management API shares the block, with the right management token as well.
    assert await manage_status(gateway, MANAGEMENT_TOKEN) == (429, "rate_limited")
    assert gateway.upstream.requests == []

    monotonic.advance(20)
    assert (await call(gateway, token))[0] == 200
    assert await manage_status(gateway, MANAGEMENT_TOKEN) == (200, None)


async def test_a_blocked_ip_gets_the_rate_limit_headers_of_its_failure_allowance(make_gateway: Any) -> None:
    gateway = await make_gateway(monotonic=FakeClock(1000.0), IP_RATE_LIMIT="3")
    token = await gateway.token()
    for _ in range(3):
        assert (await call(gateway, BOGUS))[:2] == (401, "invalid_token")

    status, code, headers = await call(gateway, token)
    async with gateway.client.get("/manage/projects", headers=bearer(MANAGEMENT_TOKEN)) as manage:
        manage_headers = manage.headers

    assert (status, code, manage.status) == (429, "rate_limited", 429)
    for seen in (headers, manage_headers):
        assert (seen["X-RateLimit-Limit"], seen["X-RateLimit-Remaining"], seen["Retry-After"]) == ("3", "0", "20")


async def test_failed_management_token_attempts_count_too(make_gateway: Any) -> None:
    gateway = await make_gateway(monotonic=FakeClock(1000.0), IP_RATE_LIMIT="3")
    token = await gateway.token()

    assert await manage_status(gateway, "wrong-" + "w" * 40) == (401, "invalid_management_token")
    async with gateway.client.get("/manage/projects") as response:  # no credential at all
        assert response.status == 401
    assert (await call(gateway, BOGUS))[:2] == (401, "invalid_token")

    assert (await call(gateway, token))[:2] == (429, "rate_limited")
    assert await manage_status(gateway, MANAGEMENT_TOKEN) == (429, "rate_limited")


async def test_blocking_one_client_ip_leaves_others_alone_behind_a_trusted_proxy(make_gateway: Any) -> None:
    gateway = await make_gateway(monotonic=FakeClock(1000.0), IP_RATE_LIMIT="3", TRUSTED_PROXIES="127.0.0.1/32")
    token = await gateway.token()
    attacker, bystander = {"X-Forwarded-For": "203.0.113.7"}, {"X-Forwarded-For": "203.0.113.8"}

    for _ in range(3):
        assert (await call(gateway, BOGUS, attacker))[0] == 401

    assert (await call(gateway, token, attacker))[:2] == (429, "rate_limited")
    assert (await call(gateway, token, bystander))[0] == 200
    assert (await call(gateway, token))[0] == 200  # the proxy itself, no header
    assert await manage_status(gateway, MANAGEMENT_TOKEN, bystander) == (200, None)
    assert await manage_status(gateway, MANAGEMENT_TOKEN, attacker) == (429, "rate_limited")


async def test_a_spoofed_forwarded_for_from_an_untrusted_peer_changes_nothing(make_gateway: Any) -> None:
    gateway = await make_gateway(monotonic=FakeClock(1000.0), IP_RATE_LIMIT="3")
    token = await gateway.token()

    for n in range(3):
        assert (await call(gateway, BOGUS, {"X-Forwarded-For": f"198.51.100.{n}"}))[0] == 401

    # TRUSTED_PROXIES is unset, so the header is ignored: every attempt was 127.0.0.1's.
    assert (await call(gateway, token, {"X-Forwarded-For": "198.51.100.99"}))[:2] == (429, "rate_limited")
    assert (await call(gateway, token))[:2] == (429, "rate_limited")


async def test_retrying_a_paused_token_or_one_of_an_inactive_project_does_not_block_the_ip(make_gateway: Any) -> None:
    """Only guesses count (unknown, revoked or expired tokens): an operator pausing a token or a project
    must not get every client behind that address blocked, their other tokens included."""
    gateway = await make_gateway(monotonic=FakeClock(1000.0), IP_RATE_LIMIT="3")
    paused = await gateway.token()
    await gateway.manage("PATCH", f"/tokens/{paused['id']}", {"is_active": False}, expect=200)
    idle_project = await gateway.project()
    orphan = await gateway.token(idle_project["id"])
    await gateway.manage("PATCH", f"/projects/{idle_project['id']}", {"is_active": False}, expect=200)
    other = await gateway.token()

    for _ in range(5):
        assert (await call(gateway, paused))[:2] == (401, "token_revoked")
        assert (await call(gateway, orphan))[:2] == (403, "project_inactive")
    assert (await call(gateway, other))[0] == 200

    revoked = await gateway.token()
    await gateway.manage("DELETE", f"/tokens/{revoked['id']}", expect=204)
    for _ in range(3):
        assert (await call(gateway, revoked))[:2] == (401, "token_revoked")
    assert (await call(gateway, other))[:2] == (429, "rate_limited")  # a dead token replayed does count
