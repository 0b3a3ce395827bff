"""Attacks on a running gateway, from a security review (real HTTP, real SQLite, the fake upstream).

Each asserts what SPEC.md / README.md promise against a hostile client: request smuggling, path
tricks, forged audit lines, secrets in odd places, revocation timing, races against management
writes. The review's probes that found defects live on as tests beside the code they fixed.
"""

from __future__ import annotations

import asyncio
import re
import sqlite3
from typing import Any

import orjson
import pytest

from llm_proxy.keys import AUDIT
from tests.fakes import MANAGEMENT_TOKEN, UPSTREAM_KEY, FakeClock, Gateway


def bearer(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


async def audit_events(gateway: Gateway) -> list[dict[str, Any]]:
    await gateway.app[AUDIT].flush()
    path = gateway.settings.audit_log_file
    assert path is not None
    return [orjson.loads(line) for line in path.read_bytes().splitlines() if line]


async def audit_texts(gateway: Gateway) -> list[bytes]:
    await gateway.app[AUDIT].flush()
    path = gateway.settings.audit_log_file
    assert path is not None
    texts = [path.read_bytes()]
    with sqlite3.connect(gateway.settings.database_path) as conn:
        texts.append(orjson.dumps(conn.execute("SELECT * FROM audit_events").fetchall()))
    return texts


async def raw_exchange(gateway: Gateway, data: bytes, timeout: float = 5.0) -> bytes:
    """Send raw bytes on a fresh TCP connection to the gateway and return what comes back until close."""
    url = gateway.client.make_url("/")
    reader, writer = await asyncio.open_connection(url.host, url.port)
    try:
        writer.write(data)
        await writer.drain()
        chunks = []
        try:
            async with asyncio.timeout(timeout):
                while True:
                    chunk = await reader.read(65536)
                    if not chunk:
                        break
                    chunks.append(chunk)
        except TimeoutError:
            pass
        return b"".join(chunks)
    finally:
        writer.close()


# ---------------------------------------------------------------------------------------------
# request smuggling on /v1: ambiguous framing must be refused, never forwarded
# ---------------------------------------------------------------------------------------------

_SMUGGLE_BODY = b'{"model":"gpt-4o-mini","messages":[]}'


def _smuggle_heads(token: str) -> dict[str, bytes]:
    body = _SMUGGLE_BODY
    start = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
             "Content-Type: application/json\r\n").encode()
    smuggled = b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n"
    return {
        "duplicate_content_length": start + f"Content-Length: {len(body)}\r\nContent-Length: {len(body) + 5}"
                                            f"\r\n\r\n".encode() + body + b"XXXXX",
        "cl_and_te": start + f"Content-Length: {len(body) + len(smuggled) + 5}\r\nTransfer-Encoding: chunked"
                             f"\r\n\r\n".encode() + f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n"
                     + smuggled,
        "te_not_chunked_last": start + b"Transfer-Encoding: chunked, identity\r\n\r\n"
                               + f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n",
        "obs_fold": start + f"Content-Length: {len(body)}\r\nX-Folded: a\r\n b\r\n\r\n".encode() + body,
        "bare_cr_in_value": start + f"Content-Length: {len(body)}\r\nX-Evil: a\rX-Injected: 1\r\n\r\n".encode()
                            + body,
        "space_before_colon": start + f"Content-Length : {len(body)}\r\n\r\n".encode() + body,
    }


@pytest.mark.parametrize("case", ["duplicate_content_length", "cl_and_te", "te_not_chunked_last", "obs_fold",
                                  "bare_cr_in_value", "space_before_colon"])
async def test_ambiguous_request_framing_is_refused_and_not_forwarded(gateway: Gateway, case: str) -> None:
    token = (await gateway.token())["token"]
    answer = await raw_exchange(gateway, _smuggle_heads(token)[case], timeout=3.0)
    status_line = answer.split(b"\r\n", 1)[0]
    assert re.match(rb"HTTP/1\.[01] 4[0-9][0-9] ", status_line), (case, answer[:300])
    # nothing forwarded at all, and certainly not a second, smuggled request
    assert gateway.upstream.requests == [], (case, [(r.method, r.path_qs) for r in gateway.upstream.requests])
    assert len(re.findall(rb"HTTP/1\.[01] [0-9]{3} ", answer)) == 1, (case, answer[:600])


# ---------------------------------------------------------------------------------------------
# revocation, secrets, headers, audit integrity, limits
# ---------------------------------------------------------------------------------------------

async def test_revocation_bites_on_a_kept_alive_connection_while_a_stream_of_the_token_is_open(
        gateway: Gateway) -> None:
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


async def test_revoked_and_expired_tokens_are_refused_on_a_cold_start(make_gateway: Any) -> None:
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


async def test_a_token_in_the_query_string_reaches_neither_audit_nor_any_response(gateway: Gateway) -> None:
    token = (await gateway.token())["token"]
    response = await gateway.client.get(f"/v1/models?api_key={token}", headers=bearer(token))
    assert response.status == 200
    assert token not in str(response.headers) and token.encode() not in await response.read()
    for text in await audit_texts(gateway):
        assert token[4:].encode() not in text


async def test_the_openapi_document_holds_no_secret(gateway: Gateway) -> None:
    await gateway.token()
    response = await gateway.client.get("/manage/openapi.json", headers=gateway.auth)
    assert response.status == 200
    text = await response.read()
    from tests.fakes import ENCRYPTION_KEY
    for secret in (MANAGEMENT_TOKEN, ENCRYPTION_KEY, UPSTREAM_KEY, UPSTREAM_KEY[3:]):
        assert secret.encode() not in text


@pytest.mark.parametrize("path", ["/manage/../v1/models", "/v1/../manage/projects", "/v1/models/..;/files",
                                  "/v1/models/%2E%2E/files", "/v1/./files", "/v1/models/.%2e/files",
                                  "/v1/models%5c..%5cfiles", "/V1/models", "/v1/models/..%2F..%2Fmanage"])
async def test_path_tricks_never_reach_a_non_allowed_upstream_path(gateway: Gateway, path: str) -> None:
    token = (await gateway.token())["token"]
    answer = await raw_exchange(gateway, (f"GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
                                          "Connection: close\r\n\r\n").encode())
    for seen in gateway.upstream.requests:
        target = seen.path_qs.split("?")[0]
        assert target.startswith("/v1/models") and ".." not in target.replace("..;", ""), (path, seen.path_qs)
    assert answer.startswith(b"HTTP/1.1 "), answer[:100]


async def test_absolute_form_request_target_cannot_redirect_the_upstream(gateway: Gateway) -> None:
    token = (await gateway.token())["token"]
    await raw_exchange(gateway, (f"GET http://evil.example/v1/models HTTP/1.1\r\nHost: evil.example\r\n"
                                 f"Authorization: Bearer {token}\r\nConnection: close\r\n\r\n").encode())
    for seen in gateway.upstream.requests:
        assert "evil" not in seen.headers.get("Host", "") and "evil" not in seen.path_qs


async def test_client_host_and_odd_case_forwarding_headers_do_not_reach_the_upstream(gateway: Gateway) -> None:
    token = (await gateway.token())["token"]
    response = await gateway.client.get("/v1/models", headers={
        **bearer(token), "Host": "evil.example", "x-FORWARDED-for": "6.6.6.6", "X-Real-IP": "6.6.6.6",
        "X-Request-ID": "client-id-1", "Accept-Encoding": "gzip", "Expect": "100-continue"})
    assert response.status == 200
    seen = gateway.upstream.requests[-1].headers
    names = {name.lower() for name in seen}
    assert seen["Host"] != "evil.example"
    assert not names & {"x-forwarded-for", "x-real-ip", "x-request-id"}
    assert seen["Authorization"] == f"Bearer {UPSTREAM_KEY}" and seen["Accept-Encoding"] == "identity"


async def test_client_controlled_text_cannot_forge_audit_lines_and_the_chain_verifies(gateway: Gateway) -> None:
    from llm_proxy.audit.chain import verify_files
    token = (await gateway.token())["token"]
    forged_model = 'x"}\n{"action":"token.revoke","actor":"management","result":"success"}\r\n'
    await (await gateway.client.post("/v1/chat/completions", headers={**bearer(token), "User-Agent": 'ua","a":"b'},
                                     json={"model": forged_model, "messages": []})).read()
    await (await gateway.client.get("/v1/models/%0A%7B%22action%22%3A%22x%22%7D", headers=bearer(token))).read()
    events = await audit_events(gateway)
    assert not any(e["action"] == "token.revoke" for e in events)
    path = gateway.settings.audit_log_file
    assert path is not None
    assert verify_files([path]).ok


async def test_duplicate_json_keys_and_non_finite_numbers_are_refused_or_harmless(gateway: Gateway) -> None:
    project = await gateway.project()
    for raw in (b'{"project_id": "%s", "max_requests": NaN}', b'{"project_id": "%s", "max_requests": Infinity}',
                b'{"project_id": "%s", "max_requests": 1e400}',
                b'{"project_id": "%s", "max_requests": 99999999999999999999999}'):
        response = await gateway.client.post("/manage/tokens", data=raw % project["id"].encode(),
                                             headers=gateway.auth)
        assert response.status == 400, (raw, response.status, await response.text())
        assert (await response.json())["error"]["type"] == "invalid_request_error"
    assert (await gateway.manage("GET", "/tokens"))["data"] == []


async def test_management_rejection_is_audited_without_the_presented_secret(gateway: Gateway) -> None:
    near_miss = MANAGEMENT_TOKEN[:-1] + "Z"
    response = await gateway.client.get("/manage/projects", headers=bearer(near_miss))
    assert response.status == 401
    text = b"".join(await audit_texts(gateway))
    assert near_miss.encode() not in text and MANAGEMENT_TOKEN[2:-2].encode() not in text
    assert b"invalid_management_token" in text


async def test_concurrent_requests_never_exceed_max_requests_even_with_rate_and_global_limits(
        make_gateway: Any) -> None:
    gateway = await make_gateway(GLOBAL_RATE_LIMIT="1000")
    token = await gateway.token(max_requests=5, rate_limit_per_minute=1000)
    responses = await asyncio.gather(*(gateway.client.get("/v1/models", headers=bearer(token["token"]))
                                       for _ in range(40)))
    statuses = sorted(r.status for r in responses)
    assert statuses.count(200) == 5 and statuses.count(429) == 35
    assert len(gateway.upstream.requests) == 5
    assert (await gateway.manage("GET", f"/tokens/{token['id']}", expect=200))["request_count"] == 5


async def test_project_deactivation_is_not_undone_by_a_concurrent_token_refresh(gateway: Gateway) -> None:
    """The race as it happens, many times over: before the fix about half of the runs failed (a read-back
    after the deactivation shared an older WAL snapshot; tests/test_database.py pins that down)."""
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
