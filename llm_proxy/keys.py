"""Every typed key for shared application and request state, declared in one place."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

if TYPE_CHECKING:
    from llm_proxy.audit.writer import AuditWriter
    from llm_proxy.crypto import KeyRing
    from llm_proxy.limiting.memory import Decision
    from llm_proxy.models import Credential
    from llm_proxy.settings import Settings
    from llm_proxy.storage.base import Store
    from llm_proxy.tokens.anomaly import AnomalyDetector
    from llm_proxy.tokens.cache import TokenCache
    from llm_proxy.tokens.expiry import ExpiryJob
    from llm_proxy.tokens.service import TokenService

SETTINGS: web.AppKey[Settings] = web.AppKey("settings")
KEYRING: web.AppKey[KeyRing] = web.AppKey("keyring")
STORE: web.AppKey[Store] = web.AppKey("store")
TOKEN_CACHE: web.AppKey[TokenCache] = web.AppKey("token_cache")
TOKEN_SERVICE: web.AppKey[TokenService] = web.AppKey("token_service")
AUDIT: web.AppKey[AuditWriter] = web.AppKey("audit")
ANOMALIES: web.AppKey[AnomalyDetector] = web.AppKey("anomalies")
EXPIRY_JOB: web.AppKey[ExpiryJob] = web.AppKey("expiry_job")

REQUEST_ID = web.RequestKey("request_id", str)
CLIENT_IP = web.RequestKey("client_ip", str)
CREDENTIAL: web.RequestKey[Credential] = web.RequestKey("credential")
RATE_DECISION: web.RequestKey[Decision] = web.RequestKey("rate_decision")
UPSTREAM_BROKEN = web.RequestKey("upstream_broken", bool)
REQUEST_STARTED = web.RequestKey("request_started", float)
