"""Soak llm-proxy with mixed traffic for a bounded time; fail if its memory or open files keep growing.

    python bench/soak.py                 # 2 minutes
    python bench/soak.py --minutes 30 --rate 60

A fake upstream (aiohttp, in this process) and `python -m llm_proxy serve` (a subprocess, on
127.0.0.1, with a temporary data directory) are started; a project and a token are created; then
requests arrive at --rate per second for --minutes: plain chat, streamed chat, embeddings, model
lists, management reads (tokens, audit, metrics), bad tokens, and streams the client abandons
after the first event. Every --every seconds the gateway's VmRSS (/proc/PID/status) and open file
descriptors (/proc/PID/fd) are sampled and printed.

Verdict, after a warm-up (--warmup seconds, by default a third of the run and at most 60 s: the
allocator, connection pools and SQLite's page cache fill up, RSS settles about 2 MB above its start):
  * RSS may grow by at most max(--rss-tolerance-mb, 10 %) from the first sample after warm-up to
    the last one;
  * open descriptors by at most --fd-tolerance (connection pools come and go with the load);
  * every request gets the status its kind expects, and the gateway exits 0 on SIGTERM.
Exit status: 0 pass, 1 fail, 2 could not run. Everything stops by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import random
import secrets
import signal
import socket
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
from aiohttp import web

ROOT = Path(__file__).resolve().parent.parent
COMPLETION = (b'{"id":"chatcmpl-soak","object":"chat.completion","created":1700000000,"model":"gpt-4o-mini",'
              b'"choices":[{"index":0,"message":{"role":"assistant","content":"Hello"},"finish_reason":"stop"}],'
              b'"usage":{"prompt_tokens":5,"completion_tokens":1,"total_tokens":6}}')
EMBEDDING = (b'{"object":"list","model":"text-embedding-3-small","data":[{"object":"embedding","index":0,'
             b'"embedding":[0.1,0.2,0.3]}],"usage":{"prompt_tokens":3,"total_tokens":3}}')
MODELS = b'{"object":"list","data":[{"id":"gpt-4o-mini","object":"model","created":1700000000,"owned_by":"x"}]}'
CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello there"}]}
# (kind, weight, expected status). IP_RATE_LIMIT is set far above the bad-token rate: failures are
# still counted per IP (that memory is part of the soak), but the soak's own IP is never blocked.
MIX = (("chat", 30, 200), ("stream", 25, 200), ("embeddings", 15, 200), ("models", 8, 200),
       ("manage", 11, 200), ("abandon", 6, 200), ("bad_token", 5, 401))


# ---- the fake upstream ----

def upstream_app() -> web.Application:
    """A fake OpenAI API: completions (streamed on request, usage last), embeddings, models."""
    async def chat(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        if not body.get("stream"):
            return web.Response(body=COMPLETION, content_type="application/json")
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        try:
            for index in range(int(body.get("n_chunks", 10))):
                await response.write(b'data: {"id":"chatcmpl-soak","object":"chat.completion.chunk","choices":'
                                     b'[{"index":0,"delta":{"content":"tok%d "},"finish_reason":null}]}\n\n' % index)
                await asyncio.sleep(0.005)
            await response.write(b'data: {"id":"chatcmpl-soak","object":"chat.completion.chunk","choices":[],'
                                 b'"usage":{"prompt_tokens":5,"completion_tokens":10,"total_tokens":15}}\n\n'
                                 b"data: [DONE]\n\n")
            await response.write_eof()
        except ConnectionResetError:
            pass  # the gateway closed the stream because its client left: what "abandon" is for
        return response

    async def embeddings(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(body=EMBEDDING, content_type="application/json")

    async def models(request: web.Request) -> web.Response:
        return web.Response(body=MODELS, content_type="application/json")

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_post("/v1/embeddings", embeddings)
    app.router.add_get("/v1/models", models)
    return app


# ---- the gateway process ----

def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class Gateway:
    process: asyncio.subprocess.Process
    url: str
    management: dict[str, str]
    token: str = ""

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError("no VmRSS")

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.process.pid}/fd"))


async def start_gateway(workdir: Path, upstream: str) -> Gateway:
    """Start `python -m llm_proxy serve` on a free port; wait for /health; create a project and a token."""
    port = free_port()
    management_token = secrets.token_urlsafe(32)
    data = workdir / "data"
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(ROOT),
           "MANAGEMENT_TOKEN": management_token, "ENCRYPTION_KEY": base64.b64encode(secrets.token_bytes(32)).decode(),
           "OPENAI_API_URL": upstream, "LISTEN_ADDR": f"127.0.0.1:{port}",
           "DATABASE_PATH": str(data / "llm-proxy.db"), "AUDIT_LOG_FILE": str(data / "audit.log"),
           "LOG_FILE": str(workdir / "gateway.log"), "RATE_LIMIT_PER_MINUTE": "0",
           "IP_RATE_LIMIT": "1000000", "SHUTDOWN_GRACE": "5s"}
    with (workdir / "gateway.out").open("wb") as out:  # cwd is the temporary directory: no developer's .env
        process = await asyncio.create_subprocess_exec(sys.executable, "-m", "llm_proxy", "serve", cwd=workdir,
                                                       env=env, stdout=out, stderr=out,
                                                       stdin=asyncio.subprocess.DEVNULL)
    gateway = Gateway(process, f"http://127.0.0.1:{port}", {"Authorization": f"Bearer {management_token}"})
    async with aiohttp.ClientSession() as session:
        deadline = time.monotonic() + 20
        while True:
            if process.returncode is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the gateway did not start; see {workdir / 'gateway.out'}:\n"
                                   + (workdir / "gateway.out").read_text(errors="replace")[-2000:])
            try:
                async with session.get(gateway.url + "/health") as response:
                    if response.status == 200:
                        break
            except aiohttp.ClientConnectionError:
                await asyncio.sleep(0.05)
        async with session.post(gateway.url + "/manage/projects", headers=gateway.management,
                                json={"name": "soak", "api_key": "sk-soak-" + secrets.token_hex(16)}) as response:
            project = await response.json()
        async with session.post(gateway.url + "/manage/tokens", headers=gateway.management,
                                json={"project_id": project["id"], "duration_minutes": 43200}) as response:
            gateway.token = (await response.json())["token"]
    return gateway


# ---- the traffic ----

@dataclass
class Tally:
    statuses: Counter[tuple[str, int]] = field(default_factory=Counter)
    unexpected: Counter[tuple[str, str]] = field(default_factory=Counter)

    @property
    def total(self) -> int:
        return sum(self.statuses.values())


async def one_request(session: aiohttp.ClientSession, gateway: Gateway, kind: str, expected: int,
                      tally: Tally) -> None:
    """Send one request of `kind`; record its status, and anything but `expected` as unexpected."""
    token = {"Authorization": f"Bearer {gateway.token}"}
    url = gateway.url
    try:
        if kind == "chat":
            request = session.post(url + "/v1/chat/completions", json=CHAT, headers=token)
        elif kind == "stream":
            request = session.post(url + "/v1/chat/completions", json={**CHAT, "stream": True}, headers=token)
        elif kind == "abandon":
            request = session.post(url + "/v1/chat/completions", json={**CHAT, "stream": True, "n_chunks": 200},
                                   headers=token)
        elif kind == "embeddings":
            request = session.post(url + "/v1/embeddings", json={"model": "text-embedding-3-small", "input": "hi"},
                                   headers=token)
        elif kind == "models":
            request = session.get(url + "/v1/models", headers=token)
        elif kind == "manage":
            path = random.choice(("/manage/tokens", "/manage/audit?limit=20", "/metrics", "/manage/projects"))  # noqa: S311
            request = session.get(url + path, headers=gateway.management)
        else:  # bad_token: a fresh well-formed but unknown token every time
            bad = {"Authorization": f"Bearer tok-{secrets.token_urlsafe(32)}"}
            request = session.get(url + "/v1/models", headers=bad)
        async with request as response:
            if kind == "abandon":
                await response.content.readuntil(b"\n\n")
                response.close()  # drop the connection mid-stream
            else:
                await response.read()
            tally.statuses[kind, response.status] += 1
            if response.status != expected:
                tally.unexpected[kind, str(response.status)] += 1
    except (aiohttp.ClientError, TimeoutError) as exc:
        tally.unexpected[kind, type(exc).__name__] += 1


async def traffic(gateway: Gateway, rate: float, until: float, tally: Tally) -> None:
    """Open-loop arrivals at `rate` per second (at most 32 in flight) until the monotonic time `until`."""
    kinds = [(kind, expected) for kind, _, expected in MIX]
    weights = [weight for _, weight, _ in MIX]
    in_flight = asyncio.Semaphore(32)
    tasks: set[asyncio.Task[None]] = set()
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=32)) as session:
        async def run(kind: str, expected: int) -> None:
            async with in_flight:
                await one_request(session, gateway, kind, expected, tally)

        next_at = time.monotonic()
        while next_at < until:
            kind, expected = random.choices(kinds, weights)[0]  # noqa: S311 (a traffic mix, not a secret)
            task = asyncio.create_task(run(kind, expected))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            next_at += 1 / rate
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
        await asyncio.gather(*tasks)


# ---- the run ----

@dataclass(frozen=True)
class Sample:
    at: float
    rss_mb: float
    fds: int
    requests: int


async def soak(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="llm-proxy-soak-") as tmp:
        workdir = Path(tmp)
        runner = web.AppRunner(upstream_app(), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        upstream_port = runner.addresses[0][1]
        gateway: Gateway | None = None
        try:
            gateway = await start_gateway(workdir, f"http://127.0.0.1:{upstream_port}")
            return await measure(gateway, args)
        except RuntimeError as exc:
            print(f"soak: {exc}", file=sys.stderr)
            return 2
        finally:
            if gateway is not None and gateway.process.returncode is None:
                gateway.process.kill()
                await gateway.process.wait()
            await runner.cleanup()


async def measure(gateway: Gateway, args: argparse.Namespace) -> int:
    tally = Tally()
    started = time.monotonic()
    until = started + args.minutes * 60
    samples = [Sample(0.0, gateway.rss_mb(), gateway.fds(), 0)]
    print(f"soak: {args.minutes:g} min at {args.rate:g} req/s against pid {gateway.process.pid}; "
          f"warm-up {args.warmup:g} s; sampling every {args.every:g} s")
    print(f"{'t (s)':>7} {'RSS (MB)':>9} {'fds':>5} {'requests':>9}")
    print(f"{0:>7.0f} {samples[0].rss_mb:>9.1f} {samples[0].fds:>5} {0:>9}", flush=True)
    load = asyncio.create_task(traffic(gateway, args.rate, until, tally))
    while True:
        await asyncio.wait({load}, timeout=max(0.0, started + len(samples) * args.every - time.monotonic()))
        if gateway.process.returncode is not None:
            load.cancel()
            print(f"soak: the gateway exited with {gateway.process.returncode}", file=sys.stderr)
            return 1
        if load.done() and samples[-1].at > (time.monotonic() - started) - 1:
            break  # a sample was just taken: the traffic ended on the dot
        sample = Sample(time.monotonic() - started, gateway.rss_mb(), gateway.fds(), tally.total)
        samples.append(sample)
        print(f"{sample.at:>7.0f} {sample.rss_mb:>9.1f} {sample.fds:>5} {sample.requests:>9}", flush=True)
        if load.done():
            break
    await load

    gateway.process.send_signal(signal.SIGTERM)
    try:
        code = await asyncio.wait_for(gateway.process.wait(), 20)
    except TimeoutError:
        code = None

    warm = [sample for sample in samples if sample.at >= args.warmup]
    if len(warm) < 2:
        print("soak: too few samples after the warm-up; run longer or warm up less", file=sys.stderr)
        return 2
    first, last = warm[0], warm[-1]
    rss_growth, fd_growth = last.rss_mb - first.rss_mb, last.fds - first.fds
    rss_allowed = max(args.rss_tolerance_mb, first.rss_mb * 0.10)
    print()
    print(f"requests: {tally.total} ({tally.total / (samples[-1].at or 1):.1f}/s); by kind and status: "
          + ", ".join(f"{kind} {status}: {n}" for (kind, status), n in sorted(tally.statuses.items())))
    print(f"after warm-up (t={first.at:.0f} s -> t={last.at:.0f} s): RSS {first.rss_mb:.1f} -> {last.rss_mb:.1f} MB "
          f"({rss_growth:+.1f}, allowed +{rss_allowed:.1f}); fds {first.fds} -> {last.fds} "
          f"({fd_growth:+d}, allowed +{args.fd_tolerance}); peak RSS {max(s.rss_mb for s in samples):.1f} MB")
    problems = []
    if rss_growth > rss_allowed:
        problems.append(f"RSS grew by {rss_growth:.1f} MB")
    if fd_growth > args.fd_tolerance:
        problems.append(f"open descriptors grew by {fd_growth}")
    if tally.unexpected:
        problems.append("unexpected answers: " + ", ".join(f"{kind} {what}: {n}"
                                                            for (kind, what), n in sorted(tally.unexpected.items())))
    if code != 0:
        problems.append(f"the gateway's exit status on SIGTERM was {code}")
    print("verdict: " + ("PASS" if not problems else "FAIL - " + "; ".join(problems)))
    return 1 if problems else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=2.0, help="how long to send traffic (default 2)")
    parser.add_argument("--rate", type=float, default=40.0, help="requests per second (default 40)")
    parser.add_argument("--every", type=float, default=10.0, help="seconds between samples (default 10)")
    parser.add_argument("--warmup", type=float, default=None,
                        help="seconds before the baseline sample (default: a third of the run, at most 60)")
    parser.add_argument("--rss-tolerance-mb", type=float, default=10.0,
                        help="RSS growth allowed after warm-up, MB (default 10, or 10%% if larger)")
    parser.add_argument("--fd-tolerance", type=int, default=16,
                        help="open-descriptor growth allowed after warm-up (default 16)")
    args = parser.parse_args()
    if args.minutes <= 0 or args.rate <= 0 or args.every <= 0 or args.minutes > 24 * 60:
        parser.error("--minutes (at most a day), --rate and --every must be positive")
    if args.warmup is None:
        args.warmup = min(60.0, args.minutes * 60 / 3)
    if not Path("/proc/self/status").exists():
        print("soak: needs Linux /proc to read RSS and open descriptors", file=sys.stderr)
        return 2
    return asyncio.run(soak(args))


if __name__ == "__main__":
    sys.exit(main())
