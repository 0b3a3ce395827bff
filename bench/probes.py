"""Client-side measurements in Python: time to first byte, per-chunk delay, memory under held streams."""

from __future__ import annotations

import asyncio
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

BODY = b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Hi"}],"stream":true}'
PLAIN_BODY = b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Hi"}]}'
_SENT = re.compile(rb'"sent_ns":(\d+)')
PATH = "/v1/chat/completions"


def _headers(token: str | None) -> dict[str, str]:
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    return headers


def _session(limit: int = 1) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=limit), trust_env=False,
                                 timeout=aiohttp.ClientTimeout(total=120))


def rss_kb(pid: int) -> int:
    """Return a process's resident set size (VmRSS) in kB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


@dataclass
class Timings:
    """What one probe run measured, in milliseconds."""
    values: list[float] = field(default_factory=list)
    overhead_header: list[float] = field(default_factory=list)  # X-LLM-Proxy-Overhead-Ms, when sent


async def plain_requests(base: str, token: str | None, count: int) -> Timings:
    """Send `count` sequential non-streamed requests on one connection; return their latencies."""
    result = Timings()
    async with _session() as session:
        for _ in range(count):
            started = time.perf_counter_ns()
            async with session.post(base + PATH, data=PLAIN_BODY, headers=_headers(token)) as response:
                body = await response.read()
                if response.status != 200 or b"chat.completion" not in body:
                    raise RuntimeError(f"{base}: status {response.status}")
            result.values.append((time.perf_counter_ns() - started) / 1e6)
    return result


async def first_byte(base: str, token: str | None, count: int, query: str = "stream=1") -> Timings:
    """Send `count` sequential streamed requests on one connection; return each time to the first body byte."""
    result = Timings()
    async with _session() as session:
        for _ in range(count):
            started = time.perf_counter_ns()
            async with session.post(f"{base}{PATH}?{query}", data=BODY, headers=_headers(token)) as response:
                first = await response.content.readany()
                arrived = time.perf_counter_ns()
                rest = await response.read()
                if response.status != 200 or not (first + rest).endswith(b"data: [DONE]\n\n"):
                    raise RuntimeError(f"{base}: status {response.status} or a truncated stream")
                overhead = response.headers.get("X-LLM-Proxy-Overhead-Ms")
                if overhead is not None:
                    result.overhead_header.append(float(overhead))
            result.values.append((arrived - started) / 1e6)
    return result


async def chunk_delays(base: str, token: str | None, requests: int, chunks: int, interval_ms: int) -> Timings:
    """Stream paced chunks; return, for every chunk, arrival time minus the upstream's send stamp."""
    result = Timings()
    async with _session() as session:
        for _ in range(requests):
            url = f"{base}{PATH}?stream=1&paced=1&chunks={chunks}&interval_ms={interval_ms}"
            async with session.post(url, data=BODY, headers=_headers(token)) as response:
                if response.status != 200:
                    raise RuntimeError(f"{base}: status {response.status}")
                buffer, seen = b"", 0
                async for data in response.content.iter_any():
                    arrived = time.monotonic_ns()
                    buffer += data
                    # Only whole events: a chunk split across reads counts when its last byte lands.
                    complete, _, buffer = buffer.rpartition(b"\n\n")
                    for stamp in _SENT.findall(complete):
                        result.values.append((arrived - int(stamp)) / 1e6)
                        seen += 1
                if seen != chunks:
                    raise RuntimeError(f"{base}: {seen} of {chunks} chunks arrived")
    return result


async def held_streams(base: str, token: str | None, count: int, pid: int | None,
                       hold_s: float = 60.0, connecting: int = 100) -> tuple[int, int | None]:
    """Open `count` streams that stay open, wait for each one's first chunk, read RSS of `pid`, then hang up.

    Returns (streams open at the reading, VmRSS in kB or None without a pid).
    """
    opened = 0
    all_open = asyncio.Event()
    release = asyncio.Event()
    gate = asyncio.Semaphore(connecting)  # a burst of 1,000 SYNs would overflow a 128-entry listen backlog
    url = f"{base}{PATH}?stream=1&paced=1&chunks=2&hold_s={hold_s}"

    async def one(session: aiohttp.ClientSession) -> None:
        nonlocal opened
        async with gate:
            response = await session.post(url, data=BODY, headers=_headers(token))
            if response.status != 200:
                response.release()
                raise RuntimeError(f"{base}: status {response.status} for a held stream")
            await response.content.readany()
        opened += 1
        if opened == count:
            all_open.set()
        try:
            await release.wait()
        finally:
            response.close()

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), trust_env=False) as session:
        tasks = [asyncio.create_task(one(session)) for _ in range(count)]
        waiter = asyncio.create_task(all_open.wait())
        try:
            done, _ = await asyncio.wait([waiter, *tasks], timeout=hold_s / 2, return_when=asyncio.FIRST_COMPLETED)
            if waiter not in done:
                # Before the release a stream task only ends by failing.
                if not done:
                    raise TimeoutError(f"{base}: only {opened} of {count} streams opened")
                raise next(iter(done)).exception() or RuntimeError(f"{base}: a held stream ended early")
            # Let the server settle what it allocates right after relaying the first chunk.
            await asyncio.sleep(0.5)
            reading = rss_kb(pid) if pid is not None else None
            return opened, reading
        finally:
            release.set()
            waiter.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
