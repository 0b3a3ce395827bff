"""The committed OpenAPI document: generated, complete (every route and nothing else), served, and true to the live
gateway's answers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
from aiohttp import web

import llm_proxy
from llm_proxy.app import create_app
from llm_proxy.manage.openapi import build_document, render
from llm_proxy.manage.validation import MAX_GRACE_SECONDS
from tests.fakes import MANAGEMENT_TOKEN, UPSTREAM_KEY, Gateway, assert_security, make_settings, send

COMMITTED = Path(llm_proxy.__file__).parent / "manage" / "openapi.json"
# The proxy's catch-all forwards whatever ALLOWED_ENDPOINTS admits; it is the upstream's API, not ours.
UNDOCUMENTED_PREFIXES = ("/v1", "/admin")  # the proxy (OpenAI's own API) and the console's HTML pages
METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")


def app_routes(app: web.Application) -> set[tuple[str, str]]:
    """Return (METHOD, path) of every route of an application and its sub-applications, HEAD left out."""
    routes: set[tuple[str, str]] = set()
    for resource in app.router.resources():
        if isinstance(resource, web.PrefixedSubAppResource):
            # Mounting a sub-application prefixes its resources, so their canonical paths are already whole.
            routes |= app_routes(resource.get_info()["app"])
            continue
        for route in resource:
            if route.method != "HEAD":
                routes.add((route.method, resource.canonical))
    return {(method, path) for method, path in routes if not path.startswith(UNDOCUMENTED_PREFIXES)}


def documented_routes(document: dict[str, Any]) -> set[tuple[str, str]]:
    """Return (METHOD, path) of every operation in an OpenAPI document."""
    return {(method.upper(), path) for path, item in document["paths"].items() for method in item if method in METHODS}


def test_committed_document_is_generated() -> None:
    assert COMMITTED.read_text() == render(build_document()), \
        "llm_proxy/manage/openapi.json is stale: run " \
        "`python -m llm_proxy.manage.openapi > llm_proxy/manage/openapi.json`"


def test_every_route_is_documented(tmp_path: Path) -> None:
    routes = app_routes(create_app(make_settings(tmp_path)))
    assert ("POST", "/manage/tokens") in routes and ("GET", "/health") in routes  # the walk reached both apps
    assert routes - documented_routes(build_document()) == set()


def test_every_documented_route_exists(tmp_path: Path) -> None:
    assert documented_routes(build_document()) - app_routes(create_app(make_settings(tmp_path))) == set()


async def test_document_is_served_to_the_management_token_only(make_gateway: Any) -> None:
    gateway: Gateway = await make_gateway(MAX_TOKEN_DURATION_MINUTES="120")

    anonymous = await gateway.client.get("/manage/openapi.json")
    assert anonymous.status == 401
    assert (await anonymous.json())["error"]["code"] == "invalid_management_token"

    response = await gateway.client.get("/manage/openapi.json", headers=gateway.auth)
    assert response.status == 200 and response.content_type == "application/json"
    assert response.headers["Cache-Control"] == "no-store"
    assert orjson.loads(await response.read()) == build_document(gateway.settings)


async def test_the_openapi_document_holds_no_secret(gateway: Gateway) -> None:
    """From the security review."""
    await gateway.token()
    response = await gateway.client.get("/manage/openapi.json", headers=gateway.auth)
    assert response.status == 200
    text = await response.read()
    from tests.fakes import ENCRYPTION_KEY
    for secret in (MANAGEMENT_TOKEN, ENCRYPTION_KEY, UPSTREAM_KEY, UPSTREAM_KEY[3:]):
        assert secret.encode() not in text


def test_document_reflects_the_token_duration_limit(tmp_path: Path) -> None:
    document = build_document(make_settings(tmp_path, MAX_TOKEN_DURATION_MINUTES="120"))
    create = document["paths"]["/manage/tokens"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    refresh = document["paths"]["/manage/tokens/{id}/refresh"]["post"]["requestBody"]["content"][
        "application/json"]["schema"]
    assert create["properties"]["duration_minutes"]["maximum"] == 120
    assert refresh["properties"]["duration_minutes"]["maximum"] == 120
    assert refresh["properties"]["grace_seconds"]["maximum"] == MAX_GRACE_SECONDS


def test_every_management_operation_is_secured_and_answers_errors_in_the_openai_shape() -> None:
    document = build_document()
    assert document["openapi"] == "3.1.0"
    assert document["components"]["securitySchemes"]["managementToken"] == {
        "type": "http", "scheme": "bearer", "description": "MANAGEMENT_TOKEN (or one of its list)."}
    for path, item in document["paths"].items():
        for method, operation in item.items():
            if method not in METHODS:
                continue
            statuses = set(operation["responses"])
            if path.startswith("/manage/"):
                assert "security" not in operation, (method, path)  # inherits the document's bearer
                assert {"401", "403", "429"} <= statuses, (method, path)
            else:
                assert operation.get("security", [{"managementToken": []}]) in ([], [{"managementToken": []}])
            body = operation.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema")
            if body is not None:
                assert body["additionalProperties"] is False, (method, path)
                assert {"400", "408", "413"} <= statuses, (method, path)
            for status, response in operation["responses"].items():
                if int(status) >= 400:
                    schema = _resolve(document, response)["content"]["application/json"]["schema"]
                    assert schema["allOf"][0] == {"$ref": "#/components/schemas/Error"}, (method, path, status)


def _resolve(document: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in node:
        target: Any = document
        for part in node["$ref"].removeprefix("#/").split("/"):
            target = target[part]
        node = target
    return node


# ---- the document against the live gateway's answers ----

async def test_openapi_matches_routes(gateway: Any) -> None:
    """From the fifth review (the management API's contract)."""
    status, doc, headers = await send(gateway, "GET", "/manage/openapi.json")
    assert status == 200 and doc["openapi"].startswith("3.1")
    assert_security(headers, management=True)
    documented = {(path, method.upper()) for path, item in doc["paths"].items() for method in item
                  if method != "parameters"}
    actual = set()
    for resource in gateway.app.router.resources():
        info = resource.get_info()
        if info.get("prefix") == "/admin":
            continue  # the console's HTML pages are not the management API
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
    """From the fifth review (the management API's contract)."""
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
    """From the fifth review (the management API's contract)."""
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
        status, body_doc, _ = await send(gateway, method, path, body=body)
        observed.append((method, template, status))
        assert str(status) in paths[template][method.lower()]["responses"], (method, template, status, body_doc)
    status, _, headers = await send(gateway, "GET", "/manage/projects", auth=False)
    assert status == 401 and headers.get("WWW-Authenticate") == "Bearer"
