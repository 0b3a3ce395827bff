"""Client token checks on /v1 through real HTTP: unknown, revoked, paused, expired, and warm in memory."""

from __future__ import annotations

from typing import Any

import openai
import pytest

from llm_proxy.app import STORE
from llm_proxy.storage.sqlite.database import Database
from llm_proxy.storage.sqlite.store import SqliteStore
from tests.fakes import MANAGEMENT_TOKEN, FakeClock, Gateway, bearer


async def _status_and_code(gateway: Gateway, token: str) -> tuple[int, str | None]:
    response = await gateway.client.get("/v1/models", headers={"Authorization": f"Bearer {token}"})
    body = await response.json()
    return response.status, body.get("error", {}).get("code") if isinstance(body, dict) else None


@pytest.mark.parametrize("presented", [
    None, "", "tok-", "tok-" + "A" * 43, "tok-" + "A" * 42 + "!", "sk-something", "Bearer", MANAGEMENT_TOKEN,
])
async def test_missing_or_invalid_tokens_are_401_invalid_token(gateway: Gateway, presented: str | None) -> None:
    headers = {} if presented is None else {"Authorization": f"Bearer {presented}"}
    response = await gateway.client.get("/v1/models", headers=headers)

    assert response.status == 401
    assert (await response.json())["error"]["code"] == "invalid_token"
    assert gateway.upstream.requests == []


async def test_sdk_sees_authentication_error(gateway: Gateway) -> None:
    with pytest.raises(openai.AuthenticationError) as caught:
        await gateway.openai("tok-" + "B" * 43).models.list()
    assert caught.value.code == "invalid_token"


async def test_revocation_bites_on_the_very_next_request(gateway: Gateway) -> None:
    token = await gateway.token()
    assert (await _status_and_code(gateway, token["token"]))[0] == 200

    await gateway.manage("DELETE", f"/tokens/{token['id']}", expect=204)

    assert await _status_and_code(gateway, token["token"]) == (401, "token_revoked")


async def test_revocation_bites_on_a_kept_alive_connection_while_a_stream_of_the_token_is_open(
        gateway: Gateway) -> None:
    """From the security review."""
    gateway.upstream.chunk_delay, gateway.upstream.chunks = 0.05, 4
    token = await gateway.token()
    chat = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    first = await gateway.client.get("/v1/models", headers=bearer(token["token"]))
    await first.read()
    async with gateway.client.post("/v1/chat/completions", json=chat, headers=bearer(token["token"])) as stream:
        assert (await stream.content.readline()).startswith(b"data: ")
        await gateway.manage("DELETE", f"/tokens/{token['id']}", expect=204)
        again = await gateway.client.get("/v1/models", headers=bearer(token["token"]))
        assert again.status == 401
        assert (await again.json())["error"]["code"] == "token_revoked"
        await stream.read()


async def test_deactivation_and_reactivation_bite_immediately(gateway: Gateway) -> None:
    token = await gateway.token()
    assert (await _status_and_code(gateway, token["token"]))[0] == 200

    await gateway.manage("PATCH", f"/tokens/{token['id']}", {"is_active": False}, expect=200)
    assert await _status_and_code(gateway, token["token"]) == (401, "token_revoked")

    await gateway.manage("PATCH", f"/tokens/{token['id']}", {"is_active": True}, expect=200)
    assert (await _status_and_code(gateway, token["token"]))[0] == 200


async def test_project_deactivation_bites_immediately(gateway: Gateway) -> None:
    token = await gateway.token()
    assert (await _status_and_code(gateway, token["token"]))[0] == 200

    await gateway.manage("PATCH", f"/projects/{token['project_id']}", {"is_active": False}, expect=200)

    assert await _status_and_code(gateway, token["token"]) == (403, "project_inactive")


async def test_bulk_revoke_bites_immediately(gateway: Gateway) -> None:
    project = await gateway.project()
    first, second = await gateway.token(project["id"]), await gateway.token(project["id"])
    assert (await _status_and_code(gateway, first["token"]))[0] == 200

    result = await gateway.manage("POST", f"/projects/{project['id']}/tokens/revoke", expect=200)

    assert result == {"revoked_count": 2, "already_revoked_count": 0, "total_tokens": 2}
    assert await _status_and_code(gateway, first["token"]) == (401, "token_revoked")
    assert await _status_and_code(gateway, second["token"]) == (401, "token_revoked")


async def test_expiry_bites_at_the_expiry_instant(make_gateway: Any) -> None:
    clock = FakeClock(1_800_000_000.0)
    gateway = await make_gateway(clock=clock)
    token = await gateway.token(duration_minutes=1)
    assert (await _status_and_code(gateway, token["token"]))[0] == 200

    clock.now += 59
    assert (await _status_and_code(gateway, token["token"]))[0] == 200
    clock.now += 1
    assert await _status_and_code(gateway, token["token"]) == (401, "token_expired")


async def test_warm_token_checks_read_nothing_from_the_database(gateway: Gateway, monkeypatch: Any) -> None:
    token = await gateway.token()
    assert (await _status_and_code(gateway, token["token"]))[0] == 200
    store = gateway.app[STORE]
    assert isinstance(store, SqliteStore)
    db: Database = store.db
    reads: list[str] = []
    original_one, original_all = db.fetchone, db.fetchall

    async def counting_one(sql: str, params: Any = ()) -> Any:
        reads.append(sql)
        return await original_one(sql, params)

    async def counting_all(sql: str, params: Any = ()) -> Any:
        reads.append(sql)
        return await original_all(sql, params)

    monkeypatch.setattr(db, "fetchone", counting_one)
    monkeypatch.setattr(db, "fetchall", counting_all)

    for _ in range(20):
        assert (await _status_and_code(gateway, token["token"]))[0] == 200
    # Unknown tokens are remembered too, so repeating a bad one costs no reads either.
    bogus = "tok-" + "C" * 43
    for _ in range(5):
        assert (await _status_and_code(gateway, bogus))[0] == 401

    assert reads == ["SELECT * FROM tokens WHERE token_hash = ?"]


async def test_token_created_by_a_previous_process_is_loaded_from_the_database(make_gateway: Any) -> None:
    first = await make_gateway()
    token = await first.token()
    await first.client.close()

    second = await make_gateway()
    assert (await _status_and_code(second, token["token"]))[0] == 200


async def test_revoked_and_expired_tokens_are_refused_on_a_cold_start(make_gateway: Any) -> None:
    """From the security review."""
    clock = FakeClock()
    first = await make_gateway(clock=clock)
    revoked, expiring = await first.token(), await first.token(duration_minutes=1)
    await first.manage("DELETE", f"/tokens/{revoked['id']}", expect=204)
    await first.client.close()
    clock.advance(61)
    second = await make_gateway(clock=clock)
    codes = []
    for secret in (revoked["token"], expiring["token"]):
        response = await second.client.get("/v1/models", headers=bearer(secret))
        codes.append((response.status, (await response.json())["error"]["code"]))
    assert codes == [(401, "token_revoked"), (401, "token_expired")]
    assert second.upstream.requests == []
