"""The management API through real HTTP: projects and tokens, their routes and lists, secrets never stored or shown."""

from __future__ import annotations

import re
from typing import Any

import pytest

from llm_proxy.app import STORE
from llm_proxy.tokens.credentials import hash_token
from tests.fakes import (
    ENCRYPTION_KEY,
    MANAGEMENT_TOKEN,
    UPSTREAM_KEY,
    Gateway,
    assert_error,
    assert_security,
    read_all_bytes,
    send,
)


async def test_project_lifecycle(gateway: Gateway) -> None:
    created = await gateway.project("alpha")
    assert created["name"] == "alpha" and created["is_active"] is True
    assert created["api_key"] == "sk-upst****cdef"

    assert await gateway.manage("GET", f"/projects/{created['id']}", expect=200) == created
    listed = await gateway.manage("GET", "/projects", expect=200)
    assert [p["id"] for p in listed["data"]] == [created["id"]]

    updated = await gateway.manage("PATCH", f"/projects/{created['id']}",
                                   {"name": "beta", "is_active": False, "api_key": "sk-new-key-000000000000"},
                                   expect=200)
    assert (updated["name"], updated["is_active"], updated["api_key"]) == ("beta", False, "sk-new-****0000")
    assert (await gateway.manage("GET", "/projects?active=true", expect=200))["data"] == []
    assert len((await gateway.manage("GET", "/projects?active=false", expect=200))["data"]) == 1


async def test_delete_project_is_405_with_allow(gateway: Gateway) -> None:
    project = await gateway.project()
    response = await gateway.client.delete(f"/manage/projects/{project['id']}", headers=gateway.auth)

    assert response.status == 405
    assert response.headers["Allow"] == "GET, PATCH"
    assert (await response.json())["error"]["code"] == "method_not_allowed"


async def test_duplicate_project_name_is_409(gateway: Gateway) -> None:
    await gateway.project("same")
    body = await gateway.manage("POST", "/projects", {"name": "same", "api_key": "sk-x"}, expect=409)
    assert body["error"]["code"] == "conflict"


async def test_unknown_ids_are_404(gateway: Gateway) -> None:
    for method, path in [("GET", "/projects/nope"), ("PATCH", "/projects/nope"), ("GET", "/tokens/nope"),
                         ("PATCH", "/tokens/nope"), ("DELETE", "/tokens/nope"), ("POST", "/tokens/nope/refresh"),
                         ("POST", "/projects/nope/tokens/revoke")]:
        body = {"is_active": False} if method == "PATCH" else None
        result = await gateway.manage(method, path, body, expect=404)
        assert result["error"]["code"] == "not_found"


async def test_token_lifecycle(gateway: Gateway) -> None:
    project = await gateway.project()
    created = await gateway.token(project["id"], duration_minutes=30, max_requests=10, rate_limit_per_minute=5,
                                  max_tokens_total=1000)
    plaintext = created.pop("token")
    assert re.fullmatch(r"tok-[A-Za-z0-9_-]{43}", plaintext)
    assert created["token_hint"] == f"tok-{plaintext[4:8]}****{plaintext[-4:]}"
    assert (created["max_requests"], created["rate_limit_per_minute"], created["max_tokens_total"]) == (10, 5, 1000)

    fetched = await gateway.manage("GET", f"/tokens/{created['id']}", expect=200)
    assert "token" not in fetched and fetched["id"] == created["id"]
    listed = await gateway.manage("GET", f"/tokens?project_id={project['id']}", expect=200)
    assert [t["id"] for t in listed["data"]] == [created["id"]]

    patched = await gateway.manage("PATCH", f"/tokens/{created['id']}", {"max_requests": None}, expect=200)
    assert patched["max_requests"] is None

    await gateway.manage("DELETE", f"/tokens/{created['id']}", expect=204)
    await gateway.manage("DELETE", f"/tokens/{created['id']}", expect=204)  # idempotent
    revoked = await gateway.manage("GET", f"/tokens/{created['id']}", expect=200)
    assert revoked["is_active"] is False and revoked["revoked_at"] is not None
    assert (await gateway.manage("GET", "/tokens?active_only=true", expect=200))["data"] == []
    conflict = await gateway.manage("PATCH", f"/tokens/{created['id']}", {"is_active": True}, expect=409)
    assert conflict["error"]["param"] == "is_active"


async def test_token_duration_is_honoured_exactly(gateway: Any) -> None:
    """From the fifth review (the management API's contract)."""
    from datetime import datetime
    project = await gateway.project()
    doc = await gateway.token(project["id"], duration_minutes=1)
    created = datetime.strptime(doc["created_at"], "%Y-%m-%dT%H:%M:%SZ")
    expires = datetime.strptime(doc["expires_at"], "%Y-%m-%dT%H:%M:%SZ")
    assert 59 <= (expires - created).total_seconds() <= 61, doc


async def test_request_count_is_live_in_token_resource(gateway: Gateway) -> None:
    token = await gateway.token()
    for _ in range(3):
        response = await gateway.client.get("/v1/models", headers={"Authorization": f"Bearer {token['token']}"})
        assert response.status == 200
    fetched = await gateway.manage("GET", f"/tokens/{token['id']}", expect=200)
    assert fetched["request_count"] == 3 and fetched["last_used_at"] is not None


async def test_token_for_inactive_project_is_403_and_unknown_project_404(gateway: Gateway) -> None:
    project = await gateway.project()
    await gateway.manage("PATCH", f"/projects/{project['id']}", {"is_active": False}, expect=200)

    inactive = await gateway.manage("POST", "/tokens", {"project_id": project["id"]}, expect=403)
    unknown = await gateway.manage("POST", "/tokens", {"project_id": "missing"}, expect=404)
    assert inactive["error"]["code"] == "project_inactive"
    assert unknown["error"]["code"] == "not_found"


# ---- methods and routes: OpenAI-shaped errors, with their headers ----

async def test_wrong_methods_on_management_routes_are_openai_shaped_405(gateway: Any) -> None:
    """From the fifth review (the management API's contract)."""
    project = await gateway.project()
    token = await gateway.token(project["id"])
    cases = [("PUT", "/manage/projects"), ("DELETE", "/manage/projects"), ("PUT", f"/manage/projects/{project['id']}"),
             ("POST", f"/manage/projects/{project['id']}"), ("GET", f"/manage/projects/{project['id']}/tokens/revoke"),
             ("POST", f"/manage/projects/{project['id']}/usage"), ("PUT", "/manage/tokens"),
             ("PUT", f"/manage/tokens/{token['id']}"), ("GET", f"/manage/tokens/{token['id']}/refresh"),
             ("POST", "/manage/audit"), ("POST", "/manage/openapi.json"), ("DELETE", "/manage/audit")]
    for method, path in cases:
        status, doc, headers = await send(gateway, method, path)
        assert status == 405, (method, path, status, doc)
        assert_error(doc, "method_not_allowed")
        assert headers.get("Allow"), (method, path)
        assert_security(headers, management=True)


async def test_unauthenticated_wrong_method_is_401_not_405(gateway: Any) -> None:
    """From the fifth review (the management API's contract)."""
    status, doc, headers = await send(gateway, "PUT", "/manage/projects", auth=False)
    assert status == 401, (status, doc)
    assert_error(doc, "invalid_management_token")
    assert_security(headers, management=True)


async def test_unknown_management_paths_404_with_headers(gateway: Any) -> None:
    """From the fifth review (the management API's contract)."""
    for path in ("/manage", "/manage/", "/manage/nope", "/manage/projects/x/y/z", "/manage/tokens/a/b"):
        status, doc, headers = await send(gateway, "GET", path)
        assert status == 404, (path, status, doc)
        assert_error(doc)
        assert_security(headers, management=True)


async def test_non_uuid_ids_are_404(gateway: Any) -> None:
    """From the fifth review (the management API's contract)."""
    for ident in ("abc", "0", "-1", "%C3%A9", "x" * 3000, "%20", "..%2F..", "'%20OR%201=1"):
        for path in (f"/manage/projects/{ident}", f"/manage/tokens/{ident}", f"/manage/projects/{ident}/usage"):
            status, doc, _headers = await send(gateway, "GET", path)
            assert status == 404, (path[:80], status, doc)
            assert_error(doc, "not_found")
        status, doc, _ = await send(gateway, "DELETE", f"/manage/tokens/{ident}")
        assert status == 404, (ident[:40], status, doc)
        status, doc, _ = await send(gateway, "POST", f"/manage/projects/{ident}/tokens/revoke")
        assert status == 404, (ident[:40], status, doc)
        status, doc, _ = await send(gateway, "POST", f"/manage/tokens/{ident}/refresh", body={})
        assert status == 404, (ident[:40], status, doc)
        status, doc, _ = await send(gateway, "PATCH", f"/manage/tokens/{ident}", body={"is_active": False})
        assert status == 404, (ident[:40], status, doc)
        status, doc, _ = await send(gateway, "PATCH", f"/manage/projects/{ident}", body={"is_active": False})
        assert status == 404, (ident[:40], status, doc)


async def test_delete_project_405_even_unknown_and_allow(gateway: Any) -> None:
    """From the fifth review (the management API's contract)."""
    status, doc, headers = await send(gateway, "DELETE", "/manage/projects/does-not-exist")
    assert status == 405 and headers["Allow"] == "GET, PATCH"
    assert_error(doc, "method_not_allowed")


async def test_head_on_management_get_routes(gateway: Any) -> None:
    """From the fifth review (the management API's contract)."""
    status, _, headers = await send(gateway, "HEAD", "/manage/projects")
    assert status in (200, 405), status
    if status == 405:
        assert "HEAD" not in headers.get("Allow", "")
    assert_security(headers, management=True)



# ---- lists: filters and order ----

async def test_list_filters(gateway: Any) -> None:
    """From the fifth review (the management API's contract)."""
    active = await gateway.project("act")
    inactive = await gateway.project("inact")
    await gateway.manage("PATCH", f"/projects/{inactive['id']}", {"is_active": False}, expect=200)
    for value, expected in (("true", [active["id"]]), ("TRUE", [active["id"]]), ("1", [active["id"]]),
                            ("false", [inactive["id"]]), ("0", [inactive["id"]]),
                            ("", [active["id"], inactive["id"]])):
        status, doc, _ = await send(gateway, "GET", f"/manage/projects?active={value}")
        assert status == 200 and sorted(p["id"] for p in doc["data"]) == sorted(expected), (value, doc)
    for value in ("yes", "2", "tru", "%20true"):
        status, doc, _ = await send(gateway, "GET", f"/manage/projects?active={value}")
        assert status == 400, (value, status, doc)
        assert_error(doc, "invalid_request", "active")
    t1 = await gateway.token(active["id"])
    t2 = await gateway.token(active["id"])
    await gateway.manage("DELETE", f"/tokens/{t2['id']}", expect=204)
    status, doc, _ = await send(gateway, "GET", f"/manage/tokens?project_id={active['id']}&active_only=true")
    assert status == 200 and [t["id"] for t in doc["data"]] == [t1["id"]], doc
    status, doc, _ = await send(gateway, "GET", f"/manage/tokens?project_id={active['id']}")
    assert sorted(t["id"] for t in doc["data"]) == sorted([t1["id"], t2["id"]])  # order: see the ordering probe
    assert all("token" not in t for t in doc["data"])
    status, doc, _ = await send(gateway, "GET", "/manage/tokens?project_id=unknown")
    assert status == 200 and doc["data"] == []
    for query in ("active_only=maybe", "expired=x"):
        status, doc, _ = await send(gateway, "GET", f"/manage/tokens?{query}")
        assert status == 400, (query, status, doc)
    status, doc, _ = await send(gateway, "GET", "/manage/tokens?expired=false")
    assert status == 200 and len(doc["data"]) == 2


async def test_lists_are_oldest_first_in_creation_order(gateway: Any) -> None:
    """From the fifth review (the management API's contract)."""
    created = [(await gateway.project(f"order-{index}"))["id"] for index in range(12)]
    listed = await gateway.manage("GET", "/projects", expect=200)
    assert [p["id"] for p in listed["data"]] == created
    pid = created[0]
    tokens = [(await gateway.token(pid))["id"] for _ in range(12)]
    listed = await gateway.manage("GET", f"/tokens?project_id={pid}", expect=200)
    assert [t["id"] for t in listed["data"]] == tokens



# ---- secrets at rest and in answers ----

async def test_database_holds_neither_plaintext_token_nor_upstream_key(gateway: Gateway) -> None:
    token = await gateway.token()
    await gateway.manage("POST", f"/tokens/{token['id']}/refresh", {"grace_seconds": 5}, expect=201)
    response = await gateway.client.get("/v1/models", headers={"Authorization": f"Bearer {token['token']}"})
    assert response.status == 200
    await gateway.client.close()  # flush counters and checkpoint

    stored = read_all_bytes(gateway.settings.database_path)
    assert stored, "database file is empty"
    for secret in (token["token"], token["token"][4:], UPSTREAM_KEY, UPSTREAM_KEY[3:], MANAGEMENT_TOKEN,
                   ENCRYPTION_KEY):
        assert secret.encode() not in stored
    assert hash_token(token["token"]).encode() in stored
    assert b"enc:v1:" in stored


async def test_management_responses_never_include_secrets(gateway: Gateway) -> None:
    token = await gateway.token()
    bodies = [await gateway.manage("GET", "/projects"), await gateway.manage("GET", "/tokens"),
              await gateway.manage("GET", f"/tokens/{token['id']}"),
              await gateway.manage("GET", f"/projects/{token['project_id']}")]
    text = repr(bodies)
    assert token["token"] not in text and UPSTREAM_KEY not in text and MANAGEMENT_TOKEN not in text


async def test_database_files_are_owner_only(gateway: Gateway) -> None:
    await gateway.project()
    for suffix in ("", "-wal"):
        path = gateway.settings.database_path.with_name(gateway.settings.database_path.name + suffix)
        assert path.stat().st_mode & 0o077 == 0, path


# ---- a project write that lands while a token write is in flight ----

async def _v1_models(gateway: Gateway, token: str) -> tuple[int, str | None]:
    response = await gateway.client.get("/v1/models", headers={"Authorization": f"Bearer {token}"})
    body = await response.json()
    return response.status, body.get("error", {}).get("code") if isinstance(body, dict) else None


@pytest.mark.parametrize("write", ["create", "refresh"])
async def test_a_project_deactivated_during_a_token_write_stays_inactive(
        gateway: Gateway, monkeypatch: pytest.MonkeyPatch, write: str) -> None:
    """The token write read its project (active) before the deactivation committed; caching the new
    token must not bring that stale row back: every token of the project is refused at once."""
    project = await gateway.project()
    live = await gateway.token(project["id"])
    other = await gateway.token(project["id"])
    assert (await _v1_models(gateway, live["token"]))[0] == 200  # its project's state is cached

    tokens = gateway.app[STORE].tokens
    name = "create" if write == "create" else "refresh"
    real = getattr(tokens, name)

    async def deactivated_meanwhile(*args: Any, **kwargs: Any) -> Any:
        await gateway.manage("PATCH", f"/projects/{project['id']}", {"is_active": False}, expect=200)
        return await real(*args, **kwargs)

    monkeypatch.setattr(tokens, name, deactivated_meanwhile)
    if write == "create":
        new = await gateway.manage("POST", "/tokens", {"project_id": project["id"]}, expect=201)
    else:
        new = await gateway.manage("POST", f"/tokens/{other['id']}/refresh", {"grace_seconds": 60}, expect=201)

    for token in (live["token"], new["token"]):
        assert await _v1_models(gateway, token) == (403, "project_inactive")


async def test_an_upstream_key_changed_during_a_token_create_is_the_key_used(
        gateway: Gateway, monkeypatch: pytest.MonkeyPatch) -> None:
    project = await gateway.project()
    live = await gateway.token(project["id"])
    assert (await _v1_models(gateway, live["token"]))[0] == 200
    new_key = "sk-rotated-" + "k" * 32
    tokens = gateway.app[STORE].tokens
    real = tokens.create

    async def rotated_meanwhile(*args: Any, **kwargs: Any) -> Any:
        await gateway.manage("PATCH", f"/projects/{project['id']}", {"api_key": new_key}, expect=200)
        return await real(*args, **kwargs)

    monkeypatch.setattr(tokens, "create", rotated_meanwhile)
    new = await gateway.manage("POST", "/tokens", {"project_id": project["id"]}, expect=201)

    for token in (live["token"], new["token"]):
        gateway.upstream.requests.clear()
        assert (await _v1_models(gateway, token))[0] == 200
        assert [r.headers["Authorization"] for r in gateway.upstream.requests] == [f"Bearer {new_key}"]
