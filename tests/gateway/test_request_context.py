"""Request ids, and client IP resolution behind trusted proxies (X-Forwarded-For), as unit tests and a property."""

from __future__ import annotations

import ipaddress
import re
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st
from multidict import CIMultiDict

from llm_proxy.app import AUDIT
from llm_proxy.gateway.context import RequestIds, ip_in, resolve_client_ip
from llm_proxy.settings import IPNetwork
from tests.fakes import send


def networks(*items: str) -> tuple[IPNetwork, ...]:
    return tuple(ipaddress.ip_network(item) for item in items)


PROXIES = networks("10.0.0.0/8", "fd00::/8")


@pytest.mark.parametrize(("peer", "forwarded_for", "trusted", "expected"), [
    # No trusted proxies configured: the header is never believed.
    ("203.0.113.9", "198.51.100.1", (), "203.0.113.9"),
    # An untrusted peer may claim anything; it stays itself.
    ("203.0.113.9", "198.51.100.1", PROXIES, "203.0.113.9"),
    ("203.0.113.9", "10.0.0.1", PROXIES, "203.0.113.9"),
    # A trusted peer without (or with an empty) header is the client itself.
    ("10.0.0.1", None, PROXIES, "10.0.0.1"),
    ("10.0.0.1", "", PROXIES, "10.0.0.1"),
    # A trusted peer: the right-most hop it does not trust is the client; hops to its left are
    # whatever the client chose to send, so they are never believed.
    ("10.0.0.1", "198.51.100.1", PROXIES, "198.51.100.1"),
    ("10.0.0.1", "6.6.6.6, 198.51.100.1", PROXIES, "198.51.100.1"),
    ("10.0.0.1", " 6.6.6.6 ,198.51.100.1 ", PROXIES, "198.51.100.1"),
    # A chain of trusted proxies is walked through.
    ("10.0.0.1", "198.51.100.1, 10.0.0.2, 10.0.0.3", PROXIES, "198.51.100.1"),
    ("10.0.0.1", "6.6.6.6, 198.51.100.1, 10.9.9.9", PROXIES, "198.51.100.1"),
    # Every hop trusted: the left-most (farthest) one is the best we know.
    ("10.0.0.1", "10.0.0.2, 10.0.0.3", PROXIES, "10.0.0.2"),
    # A malformed hop breaks the chain before an untrusted one is found: fall back to the peer.
    ("10.0.0.1", "198.51.100.1, garbage", PROXIES, "10.0.0.1"),
    ("10.0.0.1", "198.51.100.1, 10.0.0.2, not-an-ip", PROXIES, "10.0.0.1"),
    ("10.0.0.1", "198.51.100.1,", PROXIES, "10.0.0.1"),
    ("10.0.0.1", "198.51.100.1:4711", PROXIES, "10.0.0.1"),
    ("10.0.0.1", "unknown", PROXIES, "10.0.0.1"),
    # Garbage left of the client hop is never reached.
    ("10.0.0.1", "garbage, 198.51.100.1", PROXIES, "198.51.100.1"),
    # IPv6 peers, hops and networks; addresses come back in canonical form.
    ("fd00::1", "2001:db8::7", PROXIES, "2001:db8::7"),
    ("fd00::1", "2001:0db8:0000:0000:0000:0000:0000:0007", PROXIES, "2001:db8::7"),
    ("fd00::1", "2001:db8::7, fd12::3", PROXIES, "2001:db8::7"),
    ("10.0.0.1", "2001:db8::7", PROXIES, "2001:db8::7"),
    ("fd00::1", "198.51.100.1", PROXIES, "198.51.100.1"),
    ("2001:db8::1", "198.51.100.1", PROXIES, "2001:db8::1"),
    ("fd00::1", "[2001:db8::7]", PROXIES, "fd00::1"),
    ("::1", "2001:db8::7", networks("::1/128"), "2001:db8::7"),
    # An unparsable peer (e.g. a unix socket) is never trusted.
    ("", "198.51.100.1", PROXIES, ""),
])
def test_resolve_client_ip(peer: str, forwarded_for: str | None, trusted: tuple[IPNetwork, ...],
                           expected: str) -> None:
    assert resolve_client_ip(peer, forwarded_for, trusted) == expected


@pytest.mark.parametrize(("address", "nets", "expected"), [
    ("127.0.0.1", networks("127.0.0.1/32"), True),
    ("127.0.0.2", networks("127.0.0.1/32"), False),
    ("10.20.30.40", networks("192.168.0.0/16", "10.0.0.0/8"), True),
    ("::1", networks("::1/128"), True),
    ("2001:db8:1::5", networks("2001:db8::/32"), True),
    ("2001:db9::5", networks("2001:db8::/32"), False),
    ("127.0.0.1", networks("::/0"), False),
    ("not-an-ip", networks("0.0.0.0/0"), False),
    ("", networks("0.0.0.0/0"), False),
    ("127.0.0.1", (), False),
])
def test_ip_in(address: str, nets: tuple[IPNetwork, ...], expected: bool) -> None:
    assert ip_in(address, nets) is expected


_ipv4 = st.ip_addresses(v=4).map(str)
_ipv6 = st.ip_addresses(v=6).map(str)
_hop = st.one_of(_ipv4, _ipv6, st.text(max_size=20))
_header = st.one_of(st.none(), st.text(max_size=60), st.lists(_hop, max_size=6).map(", ".join))


@given(peer=st.one_of(_ipv4, _ipv6), header=_header)
def test_an_untrusted_peer_is_always_the_client_whatever_it_claims(peer: str, header: str | None) -> None:
    trusted = networks("10.0.0.0/8", "fd00::/8")
    if ip_in(peer, trusted):
        return  # only untrusted peers are in question here
    assert resolve_client_ip(peer, header, trusted) == peer


@given(peer=st.sampled_from(["10.0.0.1", "fd00::1"]), hops=st.lists(_hop, max_size=6))
def test_a_trusted_peer_yields_the_peer_or_a_well_formed_hop(peer: str, hops: list[str]) -> None:
    header = ", ".join(hops)
    result = resolve_client_ip(peer, header, PROXIES)
    # Whatever the header holds, the answer is an address: the peer or one of the hops, canonicalised.
    assert result == peer or result in {str(ipaddress.ip_address(hop.strip())) for hop in hops
                                        if _is_ip(hop.strip())}


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def test_request_ids_are_32_hex_digits_and_unique_across_refills() -> None:
    ids = RequestIds()
    drawn = [ids.new() for _ in range(1000)]  # four refills of the 256-id batch
    assert all(re.fullmatch(r"[0-9a-f]{32}", value) for value in drawn)
    assert len(set(drawn)) == len(drawn)
    assert len(set(RequestIds().new() for _ in range(50))) == 50  # each instance draws its own


# ---- through real HTTP: X-Forwarded-For given on several header lines ----

_SPOOFED_FIRST_LINE = [("X-Forwarded-For", "10.9.9.9"), ("X-Forwarded-For", "203.0.113.7")]


async def test_every_x_forwarded_for_line_is_read_so_a_client_cannot_choose_its_ip(make_gateway: Any) -> None:
    """A proxy that adds its own line (HAProxy does) must not leave the client's line as the answer:
    here the client wrote 10.9.9.9, which MANAGEMENT_ALLOWED_IPS lets read /metrics without a token."""
    gateway = await make_gateway(TRUSTED_PROXIES="127.0.0.1/32", MANAGEMENT_ALLOWED_IPS="10.9.9.9/32")

    spoofed = await gateway.client.get("/metrics", headers=CIMultiDict(_SPOOFED_FIRST_LINE))
    honest = await gateway.client.get("/metrics", headers={"X-Forwarded-For": "10.9.9.9"})

    assert spoofed.status in (401, 403)
    assert honest.status == 200  # the one-line case still works as before
    await gateway.app[AUDIT].flush()
    events = [orjson.loads(line) for line in gateway.settings.audit_log_file.read_bytes().splitlines()]
    assert events[0]["client_ip"] == "203.0.113.7"


async def test_the_failure_throttle_counts_the_address_the_proxy_saw_whatever_the_client_wrote(
        make_gateway: Any) -> None:
    gateway = await make_gateway(TRUSTED_PROXIES="127.0.0.1/32", IP_RATE_LIMIT="2")
    statuses = []
    for n in range(4):
        headers = CIMultiDict([("X-Forwarded-For", f"198.51.100.{n}"), ("X-Forwarded-For", "203.0.113.7"),
                               ("Authorization", "Bearer tok-" + "x" * 43)])
        statuses.append((await gateway.client.get("/v1/models", headers=headers)).status)
    assert statuses == [401, 401, 429, 429]


# ---- through real HTTP: the request id on every kind of error ----

async def test_request_id_echoed_on_error_kinds(gateway: Any) -> None:
    """From the fifth review (the management API's contract)."""
    for method, path in (("PUT", "/manage/projects"), ("GET", "/nope"), ("GET", "/manage/tokens/x"),
                         ("POST", "/manage/projects")):
        status, _, headers = await send(gateway, method, path, headers={"X-Request-ID": "probe-1.A_b"})
        assert status >= 400 and headers["X-Request-ID"] == "probe-1.A_b", (method, path, dict(headers))
        status, _, headers = await send(gateway, method, path, headers={"X-Request-ID": "bad id!"})
        assert headers["X-Request-ID"] != "bad id!"
