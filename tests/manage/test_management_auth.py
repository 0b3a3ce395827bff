"""The management token and MANAGEMENT_ALLOWED_IPS on /manage, through real HTTP."""

from __future__ import annotations

from typing import Any

import pytest

from tests.fakes import MANAGEMENT_TOKEN, call, manage_status

# ---- MANAGEMENT_ALLOWED_IPS ----

@pytest.mark.parametrize("secret", [MANAGEMENT_TOKEN, "wrong-" + "w" * 40])
async def test_management_from_a_disallowed_ip_is_403_before_the_credential_is_checked(
        make_gateway: Any, secret: str) -> None:
    gateway = await make_gateway(MANAGEMENT_ALLOWED_IPS="10.0.0.0/8")

    assert await manage_status(gateway, secret) == (403, "ip_not_allowed")
    async with gateway.client.get("/manage/projects") as response:
        assert response.status == 403


@pytest.mark.parametrize("allowed", ["127.0.0.1,::1", "127.0.0.0/8", "fd00::/8, 127.0.0.1/32", "::1, 127.0.0.1"])
async def test_management_from_an_allowed_ip_still_needs_the_token(make_gateway: Any, allowed: str) -> None:
    gateway = await make_gateway(MANAGEMENT_ALLOWED_IPS=allowed)

    assert await manage_status(gateway, MANAGEMENT_TOKEN) == (200, None)
    assert await manage_status(gateway, "wrong-" + "w" * 40) == (401, "invalid_management_token")


@pytest.mark.parametrize(("client_ip", "expected"), [("2001:db8:1::5", 200), ("2001:db9::5", 403),
                                                     ("192.0.2.1", 403)])
async def test_management_allow_list_matches_ipv6_cidrs(make_gateway: Any, client_ip: str, expected: int) -> None:
    gateway = await make_gateway(MANAGEMENT_ALLOWED_IPS="2001:db8::/32", TRUSTED_PROXIES="127.0.0.1")

    status, _ = await manage_status(gateway, MANAGEMENT_TOKEN, {"X-Forwarded-For": client_ip})

    assert status == expected


async def test_a_disallowed_ip_does_not_affect_the_proxy(make_gateway: Any) -> None:
    gateway = await make_gateway(MANAGEMENT_ALLOWED_IPS="127.0.0.1")
    token = await gateway.token()
    restricted = await make_gateway(MANAGEMENT_ALLOWED_IPS="10.0.0.0/8")

    assert (await call(restricted, token))[0] == 200
