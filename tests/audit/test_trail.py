"""The audit trail end to end: which request writes which event, the query API, and no secret anywhere."""

from __future__ import annotations

import asyncio
import logging
import secrets
import sqlite3
from pathlib import Path
from typing import Any

import orjson
import pytest

from llm_proxy.app import AUDIT
from llm_proxy.audit.masking import obfuscate
from llm_proxy.audit.verify import verify_files
from tests.fakes import (
    ENCRYPTION_KEY,
    MANAGEMENT_TOKEN,
    UPSTREAM_KEY,
    Gateway,
    assert_error,
    bearer,
    read_all_bytes,
    send,
)

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}


async def _events(gateway: Gateway) -> list[dict[str, Any]]:
    await gateway.app[AUDIT].flush()
    path = gateway.settings.audit_log_file
    assert path is not None
    return [orjson.loads(line) for line in path.read_bytes().splitlines() if line]


async def _last(gateway: Gateway) -> dict[str, Any]:
    return (await _events(gateway))[-1]


# (action, actor, result, how to produce it) — one row per action the HTTP API emits.
async def _project_create(g: Gateway, ctx: dict[str, Any]) -> None:
    ctx["project"] = await g.project("audited")


async def _project_create_bad(g: Gateway, ctx: dict[str, Any]) -> None:
    await g.manage("POST", "/projects", {"name": ""}, expect=400)


async def _project_read(g: Gateway, ctx: dict[str, Any]) -> None:
    await g.manage("GET", f"/projects/{ctx['project']['id']}", expect=200)


async def _project_list(g: Gateway, ctx: dict[str, Any]) -> None:
    await g.manage("GET", "/projects", expect=200)


async def _project_update(g: Gateway, ctx: dict[str, Any]) -> None:
    await g.manage("PATCH", f"/projects/{ctx['project']['id']}", {"name": "renamed"}, expect=200)


async def _project_delete(g: Gateway, ctx: dict[str, Any]) -> None:
    await g.manage("DELETE", f"/projects/{ctx['project']['id']}", expect=405)


async def _token_create(g: Gateway, ctx: dict[str, Any]) -> None:
    ctx["token"] = await g.token(ctx["project"]["id"], rate_limit_per_minute=1)


async def _token_read(g: Gateway, ctx: dict[str, Any]) -> None:
    await g.manage("GET", f"/tokens/{ctx['token']['id']}", expect=200)


async def _token_list(g: Gateway, ctx: dict[str, Any]) -> None:
    await g.manage("GET", "/tokens", expect=200)


async def _token_update(g: Gateway, ctx: dict[str, Any]) -> None:
    await g.manage("PATCH", f"/tokens/{ctx['token']['id']}", {"max_requests": 100}, expect=200)


async def _token_access(g: Gateway, ctx: dict[str, Any]) -> None:
    response = await g.client.post("/v1/chat/completions", json={"model": "gpt-4o-mini", "messages": []},
                                   headers={"Authorization": f"Bearer {ctx['token']['token']}",
                                            "User-Agent": "audit-test/1.0"})
    assert response.status == 200


async def _token_access_limited(g: Gateway, ctx: dict[str, Any]) -> None:
    response = await g.client.get("/v1/models", headers={"Authorization": f"Bearer {ctx['token']['token']}"})
    assert response.status == 429


async def _token_refresh(g: Gateway, ctx: dict[str, Any]) -> None:
    ctx["token"] = await g.manage("POST", f"/tokens/{ctx['token']['id']}/refresh", {}, expect=201)


async def _token_revoke(g: Gateway, ctx: dict[str, Any]) -> None:
    await g.manage("DELETE", f"/tokens/{ctx['token']['id']}", expect=204)


async def _token_validate_denied(g: Gateway, ctx: dict[str, Any]) -> None:
    response = await g.client.get("/v1/models", headers={"Authorization": f"Bearer {ctx['token']['token']}"})
    assert response.status == 401


async def _revoke_batch(g: Gateway, ctx: dict[str, Any]) -> None:
    await g.manage("POST", f"/projects/{ctx['project']['id']}/tokens/revoke", expect=200)


async def _auth_failure_client(g: Gateway, ctx: dict[str, Any]) -> None:
    response = await g.client.get("/v1/models", headers={"Authorization": "Bearer tok-" + "Q" * 43})
    assert response.status == 401


async def _auth_failure_management(g: Gateway, ctx: dict[str, Any]) -> None:
    response = await g.client.get("/manage/projects", headers={"Authorization": "Bearer not-the-management-token"})
    assert response.status == 401


async def _audit_list(g: Gateway, ctx: dict[str, Any]) -> None:
    await g.manage("GET", "/audit?limit=5", expect=200)


SCENARIO = [
    ("project.create", "management", "success", _project_create),
    ("project.create", "management", "failure", _project_create_bad),
    ("project.read", "management", "success", _project_read),
    ("project.list", "management", "success", _project_list),
    ("project.update", "management", "success", _project_update),
    ("project.delete", "management", "denied", _project_delete),
    ("token.create", "management", "success", _token_create),
    ("token.read", "management", "success", _token_read),
    ("token.list", "management", "success", _token_list),
    ("token.update", "management", "success", _token_update),
    ("token.access", "client", "success", _token_access),
    ("token.access", "client", "denied", _token_access_limited),
    ("token.refresh", "management", "success", _token_refresh),
    ("token.revoke", "management", "success", _token_revoke),
    ("token.validate", "client", "denied", _token_validate_denied),
    ("token.revoke_batch", "management", "success", _revoke_batch),
    ("auth.failure", "client", "failure", _auth_failure_client),
    ("auth.failure", "management", "failure", _auth_failure_management),
    ("audit.list", "management", "success", _audit_list),
]


async def test_each_request_writes_its_audit_event(gateway: Gateway) -> None:
    ctx: dict[str, Any] = {}
    for action, actor, result, produce in SCENARIO:
        await produce(gateway, ctx)
        event = await _last(gateway)
        assert (event["action"], event["actor"], event["result"]) == (action, actor, result), produce.__name__
        assert event["timestamp"].endswith("Z") and event["client_ip"] == "127.0.0.1"
        assert event["request_id"]


async def test_token_access_event_details(gateway: Gateway) -> None:
    ctx: dict[str, Any] = {}
    await _project_create(gateway, ctx)
    await _token_create(gateway, ctx)
    await _token_access(gateway, ctx)

    event = await _last(gateway)
    details = event["details"]
    assert event["project_id"] == ctx["project"]["id"]
    assert details["status"] == 200 and details["model"] == "gpt-4o-mini"
    assert details["http_method"] == "POST" and details["endpoint"] == "/v1/chat/completions"
    assert details["user_agent"] == "audit-test/1.0" and details["duration_ms"] >= 0
    assert details["token_id"] == ctx["token"]["token_hint"]
    assert list(event)[-2:] == ["seq", "hash"]


async def test_file_and_table_hold_the_same_events(gateway: Gateway) -> None:
    ctx: dict[str, Any] = {}
    for _, _, _, produce in SCENARIO[:8]:
        await produce(gateway, ctx)
    file_events = await _events(gateway)

    listed = await gateway.manage("GET", "/audit?limit=1000", expect=200)
    table_events = list(reversed(listed["data"]))

    assert table_events[: len(file_events)] == file_events


async def test_the_audit_query_sees_events_the_writer_has_not_written_yet(gateway: Gateway) -> None:
    """GET /manage/audit writes what is queued first: an event from just before the query is in its answer."""
    project = await gateway.project()
    await gateway.manage("GET", f"/projects/{project['id']}", expect=200)  # audited as project.read, queued

    listed = await gateway.manage("GET", "/audit?action=project.read", expect=200)

    assert [event["project_id"] for event in listed["data"]] == [project["id"]]


async def test_audit_query_filters_and_paginates(gateway: Gateway) -> None:
    project = await gateway.project()
    for _ in range(5):
        await gateway.manage("GET", f"/projects/{project['id']}", expect=200)
    await gateway.app[AUDIT].flush()

    page1 = await gateway.manage("GET", "/audit?action=project.read&limit=2", expect=200)
    page2 = await gateway.manage("GET", f"/audit?action=project.read&limit=2&before={page1['next_before']}",
                                 expect=200)
    page3 = await gateway.manage("GET", f"/audit?action=project.read&limit=2&before={page2['next_before']}",
                                 expect=200)

    seqs = [e["seq"] for page in (page1, page2, page3) for e in page["data"]]
    assert len(seqs) == 5 and seqs == sorted(seqs, reverse=True)
    assert page3["next_before"] is None
    by_project = await gateway.manage("GET", f"/audit?project_id={project['id']}&result=success", expect=200)
    assert {e["action"] for e in by_project["data"]} == {"project.create", "project.read"}
    future = await gateway.manage("GET", "/audit?since=2999-01-01", expect=200)
    assert future["data"] == []


@pytest.mark.parametrize("query", ["limit=0", "limit=abc", "limit=100000", "since=yesterday", "before=-1",
                                   "colour=red"])
async def test_audit_query_rejects_bad_parameters(gateway: Gateway, query: str) -> None:
    body = await gateway.manage("GET", f"/audit?{query}", expect=400)
    assert body["error"]["param"] == query.split("=")[0]


async def test_audit_pagination_and_bounds(gateway: Any) -> None:
    """From the fifth review (the management API's contract)."""
    for index in range(7):
        await gateway.project(f"p{index}")
    seen: list[int] = []
    before = None
    for _ in range(20):
        query = "?limit=3&action=project.create" + (f"&before={before}" if before else "")
        status, doc, _ = await send(gateway, "GET", "/manage/audit" + query)
        assert status == 200, doc
        seen.extend(event["seq"] for event in doc["data"])
        before = doc["next_before"]
        if before is None:
            break
    assert len(seen) == 7 and seen == sorted(seen, reverse=True) and len(set(seen)) == 7, seen
    for query, param in (("limit=0", "limit"), ("limit=1001", "limit"), ("limit=-1", "limit"), ("limit=1.5", "limit"),
                         ("limit=abc", "limit"), ("before=0", "before"), ("before=-3", "before"),
                         ("since=2024-13-01", "since"), ("until=2024-02-30", "until"), ("since=2024-1-1", "since"),
                         ("since=2024-01-01T00:00:00", "since"), ("since=2024-01-01T24:00:00Z", "since"),
                         ("bogus=1", "bogus")):
        status, doc, _ = await send(gateway, "GET", f"/manage/audit?{query}")
        assert status == 400, (query, status, doc)
        assert_error(doc, "invalid_request", param)
    status, doc, _ = await send(gateway, "GET", "/manage/audit?limit=1000")
    assert status == 200
    status, doc, _ = await send(gateway, "GET", "/manage/audit?since=2999-01-01")
    assert status == 200 and doc["data"] == [] and doc["next_before"] is None


async def test_no_secret_reaches_the_audit_file_or_table(gateway: Gateway) -> None:
    ctx: dict[str, Any] = {}
    for _, _, _, produce in SCENARIO:
        await produce(gateway, ctx)
    bogus = "tok-" + "S" * 43
    await gateway.client.get("/v1/models", headers={"Authorization": f"Bearer {bogus}"})
    await gateway.client.post("/v1/chat/completions", headers={"Authorization": f"Bearer {bogus}"},
                              json={"model": "m", "messages": [{"role": "user", "content": "BODY-SECRET-42"}]})
    await gateway.app[AUDIT].flush()

    audit_file = gateway.settings.audit_log_file
    assert audit_file is not None
    texts = [audit_file.read_bytes()]
    with sqlite3.connect(gateway.settings.database_path) as conn:
        texts.append(orjson.dumps(conn.execute("SELECT * FROM audit_events").fetchall()))
    texts.append(read_all_bytes(gateway.settings.database_path))
    for text in texts:
        for secret in (ctx["token"]["token"], ctx["token"]["token"][4:], bogus, bogus[4:], UPSTREAM_KEY,
                       MANAGEMENT_TOKEN, ENCRYPTION_KEY, "BODY-SECRET-42"):
            assert secret.encode() not in text


async def _audit_texts(gateway: Gateway) -> list[bytes]:
    await gateway.app[AUDIT].flush()
    audit_file = gateway.settings.audit_log_file
    assert audit_file is not None
    with sqlite3.connect(gateway.settings.database_path) as conn:
        rows = conn.execute("SELECT * FROM audit_events").fetchall()
    return [audit_file.read_bytes(), orjson.dumps(rows)]


@pytest.mark.parametrize("where", ["path", "user_agent", "request_id", "model", "management_path"])
async def test_a_secret_in_a_field_the_client_chose_is_masked_in_the_audit(gateway: Gateway, where: str) -> None:
    """Client-chosen text (path, User-Agent, X-Request-ID, model name, a management URL's id) goes
    into events; a token put there, by mistake or on purpose, is stored obfuscated only."""
    token = (await gateway.token())["token"]
    headers = {"Authorization": f"Bearer {token}"}
    if where == "path":
        response = await gateway.client.get(f"/v1/models/{token}", headers=headers)
    elif where == "user_agent":
        response = await gateway.client.get("/v1/models", headers={**headers, "User-Agent": f"app/1.0 key={token}"})
    elif where == "request_id":
        response = await gateway.client.get("/v1/models", headers={**headers, "X-Request-ID": token})
    elif where == "model":
        response = await gateway.client.post("/v1/chat/completions", headers=headers,
                                             json={"model": token, "messages": []})
    else:
        response = await gateway.client.get(f"/manage/projects/{token}", headers=gateway.auth)
    await response.read()

    texts = await _audit_texts(gateway)
    for text in texts:
        assert token.encode() not in text and token[4:].encode() not in text
    assert obfuscate(token).encode() in texts[0]  # masked, not dropped: the event still says where


async def test_request_id_carrying_a_long_random_secret_is_masked_in_audit(make_gateway: Any, tmp_path: Path) -> None:
    """From the review of the day's fixes."""
    gateway = await make_gateway()
    token = (await gateway.token())["token"]
    # What `llm-proxy gen-secret` makes (a management token): a long random base64url run, a sane X-Request-ID.
    secret = secrets.token_urlsafe(32)
    while not (any(c.isupper() for c in secret) and any(c.islower() for c in secret)
               and any(c.isdigit() for c in secret)):
        secret = secrets.token_urlsafe(32)
    response = await gateway.client.get("/v1/models", headers={"Authorization": f"Bearer {token}",
                                                               "X-Request-ID": secret})
    assert response.status == 200
    await _events(gateway)  # flushes the writer
    text = (tmp_path / "audit.log").read_text()
    assert secret not in text, "a long random run given as X-Request-ID is stored verbatim in the audit file"


async def test_request_id_carrying_the_management_token_is_masked_in_audit(make_gateway: Any, tmp_path: Path) -> None:
    """From the review of the day's fixes."""
    gateway = await make_gateway()
    response = await gateway.client.get("/manage/projects", headers={**gateway.auth, "X-Request-ID": MANAGEMENT_TOKEN})
    assert response.status == 200
    await _events(gateway)
    text = (tmp_path / "audit.log").read_text()
    assert MANAGEMENT_TOKEN not in text, "the management token, sent as X-Request-ID, is stored in the audit file"


async def test_a_token_in_the_query_string_reaches_neither_audit_nor_any_response(gateway: Gateway) -> None:
    """From the security review."""
    token = (await gateway.token())["token"]
    response = await gateway.client.get(f"/v1/models?api_key={token}", headers=bearer(token))
    assert response.status == 200
    assert token not in str(response.headers) and token.encode() not in await response.read()
    for text in await _audit_texts(gateway):
        assert token[4:].encode() not in text


async def test_management_rejection_is_audited_without_the_presented_secret(gateway: Gateway) -> None:
    """From the security review."""
    near_miss = MANAGEMENT_TOKEN[:-1] + "Z"
    response = await gateway.client.get("/manage/projects", headers=bearer(near_miss))
    assert response.status == 401
    text = b"".join(await _audit_texts(gateway))
    assert near_miss.encode() not in text and MANAGEMENT_TOKEN[2:-2].encode() not in text
    assert b"invalid_management_token" in text


async def test_gateway_made_identifiers_are_stored_exactly(gateway: Gateway) -> None:
    """Masking client text must not touch what the gateway wrote itself: token hints, UUIDs, request ids."""
    token = await gateway.token()
    await gateway.client.get("/v1/models", headers={"Authorization": f"Bearer {token['token']}"})
    events = await _events(gateway)
    access = events[-1]
    assert access["details"]["token_id"] == obfuscate(token["token"])
    assert access["project_id"] == token["project_id"]
    assert len(access["request_id"]) == 32 and "*" not in access["request_id"]
    created = next(event for event in events if event["action"] == "token.create")
    assert created["details"]["token_id"] == obfuscate(token["token"])


async def test_an_undecodable_user_agent_keeps_the_rest_of_its_event(gateway: Gateway) -> None:
    """A byte that is not UTF-8 in a header must not let a client wipe its own event's details."""
    token = await gateway.token()
    url = gateway.client.make_url("/")
    reader, writer = await asyncio.open_connection(url.host, url.port)
    try:
        writer.write(f"GET /v1/models HTTP/1.1\r\nHost: gateway\r\nAuthorization: Bearer {token['token']}\r\n"
                     "Connection: close\r\n".encode() + b"User-Agent: evil\xff\xfe\r\n\r\n")
        answer = await reader.read()
    finally:
        writer.close()
    assert answer.startswith(b"HTTP/1.1 200")

    access = (await _events(gateway))[-1]
    assert access["action"] == "token.access" and access["result"] == "success"
    details = access["details"]
    assert (details["status"], details["endpoint"], details["token_id"]) == (200, "/v1/models",
                                                                             obfuscate(token["token"]))
    assert details["user_agent"].startswith("evil")
    assert verify_files([gateway.settings.audit_log_file]).ok  # type: ignore[list-item]


async def test_client_controlled_text_cannot_forge_audit_lines_and_the_chain_verifies(gateway: Gateway) -> None:
    """From the security review."""
    from llm_proxy.audit.verify import verify_files
    token = (await gateway.token())["token"]
    forged_model = 'x"}\n{"action":"token.revoke","actor":"management","result":"success"}\r\n'
    await (await gateway.client.post("/v1/chat/completions", headers={**bearer(token), "User-Agent": 'ua","a":"b'},
                                     json={"model": forged_model, "messages": []})).read()
    await (await gateway.client.get("/v1/models/%0A%7B%22action%22%3A%22x%22%7D", headers=bearer(token))).read()
    events = await _events(gateway)
    assert not any(e["action"] == "token.revoke" for e in events)
    path = gateway.settings.audit_log_file
    assert path is not None
    assert verify_files([path]).ok


# ---- the audit file cannot be written ----

async def test_audit_file_on_a_full_disk_keeps_requests_and_events_in_the_database(
        make_gateway: Any, caplog: pytest.LogCaptureFixture) -> None:
    """AUDIT_LOG_FILE=/dev/full (ENOSPC): requests 200, one loud error, the file-errors metric, events in the table."""
    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full")
    gateway = await make_gateway(AUDIT_LOG_FILE="/dev/full")
    token = await gateway.token()

    for _ in range(3):
        async with gateway.client.post("/v1/chat/completions", json=CHAT, headers=bearer(token)) as response:
            assert response.status == 200
    await gateway.app[AUDIT].flush()

    errors = [r for r in caplog.records if r.name == "llm_proxy.audit.writer" and r.levelno >= logging.ERROR]
    assert errors and "No space left on device" in errors[0].getMessage()
    async with gateway.client.get("/metrics", headers={"Authorization": f"Bearer {MANAGEMENT_TOKEN}"}) as metrics:
        text = await metrics.text()
    samples = dict(line.rsplit(" ", 1) for line in text.splitlines() if line and not line.startswith("#"))
    assert float(samples["llm_proxy_audit_file_errors_total"]) >= 5  # project, token, three requests
    listed = await gateway.manage("GET", "/audit?action=token.access", expect=200)
    assert [event["result"] for event in listed["data"]] == ["success"] * 3
