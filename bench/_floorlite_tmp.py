from __future__ import annotations
import argparse, asyncio, collections
import httptools
from aiohttp import web
from urllib.parse import urlsplit

HOP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection",
                 "te", "trailer", "trailers", "transfer-encoding", "upgrade", "host", "content-length"})
RDROP = frozenset({b"connection", b"keep-alive", b"transfer-encoding", b"content-length", b"server", b"date"})

class Conn(asyncio.Protocol):
    def __init__(self, pool):
        self.pool = pool
        self.parser = httptools.HttpResponseParser(self)
        self.transport = None
        self.headers = []
        self.head = None
        self.chunks = collections.deque()
        self.waiter = None
        self.done = False
        self.closed = False
    def connection_made(self, t): self.transport = t
    def data_received(self, data): self.parser.feed_data(data)
    def connection_lost(self, exc):
        self.closed = True
        self._wake()
        if self.head is not None and not self.head.done(): self.head.set_exception(ConnectionError())
    def on_header(self, n, v): self.headers.append((n, v))
    def on_headers_complete(self):
        self.head.set_result(self.parser.get_status_code())
    def on_body(self, b):
        self.chunks.append(b); self._wake()
    def on_message_complete(self):
        self.done = True; self._wake()
    def _wake(self):
        w = self.waiter
        if w is not None and not w.done(): w.set_result(None)
    async def chunks_iter(self):
        while True:
            while self.chunks: yield self.chunks.popleft()
            if self.done or self.closed: return
            self.waiter = asyncio.get_running_loop().create_future()
            await self.waiter
            self.waiter = None

class Pool:
    def __init__(self, url):
        u = urlsplit(url); self.host, self.port = u.hostname, u.port
        self.idle = []
        self.hosthdr = f"{self.host}:{self.port}".encode()
    async def request(self, method, target, headers, body):
        conn = None
        while self.idle:
            c = self.idle.pop()
            if not c.closed and not c.transport.is_closing(): conn = c; break
        if conn is None:
            loop = asyncio.get_running_loop()
            _, conn = await loop.create_connection(lambda: Conn(self), self.host, self.port)
        conn.headers = []; conn.chunks.clear(); conn.done = False
        conn.head = asyncio.get_running_loop().create_future()
        parts = [method.encode(), b" ", target.encode(), b" HTTP/1.1\r\nHost: ", self.hosthdr, b"\r\n"]
        for n, v in headers: parts += [n.encode(), b": ", v.encode(), b"\r\n"]
        parts += [b"Content-Length: ", str(len(body)).encode(), b"\r\n\r\n", body]
        conn.transport.write(b"".join(parts))
        status = await conn.head
        return conn, status
    def release(self, conn):
        if conn.done and not conn.closed and conn.parser.should_keep_alive(): self.idle.append(conn)
        else: conn.transport.close()

def make_app(upstream):
    pool = Pool(upstream)
    async def forward(request):
        headers = [(n, v) for n, v in request.headers.items() if n.lower() not in HOP]
        body = await request.read() if request.body_exists else b""
        conn, status = await pool.request(request.method, request.raw_path, headers, body)
        try:
            response = web.StreamResponse(status=status)
            clen = None
            for n, v in conn.headers:
                ln = n.lower()
                if ln == b"content-length": clen = int(v)
                if ln not in RDROP: response.headers.add(n.decode("latin-1"), v.decode("latin-1"))
            if clen is not None: response.content_length = clen
            await response.prepare(request)
            async for chunk in conn.chunks_iter():
                await response.write(chunk)
            await response.write_eof()
            return response
        finally:
            pool.release(conn)
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", forward)
    return app

def main():
    p = argparse.ArgumentParser(); p.add_argument("--port", type=int); p.add_argument("--upstream")
    a = p.parse_args()
    import uvloop
    web.run_app(make_app(a.upstream), host="127.0.0.1", port=a.port, access_log=None, print=None, handler_cancellation=True, loop=uvloop.new_event_loop())
if __name__ == "__main__": main()
