"""A bare streaming proxy: the baseline cost of any proxy, with no validation at all.

Raw ASGI, one shared HTTP client (pooled like the gateway's), the client's body forwarded
upstream as it arrives through an async generator, and the answer streamed back. Whatever the
gateway costs beyond this is the price of its validation and bookkeeping.

`--client` picks the client library: `httpx` (httpx.AsyncClient on its default transport,
httpcore), `httpx-aiohttp` (httpx.AsyncClient on the gateway's own aiohttp transport) or `aiohttp`
(aiohttp.ClientSession used directly, the floor for a Python proxy). `--pool 0` leaves the
connection pool unbounded.
"""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from typing import Any

import aiohttp
import httpx

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

_FORWARD = {b"content-type", b"content-length", b"authorization", b"x-request-id"}
# --chunked drops Content-Length, so the body goes upstream re-framed as chunked: what every
# proxy that rewrites the body (the gateway included) has to do, as it cannot know the length.
_FORWARD_CHUNKED = _FORWARD - {b"content-length"}
_RETURN = ("content-type", "content-length", "x-request-id")


class Passthrough:
    """The ASGI app; the httpx client lives from lifespan startup to shutdown."""

    def __init__(self, upstream: str, *, chunked: bool = False, client: str = "httpx",
                 pool: int = 512) -> None:
        self.upstream = upstream.rstrip("/")
        self.forward = _FORWARD_CHUNKED if chunked else _FORWARD
        self.kind = client
        self.pool = pool
        self.client: httpx.AsyncClient | None = None
        self.session: aiohttp.ClientSession | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
        elif scope["type"] == "http":
            await self._proxy(scope, receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self._start()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self.client is not None:
                    await self.client.aclose()
                if self.session is not None:
                    await self.session.close()
                await send({"type": "lifespan.shutdown.complete"})
                return

    def _start(self) -> None:
        size = self.pool or None
        if self.kind == "aiohttp":
            self.session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self.pool, limit_per_host=0),
                timeout=aiohttp.ClientTimeout(total=None, sock_read=60, sock_connect=60),
                auto_decompress=False)
            return
        transport = None
        limits = httpx.Limits(max_connections=size, max_keepalive_connections=size)
        if self.kind == "httpx-aiohttp":
            from gateway.upstream.transport import AiohttpTransport

            transport = AiohttpTransport(limits)
        self.client = httpx.AsyncClient(timeout=httpx.Timeout(60.0), limits=limits,
                                        transport=transport, trust_env=False)

    async def _proxy(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.session is not None:
            await self._proxy_aiohttp(scope, receive, send)
            return
        assert self.client is not None
        body = _body(receive)
        headers = [(k, v) for k, v in scope["headers"] if k.lower() in self.forward]
        method = scope["method"]
        request = self.client.build_request(
            method, self.upstream + scope["path"], headers=headers,
            content=body if method in ("POST", "PUT", "PATCH") else None)
        response = await self.client.send(request, stream=True)
        try:
            out = [(k.encode(), v.encode()) for k in _RETURN if (v := response.headers.get(k))]
            await send({"type": "http.response.start", "status": response.status_code,
                        "headers": out})
            async for chunk in response.aiter_raw():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            await response.aclose()

    async def _proxy_aiohttp(self, scope: Scope, receive: Receive, send: Send) -> None:
        assert self.session is not None
        headers = [(k.decode(), v.decode()) for k, v in scope["headers"]
                   if k.lower() in self.forward]
        method = scope["method"]
        async with self.session.request(
                method, self.upstream + scope["path"], headers=headers,
                data=_body(receive) if method in ("POST", "PUT", "PATCH") else None,
                allow_redirects=False) as response:
            out = [(k.encode(), v.encode()) for k in _RETURN if (v := response.headers.get(k))]
            await send({"type": "http.response.start", "status": response.status,
                        "headers": out})
            async for chunk in response.content.iter_any():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})


async def _body(receive: Receive) -> AsyncIterator[bytes]:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ConnectionResetError("client left")
        chunk = message.get("body", b"")
        if chunk:
            yield chunk
        if not message.get("more_body", False):
            return


def main() -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="origin, e.g. http://127.0.0.1:9000")
    parser.add_argument("--chunked", action="store_true", help="send the body upstream chunked")
    parser.add_argument("--client", choices=("httpx", "httpx-aiohttp", "aiohttp"), default="httpx")
    parser.add_argument("--pool", type=int, default=512, help="upstream connections; 0: unbounded")
    parser.add_argument("--backlog", type=int, default=2048, help="listen backlog")
    args = parser.parse_args()
    app = Passthrough(args.upstream, chunked=args.chunked, client=args.client, pool=args.pool)
    uvicorn.run(app, host="127.0.0.1", port=args.port, loop="uvloop", http="httptools",
                lifespan="on", log_level="warning", access_log=False, server_header=False,
                proxy_headers=False, backlog=args.backlog)


if __name__ == "__main__":
    main()
