"""Every typed key for shared application and request state, declared in one place."""

from __future__ import annotations

from typing import TYPE_CHECKING

import aiohttp
from aiohttp import web

if TYPE_CHECKING:
    from .audit import AuditWriter
    from .crypto import KeyRing
    from .database import Database
    from .settings import Settings
    from .tokenstore import Credential, TokenStore

SETTINGS = web.AppKey("settings", "Settings")
KEYRING = web.AppKey("keyring", "KeyRing")
DATABASE = web.AppKey("database", "Database")
TOKEN_STORE = web.AppKey("token_store", "TokenStore")
AUDIT = web.AppKey("audit", "AuditWriter")
UPSTREAM_SESSION = web.AppKey("upstream_session", aiohttp.ClientSession)

REQUEST_ID = web.RequestKey("request_id", str)
CLIENT_IP = web.RequestKey("client_ip", str)
CREDENTIAL = web.RequestKey("credential", "Credential")
