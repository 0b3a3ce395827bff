"""Every console page, with data on it, at desktop and phone widths (issue 16): axe-core finds no serious or
critical violation, the phone layout never scrolls sideways (wide tables scroll inside their `.scroll` box),
and each page is saved as build/screenshots/console-<page>-<viewport>.png to be looked at."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from playwright.async_api import Page, expect

from tests.console.conftest import VIEWPORTS, Violation
from tests.console.test_console_http import flushed
from tests.fakes import MANAGEMENT_TOKEN, Gateway

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}


async def with_data(gateway: Gateway) -> dict[str, Any]:
    """Two projects with tokens, requests that succeeded and ones refused, so tables and charts have rows."""
    main = await gateway.project("support-bot")
    other = await gateway.project("nightly-batch-summaries-for-the-finance-team")
    token = await gateway.token(main["id"], max_requests=50, max_tokens_total=10_000)
    await gateway.token(main["id"], rate_limit_per_minute=30)
    spent = await gateway.token(other["id"], max_requests=1)
    sdk = gateway.openai(token["token"])
    for _ in range(3):
        await sdk.chat.completions.create(**CHAT)
    await gateway.openai(spent["token"]).models.list()
    for refused in (spent["token"], "tok-not-a-token-of-this-gateway"):  # over its limit; unknown
        response = await gateway.client.get("/v1/models", headers={"Authorization": f"Bearer {refused}"})
        assert response.status in (401, 429), response.status
    await flushed(gateway)
    return {"project": main, "token": token}


async def sign_in(page: Page) -> None:
    await page.goto("/admin/login")
    await page.get_by_label("Management token").fill(MANAGEMENT_TOKEN)
    await page.get_by_role("button", name="Sign in").click()
    await expect(page.get_by_role("heading", name="Overview", exact=True)).to_be_visible()


@pytest.mark.parametrize("viewport", VIEWPORTS)
async def test_every_page_is_accessible_fits_the_screen_and_is_photographed(
        make_gateway: Callable[..., Any], make_page: Callable[..., Awaitable[Page]],
        axe: Callable[[Page], Awaitable[list[Violation]]], screenshot: Callable[[Page, str], Awaitable[Path]],
        viewport: str) -> None:
    gateway: Gateway = await make_gateway()
    data = await with_data(gateway)
    project, token = data["project"], data["token"]
    page = await make_page(viewport, base_url=str(gateway.client.make_url("")).rstrip("/"))
    failures: dict[str, Any] = {}

    async def check(name: str, heading: str | re.Pattern[str]) -> None:
        await expect(page.get_by_role("heading", name=heading, exact=isinstance(heading, str))).to_be_visible()
        await screenshot(page, f"console-{name}")
        violations = await axe(page)
        if violations:
            failures[name] = violations
        # Nothing wider than the screen but what scrolls inside its own box.
        widths = await page.evaluate("[document.documentElement.scrollWidth, window.innerWidth]")
        if widths[0] > widths[1]:
            failures[f"{name}: page {widths[0]}px wide on a {widths[1]}px screen"] = await page.evaluate(
                """() => [...document.querySelectorAll("main *")].filter(element =>
                    element.getBoundingClientRect().right > window.innerWidth && !element.closest(".scroll"))
                    .slice(0, 5).map(element => element.outerHTML.slice(0, 120))""")

    await page.goto("/admin/login")
    await check("login", "Sign in")
    await sign_in(page)
    await check("overview", "Overview")
    await expect(page.locator("figure.chart svg rect").first).to_be_attached()  # the chart has bars
    await page.get_by_text("As a table").click()  # the chart's table, hidden until asked for
    if violations := await axe(page):
        failures["overview with its table open"] = violations
    await page.goto("/admin/projects")
    await check("projects", "Projects")
    await page.goto(f"/admin/projects/{project['id']}")
    await check("project", "Project support-bot")
    await page.goto("/admin/tokens?state=all")
    await check("tokens", "Tokens")
    await page.goto(f"/admin/tokens/{token['id']}")
    await check("token", re.compile("^Token "))
    await page.goto(f"/admin/tokens?project_id={project['id']}")
    await page.get_by_role("button", name="Create token").click()
    await check("token-created", "Token created")
    await page.goto(f"/admin/usage?project_id={project['id']}&days=7")
    await check("usage", "Usage")
    await expect(page.locator("figure.chart svg rect").first).to_be_attached()
    await page.goto("/admin/audit")
    await page.locator("table.audit summary").first.click()  # one event open, as an operator reads it
    await check("audit", "Audit")
    await page.goto("/admin/audit/verify")
    await check("audit-verify", "Audit chain verification")
    await page.goto("/admin/no-such-page")
    await check("error", "Not found")
    assert not failures, failures
