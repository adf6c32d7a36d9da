"""A bare streaming proxy: the baseline cost of any proxy, with no validation at all.

Raw ASGI, one shared httpx.AsyncClient (pooled like the gateway's), the client's body forwarded
upstream as it arrives through an async generator, and the answer streamed back. Whatever the
gateway costs beyond this is the price of its validation and bookkeeping.
"""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from typing import Any

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

    def __init__(self, upstream: str, *, chunked: bool = False) -> None:
        self.upstream = upstream.rstrip("/")
        self.forward = _FORWARD_CHUNKED if chunked else _FORWARD
        self.client: httpx.AsyncClient | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
        elif scope["type"] == "http":
            await self._proxy(scope, receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self.client = httpx.AsyncClient(
                    timeout=httpx.Timeout(60.0),
                    limits=httpx.Limits(max_connections=512, max_keepalive_connections=512),
                    trust_env=False)
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self.client is not None:
                    await self.client.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _proxy(self, scope: Scope, receive: Receive, send: Send) -> None:
        assert self.client is not None

        async def body() -> AsyncIterator[bytes]:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    raise ConnectionResetError("client left")
                chunk = message.get("body", b"")
                if chunk:
                    yield chunk
                if not message.get("more_body", False):
                    return

        headers = [(k, v) for k, v in scope["headers"] if k.lower() in self.forward]
        method = scope["method"]
        request = self.client.build_request(
            method, self.upstream + scope["path"], headers=headers,
            content=body() if method in ("POST", "PUT", "PATCH") else None)
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


def main() -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="origin, e.g. http://127.0.0.1:9000")
    parser.add_argument("--chunked", action="store_true", help="send the body upstream chunked")
    args = parser.parse_args()
    uvicorn.run(Passthrough(args.upstream, chunked=args.chunked), host="127.0.0.1", port=args.port,
                loop="uvloop", http="httptools", lifespan="on", log_level="warning", access_log=False,
                server_header=False, proxy_headers=False)


if __name__ == "__main__":
    main()
