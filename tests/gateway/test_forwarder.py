"""The proxy end to end: the real openai SDK -> gateway -> fake upstream (a real aiohttp app); hostile raw requests."""

from __future__ import annotations

import asyncio
import itertools
import re
import time

import aiohttp
import openai
import orjson
import pytest

from llm_proxy.app import AUDIT
from tests.fakes import UPSTREAM_KEY, Gateway, bearer


async def _last_event(gateway: Gateway) -> dict:  # type: ignore[type-arg]
    await gateway.app[AUDIT].flush()
    path = gateway.settings.audit_log_file
    assert path is not None
    return orjson.loads(path.read_bytes().splitlines()[-1])


async def test_chat_completion_through_openai_sdk_uses_project_key(gateway: Gateway) -> None:
    token = await gateway.token()
    client = gateway.openai(token["token"])

    completion = await client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])

    assert completion.choices[0].message.content == "Hello there"
    seen = gateway.upstream.requests[-1]
    assert seen.path_qs == "/v1/chat/completions"
    assert seen.headers["Authorization"] == f"Bearer {UPSTREAM_KEY}"
    assert token["token"] not in str(seen.headers)


async def test_streamed_chat_chunks_arrive_as_upstream_sends_them(gateway: Gateway) -> None:
    gateway.upstream.chunk_delay = 0.3
    gateway.upstream.chunks = 3
    token = await gateway.token()
    client = gateway.openai(token["token"])

    arrivals: list[float] = []
    parts: list[str] = []
    stream = await client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], stream=True)
    async for chunk in stream:
        arrivals.append(time.monotonic())
        if chunk.choices and chunk.choices[0].delta.content:
            parts.append(chunk.choices[0].delta.content)

    assert parts == ["part0 ", "part1 ", "part2 "]
    # Buffering would deliver everything at once; streaming spaces the chunks by the upstream's pauses.
    gaps = [later - earlier for earlier, later in itertools.pairwise(arrivals)]
    assert sum(1 for gap in gaps if gap >= 0.2) >= 2, gaps


async def test_embeddings_and_models_through_openai_sdk(gateway: Gateway) -> None:
    token = await gateway.token()
    client = gateway.openai(token["token"])

    embedding = await client.embeddings.create(model="text-embedding-3-small", input="hello")
    models = await client.models.list()

    assert embedding.data[0].embedding == [0.1, 0.2, 0.3]
    assert [model.id async for model in models] == ["gpt-4o-mini"]


async def test_hop_by_hop_cookie_and_forwarded_headers_are_dropped_query_kept(gateway: Gateway) -> None:
    token = await gateway.token()
    response = await gateway.client.get(
        "/v1/models?limit=5&after=x", headers={
            "Authorization": f"Bearer {token['token']}", "Cookie": "session=abc", "X-Forwarded-For": "6.6.6.6",
            "X-Forwarded-Host": "evil", "Forwarded": "for=6.6.6.6", "Connection": "keep-alive, X-Custom-Hop",
            "X-Custom-Hop": "1", "Proxy-Authorization": "Basic Zm9v", "X-Keep-Me": "yes"})

    assert response.status == 200
    seen = gateway.upstream.requests[-1]
    names = {name.lower() for name in seen.headers}
    assert seen.path_qs == "/v1/models?limit=5&after=x"
    assert not names & {"cookie", "x-forwarded-for", "x-forwarded-host", "forwarded", "x-custom-hop",
                        "proxy-authorization"}
    assert seen.headers["X-Keep-Me"] == "yes"


async def test_client_chosen_openai_organization_and_project_do_not_reach_the_upstream(gateway: Gateway) -> None:
    token = await gateway.token()
    response = await gateway.client.post(
        "/v1/chat/completions", json={"model": "m", "messages": []},
        headers={"Authorization": f"Bearer {token['token']}", "OpenAI-Organization": "org-someone-else",
                 "openai-project": "proj_someone_else"})

    assert response.status == 200
    names = {name.lower() for name in gateway.upstream.requests[-1].headers}
    assert not names & {"openai-organization", "openai-project"}


async def test_upstream_cookies_and_account_ids_do_not_reach_the_client(gateway: Gateway) -> None:
    token = await gateway.token()
    response = await gateway.client.post("/v1/chat/completions", json={"model": "m", "messages": []},
                                         headers={"Authorization": f"Bearer {token['token']}"})

    assert response.status == 200
    assert "Set-Cookie" not in response.headers
    assert "openai-organization" not in response.headers
    assert response.headers["X-Upstream-Request-ID"] == "upstream-req-1"
    assert response.headers["X-Request-ID"] != "upstream-req-1"


async def test_a_json_body_under_another_label_is_still_metered_and_counts_against_the_budget(
        gateway: Gateway) -> None:
    token = await gateway.token(max_tokens_total=10)
    headers = {"Authorization": f"Bearer {token['token']}", "Content-Type": "text/plain"}
    chat = b'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}'

    statuses = []
    for _ in range(3):
        async with gateway.client.post("/v1/chat/completions", data=chat, headers=headers) as response:
            await response.read()
            statuses.append(response.status)

    # Each answer reports 7 tokens: two answers spend the budget of 10, the third is refused.
    assert statuses == [200, 200, 429]
    assert (await gateway.manage("GET", f"/tokens/{token['id']}", expect=200))["total_tokens"] == 14
    assert len(gateway.upstream.requests) == 2


@pytest.mark.parametrize("path", [
    "/v1/files", "/v1/chat/completions/../../admin", "/v1/chat/completions/%2e%2e/x", "/v1//models",
    "/v1/models%2f..%2f..%2fmanage", "/v1/fine_tuning/jobs", "/v1/chat%2fcompletions",
])
async def test_paths_outside_allowed_endpoints_are_404_and_never_forwarded(gateway: Gateway, path: str) -> None:
    token = await gateway.token()
    response = await gateway.client.get(path, headers={"Authorization": f"Bearer {token['token']}"})

    assert response.status == 404
    body = await response.json()
    assert set(body["error"]) >= {"message", "type", "code"}
    assert gateway.upstream.requests == []


@pytest.mark.parametrize("method", ["TRACE", "PUT", "PATCH", "PROPFIND"])
async def test_methods_the_openai_api_does_not_use_are_405_and_never_forwarded(gateway: Gateway, method: str) -> None:
    """An upstream that echoes TRACE (Apache's default) would hand the project's key to the token holder."""
    token = await gateway.token()

    response = await gateway.client.request(method, "/v1/models",
                                            headers={"Authorization": f"Bearer {token['token']}"})

    assert response.status == 405
    assert response.headers["Allow"] == "GET, POST, DELETE, HEAD, OPTIONS"
    assert (await response.json())["error"]["code"] == "method_not_allowed"
    assert gateway.upstream.requests == []
    event = await _last_event(gateway)
    assert (event["action"], event["result"]) == ("token.access", "denied")
    assert event["details"]["status"] == 405 and event["details"]["reason"] == "method_not_allowed"
    assert event["details"]["http_method"] == method
    listed = await gateway.manage("GET", f"/tokens/{token['id']}", expect=200)
    assert listed["request_count"] == 0  # refused before admission: no quota spent


async def test_a_405_method_without_a_token_is_still_401(gateway: Gateway) -> None:
    response = await gateway.client.request("TRACE", "/v1/models")
    assert response.status == 401
    assert gateway.upstream.requests == []


@pytest.mark.parametrize(("method", "path"), [("GET", "/v1/models"), ("POST", "/v1/embeddings"),
                                              ("DELETE", "/v1/models/ft-1"), ("HEAD", "/v1/models"),
                                              ("OPTIONS", "/v1/models")])
async def test_the_methods_the_openai_api_uses_are_forwarded(gateway: Gateway, method: str, path: str) -> None:
    token = await gateway.token()

    response = await gateway.client.request(method, path, json={"model": "m", "input": "x"} if method == "POST"
                                            else None, headers={"Authorization": f"Bearer {token['token']}"})

    assert response.status == 200
    assert [(seen.method, seen.path_qs) for seen in gateway.upstream.requests] == [(method, path)]


async def test_upstream_errors_pass_through_unchanged(gateway: Gateway) -> None:
    gateway.upstream.status = 429
    gateway.upstream.status_headers = {"Retry-After": "7", "x-ratelimit-remaining-requests": "0"}
    token = await gateway.token()

    response = await gateway.client.post("/v1/chat/completions", json={"model": "m", "messages": []},
                                         headers={"Authorization": f"Bearer {token['token']}"})

    assert response.status == 429
    assert response.headers["Retry-After"] == "7"
    assert response.headers["x-ratelimit-remaining-requests"] == "0"
    assert (await response.json())["error"]["code"] == "upstream_code"


@pytest.mark.parametrize("upstream_status", [401, 403])
@pytest.mark.parametrize("stream", [False, True])
async def test_the_upstream_refusing_the_project_key_is_502_without_any_of_the_key(
        gateway: Gateway, caplog: pytest.LogCaptureFixture, upstream_status: int, stream: bool) -> None:
    """OpenAI's 401 quotes the key's last characters; the client must see neither them nor an auth error."""
    gateway.upstream.status = upstream_status
    gateway.upstream.status_message = "Incorrect API key provided: sk-upstr****cdef. You can find your API key at …"
    project = await gateway.project()
    token = await gateway.token(project["id"])

    with pytest.raises(openai.APIStatusError) as caught:
        await gateway.openai(token["token"]).chat.completions.create(model="m", messages=[], stream=stream)

    assert not isinstance(caught.value, openai.AuthenticationError | openai.PermissionDeniedError)
    assert caught.value.status_code == 502
    assert caught.value.response.headers["x-should-retry"] == "false"
    error = caught.value.response.json()["error"]
    assert error["code"] == "upstream_auth_failed" and f"upstream status {upstream_status}" in error["message"]
    assert "cdef" not in caught.value.response.text and "sk-" not in caught.value.response.text
    assert len(gateway.upstream.requests) == 1  # sent once: the SDK was told not to retry
    event = await _last_event(gateway)
    assert (event["action"], event["result"], event["project_id"]) == ("token.access", "error", project["id"])
    assert event["details"]["reason"] == "upstream_auth_failed"
    assert event["details"]["upstream_status"] == upstream_status and event["details"]["status"] == 502
    refused = [record.getMessage() for record in caplog.records if "refused the API key" in record.getMessage()]
    assert len(refused) == 1 and project["id"] in refused[0]


async def test_a_refused_project_key_is_logged_once_a_minute_not_per_request(
        gateway: Gateway, caplog: pytest.LogCaptureFixture) -> None:
    gateway.upstream.status = 401
    token = await gateway.token()
    for _ in range(3):
        response = await gateway.client.post("/v1/chat/completions", json={"model": "m", "messages": []},
                                             headers={"Authorization": f"Bearer {token['token']}"})
        assert response.status == 502
    assert sum("refused the API key" in record.getMessage() for record in caplog.records) == 1


async def test_upstream_5xx_reaches_sdk_as_api_error(gateway: Gateway) -> None:
    gateway.upstream.status = 503
    token = await gateway.token()

    with pytest.raises(openai.InternalServerError) as caught:
        await gateway.openai(token["token"]).chat.completions.create(model="m", messages=[])
    assert caught.value.status_code == 503


async def test_unreachable_upstream_is_502(make_gateway) -> None:  # type: ignore[no-untyped-def]
    gateway = await make_gateway(upstream_url="http://127.0.0.1:1")
    token = await gateway.token()

    response = await gateway.client.get("/v1/models", headers={"Authorization": f"Bearer {token['token']}"})

    assert response.status == 502
    assert (await response.json())["error"]["code"] == "upstream_unavailable"


async def test_silent_upstream_is_504_after_request_timeout(make_gateway) -> None:  # type: ignore[no-untyped-def]
    gateway = await make_gateway(REQUEST_TIMEOUT="300ms")
    gateway.upstream.hang = True
    token = await gateway.token()

    response = await gateway.client.post("/v1/chat/completions", json={"model": "m", "messages": []},
                                         headers={"Authorization": f"Bearer {token['token']}"})

    assert response.status == 504
    assert (await response.json())["error"]["code"] == "upstream_timeout"


async def test_client_disconnect_mid_stream_closes_upstream_request(gateway: Gateway) -> None:
    gateway.upstream.chunk_delay = 0.2
    gateway.upstream.chunks = 50
    token = await gateway.token()

    async with aiohttp.ClientSession() as session:
        response = await session.post(gateway.client.make_url("/v1/chat/completions"),
                                      json={"model": "m", "messages": [], "stream": True},
                                      headers={"Authorization": f"Bearer {token['token']}"})
        await response.content.readline()
        response.close()  # drop the connection while the upstream is still streaming

    # 50 chunks at 0.2 s would take 10 s; the upstream sees its client go away within about one chunk.
    await asyncio.wait_for(gateway.upstream.stream_closed.wait(), timeout=2)


async def test_upstream_reset_mid_stream_ends_client_stream_and_gateway_stays_healthy(gateway: Gateway) -> None:
    gateway.upstream.chunks = 5
    gateway.upstream.break_after_chunks = 2
    token = await gateway.token()

    with pytest.raises(openai.APIError):
        stream = await gateway.openai(token["token"]).chat.completions.create(model="m", messages=[], stream=True)
        async for _ in stream:
            pass

    assert (await gateway.client.get("/health")).status == 200


async def test_request_id_is_echoed_or_generated(gateway: Gateway) -> None:
    sane = await gateway.client.get("/health", headers={"X-Request-ID": "abc-123.X_y"})
    insane = await gateway.client.get("/health", headers={"X-Request-ID": "bad id\u00e9<script>"})
    missing = await gateway.client.get("/nope")

    assert sane.headers["X-Request-ID"] == "abc-123.X_y"
    assert insane.headers["X-Request-ID"] != "bad id\u00e9<script>"
    assert len(missing.headers["X-Request-ID"]) == 32


# ---- hostile requests: ambiguous framing, path tricks, client-chosen forwarding headers ----

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
    """From the security review."""
    token = (await gateway.token())["token"]
    answer = await raw_exchange(gateway, _smuggle_heads(token)[case], timeout=3.0)
    status_line = answer.split(b"\r\n", 1)[0]
    assert re.match(rb"HTTP/1\.[01] 4[0-9][0-9] ", status_line), (case, answer[:300])
    # nothing forwarded at all, and certainly not a second, smuggled request
    assert gateway.upstream.requests == [], (case, [(r.method, r.path_qs) for r in gateway.upstream.requests])
    assert len(re.findall(rb"HTTP/1\.[01] [0-9]{3} ", answer)) == 1, (case, answer[:600])


@pytest.mark.parametrize("path", ["/manage/../v1/models", "/v1/../manage/projects", "/v1/models/..;/files",
                                  "/v1/models/%2E%2E/files", "/v1/./files", "/v1/models/.%2e/files",
                                  "/v1/models%5c..%5cfiles", "/V1/models", "/v1/models/..%2F..%2Fmanage"])
async def test_path_tricks_never_reach_a_non_allowed_upstream_path(gateway: Gateway, path: str) -> None:
    """From the security review."""
    token = (await gateway.token())["token"]
    answer = await raw_exchange(gateway, (f"GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
                                          "Connection: close\r\n\r\n").encode())
    for seen in gateway.upstream.requests:
        target = seen.path_qs.split("?")[0]
        assert target.startswith("/v1/models") and ".." not in target.replace("..;", ""), (path, seen.path_qs)
    assert answer.startswith(b"HTTP/1.1 "), answer[:100]


async def test_absolute_form_request_target_cannot_redirect_the_upstream(gateway: Gateway) -> None:
    """From the security review."""
    token = (await gateway.token())["token"]
    await raw_exchange(gateway, (f"GET http://evil.example/v1/models HTTP/1.1\r\nHost: evil.example\r\n"
                                 f"Authorization: Bearer {token}\r\nConnection: close\r\n\r\n").encode())
    for seen in gateway.upstream.requests:
        assert "evil" not in seen.headers.get("Host", "") and "evil" not in seen.path_qs


async def test_client_host_and_odd_case_forwarding_headers_do_not_reach_the_upstream(gateway: Gateway) -> None:
    """From the security review."""
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
