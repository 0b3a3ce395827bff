"""The attacks of issue 16, each through Debian's Chromium against a real gateway: a browser adds no way in.

Forged posts from another origin and without (or with another session's) CSRF token are refused with
nothing changed; what users typed is shown as text; the console cannot be framed; a session id is new
at every sign-in and ends on timeouts and when its management token is removed; the IP throttle and
allow-list hold; everything works with JavaScript off; a token's plaintext is never shown twice."""

from __future__ import annotations

import html
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import openai
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from playwright.async_api import Error as PlaywrightError
from playwright.async_api import Page, expect

from llm_proxy.console.sessions import ABSOLUTE_TIMEOUT, IDLE_TIMEOUT
from tests.console.test_console_http import COOKIE, Clock, audit_rows, flushed
from tests.fakes import MANAGEMENT_TOKEN, UPSTREAM_KEY, Gateway

MakePage = Callable[..., Awaitable[Page]]
HOSTILE_NAME = "<img src=x onerror=alert(1)>"
HOSTILE_AGENT = "<script>alert(2)</script>"
SECOND_TOKEN = f"mgmt-{'Z9y8X7w6' * 6}"


def base_of(gateway: Gateway) -> str:
    return str(gateway.client.make_url("")).rstrip("/")


async def sign_in(page: Page, token: str = MANAGEMENT_TOKEN) -> None:
    await page.goto("/admin/login")
    await page.get_by_label("Management token").fill(token)
    await page.get_by_role("button", name="Sign in").click()
    await expect(page.get_by_role("heading", name="Overview", exact=True)).to_be_visible()


async def csrf_on(page: Page) -> str:
    value = await page.locator("input[name=csrf]").first.get_attribute("value")
    assert value
    return value


async def project_names(gateway: Gateway) -> list[str]:
    return [project["name"] for project in (await gateway.manage("GET", "/projects", expect=200))["data"]]


@pytest.fixture
async def other_site() -> AsyncIterator[Callable[[str], Awaitable[int]]]:
    """Serve a page of HTML from another real aiohttp server (another port, so another origin); returns its port."""
    servers: list[TestServer] = []

    async def serve(html: str) -> int:
        async def attack(request: web.Request) -> web.Response:
            return web.Response(text=html, content_type="text/html")
        app = web.Application()
        app.router.add_get("/", attack)
        servers.append(TestServer(app, host="127.0.0.1"))
        await servers[-1].start_server()
        assert servers[-1].port is not None
        return servers[-1].port

    yield serve
    for server in servers:
        await server.close()


async def test_a_form_posted_from_another_origin_is_refused_and_changes_nothing(
        make_gateway: Callable[..., Any], make_page: MakePage, other_site: Callable[[str], Awaitable[int]]) -> None:
    """127.0.0.1 on another port is the same site (the Strict cookie goes along, so only the Origin check
    stands in the way, even with the session's real CSRF token leaked to the attacker); localhost is another
    site (no cookie, Sec-Fetch-Site: cross-site); a sandboxed frame sends Origin: null, as our own pages do
    under no-referrer, and is told apart by Sec-Fetch-Site."""
    gateway: Gateway = await make_gateway()
    page = await make_page(base_url=base_of(gateway))
    await sign_in(page)
    await page.goto("/admin/projects")
    leaked = await csrf_on(page)
    for host in ("127.0.0.1", "localhost"):
        for csrf in ("0" * 64, leaked):
            port = await other_site(
                f'<!doctype html><title>Prize</title><form method="post" action="{base_of(gateway)}/admin/projects">'
                f'<input name="name" value="evil-{host}"><input name="api_key" value="sk-evil-key-1234567890">'
                f'<input name="csrf" value="{csrf}"><button>Claim your prize</button></form>')
            await page.goto(f"http://{host}:{port}/")
            async with page.expect_response(re.compile(r"/admin/projects$")) as answered:
                await page.get_by_role("button", name="Claim your prize").click()
            response = await answered.value
            sent = await response.request.all_headers()
            assert (sent["sec-fetch-site"], COOKIE in sent.get("cookie", ""), sent["origin"]) == (
                ("same-site", True, f"http://127.0.0.1:{port}") if host == "127.0.0.1" else
                ("cross-site", False, f"http://localhost:{port}")), sent
            assert response.status == 403, (host, csrf)
            await expect(page.get_by_role("heading", name="Not allowed")).to_be_visible()
    # A sandboxed frame posts as an opaque origin (Origin: null, which our own pages send too): cross-site.
    form = (f'<form method="post" action="{base_of(gateway)}/admin/projects"><input name="name" value="evil-null">'
            f'<input name="api_key" value="sk-evil-key-1234567890"><input name="csrf" value="{leaked}">'
            '<button>Claim your prize</button></form>')
    port = await other_site(f'<!doctype html><title>Prize</title><iframe title="prize" sandbox="allow-forms" '
                            f'srcdoc="{html.escape(form)}"></iframe>')
    await page.goto(f"http://127.0.0.1:{port}/")
    async with page.expect_response(re.compile(r"/admin/projects$")) as answered:
        await page.frame_locator("iframe").get_by_role("button", name="Claim your prize").click()
    sent = await (await answered.value).request.all_headers()
    assert (sent["origin"], sent["sec-fetch-site"], (await answered.value).status) == ("null", "cross-site", 403)

    assert await project_names(gateway) == []
    await flushed(gateway)
    assert audit_rows(gateway, "project.create") == []
    await page.goto("/admin/projects")  # the operator's own session goes on
    await expect(page.get_by_role("heading", name="Projects")).to_be_visible()


async def test_a_post_from_our_origin_without_the_sessions_csrf_token_is_refused(
        make_gateway: Callable[..., Any], make_page: MakePage) -> None:
    gateway: Gateway = await make_gateway()
    page = await make_page(base_url=base_of(gateway))
    other = await make_page(base_url=base_of(gateway))
    await sign_in(page)
    await sign_in(other)
    others_csrf = await csrf_on(other)
    assert others_csrf != await csrf_on(page)

    await page.goto("/admin/projects")
    status = await page.evaluate("""async () => (await fetch("/admin/projects", {method: "POST", redirect: "manual",
        body: new URLSearchParams({name: "by-fetch", api_key: "sk-fetch-key-1234567890"})})).status""")
    assert status == 403
    form = page.locator("form.card")
    for name, tamper in (("no-csrf", "form => form.querySelector('input[name=csrf]').remove()"),
                         ("other-session", f"form => form.querySelector('input[name=csrf]').value = '{others_csrf}'")):
        await page.goto("/admin/projects")
        await page.get_by_label("Name", exact=True).fill(name)
        await page.get_by_label("Upstream API key").fill(UPSTREAM_KEY)
        await form.evaluate(tamper)
        async with page.expect_response(re.compile(r"/admin/projects$")) as answered:
            await page.get_by_role("button", name="Create project").click()
        assert (await answered.value).status == 403, name
        await expect(page.get_by_role("alert")).to_contain_text("CSRF token")
    assert await project_names(gateway) == []
    await flushed(gateway)
    reasons = [orjson.loads(row["details"])["reason"] for row in audit_rows(gateway, "auth.failure")]
    assert reasons == ["csrf_failed"] * 3 and audit_rows(gateway, "project.create") == []


async def test_what_users_typed_is_shown_as_text_on_every_page(make_gateway: Callable[..., Any],
                                                               make_page: MakePage) -> None:
    gateway: Gateway = await make_gateway()
    project = await gateway.project(HOSTILE_NAME)
    token = await gateway.token(project["id"])
    await gateway.openai(token["token"]).chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], extra_headers={"User-Agent": HOSTILE_AGENT})
    await flushed(gateway)
    page = await make_page(base_url=base_of(gateway))
    dialogs: list[str] = []
    page.on("dialog", lambda dialog: dialogs.append(dialog.message))  # an unhandled dialog is dismissed
    await sign_in(page)

    async def shown_as_text() -> None:
        assert await page.locator("img[src=x], script:not([src])").count() == 0  # no markup made of it
        assert dialogs == [], page.url

    await page.get_by_role("link", name="Projects").click()
    await expect(page.get_by_role("link", name=HOSTILE_NAME)).to_be_visible()
    await shown_as_text()
    await page.get_by_role("link", name=HOSTILE_NAME).click()
    await expect(page.get_by_role("heading", name=f"Project {HOSTILE_NAME}")).to_be_visible()
    await shown_as_text()
    await page.get_by_role("link", name="Tokens").first.click()
    await expect(page.get_by_role("cell", name=HOSTILE_NAME)).to_be_visible()
    await shown_as_text()
    await page.get_by_role("link", name="Usage").click()
    await page.get_by_label("Project", exact=True).select_option(label=HOSTILE_NAME)
    await page.get_by_role("button", name="Show").click()
    await expect(page.get_by_role("heading", name=f"{HOSTILE_NAME}: the last")).to_be_visible()
    await shown_as_text()
    await page.get_by_role("link", name="Audit").click()
    await page.get_by_label("Action").fill("token.access")
    await page.get_by_role("button", name="Filter").click()
    event = page.locator("table.audit tbody tr").first
    await event.locator("summary").click()
    # The event is shown as its JSON, what the client sent shown as the text it is.
    await expect(event.locator("pre")).to_contain_text('"user_agent": "<script>alert(2)</script>"')
    await shown_as_text()
    await page.get_by_role("link", name="Overview").click()
    await expect(page.get_by_role("heading", name="Overview", exact=True)).to_be_visible()
    await shown_as_text()


async def test_the_console_cannot_be_framed(make_gateway: Callable[..., Any], make_page: MakePage,
                                           other_site: Callable[[str], Awaitable[int]]) -> None:
    gateway: Gateway = await make_gateway()
    page = await make_page()
    login = await page.goto(base_of(gateway) + "/admin/login")
    assert login is not None
    headers = await login.all_headers()
    assert headers["x-frame-options"] == "DENY" and "frame-ancestors 'none'" in headers["content-security-policy"]
    port = await other_site(f'<!doctype html><title>Frame</title><iframe title="console" '
                            f'src="{base_of(gateway)}/admin/login"></iframe>')
    async with page.expect_response(re.compile(r"/admin/login$")) as framed:
        await page.goto(f"http://127.0.0.1:{port}/")
    assert (await framed.value).status == 200  # served, and refused by the browser
    await expect(page.locator("iframe")).to_be_attached()
    frame = page.frames[1]
    assert frame.url.startswith("chrome-error://")
    assert 'type="password"' not in await frame.content()
    assert await frame.locator("form").count() == 0


async def test_a_new_session_id_at_sign_in_and_a_planted_one_replaced(make_gateway: Callable[..., Any],
                                                                     make_page: MakePage) -> None:
    gateway: Gateway = await make_gateway()
    page = await make_page(base_url=base_of(gateway))
    await page.context.add_cookies([{"name": COOKIE, "value": "planted-by-someone-else", "domain": "127.0.0.1",
                                     "path": "/admin", "httpOnly": True, "sameSite": "Strict"}])
    await page.goto("/admin/")
    await expect(page).to_have_url(re.compile(r"/admin/login$"))  # a planted id is no session

    async def session_cookies() -> list[dict[str, Any]]:
        return [dict(cookie) for cookie in await page.context.cookies() if cookie["name"] == COOKIE]

    await sign_in(page)
    [first] = await session_cookies()
    assert first["value"] != "planted-by-someone-else" and len(first["value"]) >= 43
    assert (first["httpOnly"], first["sameSite"], first["path"]) == (True, "Strict", "/admin")
    assert await page.evaluate("document.cookie") == ""  # never readable by script
    await page.context.clear_cookies()
    await sign_in(page)
    [second] = await session_cookies()
    assert second["value"] != first["value"]


async def test_a_session_past_its_idle_or_absolute_timeout_is_sent_to_sign_in(make_gateway: Callable[..., Any],
                                                                             make_page: MakePage) -> None:
    clock = Clock()
    gateway: Gateway = await make_gateway(clock=clock)
    page = await make_page(base_url=base_of(gateway))
    await sign_in(page)
    clock.now += IDLE_TIMEOUT + 1
    await page.goto("/admin/tokens")
    await expect(page).to_have_url(re.compile(r"/admin/login$"))

    await sign_in(page)
    signed_in = clock.now
    while clock.now - signed_in <= ABSOLUTE_TIMEOUT:  # busy every 29 minutes, never idle
        await page.goto("/admin/tokens")
        await expect(page.get_by_role("heading", name="Tokens")).to_be_visible()
        clock.now += IDLE_TIMEOUT - 60
    await page.goto("/admin/tokens")
    await expect(page).to_have_url(re.compile(r"/admin/login$"))


async def test_a_session_whose_management_token_was_removed_is_sent_to_sign_in(
        make_gateway: Callable[..., Any], make_page: MakePage) -> None:
    first: Gateway = await make_gateway(MANAGEMENT_TOKEN=f"{MANAGEMENT_TOKEN},{SECOND_TOKEN}")
    page = await make_page()  # cookies are per host, not per port: each restart's port gets the same cookie
    await page.goto(base_of(first) + "/admin/login")
    await page.get_by_label("Management token").fill(SECOND_TOKEN)
    await page.get_by_role("button", name="Sign in").click()
    await expect(page.get_by_role("heading", name="Overview", exact=True)).to_be_visible()
    await first.close()
    kept: Gateway = await make_gateway(MANAGEMENT_TOKEN=f"{MANAGEMENT_TOKEN},{SECOND_TOKEN}")
    await page.goto(base_of(kept) + "/admin/projects")
    await expect(page.get_by_role("heading", name="Projects")).to_be_visible()  # a restart alone ends nothing
    await kept.close()
    removed: Gateway = await make_gateway(MANAGEMENT_TOKEN=MANAGEMENT_TOKEN)
    await page.goto(base_of(removed) + "/admin/projects")
    await expect(page).to_have_url(re.compile(r"/admin/login$"))


async def test_repeated_wrong_sign_ins_hit_the_ip_throttle(make_gateway: Callable[..., Any],
                                                          make_page: MakePage) -> None:
    gateway: Gateway = await make_gateway(IP_RATE_LIMIT="3")
    page = await make_page(base_url=base_of(gateway))
    await page.goto("/admin/login")
    for attempt, token in enumerate(["mgmt-wrong-wrong-wrong-wrong"] * 3 + [MANAGEMENT_TOKEN]):
        await page.get_by_label("Management token").fill(token)
        async with page.expect_response(re.compile(r"/admin/login$")) as answered:
            await page.get_by_role("button", name="Sign in").click()
        if attempt < 3:
            assert (await answered.value).status == 401
            await expect(page.get_by_role("alert")).to_have_text("That is not a management token of this gateway.")
    assert (await answered.value).status == 429
    await expect(page.get_by_role("heading", name="Too many attempts")).to_be_visible()
    assert not [cookie for cookie in await page.context.cookies() if cookie["name"] == COOKIE]
    assert (await page.goto("/admin/login")).status == 429  # the address is blocked for a while, not just the form


async def test_an_address_outside_management_allowed_ips_gets_a_403_page(make_gateway: Callable[..., Any],
                                                                         make_page: MakePage) -> None:
    gateway: Gateway = await make_gateway(MANAGEMENT_ALLOWED_IPS="10.9.9.9")
    page = await make_page(base_url=base_of(gateway))
    for path in ("/admin/login", "/admin/"):
        response = await page.goto(path)
        assert response is not None and response.status == 403, path
        await expect(page.get_by_role("heading", name="Not allowed")).to_be_visible()
        assert await page.locator("input[type=password]").count() == 0


async def test_everything_works_with_javascript_off(make_gateway: Callable[..., Any], make_page: MakePage) -> None:
    gateway: Gateway = await make_gateway()
    page = await make_page(base_url=base_of(gateway), java_script_enabled=False)
    await sign_in(page)
    await page.get_by_role("link", name="Projects").click()
    await page.get_by_label("Name", exact=True).fill("no-js")
    await page.get_by_label("Upstream API key").fill(UPSTREAM_KEY)
    await page.get_by_role("button", name="Create project").click()
    await expect(page.get_by_role("heading", name="Project no-js")).to_be_visible()
    await page.get_by_role("link", name="Tokens").first.click()
    await page.get_by_label("Project", exact=True).select_option(label="no-js")
    await page.get_by_role("button", name="Create token").click()
    plaintext = await page.get_by_label("The token").input_value()
    assert plaintext.startswith("tok-")
    assert not await page.get_by_role("button", name="Copy").is_visible()  # an enhancement, hidden without JS
    sdk = gateway.openai(plaintext)
    await sdk.models.list()
    await page.get_by_role("link", name="Its page").click()
    await page.get_by_role("button", name="Revoke").click()  # no confirmation without JS: the form just posts
    await expect(page.get_by_role("status")).to_have_text("Revoked.")
    with pytest.raises(openai.AuthenticationError):
        await sdk.models.list()


async def test_the_plaintext_is_never_shown_again(make_gateway: Callable[..., Any], make_page: MakePage) -> None:
    gateway: Gateway = await make_gateway()
    project = await gateway.project("shown-once")
    page = await make_page(base_url=base_of(gateway))
    await sign_in(page)
    await page.goto(f"/admin/tokens?project_id={project['id']}")
    async with page.expect_response(re.compile(r"/admin/tokens$")) as answered:
        await page.get_by_role("button", name="Create token").click()
    created = await answered.value
    assert created.status == 201 and (await created.all_headers())["cache-control"] == "no-store"
    plaintext = await page.get_by_label("The token").input_value()
    [token] = (await gateway.manage("GET", f"/tokens?project_id={project['id']}", expect=200))["data"]

    # A reload posts the form again (a headed Chromium asks first): its single-use value was spent, so no
    # second token is made, and the first one's plaintext is not shown again.
    reloaded = await page.reload()
    assert reloaded is not None and (reloaded.request.method, reloaded.status) == ("POST", 409)
    await expect(page.locator("body")).to_contain_text("already sent")
    assert plaintext not in await page.content()
    assert len((await gateway.manage("GET", f"/tokens?project_id={project['id']}", expect=200))["data"]) == 1
    await page.goto(f"/admin/tokens/{token['id']}")
    await expect(page.get_by_role("heading", name=re.compile("^Token"))).to_be_visible()
    # Back in history: not kept (no-store), so Chromium will not show it without posting again.
    with pytest.raises(PlaywrightError, match="ERR_CACHE_MISS"):
        await page.go_back()
    await expect(page.locator("body")).to_contain_text("ERR_CACHE_MISS")
    assert plaintext not in await page.content()
    for path in (f"/admin/tokens/{token['id']}", "/admin/tokens?state=all", "/admin/audit"):
        await page.goto(path)
        html = await page.content()
        assert plaintext not in html, path
