"""Which headers cross the gateway: what the upstream is sent, what the client gets back."""

from __future__ import annotations

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection",
                        "te", "trailer", "trailers", "transfer-encoding", "upgrade"})
# The client's credentials, cookies and claims about its own address never reach the upstream;
# Accept-Encoding is dropped so the upstream answers in identity encoding (usage can be read).
# OpenAI-Organization/-Project would let a token holder pick (and bill) any organization or project
# the operator's key can reach: the project's key alone decides.
REQUEST_DENY = HOP_BY_HOP | {"host", "authorization", "cookie", "content-length", "accept-encoding", "forwarded",
                             "x-real-ip", "x-request-id", "expect", "openai-organization", "openai-project"}
# Upstream cookies and account identifiers stay here; X-Request-ID is ours.
RESPONSE_DENY = HOP_BY_HOP | {"set-cookie", "server", "date", "x-request-id", "openai-organization",
                              "openai-project", "content-length"}


def upstream_headers(request: web.Request, authorization: str) -> list[tuple[str, str]]:
    """Return the headers to send upstream: the client's, less what must not cross, with the project's key."""
    connection = request.headers.get("Connection")
    # Headers the client named in Connection are hop-by-hop too.
    deny = REQUEST_DENY | {name.strip().lower() for name in connection.split(",")} if connection else REQUEST_DENY
    headers = [(name, value) for name, value in request.headers.items()
               if (lowered := name.lower()) not in deny and not lowered.startswith("x-forwarded-")]
    headers += (("Authorization", authorization), ("Accept-Encoding", "identity"))
    return headers


def client_headers(upstream: aiohttp.ClientResponse) -> CIMultiDict[str]:
    """Return the upstream's headers the client may see, its request id as X-Upstream-Request-ID."""
    headers: CIMultiDict[str] = CIMultiDict()
    for name, value in upstream.headers.items():
        lowered = name.lower()
        # The gateway alone decides CORS: the upstream's own Access-Control-* never pass.
        if lowered not in RESPONSE_DENY and not lowered.startswith("access-control-"):
            headers.add(name, value)
    if "X-Request-ID" in upstream.headers:
        headers["X-Upstream-Request-ID"] = upstream.headers["X-Request-ID"]
    return headers
