"""The /v1 route: one handler taking a request from its client IP to the upstream, in straight-line code."""

from __future__ import annotations

from aiohttp import web

from llm_proxy.errors import MethodNotAllowed, Overloaded
from llm_proxy.gateway.admission import RATE_DECISION, Admission, IpBlock
from llm_proxy.gateway.client_auth import CREDENTIAL, ClientAuth
from llm_proxy.gateway.forwarder import Forwarder
from llm_proxy.limiting.base import AddressBlocked
from llm_proxy.limiting.memory import ConcurrencyLimiter
from llm_proxy.ops.metrics import Metrics

# The methods the OpenAI API uses (GET, POST, DELETE), and HEAD and OPTIONS as HTTP requires. Anything
# else is refused here: an upstream that echoes TRACE (Apache's default) would hand the token holder
# the project's key, which the forwarded request carries in its Authorization header.
FORWARDED_METHODS = frozenset({"GET", "POST", "DELETE", "HEAD", "OPTIONS"})
ALLOW = "GET, POST, DELETE, HEAD, OPTIONS"


class ProxyRoute:
    """Check, admit and forward a /v1 request, in this order:

    1. an IP that failed authentication too often is refused before its credential is looked at
       (with Redis, a live token's request has its IP checked in the admission's round trip instead,
       and any other request, refused on the way, first here: the answers are the same, and an
       admitted request costs one round trip, not two);
    2. the client token (401/403);
    3. the method (405): only those the OpenAI API uses are forwarded, never TRACE and the like;
    4. capacity (503), before anything is counted: a request turned away for capacity costs the
       token neither quota nor rate (it is audited like the other limit refusals);
    5. quota, budget, the token's and the global rate (429);
    6. the forwarder, which streams the exchange and audits it as token.access.

    Straight-line calls rather than a middleware per step: on the hot path each layer is one more
    coroutine per request. The edge middleware around it has already set the request context and
    turns what is raised here into the OpenAI error body.
    """

    def __init__(self, *, ip_block: IpBlock, auth: ClientAuth, admission: Admission,
                 concurrency: ConcurrencyLimiter, forwarder: Forwarder, metrics: Metrics) -> None:
        self._ip_block = ip_block
        self._auth = auth
        self._admission = admission
        self._concurrency = concurrency
        self._forwarder = forwarder
        self._metrics = metrics

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """Answer one /v1 request."""
        live = await self._auth.live(request) if self._admission.checks_addresses else None
        deferred = live is not None
        if live is None:
            await self._ip_block.check(request, "client")
            live = await self._auth.authenticate(request)
        request[CREDENTIAL] = credential = live
        if request.method not in FORWARDED_METHODS:
            if deferred:
                await self._ip_block.check(request, "client")
            wrong = MethodNotAllowed(f"{request.method} is not forwarded; the gateway forwards {ALLOW}",
                                     headers={"Allow": ALLOW})
            self._admission.audit_refusal(request, credential, wrong)
            raise wrong
        concurrency = self._concurrency
        if not concurrency.try_acquire():
            if deferred:
                await self._ip_block.check(request, "client")
            self._metrics.count_denial("overloaded")
            refusal = Overloaded(headers={"Retry-After": "1"})
            self._admission.audit_refusal(request, credential, refusal)
            raise refusal
        try:
            try:
                decision = await self._admission.admit(request, credential)
            except AddressBlocked as blocked:
                raise self._ip_block.refusal(request, "client", blocked.retry_after) from None
            if decision.limit:
                request[RATE_DECISION] = decision
            return await self._forwarder.handle(request)
        finally:
            concurrency.release()
