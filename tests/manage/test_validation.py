"""Strict validation of management requests through real HTTP: every bad body or query is a 400 naming
its field (or a 413), and changes nothing."""

from __future__ import annotations

from typing import Any

import pytest

from tests.fakes import Gateway

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
