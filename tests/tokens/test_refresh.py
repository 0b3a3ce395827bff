"""Token refresh through real HTTP: the old token's end after its grace, one successor at most, and no refresh
undoing a project's deactivation."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from llm_proxy.app import EXPIRY_JOB, STORE
from tests.fakes import FakeClock, Gateway, bearer


async def _v1_models(gateway: Gateway, token: str) -> tuple[int, str | None]:
    response = await gateway.client.get("/v1/models", headers={"Authorization": f"Bearer {token}"})
    body = await response.json()
    return response.status, body.get("error", {}).get("code") if isinstance(body, dict) else None


async def _refresh(gateway: Gateway, token_id: str, grace_seconds: int = 600) -> tuple[int, dict[str, Any]]:
    response = await gateway.client.post(f"/manage/tokens/{token_id}/refresh", json={"grace_seconds": grace_seconds},
                                         headers=gateway.auth)
    return response.status, await response.json()


# ---- the successor, and the old token with and without grace ----

async def test_refresh_without_grace_retires_the_old_token_at_once(gateway: Gateway) -> None:
    old = await gateway.token(max_requests=7)
    new = await gateway.manage("POST", f"/tokens/{old['id']}/refresh", {}, expect=201)

    assert new["project_id"] == old["project_id"] and new["max_requests"] == 7
    assert new["token"] != old["token"]
    old_after = await gateway.manage("GET", f"/tokens/{old['id']}", expect=200)
    assert old_after["replaced_by"] == new["id"]
    old_call = await gateway.client.get("/v1/models", headers={"Authorization": f"Bearer {old['token']}"})
    new_call = await gateway.client.get("/v1/models", headers={"Authorization": f"Bearer {new['token']}"})
    assert (old_call.status, new_call.status) == (401, 200)


async def test_refresh_with_grace_keeps_both_working(gateway: Gateway) -> None:
    old = await gateway.token()
    new = await gateway.manage("POST", f"/tokens/{old['id']}/refresh", {"grace_seconds": 600}, expect=201)
    for secret in (old["token"], new["token"]):
        response = await gateway.client.get("/v1/models", headers={"Authorization": f"Bearer {secret}"})
        assert response.status == 200


# ---- after the grace: refreshed away is token_revoked, in memory and after a restart ----

async def test_a_token_refreshed_with_grace_is_token_revoked_once_the_grace_ends(make_gateway: Any) -> None:
    clock = FakeClock()
    first = await make_gateway(clock=clock)
    old = await first.token(duration_minutes=600)
    plain = await first.token(duration_minutes=1)  # never refreshed: it simply expires
    new = await first.manage("POST", f"/tokens/{old['id']}/refresh", {"grace_seconds": 30}, expect=201)
    assert (await _v1_models(first, old["token"]))[0] == 200  # cached, within its grace

    clock.advance(61)
    assert await _v1_models(first, old["token"]) == (401, "token_revoked")
    assert await _v1_models(first, plain["token"]) == (401, "token_expired")
    assert (await _v1_models(first, new["token"]))[0] == 200
    await first.client.close()

    # A restarted gateway loads each token from the database: the same answers.
    second = await make_gateway(clock=clock)
    assert await _v1_models(second, old["token"]) == (401, "token_revoked")
    assert await _v1_models(second, plain["token"]) == (401, "token_expired")
    assert (await _v1_models(second, new["token"]))[0] == 200


async def test_a_token_first_loaded_after_its_grace_is_token_revoked(make_gateway: Any) -> None:
    """The old token never used (so never cached) before the grace ended: loaded from the database."""
    clock = FakeClock()
    gateway = await make_gateway(clock=clock)
    old = await gateway.token(duration_minutes=600)
    await gateway.manage("POST", f"/tokens/{old['id']}/refresh", {"grace_seconds": 30}, expect=201)
    clock.advance(31)
    assert await _v1_models(gateway, old["token"]) == (401, "token_revoked")


# ---- a refreshed token cannot be refreshed again ----

@pytest.mark.parametrize("grace_seconds", [0, 600])
async def test_a_token_already_refreshed_cannot_be_refreshed_again(gateway: Gateway, grace_seconds: int) -> None:
    old = await gateway.token(max_requests=1)
    first = await gateway.manage("POST", f"/tokens/{old['id']}/refresh", {"grace_seconds": grace_seconds},
                                 expect=201)
    status, body = await _refresh(gateway, old["id"], grace_seconds)
    assert status == 409 and body["error"]["code"] == "conflict", body
    assert "token" not in body and old["token"] not in str(body) and first["token"] not in str(body)

    stored = await gateway.manage("GET", f"/tokens/{old['id']}", expect=200)
    assert stored["replaced_by"] == first["id"]
    listed = await gateway.manage("GET", f"/tokens?project_id={old['project_id']}", expect=200)
    assert sorted(t["id"] for t in listed["data"]) == sorted([old["id"], first["id"]])
    assert (await _v1_models(gateway, first["token"]))[0] == 200
    # Its successor is the one to refresh.
    await gateway.manage("POST", f"/tokens/{first['id']}/refresh", {}, expect=201)


async def test_concurrent_refreshes_of_one_token_give_exactly_one_successor(gateway: Gateway) -> None:
    for attempt in range(10):
        old = await gateway.token(max_requests=1)
        answers = await asyncio.gather(_refresh(gateway, old["id"]), _refresh(gateway, old["id"]))
        statuses = sorted(status for status, _ in answers)
        assert statuses == [201, 409], (attempt, answers)
        successor = next(body for status, body in answers if status == 201)
        stored = await gateway.manage("GET", f"/tokens/{old['id']}", expect=200)
        assert stored["replaced_by"] == successor["id"], attempt
        listed = await gateway.manage("GET", f"/tokens?project_id={old['project_id']}", expect=200)
        assert len(listed["data"]) == 2, attempt


async def test_a_refresh_that_lands_during_another_is_refused_inside_the_write(
        gateway: Gateway, monkeypatch: pytest.MonkeyPatch) -> None:
    """The second refresh passed the handler's own check before the first committed: the write refuses it."""
    old = await gateway.token(max_requests=1)
    tokens = gateway.app[STORE].tokens
    real = tokens.refresh
    calls = 0
    inner: list[tuple[int, dict[str, Any]]] = []

    async def refreshed_meanwhile(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 1:  # only the outer refresh lets another one through first
            inner.append(await _refresh(gateway, old["id"]))
        return await real(*args, **kwargs)

    monkeypatch.setattr(tokens, "refresh", refreshed_meanwhile)
    status, body = await _refresh(gateway, old["id"])
    assert (status, body["error"]["code"]) == (409, "conflict"), body
    assert calls == 2 and inner[0][0] == 201, inner
    stored = await gateway.manage("GET", f"/tokens/{old['id']}", expect=200)
    assert stored["replaced_by"] == inner[0][1]["id"]
    listed = await gateway.manage("GET", f"/tokens?project_id={old['project_id']}", expect=200)
    assert len(listed["data"]) == 2


async def test_project_deactivation_is_not_undone_by_a_concurrent_token_refresh(gateway: Gateway) -> None:
    """The race as it happens, many times over: before the fix about half of the runs failed (a read-back
    after the deactivation shared an older WAL snapshot; tests/storage/test_database.py pins that down).

    From the security review."""
    for attempt in range(60):
        project = await gateway.project(f"refresh-race-{attempt}")
        live = await gateway.token(project["id"])
        other = await gateway.token(project["id"])
        assert (await gateway.client.get("/v1/models", headers=bearer(live["token"]))).status == 200
        refresh = gateway.client.post(f"/manage/tokens/{other['id']}/refresh", json={"grace_seconds": 60},
                                      headers=gateway.auth)
        deactivate = gateway.client.patch(f"/manage/projects/{project['id']}", json={"is_active": False},
                                          headers=gateway.auth)
        refreshed, patched = await asyncio.gather(refresh, deactivate)
        assert patched.status == 200
        await refreshed.read()
        response = await gateway.client.get("/v1/models", headers=bearer(live["token"]))
        assert response.status == 403, (attempt, refreshed.status, response.status)


# ---- an expired token: decided by expires_at, not by when the expiry job last ran ----

@pytest.mark.parametrize("job_ran", [False, True])
async def test_an_expired_token_cannot_be_refreshed_before_or_after_the_expiry_job(
        make_gateway: Any, job_ran: bool) -> None:
    """Before the fix, the minute before the job ran gave a stolen expired token a fresh live successor."""
    clock = FakeClock()
    gateway = await make_gateway(clock=clock)
    token = await gateway.token(duration_minutes=1)
    clock.advance(61)
    if job_ran:
        await gateway.app[EXPIRY_JOB].run_once()

    status, body = await _refresh(gateway, token["id"], grace_seconds=0)

    assert status == 409 and body["error"]["code"] == "token_expired"
    tokens = (await gateway.manage("GET", "/tokens", expect=200))["data"]
    assert [t["id"] for t in tokens] == [token["id"]] and tokens[0]["replaced_by"] is None
    events = (await gateway.manage("GET", "/audit?action=token.refresh", expect=200))["data"]
    assert [(e["result"], e["details"]["error_code"]) for e in events] == [("failure", "token_expired")]


async def test_a_token_one_second_before_its_expiry_can_still_be_refreshed(make_gateway: Any) -> None:
    clock = FakeClock()
    gateway = await make_gateway(clock=clock)
    token = await gateway.token(duration_minutes=1)
    clock.advance(59)
    status, body = await _refresh(gateway, token["id"], grace_seconds=0)
    assert status == 201 and (await _v1_models(gateway, body["token"]))[0] == 200
