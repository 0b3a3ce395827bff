"""The management token and MANAGEMENT_ALLOWED_IPS on /manage, through real HTTP."""

from __future__ import annotations

from typing import Any

import pytest

from tests.fakes import MANAGEMENT_TOKEN, Gateway, call, manage_status

# ---- the management token ----

@pytest.mark.parametrize("header", [None, "Bearer wrong-token-" + "x" * 40, "Basic " + MANAGEMENT_TOKEN,
                                    "Bearer " + MANAGEMENT_TOKEN[:-1]])
async def test_management_api_rejects_missing_or_wrong_management_token(gateway: Gateway, header: str | None) -> None:
    headers = {} if header is None else {"Authorization": header}
    response = await gateway.client.get("/manage/projects", headers=headers)

    assert response.status == 401
    assert (await response.json())["error"]["code"] == "invalid_management_token"


async def test_client_tokens_do_not_open_the_management_api(gateway: Gateway) -> None:
    token = await gateway.token()
    response = await gateway.client.get("/manage/projects", headers={"Authorization": f"Bearer {token['token']}"})
    assert response.status == 401


async def test_several_management_tokens_are_all_accepted(make_gateway: Any) -> None:
    old, new = "old-" + "o" * 40, "new-" + "n" * 40
    gateway = await make_gateway(MANAGEMENT_TOKEN=f"{old},{new}")
    for secret in (old, new):
        response = await gateway.client.get("/manage/projects", headers={"Authorization": f"Bearer {secret}"})
        assert response.status == 200


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
    await gateway.close()  # one serving process per database: the restricted one takes it over
    restricted = await make_gateway(MANAGEMENT_ALLOWED_IPS="10.0.0.0/8")

    assert (await call(restricted, token))[0] == 200
