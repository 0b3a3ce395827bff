"""Every typed key for shared application and request state, declared in one place."""

from __future__ import annotations

import aiohttp
from aiohttp import web

SETTINGS = web.AppKey("settings", "Settings")
KEYRING = web.AppKey("keyring", "KeyRing")
DATABASE = web.AppKey("database", "Database")
TOKEN_STORE = web.AppKey("token_store", "TokenStore")
AUDIT = web.AppKey("audit", "AuditWriter")
UPSTREAM_SESSION = web.AppKey("upstream_session", aiohttp.ClientSession)

REQUEST_ID = web.RequestKey("request_id", str)
CLIENT_IP = web.RequestKey("client_ip", str)
CREDENTIAL = web.RequestKey("credential", "Credential")
UPSTREAM_BROKEN = web.RequestKey("upstream_broken", bool)
RATE_DECISION = web.RequestKey("rate_decision", "Decision")
