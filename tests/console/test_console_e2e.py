"""The console end to end in Chromium, as an operator uses it (issue 16): sign in; create a project; create a
token and copy it; use it through the real openai SDK; see the request on Overview and Usage; revoke it and
see the next SDK call fail; find both events on the Audit page and verify the chain; sign out."""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Awaitable, Callable
from contextlib import closing
from pathlib import Path
from typing import Any

import openai
import orjson
import pytest
from playwright.async_api import Page, expect

from tests.fakes import MANAGEMENT_TOKEN, UPSTREAM_KEY, Gateway

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}


async def sign_in(page: Page) -> None:
    await page.goto("/admin/")
    await expect(page).to_have_url(re.compile(r"/admin/login$"))  # no session yet
    await page.get_by_label("Management token").fill(MANAGEMENT_TOKEN)
    await page.get_by_role("button", name="Sign in").click()
    await expect(page.get_by_role("heading", name="Overview", exact=True)).to_be_visible()


def console_events(gateway: Gateway) -> list[dict[str, Any]]:
    with closing(sqlite3.connect(gateway.settings.database_path)) as conn:
        conn.row_factory = sqlite3.Row
        rows = conn.execute("SELECT action, result, details FROM audit_events ORDER BY id").fetchall()
    return [{"action": row["action"], "result": row["result"], "details": orjson.loads(row["details"] or "{}")}
            for row in rows]


async def test_an_operator_runs_a_token_through_its_life_in_the_console(
        make_gateway: Callable[..., Any], make_page: Callable[..., Awaitable[Page]],
        screenshot: Callable[[Page, str], Awaitable[Path]]) -> None:
    gateway: Gateway = await make_gateway()
    base = str(gateway.client.make_url("")).rstrip("/")
    page = await make_page("desktop", base_url=base, permissions=["clipboard-read", "clipboard-write"])

    await sign_in(page)

    # A project.
    await page.get_by_role("link", name="Projects").click()
    await page.get_by_label("Name", exact=True).fill("e2e-project")
    await page.get_by_label("Upstream API key").fill(UPSTREAM_KEY)
    await page.get_by_role("button", name="Create project").click()
    await expect(page.get_by_role("heading", name="Project e2e-project")).to_be_visible()
    await expect(page.get_by_role("status")).to_have_text("Created.")
    assert UPSTREAM_KEY not in await page.content()  # only its hint, ever

    # A token for it, copied with the button.
    await page.get_by_role("link", name="Tokens").first.click()
    await page.get_by_label("Project", exact=True).select_option(label="e2e-project")
    await page.get_by_label("At most this many requests").fill("10")
    await page.get_by_role("button", name="Create token").click()
    await expect(page.get_by_role("heading", name="Token created")).to_be_visible()
    plaintext = await page.get_by_label("The token").input_value()
    assert plaintext.startswith("tok-")
    await page.get_by_role("button", name="Copy").click()
    await expect(page.get_by_role("button", name="Copied")).to_be_visible()
    assert await page.evaluate("navigator.clipboard.readText()") == plaintext
    await screenshot(page, "console-token-created")

    # Used through the real SDK.
    sdk = gateway.openai(plaintext)
    answer = await sdk.chat.completions.create(**CHAT)  # type: ignore[call-overload]
    assert answer.choices

    # Seen on Overview and Usage.
    await page.get_by_role("link", name="Overview").click()
    requests = page.locator(".stats li").filter(has_text="requests in the last 24 hours").locator(".figure")
    await expect(requests).to_have_text("1")
    await expect(page.locator("figure.chart svg[role=img]")).to_be_visible()
    await page.get_by_role("link", name="Usage").click()
    await page.get_by_label("Project", exact=True).select_option(label="e2e-project")
    await page.get_by_role("button", name="Show").click()
    await expect(page.locator(".stats li").filter(has_text="requests").first.locator(".figure")).to_have_text("1")
    async with page.expect_download() as downloading:
        await page.get_by_role("link", name="Download as CSV").click()
    download = await downloading.value
    csv = Path(await download.path()).read_text()
    assert csv.startswith("day,requests,") and sum(int(line.split(",")[1]) for line in csv.splitlines()[1:]) == 1

    # Revoked in the console: the next SDK call fails.
    await page.get_by_role("link", name="Tokens").first.click()
    token_hint = plaintext[:8]
    await page.get_by_role("link", name=re.compile("^" + re.escape(token_hint))).click()
    page.once("dialog", lambda dialog: dialog.accept())  # the confirmation before a revocation
    await page.get_by_role("button", name="Revoke").click()
    await expect(page.get_by_role("status")).to_have_text("Revoked.")
    with pytest.raises(openai.AuthenticationError):
        await sdk.chat.completions.create(**CHAT)  # type: ignore[call-overload]
    assert plaintext not in await page.content()

    # Both events on the Audit page, and the chain verifies.
    await page.get_by_role("link", name="Audit").click()
    for action in ("token.create", "token.revoke"):
        await page.get_by_label("Action").fill(action)
        await page.get_by_role("button", name="Filter").click()
        row = page.locator("table.audit tbody tr").first
        await expect(row).to_contain_text(action)
        await row.locator("summary").click()
        await expect(row.locator("pre")).to_contain_text('"via": "console"')
    await page.get_by_role("link", name="Verify every chain").click()
    await expect(page.get_by_role("status")).to_contain_text("OK")

    # Signed out: the console is closed again.
    await page.get_by_role("button", name="Sign out").click()
    await expect(page.get_by_role("heading", name="Sign in")).to_be_visible()
    await page.goto("/admin/tokens")
    await expect(page).to_have_url(re.compile(r"/admin/login$"))

    events = console_events(gateway)
    actions = [(event["action"], event["result"]) for event in events if event["details"].get("via") == "console"]
    assert actions == [("admin.login", "success"), ("project.create", "success"), ("token.create", "success"),
                       ("token.revoke", "success"), ("admin.logout", "success")]
    assert all(plaintext not in str(event) and MANAGEMENT_TOKEN not in str(event) for event in events)
