"""The console over real HTTP without a browser: sign-in and sessions, CSRF and origin checks, headers,
timeouts on an injected clock, the IP allow-list and throttle, and changes audited with via: console."""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Callable
from contextlib import closing
from typing import Any

import orjson
import pytest
from aiohttp import ClientResponse

from llm_proxy.console.sessions import ABSOLUTE_TIMEOUT, IDLE_TIMEOUT
from llm_proxy.gateway.security_headers import CONSOLE_CSP
from tests.fakes import MANAGEMENT_TOKEN, Gateway

COOKIE = "llm_proxy_session"


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


async def sign_in(gateway: Gateway, token: str = MANAGEMENT_TOKEN) -> ClientResponse:
    return await gateway.client.post("/admin/login", data={"token": token}, allow_redirects=False)


def once_of(html: str) -> str:
    found = re.search(r'name="once" value="([^"]+)"', html)
    assert found, html
    return found.group(1)


def csrf_of(html: str) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', html)
    assert found, html
    return found.group(1)


async def page(gateway: Gateway, path: str) -> tuple[int, str, ClientResponse]:
    response = await gateway.client.get(path, allow_redirects=False)
    return response.status, await response.text(), response


def audit_rows(gateway: Gateway, action: str) -> list[dict[str, Any]]:
    with closing(sqlite3.connect(gateway.settings.database_path)) as conn:
        conn.row_factory = sqlite3.Row
        return [dict(row) for row in conn.execute("SELECT * FROM audit_events WHERE action = ? ORDER BY id", (action,))]


async def flushed(gateway: Gateway) -> None:
    from llm_proxy.app import AUDIT
    await gateway.app[AUDIT].flush()


async def test_pages_need_a_session_and_sign_in_opens_one_with_a_fresh_id(make_gateway: Callable[..., Any]) -> None:
    gateway: Gateway = await make_gateway()
    for path in ("/admin/", "/admin/projects", "/admin/tokens", "/admin/usage", "/admin/audit", "/admin/audit/verify"):
        status, _, response = await page(gateway, path)
        assert (status, response.headers["Location"]) == (303, "/admin/login"), path
    status, html, response = await page(gateway, "/admin/login")
    assert status == 200 and 'type="password"' in html
    assert response.headers["Content-Security-Policy"] == CONSOLE_CSP
    assert (response.headers["X-Frame-Options"], response.headers["Referrer-Policy"],
            response.headers["Cache-Control"]) == ("DENY", "no-referrer", "no-store")

    # A session id planted before sign-in is never the one signed in (no fixation).
    gateway.client.session.cookie_jar.update_cookies({COOKIE: "planted-by-someone-else"})
    signed = await sign_in(gateway)
    assert (signed.status, signed.headers["Location"]) == (303, "/admin/")
    cookie = signed.cookies[COOKIE]
    assert cookie.value != "planted-by-someone-else" and len(cookie.value) >= 43
    assert cookie["httponly"] and cookie["samesite"] == "Strict" and cookie["path"] == "/admin"
    assert MANAGEMENT_TOKEN not in str(signed.headers)
    status, html, _ = await page(gateway, "/admin/")
    assert status == 200 and "Overview" in html and MANAGEMENT_TOKEN not in html
    status, _, response = await page(gateway, "/admin")
    assert (status, response.headers["Location"]) == (308, "/admin/")
    # Signing in again gives yet another id.
    again = await sign_in(gateway)
    assert again.cookies[COOKIE].value != cookie.value

    # Only digests are stored.
    with closing(sqlite3.connect(gateway.settings.database_path)) as conn:
        stored = conn.execute("SELECT * FROM admin_sessions").fetchall()
    assert stored and all(cookie.value not in str(row) and MANAGEMENT_TOKEN not in str(row) for row in stored)


async def test_a_wrong_token_is_refused_audited_and_counted_toward_the_ip_block(
        make_gateway: Callable[..., Any]) -> None:
    gateway: Gateway = await make_gateway(IP_RATE_LIMIT="3")
    for _ in range(3):
        refused = await sign_in(gateway, "mgmt-wrong-wrong-wrong-wrong")
        assert refused.status == 401 and COOKIE not in refused.cookies
        assert "mgmt-wrong-wrong-wrong-wrong" not in await refused.text()
    blocked = await sign_in(gateway)  # the right token, from a blocked address
    assert blocked.status == 429 and "Retry-After" in blocked.headers and COOKIE not in blocked.cookies
    await flushed(gateway)
    failures = audit_rows(gateway, "admin.login")
    assert [row["result"] for row in failures] == ["failure"] * 3
    details = orjson.loads(failures[0]["details"])
    assert details["via"] == "console" and details["reason"] == "invalid_management_token"
    assert "wrong-wrong-wrong" not in failures[0]["details"]


async def test_every_post_needs_the_sessions_csrf_token_and_our_origin(make_gateway: Callable[..., Any]) -> None:
    gateway: Gateway = await make_gateway()
    await sign_in(gateway)
    _, html, _ = await page(gateway, "/admin/projects")
    csrf = csrf_of(html)
    form = {"name": "via-console", "api_key": "sk-console-key-1234567890"}

    for data, headers in (
            (form, {}),  # no CSRF token
            ({**form, "csrf": "0" * 64}, {}),  # another one
            ({**form, "csrf": csrf}, {"Origin": "https://evil.example"}),  # another site
            ({**form, "csrf": csrf}, {"Sec-Fetch-Site": "cross-site"})):
        refused = await gateway.client.post("/admin/projects", data=data, headers=headers, allow_redirects=False)
        assert refused.status == 403, (data, headers)
    assert (await gateway.manage("GET", "/projects", expect=200))["data"] == []

    # Chromium's own form posts under no-referrer: Origin null, same-origin fetch.
    made = await gateway.client.post("/admin/projects", data={**form, "csrf": csrf}, allow_redirects=False,
                                     headers={"Origin": "null", "Sec-Fetch-Site": "same-origin"})
    assert made.status == 303 and made.headers["Location"].endswith("?done=created")
    [project] = (await gateway.manage("GET", "/projects", expect=200))["data"]
    assert project["name"] == "via-console" and project["api_key"] != form["api_key"]
    await flushed(gateway)
    [created] = audit_rows(gateway, "project.create")
    assert orjson.loads(created["details"])["via"] == "console" and created["result"] == "success"
    assert form["api_key"] not in str(audit_rows(gateway, "project.create"))
    csrf_failures = [orjson.loads(row["details"]) for row in audit_rows(gateway, "auth.failure")]
    assert [details["reason"] for details in csrf_failures] == ["csrf_failed", "csrf_failed"]

    # Another session's CSRF token is refused too: sign in again, and post with the first one's.
    second = await sign_in(gateway)
    assert second.status == 303
    stale = await gateway.client.post("/admin/projects", data={**form, "name": "stale", "csrf": csrf},
                                      allow_redirects=False)
    assert stale.status == 403


async def test_sessions_end_idle_absolute_signed_out_or_when_the_token_is_removed(
        make_gateway: Callable[..., Any], tmp_path: Any) -> None:
    clock = Clock()
    gateway: Gateway = await make_gateway(clock=clock)
    await sign_in(gateway)
    clock.now += IDLE_TIMEOUT - 61
    assert (await page(gateway, "/admin/"))[0] == 200  # still fresh, and seen again now
    clock.now += IDLE_TIMEOUT - 61
    assert (await page(gateway, "/admin/"))[0] == 200
    clock.now += IDLE_TIMEOUT + 1
    status, _, response = await page(gateway, "/admin/")
    assert (status, response.headers["Location"]) == (303, "/admin/login")

    # Used every 29 minutes, a session still ends 12 hours after sign-in.
    await sign_in(gateway)
    signed_in, step = clock.now, IDLE_TIMEOUT - 60
    for _ in range(int(ABSOLUTE_TIMEOUT // step) + 2):
        clock.now += step
        if (await page(gateway, "/admin/"))[0] != 200:
            break
    assert ABSOLUTE_TIMEOUT < clock.now - signed_in <= ABSOLUTE_TIMEOUT + step
    assert (await page(gateway, "/admin/"))[0] == 303

    # Signing out ends it on the server: the old cookie opens nothing.
    await sign_in(gateway)
    cookie = gateway.client.session.cookie_jar.filter_cookies(gateway.client.make_url("/admin/"))[COOKIE].value
    _, html, _ = await page(gateway, "/admin/")
    out = await gateway.client.post("/admin/logout", data={"csrf": csrf_of(html)}, allow_redirects=False)
    assert (out.status, out.headers["Location"]) == (303, "/admin/login")
    gateway.client.session.cookie_jar.update_cookies({COOKIE: cookie})
    assert (await page(gateway, "/admin/"))[0] == 303
    await flushed(gateway)
    assert [row["result"] for row in audit_rows(gateway, "admin.logout")] == ["success"]


async def test_a_session_outlives_a_restart_but_not_its_management_tokens_removal(
        make_gateway: Callable[..., Any]) -> None:
    both = f"{MANAGEMENT_TOKEN},mgmt-{'Z9y8X7w6' * 6}"
    first: Gateway = await make_gateway(MANAGEMENT_TOKEN=both)
    await sign_in(first, f"mgmt-{'Z9y8X7w6' * 6}")
    cookie = first.client.session.cookie_jar.filter_cookies(first.client.make_url("/admin/"))[COOKIE].value
    assert (await page(first, "/admin/"))[0] == 200
    await first.close()
    # Restarted with the same tokens: the same session goes on.
    restarted: Gateway = await make_gateway(MANAGEMENT_TOKEN=both)
    restarted.client.session.cookie_jar.update_cookies({COOKIE: cookie})
    assert (await page(restarted, "/admin/"))[0] == 200
    await restarted.close()
    # The same database, restarted with that token removed from MANAGEMENT_TOKEN.
    second: Gateway = await make_gateway(MANAGEMENT_TOKEN=MANAGEMENT_TOKEN)
    second.client.session.cookie_jar.update_cookies({COOKIE: cookie})
    assert (await page(second, "/admin/"))[0] == 303


async def test_an_address_outside_management_allowed_ips_gets_403(make_gateway: Callable[..., Any]) -> None:
    gateway: Gateway = await make_gateway(MANAGEMENT_ALLOWED_IPS="10.9.9.9")
    for method, path in (("GET", "/admin/login"), ("POST", "/admin/login"), ("GET", "/admin/")):
        response = await gateway.client.request(method, path, data={"token": MANAGEMENT_TOKEN}, allow_redirects=False)
        assert response.status == 403 and COOKIE not in response.cookies, (method, path)


async def test_the_console_can_be_turned_off(make_gateway: Callable[..., Any]) -> None:
    gateway: Gateway = await make_gateway(ADMIN_CONSOLE="false")
    assert (await page(gateway, "/admin/login"))[0] == 404
    assert (await sign_in(gateway)).status == 404


@pytest.mark.parametrize("path", ["/admin/nope", "/admin/projects/no-such-project", "/admin/tokens/no-such-token"])
async def test_unknown_pages_are_pages_with_the_console_headers(make_gateway: Callable[..., Any], path: str) -> None:
    gateway: Gateway = await make_gateway()
    await sign_in(gateway)
    status, html, response = await page(gateway, path)
    assert status == 404 and "<h1>Not found</h1>" in html
    assert response.headers["Content-Security-Policy"] == CONSOLE_CSP and response.content_type == "text/html"


async def test_every_page_renders_what_the_api_holds_and_escapes_what_users_typed(
        make_gateway: Callable[..., Any]) -> None:
    gateway: Gateway = await make_gateway()
    hostile = "<img src=x onerror=alert(1)>"
    project = await gateway.project(hostile)
    token = await gateway.token(project["id"], max_requests=5)
    sdk = gateway.openai(token["token"])
    await sdk.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}],
                                      extra_headers={"User-Agent": "<script>alert(2)</script>"})
    await sign_in(gateway)
    for path, expected in (
            ("/admin/", "requests in the last 24 hours"),
            ("/admin/projects", "&lt;img src=x onerror=alert(1)&gt;"),
            (f"/admin/projects/{project['id']}", "&lt;img src=x onerror=alert(1)&gt;"),
            ("/admin/tokens?state=all", token["token_hint"]),
            (f"/admin/tokens/{token['id']}", "of 5"),
            (f"/admin/usage?project_id={project['id']}&days=7", "Download as CSV"),
            ("/admin/audit", "&#34;user_agent&#34;: &#34;&lt;script&gt;alert(2)&lt;/script&gt;&#34;"),  # as text
            ("/admin/audit/verify", "OK")):
        status, html, _ = await page(gateway, path)
        assert status == 200 and expected in html, (path, html[:2000])
        assert hostile not in html and "<script>alert" not in html, path
        assert token["token"] not in html, path
    csv = await gateway.client.get(f"/admin/usage.csv?project_id={project['id']}&days=7")
    text = await csv.text()
    assert csv.status == 200 and csv.content_type == "text/csv"
    lines = text.strip().splitlines()
    assert lines[0] == "day,requests,prompt_tokens,completion_tokens,total_tokens" and len(lines) == 8
    assert sum(int(line.split(",")[1]) for line in lines[1:]) == 1


async def test_a_token_made_in_the_console_is_shown_once_and_works_until_revoked_there(
        make_gateway: Callable[..., Any]) -> None:
    gateway: Gateway = await make_gateway()
    project = await gateway.project("console-made")
    await sign_in(gateway)
    _, html, _ = await page(gateway, "/admin/tokens")
    form = {"csrf": csrf_of(html), "once": once_of(html), "project_id": project["id"], "duration_minutes": "30",
            "max_requests": "3", "rate_limit_per_minute": "", "max_tokens_total": ""}
    made = await gateway.client.post("/admin/tokens", data=form)
    shown = await made.text()
    assert made.status == 201 and made.headers["Cache-Control"] == "no-store"
    plaintext = re.search(r'id="plaintext" value="([^"]+)"', shown)
    assert plaintext
    [listed] = (await gateway.manage("GET", f"/tokens?project_id={project['id']}", expect=200))["data"]
    assert listed["max_requests"] == 3 and listed["token_hint"] in shown
    # The same form sent again (a reload of the answer) makes no second token.
    again = await gateway.client.post("/admin/tokens", data=form)
    assert again.status == 409 and "already sent" in await again.text()
    assert len((await gateway.manage("GET", f"/tokens?project_id={project['id']}", expect=200))["data"]) == 1
    sdk = gateway.openai(plaintext.group(1))
    assert (await sdk.models.list()) is not None
    # Never shown again: not on its page, not in the list.
    for path in (f"/admin/tokens/{listed['id']}", "/admin/tokens?state=all"):
        assert plaintext.group(1) not in (await page(gateway, path))[1]

    _, html, _ = await page(gateway, f"/admin/tokens/{listed['id']}")
    revoked = await gateway.client.post(f"/admin/tokens/{listed['id']}/revoke", data={"csrf": csrf_of(html)},
                                        allow_redirects=False)
    assert revoked.status == 303
    import openai
    with pytest.raises(openai.AuthenticationError):
        await sdk.models.list()
    await flushed(gateway)
    for action in ("token.create", "token.revoke"):
        [row] = [row for row in audit_rows(gateway, action) if row["result"] == "success"]
        assert orjson.loads(row["details"])["via"] == "console", action
    [replayed] = [row for row in audit_rows(gateway, "token.create") if row["result"] != "success"]
    assert (replayed["result"], orjson.loads(replayed["details"])["error_code"]) == ("failure", "form_already_sent")


async def test_a_session_works_on_every_process_sharing_the_database(make_gateway: Callable[..., Any],
                                                                    postgres_url: str, redis_url: str) -> None:
    """Sessions live with the tokens: one opened on one process is the same session on another, and
    signing out on one ends it on all (PostgreSQL + Redis, two gateways)."""
    first: Gateway = await make_gateway(DATABASE_URL=postgres_url, REDIS_URL=redis_url)
    second: Gateway = await make_gateway(DATABASE_URL=postgres_url, REDIS_URL=redis_url)
    await sign_in(first)
    cookie = first.client.session.cookie_jar.filter_cookies(first.client.make_url("/admin/"))[COOKIE].value
    second.client.session.cookie_jar.update_cookies({COOKIE: cookie})
    status, html, _ = await page(second, "/admin/projects")
    assert status == 200
    # A change made on the second with the session opened on the first.
    made = await second.client.post("/admin/projects", data={"csrf": csrf_of(html), "name": "shared",
                                                             "api_key": "sk-shared-key-1234567890"},
                                    allow_redirects=False)
    assert made.status == 303
    assert [project["name"] for project in (await first.manage("GET", "/projects", expect=200))["data"]] == ["shared"]
    _, html, _ = await page(first, "/admin/")
    assert (await first.client.post("/admin/logout", data={"csrf": csrf_of(html)}, allow_redirects=False)).status == 303
    assert (await page(second, "/admin/"))[0] == 303


@pytest.mark.parametrize(("trusted", "secure"), [("127.0.0.1/32", True), ("10.0.0.0/8", False)])
async def test_behind_a_trusted_tls_proxy_the_cookie_is_secure_and_host_only(
        make_gateway: Callable[..., Any], trusted: str, secure: bool) -> None:
    """A proxy of TRUSTED_PROXIES that terminated TLS says X-Forwarded-Proto: https, and the browser speaks
    HTTPS: the cookie is then `__Host-`, Secure, for the whole host. From anyone else the header is ignored."""
    gateway: Gateway = await make_gateway(TRUSTED_PROXIES=trusted)
    proxied = {"X-Forwarded-Proto": "https", "X-Forwarded-For": "203.0.113.7"}
    signed = await gateway.client.post("/admin/login", data={"token": MANAGEMENT_TOKEN}, headers=proxied,
                                       allow_redirects=False)
    assert signed.status == 303
    name = "__Host-llm_proxy_session" if secure else COOKIE
    cookie = signed.cookies[name]
    assert bool(cookie["secure"]) is secure and cookie["path"] == ("/" if secure else "/admin")
    assert cookie["httponly"] and cookie["samesite"] == "Strict"
    # The browser sends it back over HTTPS (through the proxy); this client would not send a Secure cookie
    # over plain HTTP by itself, so it is given by hand.
    gateway.client.session.cookie_jar.clear()
    seen = await gateway.client.get("/admin/", headers={**proxied, "Cookie": f"{name}={cookie.value}"},
                                    allow_redirects=False)
    assert seen.status == 200


async def test_a_token_form_refused_for_its_project_may_be_sent_again(make_gateway: Callable[..., Any]) -> None:
    gateway: Gateway = await make_gateway()
    project = await gateway.project("paused-first")
    await gateway.manage("PATCH", f"/projects/{project['id']}", {"is_active": False}, expect=200)
    await sign_in(gateway)
    _, html, _ = await page(gateway, "/admin/tokens")
    form = {"csrf": csrf_of(html), "once": once_of(html), "project_id": project["id"]}
    refused = await gateway.client.post("/admin/tokens", data=form)
    assert refused.status == 403  # an inactive project's token
    await gateway.manage("PATCH", f"/projects/{project['id']}", {"is_active": True}, expect=200)
    made = await gateway.client.post("/admin/tokens", data=form)
    assert made.status == 201
    without = await gateway.client.post("/admin/tokens", data={k: v for k, v in form.items() if k != "once"})
    assert without.status == 400


async def test_odd_input_gets_a_console_page_never_a_500_or_the_apis_json(make_gateway: Callable[..., Any]) -> None:
    """From the console's security review: 5,000 digits in a number field, a directory of the assets."""
    gateway: Gateway = await make_gateway()
    project = await gateway.project("numbers")
    await sign_in(gateway)
    _, html, _ = await page(gateway, "/admin/tokens")
    huge = await gateway.client.post("/admin/tokens", data={
        "csrf": csrf_of(html), "once": once_of(html), "project_id": project["id"], "duration_minutes": "9" * 5000})
    assert huge.status == 400 and "whole number" in await huge.text()
    status, text, response = await page(gateway, "/admin/static/")
    assert status == 403 and response.content_type == "text/html" and "<h1>Not allowed</h1>" in text
    assert response.headers["Content-Security-Policy"] == CONSOLE_CSP
