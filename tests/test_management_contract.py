"""The management API's contract, from the fifth review: wrong methods, bodies and boundaries, list
order and filters, usage dates, the OpenAPI document against real answers, security headers on every
kind of response, and CORS for allowed and refused origins."""

from __future__ import annotations

from typing import Any

import orjson

from tests.fakes import MANAGEMENT_TOKEN

AUTH = {"Authorization": f"Bearer {MANAGEMENT_TOKEN}"}
ORIGIN = "https://app.example.com"


async def call(gw: Any, method: str, path: str, *, body: Any = None, raw: bytes | None = None,
               headers: dict[str, str] | None = None, auth: bool = True) -> tuple[int, Any, Any]:
    hdrs = dict(AUTH) if auth else {}
    hdrs.update(headers or {})
    data = raw if raw is not None else (orjson.dumps(body) if body is not None else None)
    if data is not None:
        hdrs.setdefault("Content-Type", "application/json")
    response = await gw.client.request(method, path, data=data, headers=hdrs)
    text = await response.read()
    try:
        doc = orjson.loads(text) if text else None
    except orjson.JSONDecodeError:
        doc = text
    return response.status, doc, response.headers


def assert_error(doc: Any, code: str | None = None, param: str | None = None) -> None:
    assert isinstance(doc, dict) and set(doc) == {"error"}, doc
    assert {"message", "type", "code"} <= set(doc["error"]), doc
    if code is not None:
        assert doc["error"]["code"] == code, doc
    if param is not None:
        assert doc["error"].get("param") == param, doc


def assert_security(headers: Any, management: bool) -> None:
    assert headers.get("X-Content-Type-Options") == "nosniff", dict(headers)
    assert "Server" not in headers, dict(headers)
    assert headers.get("X-Request-ID"), dict(headers)
    if management:
        assert headers.get("Cache-Control") == "no-store", dict(headers)
        assert headers.get("X-Frame-Options") == "DENY", dict(headers)
        assert headers.get("Referrer-Policy") == "no-referrer", dict(headers)


# ---------------------------------------------------------------- methods and routing

async def test_wrong_methods_on_management_routes_are_openai_shaped_405(gateway: Any) -> None:
    project = await gateway.project()
    token = await gateway.token(project["id"])
    cases = [("PUT", "/manage/projects"), ("DELETE", "/manage/projects"), ("PUT", f"/manage/projects/{project['id']}"),
             ("POST", f"/manage/projects/{project['id']}"), ("GET", f"/manage/projects/{project['id']}/tokens/revoke"),
             ("POST", f"/manage/projects/{project['id']}/usage"), ("PUT", "/manage/tokens"),
             ("PUT", f"/manage/tokens/{token['id']}"), ("GET", f"/manage/tokens/{token['id']}/refresh"),
             ("POST", "/manage/audit"), ("POST", "/manage/openapi.json"), ("DELETE", "/manage/audit")]
    for method, path in cases:
        status, doc, headers = await call(gateway, method, path)
        assert status == 405, (method, path, status, doc)
        assert_error(doc, "method_not_allowed")
        assert headers.get("Allow"), (method, path)
        assert_security(headers, management=True)


async def test_unauthenticated_wrong_method_is_401_not_405(gateway: Any) -> None:
    status, doc, headers = await call(gateway, "PUT", "/manage/projects", auth=False)
    assert status == 401, (status, doc)
    assert_error(doc, "invalid_management_token")
    assert_security(headers, management=True)


async def test_unknown_management_paths_404_with_headers(gateway: Any) -> None:
    for path in ("/manage", "/manage/", "/manage/nope", "/manage/projects/x/y/z", "/manage/tokens/a/b"):
        status, doc, headers = await call(gateway, "GET", path)
        assert status == 404, (path, status, doc)
        assert_error(doc)
        assert_security(headers, management=True)


async def test_non_uuid_ids_are_404(gateway: Any) -> None:
    for ident in ("abc", "0", "-1", "%C3%A9", "x" * 3000, "%20", "..%2F..", "'%20OR%201=1"):
        for path in (f"/manage/projects/{ident}", f"/manage/tokens/{ident}", f"/manage/projects/{ident}/usage"):
            status, doc, _headers = await call(gateway, "GET", path)
            assert status == 404, (path[:80], status, doc)
            assert_error(doc, "not_found")
        status, doc, _ = await call(gateway, "DELETE", f"/manage/tokens/{ident}")
        assert status == 404, (ident[:40], status, doc)
        status, doc, _ = await call(gateway, "POST", f"/manage/projects/{ident}/tokens/revoke")
        assert status == 404, (ident[:40], status, doc)
        status, doc, _ = await call(gateway, "POST", f"/manage/tokens/{ident}/refresh", body={})
        assert status == 404, (ident[:40], status, doc)
        status, doc, _ = await call(gateway, "PATCH", f"/manage/tokens/{ident}", body={"is_active": False})
        assert status == 404, (ident[:40], status, doc)
        status, doc, _ = await call(gateway, "PATCH", f"/manage/projects/{ident}", body={"is_active": False})
        assert status == 404, (ident[:40], status, doc)


async def test_delete_project_405_even_unknown_and_allow(gateway: Any) -> None:
    status, doc, headers = await call(gateway, "DELETE", "/manage/projects/does-not-exist")
    assert status == 405 and headers["Allow"] == "GET, PATCH"
    assert_error(doc, "method_not_allowed")


# ---------------------------------------------------------------- body validation

async def test_project_body_validation(gateway: Any) -> None:
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
        status, doc, headers = await call(gateway, "POST", "/manage/projects", body=body)
        assert status == 400, (body if len(str(body)) < 100 else param, status, doc)
        assert_error(doc, "invalid_request", param)
        assert_security(headers, management=True)
    for raw in (b"{", b"[]", b'"x"', b"null", b"1", b"\xff\xfe"):
        status, doc, _ = await call(gateway, "POST", "/manage/projects", raw=raw)
        assert status == 400, (raw, status, doc)
        assert_error(doc, "invalid_request")
    listed = await gateway.manage("GET", "/projects", expect=200)
    assert listed["data"] == []


async def test_project_name_boundaries_and_uniqueness(gateway: Any) -> None:
    ok = await gateway.project("a" * 200)
    assert ok["name"] == "a" * 200
    emoji = await gateway.project("\U0001F600" * 200)
    assert emoji["name"] == "\U0001F600" * 200
    first = await gateway.project("demo")
    status, doc, _ = await call(gateway, "POST", "/manage/projects", body={"name": " demo\t", "api_key": "sk-x"})
    assert status == 409, (status, doc)
    assert_error(doc, "conflict")
    # rename onto an existing name: 409 and nothing changed
    other = await gateway.project("other")
    status, doc, _ = await call(gateway, "PATCH", f"/manage/projects/{other['id']}", body={"name": "demo "})
    assert status == 409, (status, doc)
    assert (await gateway.manage("GET", f"/projects/{other['id']}", expect=200))["name"] == "other"
    # rename to its own name is fine
    status, doc, _ = await call(gateway, "PATCH", f"/manage/projects/{first['id']}", body={"name": "demo"})
    assert status == 200, (status, doc)


async def test_project_patch_validation_order(gateway: Any) -> None:
    project = await gateway.project()
    for body, param in (({"is_active": 0}, "is_active"), ({"is_active": "false"}, "is_active"),
                        ({"is_active": None}, "is_active"), ({"name": None}, "name"), ({"id": "x"}, "id"),
                        ({"created_at": "x"}, "created_at")):
        status, doc, _ = await call(gateway, "PATCH", f"/manage/projects/{project['id']}", body=body)
        assert status == 400, (body, status, doc)
        assert_error(doc, "invalid_request", param)
    status, doc, _ = await call(gateway, "PATCH", f"/manage/projects/{project['id']}", body={})
    assert status == 400, (status, doc)
    assert (await gateway.manage("GET", f"/projects/{project['id']}", expect=200)) == project


async def test_token_create_numeric_boundaries(gateway: Any) -> None:
    project = await gateway.project()
    pid = project["id"]
    max_duration = gateway.settings.max_token_duration_minutes
    for field, value in (("duration_minutes", 1), ("duration_minutes", max_duration), ("duration_minutes", 60.0),
                         ("max_requests", 0), ("max_requests", 2**53), ("max_requests", None),
                         ("rate_limit_per_minute", 0), ("max_tokens_total", 0), ("max_tokens_total", 5.0)):
        status, doc, _ = await call(gateway, "POST", "/manage/tokens", body={"project_id": pid, field: value})
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
        status, doc, _ = await call(gateway, "POST", "/manage/tokens", body={"project_id": pid, field: value})
        assert status == 400, (field, value, status, doc)
        assert_error(doc, "invalid_request", field)
    status, doc, _ = await call(gateway, "POST", "/manage/tokens", body={})
    assert status == 400 and doc["error"].get("param") == "project_id", doc
    status, doc, _ = await call(gateway, "POST", "/manage/tokens", body={"project_id": "nope"})
    assert status == 404, (status, doc)
    await gateway.manage("PATCH", f"/projects/{pid}", {"is_active": False}, expect=200)
    status, doc, _ = await call(gateway, "POST", "/manage/tokens", body={"project_id": pid})
    assert status == 403, (status, doc)
    assert_error(doc, "project_inactive")


async def test_token_duration_is_honoured_exactly(gateway: Any) -> None:
    from datetime import datetime
    project = await gateway.project()
    doc = await gateway.token(project["id"], duration_minutes=1)
    created = datetime.strptime(doc["created_at"], "%Y-%m-%dT%H:%M:%SZ")
    expires = datetime.strptime(doc["expires_at"], "%Y-%m-%dT%H:%M:%SZ")
    assert 59 <= (expires - created).total_seconds() <= 61, doc


async def test_token_patch_and_refresh_boundaries(gateway: Any) -> None:
    token = await gateway.token()
    tid = token["id"]
    for body, param in (({"max_requests": -1}, "max_requests"),
                        ({"rate_limit_per_minute": 1.5}, "rate_limit_per_minute"),
                        ({"is_active": 1}, "is_active"), ({"expires_at": "2030-01-01T00:00:00Z"}, "expires_at"),
                        ({"project_id": "x"}, "project_id"), ({"duration_minutes": 5}, "duration_minutes")):
        status, doc, _ = await call(gateway, "PATCH", f"/manage/tokens/{tid}", body=body)
        assert status == 400, (body, status, doc)
        assert_error(doc, "invalid_request", param)
    status, doc, _ = await call(gateway, "PATCH", f"/manage/tokens/{tid}", body={})
    assert status == 400
    status, doc, _ = await call(gateway, "PATCH", f"/manage/tokens/{tid}", body={"max_requests": None,
                                                                                 "rate_limit_per_minute": 0})
    assert status == 200 and doc["max_requests"] is None and doc["rate_limit_per_minute"] == 0, doc
    for body, param in (({"grace_seconds": 86401}, "grace_seconds"), ({"grace_seconds": -1}, "grace_seconds"),
                        ({"grace_seconds": 1.5}, "grace_seconds"), ({"grace_seconds": None}, "grace_seconds"),
                        ({"duration_minutes": 0}, "duration_minutes"), ({"max_requests": 1}, "max_requests")):
        status, doc, _ = await call(gateway, "POST", f"/manage/tokens/{tid}/refresh", body=body)
        assert status == 400, (body, status, doc)
        assert_error(doc, "invalid_request", param)
    status, doc, _ = await call(gateway, "POST", f"/manage/tokens/{tid}/refresh", body={"grace_seconds": 86400.0})
    assert status == 201, (status, doc)


# ---------------------------------------------------------------- list endpoints and filters

async def test_list_filters(gateway: Any) -> None:
    active = await gateway.project("act")
    inactive = await gateway.project("inact")
    await gateway.manage("PATCH", f"/projects/{inactive['id']}", {"is_active": False}, expect=200)
    for value, expected in (("true", [active["id"]]), ("TRUE", [active["id"]]), ("1", [active["id"]]),
                            ("false", [inactive["id"]]), ("0", [inactive["id"]]),
                            ("", [active["id"], inactive["id"]])):
        status, doc, _ = await call(gateway, "GET", f"/manage/projects?active={value}")
        assert status == 200 and sorted(p["id"] for p in doc["data"]) == sorted(expected), (value, doc)
    for value in ("yes", "2", "tru", "%20true"):
        status, doc, _ = await call(gateway, "GET", f"/manage/projects?active={value}")
        assert status == 400, (value, status, doc)
        assert_error(doc, "invalid_request", "active")
    t1 = await gateway.token(active["id"])
    t2 = await gateway.token(active["id"])
    await gateway.manage("DELETE", f"/tokens/{t2['id']}", expect=204)
    status, doc, _ = await call(gateway, "GET", f"/manage/tokens?project_id={active['id']}&active_only=true")
    assert status == 200 and [t["id"] for t in doc["data"]] == [t1["id"]], doc
    status, doc, _ = await call(gateway, "GET", f"/manage/tokens?project_id={active['id']}")
    assert sorted(t["id"] for t in doc["data"]) == sorted([t1["id"], t2["id"]])  # order: see the ordering probe
    assert all("token" not in t for t in doc["data"])
    status, doc, _ = await call(gateway, "GET", "/manage/tokens?project_id=unknown")
    assert status == 200 and doc["data"] == []
    for query in ("active_only=maybe", "expired=x"):
        status, doc, _ = await call(gateway, "GET", f"/manage/tokens?{query}")
        assert status == 400, (query, status, doc)
    status, doc, _ = await call(gateway, "GET", "/manage/tokens?expired=false")
    assert status == 200 and len(doc["data"]) == 2


async def test_audit_pagination_and_bounds(gateway: Any) -> None:
    for index in range(7):
        await gateway.project(f"p{index}")
    seen: list[int] = []
    before = None
    for _ in range(20):
        query = "?limit=3&action=project.create" + (f"&before={before}" if before else "")
        status, doc, _ = await call(gateway, "GET", "/manage/audit" + query)
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
        status, doc, _ = await call(gateway, "GET", f"/manage/audit?{query}")
        assert status == 400, (query, status, doc)
        assert_error(doc, "invalid_request", param)
    status, doc, _ = await call(gateway, "GET", "/manage/audit?limit=1000")
    assert status == 200
    status, doc, _ = await call(gateway, "GET", "/manage/audit?since=2999-01-01")
    assert status == 200 and doc["data"] == [] and doc["next_before"] is None


async def test_usage_date_filters(gateway: Any) -> None:
    token = await gateway.token()
    sdk = gateway.openai(token["token"])
    await sdk.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
    pid = token["project_id"]
    status, doc, _ = await call(gateway, "GET", f"/manage/projects/{pid}/usage")
    assert status == 200 and len(doc["data"]) == 1, doc
    today = doc["data"][0]["date"]
    assert doc["totals"]["requests"] == 1 and doc["totals"]["total_tokens"] == 7, doc
    assert doc["project_id"] == pid
    status, doc, _ = await call(gateway, "GET", f"/manage/projects/{pid}/usage?since={today}&until={today}")
    assert status == 200 and doc["data"] == [], doc  # until exclusive
    status, doc, _ = await call(gateway, "GET", f"/manage/projects/{pid}/usage?since={today}")
    assert len(doc["data"]) == 1
    status, doc, _ = await call(gateway, "GET", f"/manage/projects/{pid}/usage?until={today}")
    assert doc["data"] == [] and doc["totals"]["requests"] == 0
    for query, param in (("since=yesterday", "since"), ("until=2024-02-30", "until"), ("since=2024-01-01T1:00:00Z",
                                                                                         "since"),
                         ("since=%EF%BC%92024-01-01", "since")):
        status, doc, _ = await call(gateway, "GET", f"/manage/projects/{pid}/usage?{query}")
        assert status == 400, (query, status, doc)
        assert_error(doc, "invalid_request", param)


async def test_usage_until_instant_includes_that_days_earlier_part(gateway: Any) -> None:
    token = await gateway.token()
    sdk = gateway.openai(token["token"])
    await sdk.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
    pid = token["project_id"]
    doc = await gateway.manage("GET", f"/projects/{pid}/usage", expect=200)
    today = doc["data"][0]["date"]
    # until=TODAYT23:59:59Z covers (most of) today: a day's totals are either all in or the
    # filter must refuse instants. Silently dropping the whole day is wrong.
    status, doc, _ = await call(gateway, "GET", f"/manage/projects/{pid}/usage?until={today}T23:59:59Z")
    assert status == 400 or len(doc["data"]) == 1, (status, doc)


# ---------------------------------------------------------------- OpenAPI vs routes

async def test_openapi_matches_routes(gateway: Any) -> None:
    status, doc, headers = await call(gateway, "GET", "/manage/openapi.json")
    assert status == 200 and doc["openapi"].startswith("3.1")
    assert_security(headers, management=True)
    documented = {(path, method.upper()) for path, item in doc["paths"].items() for method in item
                  if method != "parameters"}
    actual = set()
    for resource in gateway.app.router.resources():
        info = resource.get_info()
        if "app" in info:
            for sub in info["app"].router.resources():
                sinfo = sub.get_info()
                path = sinfo.get("path") or sinfo.get("formatter")
                for route in sub:
                    actual.add((path, route.method))
        else:
            path = info.get("path") or info.get("formatter")
            for route in resource:
                if route.method not in ("HEAD", "*"):
                    actual.add((path, route.method))
    assert documented == actual, (documented ^ actual)


async def test_openapi_required_fields_match_real_answers(gateway: Any) -> None:
    doc = await gateway.manage("GET", "/openapi.json", expect=200)
    schemas = doc["components"]["schemas"]
    project = await gateway.project()
    token = await gateway.token(project["id"])
    assert set(project) == set(schemas["Project"]["properties"]) == set(schemas["Project"]["required"])
    assert set(token) == set(schemas["TokenWithSecret"]["properties"])
    listed = await gateway.manage("GET", f"/tokens/{token['id']}", expect=200)
    assert set(listed) == set(schemas["Token"]["required"])
    revoke = await gateway.manage("POST", f"/projects/{project['id']}/tokens/revoke", expect=200)
    assert set(revoke) == set(schemas["RevokeSummary"]["required"])
    usage = await gateway.manage("GET", f"/projects/{project['id']}/usage", expect=200)
    assert set(usage) == set(schemas["ProjectUsage"]["required"])
    page = await gateway.manage("GET", "/audit?limit=5", expect=200)
    assert set(page) == set(schemas["AuditPage"]["required"])
    for event in page["data"]:
        assert set(event) <= set(schemas["AuditEvent"]["properties"]), event
        assert set(schemas["AuditEvent"]["required"]) <= set(event), event
    health = await gateway.client.get("/health")
    assert set(orjson.loads(await health.read())) == set(schemas["Health"]["required"])


async def test_openapi_documented_statuses_cover_observed(gateway: Any) -> None:
    doc = await gateway.manage("GET", "/openapi.json", expect=200)
    paths = doc["paths"]
    project = await gateway.project()
    token = await gateway.token(project["id"])
    await gateway.manage("DELETE", f"/tokens/{token['id']}", expect=204)
    observed = []
    for method, path, template, body in (
            ("PATCH", f"/manage/tokens/{token['id']}", "/manage/tokens/{id}", {"is_active": True}),
            ("POST", f"/manage/tokens/{token['id']}/refresh", "/manage/tokens/{id}/refresh", {}),
            ("DELETE", f"/manage/tokens/{token['id']}", "/manage/tokens/{id}", None),
            ("GET", "/manage/tokens?expired=x", "/manage/tokens", None),
            ("GET", "/manage/projects/nope/usage", "/manage/projects/{id}/usage", None),
            ("POST", "/manage/projects/nope/tokens/revoke", "/manage/projects/{id}/tokens/revoke", None),
            ("GET", "/manage/audit?limit=0", "/manage/audit", None),
            ("POST", "/manage/tokens", "/manage/tokens", {"project_id": "nope"}),
            ("PATCH", "/manage/projects/nope", "/manage/projects/{id}", {"name": "n"}),
            ("DELETE", f"/manage/projects/{project['id']}", "/manage/projects/{id}", None)):
        status, body_doc, _ = await call(gateway, method, path, body=body)
        observed.append((method, template, status))
        assert str(status) in paths[template][method.lower()]["responses"], (method, template, status, body_doc)
    status, _, headers = await call(gateway, "GET", "/manage/projects", auth=False)
    assert status == 401 and headers.get("WWW-Authenticate") == "Bearer"


# ---------------------------------------------------------------- security headers

async def test_security_headers_everywhere(gateway: Any) -> None:
    token = await gateway.token()
    for method, path, auth, manage in (("GET", "/health", False, False), ("GET", "/ready", False, False),
                                       ("GET", "/metrics", True, False), ("GET", "/metrics", False, False),
                                       ("GET", "/nope", False, False), ("POST", "/health", False, False),
                                       ("GET", "/v1/nope", False, False), ("GET", "/manage/projects", False, True),
                                       ("HEAD", "/health", False, False), ("OPTIONS", "/manage/projects", True, True),
                                       ("GET", "/favicon.ico", False, False)):
        status, doc, headers = await call(gateway, method, path, auth=auth)
        assert_security(headers, manage)
        if status >= 400 and method != "HEAD":
            assert_error(doc)
    response = await gateway.client.post("/v1/chat/completions", headers={"Authorization": f"Bearer {token['token']}"},
                                         json={"model": "gpt-4o-mini", "stream": True,
                                               "messages": [{"role": "user", "content": "x"}]})
    await response.read()
    assert response.status == 200
    assert_security(response.headers, management=False)


# ---------------------------------------------------------------- CORS

async def test_cors_allowed_origin_on_errors_and_streams(make_gateway: Any) -> None:
    gw = await make_gateway(CORS_ALLOWED_ORIGINS=f"{ORIGIN},http://localhost:3000")
    token = await gw.token()
    for method, path, auth in (("GET", "/manage/projects", False), ("GET", "/manage/nope", True),
                               ("PUT", "/manage/projects", True), ("GET", "/health", False), ("GET", "/nope", False),
                               ("GET", "/metrics", False), ("POST", "/manage/projects", True)):
        status, _doc, headers = await call(gw, method, path, auth=auth, headers={"Origin": ORIGIN},
                                          body={} if method == "POST" else None)
        assert headers.get("Access-Control-Allow-Origin") == ORIGIN, (method, path, status, dict(headers))
        assert "Origin" in headers.get("Vary", ""), (path, dict(headers))
        assert "Access-Control-Allow-Credentials" not in headers
        assert "X-Request-ID" in headers.get("Access-Control-Expose-Headers", "")
        assert_security(headers, path.startswith("/manage"))
    response = await gw.client.post("/v1/chat/completions", headers={"Authorization": f"Bearer {token['token']}",
                                                                     "Origin": ORIGIN},
                                    json={"model": "gpt-4o-mini", "stream": True,
                                          "messages": [{"role": "user", "content": "x"}]})
    await response.read()
    assert response.headers.get("Access-Control-Allow-Origin") == ORIGIN


async def test_cors_disallowed_origins_get_nothing(make_gateway: Any) -> None:
    gw = await make_gateway(CORS_ALLOWED_ORIGINS=f"{ORIGIN},http://localhost:3000")
    for origin in ("null", f"{ORIGIN}/", "https://app.example.com:8443", "http://app.example.com",
                   "https://evil.com", "http://localhost:3001", "http://localhost", "https://app.example.com.evil.com",
                   "https://app.example.com:443/", "HTTPS://evil.com", "https://app.example.com:0",
                   "https://app.example.com:99999", "file://", "https://*.example.com"):
        status, doc, headers = await call(gw, "GET", "/manage/projects", headers={"Origin": origin})
        assert status == 200
        assert not [h for h in headers if h.lower().startswith("access-control-")], (origin, dict(headers))
        assert "Origin" in headers.get("Vary", ""), origin
        status, doc, headers = await call(gw, "OPTIONS", "/manage/projects", auth=False,
                                          headers={"Origin": origin, "Access-Control-Request-Method": "POST"})
        assert status == 403, (origin, status)
        assert_error(doc, "cors_origin_not_allowed")
        assert not [h for h in headers if h.lower().startswith("access-control-")], (origin, dict(headers))
        assert_security(headers, management=True)


async def test_cors_preflight_allowed(make_gateway: Any) -> None:
    gw = await make_gateway(CORS_ALLOWED_ORIGINS=f"{ORIGIN},http://localhost:3000")
    for origin, path in ((ORIGIN, "/manage/projects"), ("http://localhost:3000", "/v1/chat/completions"),
                         ("https://APP.example.com", "/anything"), ("https://app.example.com:443", "/health")):
        status, doc, headers = await call(gw, "OPTIONS", path, auth=False,
                                          headers={"Origin": origin, "Access-Control-Request-Method": "PATCH",
                                                   "Access-Control-Request-Headers": "authorization, x-evil"})
        assert status == 204, (origin, path, status, doc)
        assert headers["Access-Control-Allow-Origin"] == origin
        assert "PATCH" in headers["Access-Control-Allow-Methods"]
        assert headers["Access-Control-Allow-Headers"] == "authorization"
        assert headers["Access-Control-Max-Age"] == "600"
        assert "Access-Control-Allow-Credentials" not in headers
        assert "Origin" in headers.get("Vary", "")
        assert_security(headers, path.startswith("/manage"))


async def test_cors_wildcard(make_gateway: Any) -> None:
    gw = await make_gateway(CORS_ALLOWED_ORIGINS="*")
    for origin in ("null", "https://x.example"):
        status, _doc, headers = await call(gw, "OPTIONS", "/manage/tokens", auth=False,
                                          headers={"Origin": origin, "Access-Control-Request-Method": "POST"})
        assert status == 204 and headers["Access-Control-Allow-Origin"] == "*"
        assert "Access-Control-Allow-Credentials" not in headers
        status, _doc, headers = await call(gw, "GET", "/manage/tokens", auth=False, headers={"Origin": origin})
        assert status == 401 and headers["Access-Control-Allow-Origin"] == "*"


async def test_no_cors_config_means_no_cors_and_upstream_acao_stripped(make_gateway: Any, upstream: Any) -> None:
    gw = await make_gateway()
    token = await gw.token()
    state, _ = upstream
    state.status = 418
    state.status_headers = {"Access-Control-Allow-Origin": "*", "Access-Control-Allow-Credentials": "true"}
    response = await gw.client.post("/v1/chat/completions", headers={"Authorization": f"Bearer {token['token']}",
                                                                     "Origin": ORIGIN},
                                    json={"model": "gpt-4o-mini", "messages": []})
    await response.read()
    assert response.status == 418
    assert not [h for h in response.headers if h.lower().startswith("access-control-")], dict(response.headers)
    _status, _doc, headers = await call(gw, "OPTIONS", "/manage/projects", auth=False,
                                      headers={"Origin": ORIGIN, "Access-Control-Request-Method": "POST"})
    assert not [h for h in headers if h.lower().startswith("access-control-")], dict(headers)


async def test_lists_are_oldest_first_in_creation_order(gateway: Any) -> None:
    created = [(await gateway.project(f"order-{index}"))["id"] for index in range(12)]
    listed = await gateway.manage("GET", "/projects", expect=200)
    assert [p["id"] for p in listed["data"]] == created
    pid = created[0]
    tokens = [(await gateway.token(pid))["id"] for _ in range(12)]
    listed = await gateway.manage("GET", f"/tokens?project_id={pid}", expect=200)
    assert [t["id"] for t in listed["data"]] == tokens


async def test_ip_refusals_carry_cors_security_and_openai_shape(make_gateway: Any) -> None:
    gw = await make_gateway(CORS_ALLOWED_ORIGINS=ORIGIN, MANAGEMENT_ALLOWED_IPS="10.0.0.0/8")
    status, doc, headers = await call(gw, "GET", "/manage/projects", headers={"Origin": ORIGIN})
    assert status == 403, (status, doc)
    assert_error(doc, "ip_not_allowed")
    assert headers.get("Access-Control-Allow-Origin") == ORIGIN
    assert_security(headers, management=True)
    gw2 = await make_gateway(CORS_ALLOWED_ORIGINS=ORIGIN, IP_RATE_LIMIT="2", DATABASE_PATH=str(
        gw.settings.database_path) + "-2")
    for _ in range(3):
        await call(gw2, "GET", "/manage/projects", auth=False)
    status, doc, headers = await call(gw2, "GET", "/manage/projects", headers={"Origin": ORIGIN})
    assert status == 429, (status, doc)
    assert_error(doc, "rate_limited")
    assert headers.get("Retry-After") and headers.get("Access-Control-Allow-Origin") == ORIGIN
    assert_security(headers, management=True)


async def test_request_id_echoed_on_error_kinds(gateway: Any) -> None:
    for method, path in (("PUT", "/manage/projects"), ("GET", "/nope"), ("GET", "/manage/tokens/x"),
                         ("POST", "/manage/projects")):
        status, _, headers = await call(gateway, method, path, headers={"X-Request-ID": "probe-1.A_b"})
        assert status >= 400 and headers["X-Request-ID"] == "probe-1.A_b", (method, path, dict(headers))
        status, _, headers = await call(gateway, method, path, headers={"X-Request-ID": "bad id!"})
        assert headers["X-Request-ID"] != "bad id!"


async def test_head_on_management_get_routes(gateway: Any) -> None:
    status, _, headers = await call(gateway, "HEAD", "/manage/projects")
    assert status in (200, 405), status
    if status == 405:
        assert "HEAD" not in headers.get("Allow", "")
    assert_security(headers, management=True)
