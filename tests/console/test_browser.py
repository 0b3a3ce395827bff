"""The browser harness itself (tests/console/conftest.py), on a tiny real aiohttp app under a strict CSP: pages
load, our own script runs and an inline one does not, contexts share no cookie, screenshots come out at
each viewport's size, and axe tells a bad page from a good one."""

from __future__ import annotations

import html
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from playwright.async_api import Page, expect

from tests.console.conftest import VIEWPORTS, Violation

CSP = "default-src 'none'; script-src 'self'"
HEAD = '<!doctype html><html lang="en"><head><meta charset="utf-8">' \
       '<meta name="viewport" content="width=device-width, initial-scale=1"><title>Harness</title></head>'
GOOD = HEAD + """<body><main><h1>Harness</h1>
<p id="inline">inline script blocked</p><script>document.getElementById("inline").textContent = "inline ran";</script>
<p id="status">static script not run</p>
<form method="post" action="/"><label for="name">Name</label> <input id="name" name="name">
<button>Greet</button></form>
<script src="/static/app.js"></script></main></body></html>"""
BAD = HEAD + """<body><main><h1>Harness</h1><img src="/static/missing.png">
<form method="post" action="/"><input name="name"></form></main></body></html>"""
SCRIPT = 'document.getElementById("status").textContent = "static script ran";'


def _app() -> web.Application:
    def page(text: str) -> web.Response:
        return web.Response(text=text, content_type="text/html", headers={"Content-Security-Policy": CSP})

    async def good(request: web.Request) -> web.Response:
        return page(GOOD)

    async def greet(request: web.Request) -> web.Response:
        name = (await request.post()).get("name", "")
        return page(HEAD + f"<body><main><h1>Hello, {html.escape(str(name))}</h1></main></body></html>")

    async def bad(request: web.Request) -> web.Response:
        return page(BAD)

    async def script(request: web.Request) -> web.Response:
        return web.Response(text=SCRIPT, content_type="text/javascript")

    async def set_cookie(request: web.Request) -> web.Response:
        response = page(HEAD + "<body><main><h1>Set</h1></main></body></html>")
        response.set_cookie("session", "one", httponly=True, samesite="Strict")
        return response

    async def cookies(request: web.Request) -> web.Response:
        return web.Response(text=",".join(sorted(request.cookies)))

    app = web.Application()
    app.router.add_get("/", good)
    app.router.add_post("/", greet)
    app.router.add_get("/bad", bad)
    app.router.add_get("/static/app.js", script)
    app.router.add_get("/set-cookie", set_cookie)
    app.router.add_get("/cookies", cookies)
    return app


@pytest.fixture
async def site() -> AsyncIterator[str]:
    server = TestServer(_app(), host="127.0.0.1")
    await server.start_server()
    yield str(server.make_url("")).rstrip("/")
    await server.close()


async def test_own_script_runs_inline_script_is_refused_and_the_form_posts(page: Page, site: str) -> None:
    async with page.expect_console_message(lambda message: "Content Security Policy" in message.text):
        await page.goto(site + "/")
    await expect(page.locator("#status")).to_have_text("static script ran")
    await expect(page.locator("#inline")).to_have_text("inline script blocked")

    await page.get_by_label("Name").fill("<b>Ada</b>")
    await page.get_by_role("button", name="Greet").click()
    await expect(page.get_by_role("heading")).to_have_text("Hello, <b>Ada</b>")


async def test_each_page_has_a_context_of_its_own(make_page: Callable[..., Awaitable[Page]], site: str) -> None:
    first, second = await make_page(), await make_page()
    await first.goto(site + "/set-cookie")
    await first.goto(site + "/cookies")
    await second.goto(site + "/cookies")
    assert (await first.locator("body").inner_text(), await second.locator("body").inner_text()) == ("session", "")


@pytest.mark.parametrize("viewport", VIEWPORTS)
async def test_screenshot_is_a_png_at_the_viewports_size(
        make_page: Callable[..., Awaitable[Page]], screenshot: Callable[[Page, str], Awaitable[Path]],
        site: str, viewport: str) -> None:
    page = await make_page(viewport)
    await page.goto(site + "/")
    path = await screenshot(page, "browser-harness")
    png = path.read_bytes()
    assert path.name == f"browser-harness-{viewport}.png"
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and png[12:16] == b"IHDR"
    assert struct.unpack(">II", png[16:24]) == VIEWPORTS[viewport]


async def test_axe_reports_a_bad_page_and_passes_a_good_one(
        page: Page, axe: Callable[[Page], Awaitable[list[Violation]]], site: str) -> None:
    await page.goto(site + "/bad")
    assert {violation.rule for violation in await axe(page)} == {"image-alt", "label"}
    await page.goto(site + "/")
    violations = await axe(page)
    assert not violations, violations
