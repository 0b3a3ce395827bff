"""Strict validation of management requests through real HTTP: every bad body or query is a 400 naming
its field (or a 413), and changes nothing."""

from __future__ import annotations

from typing import Any

import pytest

from tests.fakes import Gateway, assert_error, assert_security, send

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


# ---- every field at and past its bounds ----

async def test_project_body_validation(gateway: Any) -> None:
    """From the fifth review (the management API's contract)."""
    bad = [
        ({}, "name"), ({"name": "a"}, "api_key"), ({"api_key": "sk-x"}, "name"),
        ({"name": "", "api_key": "sk-x"}, "name"), ({"name": "   ", "api_key": "sk-x"}, "name"),
        ({"name": 1, "api_key": "sk-x"}, "name"), ({"name": None, "api_key": "sk-x"}, "name"),
        ({"name": ["a"], "api_key": "sk-x"}, "name"), ({"name": "a", "api_key": 5}, "api_key"),
        ({"name": "a" * 201, "api_key": "sk-x"}, "name"), ({"name": "a\nb", "api_key": "sk-x"}, "name"),
        ({"name": "a\x00b", "api_key": "sk-x"}, "name"), ({"name": "a", "api_key": "k" * 4097}, "api_key"),
        ({"name": "a", "api_key": "sk-x", "extra": 1}, "extra"), ({"name": "a", "api_key": "sk-x", "is_active": False},
                                                                  "is_active"),
    ]
    for body, param in bad:
        status, doc, headers = await send(gateway, "POST", "/manage/projects", body=body)
        assert status == 400, (body if len(str(body)) < 100 else param, status, doc)
        assert_error(doc, "invalid_request", param)
        assert_security(headers, management=True)
    for raw in (b"{", b"[]", b'"x"', b"null", b"1", b"\xff\xfe"):
        status, doc, _ = await send(gateway, "POST", "/manage/projects", raw=raw)
        assert status == 400, (raw, status, doc)
        assert_error(doc, "invalid_request")
    listed = await gateway.manage("GET", "/projects", expect=200)
    assert listed["data"] == []


async def test_project_name_boundaries_and_uniqueness(gateway: Any) -> None:
    """From the fifth review (the management API's contract)."""
    ok = await gateway.project("a" * 200)
    assert ok["name"] == "a" * 200
    emoji = await gateway.project("\U0001F600" * 200)
    assert emoji["name"] == "\U0001F600" * 200
    first = await gateway.project("demo")
    status, doc, _ = await send(gateway, "POST", "/manage/projects", body={"name": " demo\t", "api_key": "sk-x"})
    assert status == 409, (status, doc)
    assert_error(doc, "conflict")
    # rename onto an existing name: 409 and nothing changed
    other = await gateway.project("other")
    status, doc, _ = await send(gateway, "PATCH", f"/manage/projects/{other['id']}", body={"name": "demo "})
    assert status == 409, (status, doc)
    assert (await gateway.manage("GET", f"/projects/{other['id']}", expect=200))["name"] == "other"
    # rename to its own name is fine
    status, doc, _ = await send(gateway, "PATCH", f"/manage/projects/{first['id']}", body={"name": "demo"})
    assert status == 200, (status, doc)


async def test_project_patch_validation_order(gateway: Any) -> None:
    """From the fifth review (the management API's contract)."""
    project = await gateway.project()
    for body, param in (({"is_active": 0}, "is_active"), ({"is_active": "false"}, "is_active"),
                        ({"is_active": None}, "is_active"), ({"name": None}, "name"), ({"id": "x"}, "id"),
                        ({"created_at": "x"}, "created_at")):
        status, doc, _ = await send(gateway, "PATCH", f"/manage/projects/{project['id']}", body=body)
        assert status == 400, (body, status, doc)
        assert_error(doc, "invalid_request", param)
    status, doc, _ = await send(gateway, "PATCH", f"/manage/projects/{project['id']}", body={})
    assert status == 400, (status, doc)
    assert (await gateway.manage("GET", f"/projects/{project['id']}", expect=200)) == project


async def test_token_create_numeric_boundaries(gateway: Any) -> None:
    """From the fifth review (the management API's contract)."""
    project = await gateway.project()
    pid = project["id"]
    max_duration = gateway.settings.max_token_duration_minutes
    for field, value in (("duration_minutes", 1), ("duration_minutes", max_duration), ("duration_minutes", 60.0),
                         ("max_requests", 0), ("max_requests", 2**53), ("max_requests", None),
                         ("rate_limit_per_minute", 0), ("max_tokens_total", 0), ("max_tokens_total", 5.0)):
        status, doc, _ = await send(gateway, "POST", "/manage/tokens", body={"project_id": pid, field: value})
        assert status == 201, (field, value, status, doc)
        if field != "duration_minutes" and value is not None:
            assert doc[field] == int(value) and type(doc[field]) is int, doc
    for field, value in (("duration_minutes", 0), ("duration_minutes", -1), ("duration_minutes", max_duration + 1),
                         ("duration_minutes", 1.5), ("duration_minutes", "60"), ("duration_minutes", True),
                         ("duration_minutes", None), ("duration_minutes", 1e300),
                         ("max_requests", -1), ("max_requests", 2**53 + 1), ("max_requests", 0.5),
                         ("max_requests", False), ("max_requests", "1"), ("rate_limit_per_minute", -5),
                         ("max_tokens_total", [1]), ("max_tokens_total", {"a": 1}), ("project_id", 5),
                         ("project_id", ""), ("project_id", "x" * 65), ("token", "tok-abc"), ("is_active", True)):
        status, doc, _ = await send(gateway, "POST", "/manage/tokens", body={"project_id": pid, field: value})
        assert status == 400, (field, value, status, doc)
        assert_error(doc, "invalid_request", field)
    status, doc, _ = await send(gateway, "POST", "/manage/tokens", body={})
    assert status == 400 and doc["error"].get("param") == "project_id", doc
    status, doc, _ = await send(gateway, "POST", "/manage/tokens", body={"project_id": "nope"})
    assert status == 404, (status, doc)
    await gateway.manage("PATCH", f"/projects/{pid}", {"is_active": False}, expect=200)
    status, doc, _ = await send(gateway, "POST", "/manage/tokens", body={"project_id": pid})
    assert status == 403, (status, doc)
    assert_error(doc, "project_inactive")


async def test_token_patch_and_refresh_boundaries(gateway: Any) -> None:
    """From the fifth review (the management API's contract)."""
    token = await gateway.token()
    tid = token["id"]
    for body, param in (({"max_requests": -1}, "max_requests"),
                        ({"rate_limit_per_minute": 1.5}, "rate_limit_per_minute"),
                        ({"is_active": 1}, "is_active"), ({"expires_at": "2030-01-01T00:00:00Z"}, "expires_at"),
                        ({"project_id": "x"}, "project_id"), ({"duration_minutes": 5}, "duration_minutes")):
        status, doc, _ = await send(gateway, "PATCH", f"/manage/tokens/{tid}", body=body)
        assert status == 400, (body, status, doc)
        assert_error(doc, "invalid_request", param)
    status, doc, _ = await send(gateway, "PATCH", f"/manage/tokens/{tid}", body={})
    assert status == 400
    status, doc, _ = await send(gateway, "PATCH", f"/manage/tokens/{tid}", body={"max_requests": None,
                                                                                 "rate_limit_per_minute": 0})
    assert status == 200 and doc["max_requests"] is None and doc["rate_limit_per_minute"] == 0, doc
    for body, param in (({"grace_seconds": 86401}, "grace_seconds"), ({"grace_seconds": -1}, "grace_seconds"),
                        ({"grace_seconds": 1.5}, "grace_seconds"), ({"grace_seconds": None}, "grace_seconds"),
                        ({"duration_minutes": 0}, "duration_minutes"), ({"max_requests": 1}, "max_requests")):
        status, doc, _ = await send(gateway, "POST", f"/manage/tokens/{tid}/refresh", body=body)
        assert status == 400, (body, status, doc)
        assert_error(doc, "invalid_request", param)
    status, doc, _ = await send(gateway, "POST", f"/manage/tokens/{tid}/refresh", body={"grace_seconds": 86400.0})
    assert status == 201, (status, doc)


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


# ---- JSON that parsers read differently ----

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


async def test_duplicate_json_keys_and_non_finite_numbers_are_refused_or_harmless(gateway: Gateway) -> None:
    """From the security review."""
    project = await gateway.project()
    for raw in (b'{"project_id": "%s", "max_requests": NaN}', b'{"project_id": "%s", "max_requests": Infinity}',
                b'{"project_id": "%s", "max_requests": 1e400}',
                b'{"project_id": "%s", "max_requests": 99999999999999999999999}'):
        response = await gateway.client.post("/manage/tokens", data=raw % project["id"].encode(),
                                             headers=gateway.auth)
        assert response.status == 400, (raw, response.status, await response.text())
        assert (await response.json())["error"]["type"] == "invalid_request_error"
    assert (await gateway.manage("GET", "/tokens"))["data"] == []


# ---- names ----

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
