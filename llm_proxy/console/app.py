"""Build the console's sub-application at /admin: templates, its static files, its gate and its pages."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp_jinja2
import jinja2
import orjson
from aiohttp import web

from llm_proxy.audit.writer import AuditWriter
from llm_proxy.console.guard import console_guard, https_detector
from llm_proxy.console.pages import Pages
from llm_proxy.console.reports import Reports
from llm_proxy.console.sessions import ConsoleSessions
from llm_proxy.console.signin import SignIn
from llm_proxy.gateway.admission import IpBlock
from llm_proxy.limiting.base import FailureLimiter
from llm_proxy.manage.auth import ManagementAuth, ManagementTokens
from llm_proxy.settings import Settings
from llm_proxy.storage.base import Store
from llm_proxy.tokens.cache import TokenCache
from llm_proxy.tokens.service import TokenService

STATIC = Path(__file__).parent / "static"


def event_json(event: dict[str, Any]) -> str:
    """An audit event as indented JSON text, exactly as stored (autoescaping then shows it as text;
    Jinja's tojson would show a client's `<` as `\\u003c`)."""
    return orjson.dumps(event, option=orjson.OPT_INDENT_2, default=str).decode()


def console_app(settings: Settings, service: TokenService, store: Store, cache: TokenCache, audit: AuditWriter, *,
                auth: ManagementAuth, tokens: ManagementTokens, ip_block: IpBlock, failures: FailureLimiter,
                clock: Callable[[], float] = time.time) -> web.Application:
    """Return the sub-application serving the console (mount it at /admin)."""
    sessions = ConsoleSessions(store.sessions, settings.management_tokens, clock)
    speaks_https = https_detector(settings.tls_cert_file is not None, settings.trusted_proxies)
    app = web.Application(middlewares=[console_guard(sessions, auth, ip_block, audit, speaks_https=speaks_https)])
    # Autoescaping on for every template; nothing a user typed is ever marked safe.
    environment = aiohttp_jinja2.setup(app, loader=jinja2.PackageLoader("llm_proxy.console", "templates"),
                                       autoescape=True, undefined=jinja2.StrictUndefined)
    environment.filters["event_json"] = event_json
    app.add_routes([*SignIn(sessions, tokens, failures, audit).routes(),
                    *Reports(service, store, cache, audit).routes(),
                    *Pages(settings, service, cache, audit, sessions).routes()])
    app.router.add_static("/static/", STATIC, append_version=False)
    return app
