"""Liveness and readiness through real HTTP."""

from __future__ import annotations

from llm_proxy import __version__
from llm_proxy.app import STORE
from tests.fakes import Gateway


async def test_health_needs_no_auth_and_reports_version(gateway: Gateway) -> None:
    response = await gateway.client.get("/health")
    assert response.status == 200
    assert await response.json() == {"status": "ok", "version": __version__}


async def test_ready_follows_the_database(gateway: Gateway) -> None:
    assert (await gateway.client.get("/ready")).status == 200

    await gateway.app[STORE].close()
    response = await gateway.client.get("/ready")

    assert response.status == 503
    assert (await response.json())["error"]["code"] == "not_ready"
    assert (await gateway.client.get("/health")).status == 200


async def test_unknown_route_is_openai_shaped_404(gateway: Gateway) -> None:
    response = await gateway.client.get("/nope")
    assert response.status == 404
    assert (await response.json())["error"]["code"] == "not_found"
