"""The management API through real HTTP: projects, tokens, strict validation, secrets never stored or shown."""

from __future__ import annotations

import re
from typing import Any

import pytest

from llm_proxy import repository as repo
from llm_proxy.credentials import hash_token
from tests.fakes import (
    ENCRYPTION_KEY,
    MANAGEMENT_TOKEN,
    UPSTREAM_KEY,
    Gateway,
    read_all_bytes,
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


async def test_request_count_is_live_in_token_resource(gateway: Gateway) -> None:
    token = await gateway.token()
    for _ in range(3):
        response = await gateway.client.get("/v1/models", headers={"Authorization": f"Bearer {token['token']}"})
        assert response.status == 200
    fetched = await gateway.manage("GET", f"/tokens/{token['id']}", expect=200)
    assert fetched["request_count"] == 3 and fetched["last_used_at"] is not None


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


async def test_token_for_inactive_project_is_403_and_unknown_project_404(gateway: Gateway) -> None:
    project = await gateway.project()
    await gateway.manage("PATCH", f"/projects/{project['id']}", {"is_active": False}, expect=200)

    inactive = await gateway.manage("POST", "/tokens", {"project_id": project["id"]}, expect=403)
    unknown = await gateway.manage("POST", "/tokens", {"project_id": "missing"}, expect=404)
    assert inactive["error"]["code"] == "project_inactive"
    assert unknown["error"]["code"] == "not_found"


BAD_BODIES: list[tuple[str, str, Any, str | None]] = [
    ("POST", "/projects", b"{not json", None),
    ("POST", "/projects", [], None),
    ("POST", "/projects", {"name": "x"}, "api_key"),
    ("POST", "/projects", {"name": "", "api_key": "sk-1"}, "name"),
    ("POST", "/projects", {"name": "   ", "api_key": "sk-1"}, "name"),
    ("POST", "/projects", {"name": 5, "api_key": "sk-1"}, "name"),
    ("POST", "/projects", {"name": "x", "api_key": "sk-1", "owner": "me"}, "owner"),
    ("POST", "/projects", {"name": "x" * 201, "api_key": "sk-1"}, "name"),
    ("POST", "/projects", {"name": "x\u0000y", "api_key": "sk-1"}, "name"),
    # An upstream key becomes a header value: no way to smuggle in another header.
    ("POST", "/projects", {"name": "x", "api_key": "sk-1\r\nX-Injected: 1"}, "api_key"),
    ("POST", "/tokens", {}, "project_id"),
    ("POST", "/tokens", {"project_id": "{pid}", "duration_minutes": 0}, "duration_minutes"),
    ("POST", "/tokens", {"project_id": "{pid}", "duration_minutes": -5}, "duration_minutes"),
    ("POST", "/tokens", {"project_id": "{pid}", "duration_minutes": 43201}, "duration_minutes"),
    ("POST", "/tokens", {"project_id": "{pid}", "duration_minutes": "60"}, "duration_minutes"),
    ("POST", "/tokens", {"project_id": "{pid}", "duration_minutes": 1.5}, "duration_minutes"),
    ("POST", "/tokens", {"project_id": "{pid}", "duration_minutes": True}, "duration_minutes"),
    ("POST", "/tokens", {"project_id": "{pid}", "max_requests": -1}, "max_requests"),
    ("POST", "/tokens", {"project_id": "{pid}", "rate_limit_per_minute": "fast"}, "rate_limit_per_minute"),
    ("PATCH", "/projects/{pid}", {}, None),
    ("PATCH", "/projects/{pid}", {"is_active": "false"}, "is_active"),
    ("PATCH", "/projects/{pid}", {"is_active": 0}, "is_active"),
    ("PATCH", "/projects/{pid}", {"id": "other"}, "id"),
    ("PATCH", "/tokens/{tid}", {"project_id": "other"}, "project_id"),
    ("PATCH", "/tokens/{tid}", {"max_requests": 1000.5}, "max_requests"),
    ("POST", "/tokens/{tid}/refresh", {"grace_seconds": -1}, "grace_seconds"),
    ("POST", "/tokens/{tid}/refresh", {"grace_seconds": 10**9}, "grace_seconds"),
    ("GET", "/projects?active=maybe", None, "active"),
]


@pytest.mark.parametrize(("method", "path", "body", "field"), BAD_BODIES)
async def test_bad_input_is_400_naming_the_field_and_changes_nothing(
        gateway: Gateway, method: str, path: str, body: Any, field: str | None) -> None:
    token = await gateway.token()
    path = path.replace("{pid}", token["project_id"]).replace("{tid}", token["id"])
    before = (await gateway.manage("GET", "/projects"), await gateway.manage("GET", "/tokens"))

    kwargs: dict[str, Any] = {"data": body} if isinstance(body, bytes) else {"json": body}
    response = await gateway.client.request(method, "/manage" + path, headers=gateway.auth, **kwargs)

    assert response.status == 400
    error = (await response.json())["error"]
    assert error["type"] == "invalid_request_error"
    if field is not None:
        assert error.get("param") == field and field in error["message"]
    assert (await gateway.manage("GET", "/projects"), await gateway.manage("GET", "/tokens")) == before


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

    name = "create_token" if write == "create" else "refresh_token"
    real = getattr(repo, name)

    async def deactivated_meanwhile(*args: Any, **kwargs: Any) -> Any:
        await gateway.manage("PATCH", f"/projects/{project['id']}", {"is_active": False}, expect=200)
        return await real(*args, **kwargs)

    monkeypatch.setattr(repo, name, deactivated_meanwhile)
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
    real = repo.create_token

    async def rotated_meanwhile(*args: Any, **kwargs: Any) -> Any:
        await gateway.manage("PATCH", f"/projects/{project['id']}", {"api_key": new_key}, expect=200)
        return await real(*args, **kwargs)

    monkeypatch.setattr(repo, "create_token", rotated_meanwhile)
    new = await gateway.manage("POST", "/tokens", {"project_id": project["id"]}, expect=201)

    for token in (live["token"], new["token"]):
        gateway.upstream.requests.clear()
        assert (await _v1_models(gateway, token))[0] == 200
        assert [r.headers["Authorization"] for r in gateway.upstream.requests] == [f"Bearer {new_key}"]


# ---- a body over MAX_REQUEST_SIZE: the gateway's 413, audited as invalid input ----

@pytest.mark.parametrize("framing", ["content_length", "chunked"])
async def test_an_oversized_management_body_is_413_request_too_large_and_audited_as_failure(
        make_gateway: Any, framing: str) -> None:
    gateway = await make_gateway(MAX_REQUEST_SIZE="1KB")
    api_key = "sk-" + "k" * 4000
    document = b'{"name": "big", "api_key": "%s"}' % api_key.encode()

    async def chunks() -> Any:
        for start in range(0, len(document), 512):
            yield document[start:start + 512]

    headers = {**gateway.auth, "Content-Type": "application/json"}
    response = await gateway.client.post("/manage/projects", headers=headers,
                                         data=document if framing == "content_length" else chunks())
    assert response.status == 413
    error = (await response.json())["error"]
    assert (error["type"], error["code"]) == ("invalid_request_error", "request_too_large")
    assert (await gateway.manage("GET", "/projects", expect=200))["data"] == []

    events = (await gateway.manage("GET", "/audit?action=project.create", expect=200))["data"]
    assert [(e["result"], e["details"]["status"], e["details"]["error_code"]) for e in events] == [
        ("failure", 413, "request_too_large")]
    assert api_key[3:40] not in str(events)


@pytest.mark.parametrize("raw", [b'{"name": "a", "name": "b", "api_key": "sk-0123456789abcdef0123"}',
                                 b'{"name": "a", "api_key": "sk-0123456789abcdef0123", "api_key": "sk-x"}'])
async def test_a_key_given_twice_is_refused(gateway: Gateway, raw: bytes) -> None:
    """Parsers disagree on which of two repeated keys wins; a proxy in front may read the other one."""
    response = await gateway.client.post("/manage/projects", data=raw,
                                         headers={**gateway.auth, "Content-Type": "application/json"})
    body = await response.json()
    assert response.status == 400 and body["error"]["param"] in ("name", "api_key")
    assert "more than once" in body["error"]["message"]
    assert (await gateway.manage("GET", "/projects", expect=200))["data"] == []


@pytest.mark.parametrize("depth", [1000, 1023])
async def test_a_body_nested_too_deeply_is_400_not_a_500(
        gateway: Gateway, caplog: pytest.LogCaptureFixture, depth: int) -> None:
    """orjson reads 1,000 levels; the repeated-key check (the standard library) recursed past Python's limit."""
    raw = b'{"name": "deep", "api_key": "sk-0123456789abcdef0123", "x": ' + b"[" * depth + b"]" * depth + b"}"
    response = await gateway.client.post("/manage/projects", data=raw,
                                         headers={**gateway.auth, "Content-Type": "application/json"})
    assert response.status == 400
    assert (await response.json())["error"]["message"] == "request body is nested too deeply"
    assert not [record for record in caplog.records if record.levelname in ("ERROR", "CRITICAL")]
    assert (await gateway.manage("GET", "/projects", expect=200))["data"] == []


@pytest.mark.parametrize("name", ["ops\u009b2Jteam", "ops\x85team", "ops\x9fteam", "ops\u202eteam", "ops\u2066team",
                                  "ops\u200fteam", "ops\u2028team", "ops\x1b[31mteam"])
async def test_control_characters_and_bidi_overrides_in_a_name_are_refused(gateway: Gateway, name: str) -> None:
    """U+009B is the 8-bit CSI: accepted, it made the CLI's table print a terminal escape."""
    response = await gateway.client.post("/manage/projects", json={"name": name, "api_key": "sk-" + "k" * 20},
                                         headers=gateway.auth)
    error = (await response.json())["error"]
    assert response.status == 400 and error["param"] == "name" and "control characters" in error["message"]
    project = await gateway.project("ops")
    response = await gateway.client.patch(f"/manage/projects/{project['id']}", json={"name": name},
                                          headers=gateway.auth)
    assert response.status == 400 and (await response.json())["error"]["param"] == "name"
    assert [p["name"] for p in (await gateway.manage("GET", "/projects", expect=200))["data"]] == ["ops"]


async def test_names_in_any_script_with_marks_and_emoji_are_kept(gateway: Gateway) -> None:
    for name in ("Zoë ✓ 漢字", "عربي", "עברית", "नमस्ते", "👩‍💻 team"):  # RTL scripts need no override
        assert (await gateway.project(name))["name"] == name
