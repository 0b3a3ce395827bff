"""Browser fixtures for the console's tests: Debian's Chromium, headless, driven by Playwright's async API.

- `chromium` (session): the path of Debian's Chromium, /usr/bin/chromium. Missing, the tests that need it
  are skipped, except under CI, where they fail (`make test` installs it; Playwright never downloads a
  browser here).
- `browser`: that Chromium, launched for the test. Not session-scoped on purpose: Playwright's objects
  belong to the event loop that made them, and every test runs on a loop of its own together with
  `make_gateway` and the other async fixtures; one browser for the session would move all of them to a
  session loop. A launch costs about half a second.
- `make_page(viewport="desktop", **context_options)`: a page in a new browser context (no cookie,
  storage or cache shared with any other page, in this test or another), at "desktop" (1280×800) or
  "phone" (390×844, mobile, touch) size. `context_options` go to `Browser.new_context`, for instance
  `base_url=str(gateway.client.make_url(""))` or `java_script_enabled=False`. `page` is one at desktop.
- `screenshot(page, name)`: a full-page PNG at build/screenshots/<name>-<viewport>.png, e.g.
  overview-phone.png. build/ is git-ignored, so a run never dirties the tree: an image the README shows
  is copied from there on purpose and committed beside the README.
- `axe(page)`: axe-core's serious and critical violations on the page as it stands, so a test says
  `assert not violations, violations`.

Playwright runs Chromium without its sandbox by default (`chromium_sandbox=False`), which running as root
requires, and already passes the flags that keep it off the network (no background networking, no
component updates).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from axe_playwright_python.async_playwright import Axe
from playwright.async_api import Browser, BrowserContext, Page, async_playwright

from tests.fakes import REPO
from tests.servers import missing

CHROMIUM = Path("/usr/bin/chromium")
SCREENSHOTS = REPO / "build" / "screenshots"
VIEWPORTS = {"desktop": (1280, 800), "phone": (390, 844)}
ACTION_TIMEOUT_MS = 10_000  # a local page answers in milliseconds; a failing wait should not take Playwright's 30 s
BLOCKING_IMPACTS = frozenset({"serious", "critical"})


@dataclass(frozen=True)
class Violation:
    """One axe-core rule a page breaks: its id, impact, what it asks for and the elements that break it."""

    rule: str
    impact: str
    help: str
    targets: tuple[str, ...]


@pytest.fixture(scope="session")
def chromium() -> Path:
    if not os.access(CHROMIUM, os.X_OK):
        missing(f"Debian's Chromium ({CHROMIUM})")
    return CHROMIUM


@pytest.fixture
async def browser(chromium: Path) -> AsyncIterator[Browser]:
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(executable_path=chromium, headless=True)
        yield launched
        await launched.close()


@pytest.fixture
async def make_page(browser: Browser) -> AsyncIterator[Callable[..., Awaitable[Page]]]:
    """Open pages, each in a browser context of its own, closed after the test."""
    contexts: list[BrowserContext] = []

    async def open_page(viewport: str = "desktop", **context_options: Any) -> Page:
        width, height = VIEWPORTS[viewport]
        phone = viewport == "phone"
        context = await browser.new_context(viewport={"width": width, "height": height}, device_scale_factor=1,
                                            is_mobile=phone, has_touch=phone, **context_options)
        contexts.append(context)
        context.set_default_timeout(ACTION_TIMEOUT_MS)
        return await context.new_page()

    yield open_page
    for context in contexts:
        await context.close()


@pytest.fixture
async def page(make_page: Callable[..., Awaitable[Page]]) -> Page:
    return await make_page()


@pytest.fixture
def screenshot() -> Callable[[Page, str], Awaitable[Path]]:
    async def save(page: Page, name: str) -> Path:
        size = page.viewport_size
        assert size is not None
        viewport = next((label for label, (width, height) in VIEWPORTS.items()
                         if (size["width"], size["height"]) == (width, height)), f"{size['width']}x{size['height']}")
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        path = SCREENSHOTS / f"{name}-{viewport}.png"
        await page.screenshot(path=path, full_page=True)
        return path

    return save


@pytest.fixture
def axe() -> Callable[[Page], Awaitable[list[Violation]]]:
    async def check(page: Page) -> list[Violation]:
        results = await Axe().run(page)
        return [Violation(found["id"], found["impact"], found["help"],
                          tuple(", ".join(map(str, node["target"])) for node in found["nodes"]))
                for found in results.response["violations"] if found["impact"] in BLOCKING_IMPACTS]

    return check
