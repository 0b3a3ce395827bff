"""Give every request an id (echoed on every response) and resolve the client IP behind trusted proxies."""

from __future__ import annotations

import ipaddress
import os
import re
import time
from collections.abc import Callable

from aiohttp import web

from llm_proxy.settings import IPNetwork

# Set for every request by the edge's first step; read by every later one, error bodies and audit events too.
REQUEST_ID = web.RequestKey("request_id", str)
CLIENT_IP = web.RequestKey("client_ip", str)
REQUEST_STARTED = web.RequestKey("request_started", float)

_SANE_ID = re.compile(r"[A-Za-z0-9._-]{1,128}")
_ID_BATCH = 256  # ids drawn from the OS's random source per read


class RequestIds:
    """Random 128-bit request ids (32 hex digits) from os.urandom, read 4 KiB at a time.

    One getrandom(2) per 256 requests instead of one per request (as uuid4 did): on this kind of
    VM the system call costs more than the rest of the id.
    """

    __slots__ = ("_hex", "_next")

    def __init__(self) -> None:
        self._hex = ""
        self._next = 0

    def new(self) -> str:
        """Return a fresh id."""
        start = self._next
        if start >= len(self._hex):
            self._hex, start = os.urandom(16 * _ID_BATCH).hex(), 0
        self._next = start + 32
        return self._hex[start:start + 32]


def resolve_client_ip(peer: str, forwarded_for: str | None, trusted: tuple[IPNetwork, ...]) -> str:
    """Return the peer, or the right-most X-Forwarded-For hop not in `trusted` when the peer is trusted."""
    if not trusted or not forwarded_for or not ip_in(peer, trusted):
        return peer
    hops = [hop.strip() for hop in forwarded_for.split(",")]
    for hop in reversed(hops):
        try:
            address = ipaddress.ip_address(hop)
        except ValueError:
            # A malformed hop means the chain cannot be believed past this point.
            return peer
        if not any(address in network for network in trusted):
            return str(address)
    return str(ipaddress.ip_address(hops[0])) if hops else peer


def forwarded_for(request: web.BaseRequest) -> str | None:
    """Return every X-Forwarded-For line of a request as one list, in order (None when there is none).

    HTTP lets a proxy add its own header line instead of extending the client's (HAProxy does):
    reading only the first line would take the hops the client wrote itself as the truth.
    """
    lines = request.headers.getall("X-Forwarded-For", ())
    return ",".join(lines) if lines else None


def ip_in(peer: str, networks: tuple[IPNetwork, ...]) -> bool:
    """Tell whether an address lies in any of the networks (False for anything unparsable)."""
    try:
        address = ipaddress.ip_address(peer)
    except ValueError:
        return False
    return any(address in network for network in networks)


def request_context(trusted_proxies: tuple[IPNetwork, ...]) -> Callable[[web.Request], None]:
    """Build the step that sets REQUEST_STARTED, REQUEST_ID and CLIENT_IP before anything else runs."""
    new_id = RequestIds().new

    def set_context(request: web.Request) -> None:
        request[REQUEST_STARTED] = time.perf_counter()
        presented = request.headers.get("X-Request-ID")
        request[REQUEST_ID] = presented if presented and _SANE_ID.fullmatch(presented) else new_id()
        peer = request.remote or ""
        request[CLIENT_IP] = (resolve_client_ip(peer, forwarded_for(request), trusted_proxies)
                              if trusted_proxies else peer)

    return set_context


def add_request_id_header(request: web.Request, response: web.StreamResponse) -> None:
    """Echo the request id on every response, streamed ones included (a step of the response hook)."""
    request_id = request.get(REQUEST_ID)
    if request_id is not None:
        response.headers["X-Request-ID"] = request_id


