"""gateway.upstream.transport: httpx's interface on aiohttp's pool, against real loopback servers.

Each server here is a raw asyncio server that misbehaves in one way (refuses, goes silent,
stops reading, cuts an answer, answers garbage), so every aiohttp failure is seen to come out
as the httpx error it means, which is what gateway.upstream maps to the client's 502/504.
"""

from __future__ import annotations

import asyncio
import hashlib
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import httpx
import pytest

from gateway.upstream import http_client
from gateway.upstream.transport import AiohttpTransport

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
OK = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}"


class Server:
    """A loopback server running `handler` per connection; counts connections."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.open = 0
        self.most_open = 0
        self.port = 0

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.open += 1
        self.most_open = max(self.most_open, self.open)
        try:
            await self.handler(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass  # the client hung up, or the test ended
        finally:
            self.open -= 1
            writer.close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1/images/edits"


@asynccontextmanager
async def serving(handler: Handler, **options: object) -> AsyncIterator[Server]:
    server = Server(handler)
    listener = await asyncio.start_server(server._serve, "127.0.0.1", 0, **options)
    server.port = listener.sockets[0].getsockname()[1]
    try:
        yield server
    finally:
        listener.close()


@asynccontextmanager
async def client(pool_size: int = 16, **timeouts: float) -> AsyncIterator[httpx.AsyncClient]:
    """The upstream client as gateway.upstream builds it."""
    timeout = httpx.Timeout(**({"timeout": 5.0} | timeouts))
    transport = AiohttpTransport(httpx.Limits(max_connections=pool_size))
    async with http_client(transport, timeout) as c:
        yield c
    assert transport.in_use == 0  # every answer given back, whatever went wrong


async def read_request(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    """The head and the (chunked or Content-Length) body of one request."""
    head = await reader.readuntil(b"\r\n\r\n")
    lower = head.lower()
    body = bytearray()
    if b"transfer-encoding: chunked" in lower:
        while size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16):
            body += (await reader.readexactly(size + 2))[:-2]
        await reader.readuntil(b"\r\n")
    elif b"content-length:" in lower:
        length = int(lower.split(b"content-length:")[1].split(b"\r\n")[0])
        body += await reader.readexactly(length)
    return head, bytes(body)


async def answer_ok(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while True:
        await read_request(reader)
        writer.write(OK)
        await writer.drain()


async def chunks(data: bytes, size: int = 65536) -> AsyncIterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i:i + size]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------- what goes through
async def test_a_streamed_body_arrives_whole_and_the_answer_streams_back() -> None:
    received: list[bytes] = []
    answer = bytes(range(256)) * 4096  # 1 MiB, sent in pieces

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head, body = await read_request(reader)
        received.extend((head, body))
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\nx-request-id: up-1\r\n\r\n"
                     % len(answer))
        for i in range(0, len(answer), 100_000):
            writer.write(answer[i:i + 100_000])
            await writer.drain()

    upload = bytes(range(251)) * 40_000  # 10 MB
    async with serving(handler) as server, client() as c:
        request = c.build_request("POST", server.url, content=chunks(upload),
                                  headers={"content-type": "multipart/form-data; boundary=x"})
        response = await c.send(request, stream=True)
        got = b"".join([chunk async for chunk in response.aiter_raw()])
        await response.aclose()
    head, body = received
    assert hashlib.sha256(body).digest() == hashlib.sha256(upload).digest()
    assert b"transfer-encoding: chunked" in head.lower()
    assert b"content-type: multipart/form-data; boundary=x" in head.lower()
    assert response.status_code == 200 and response.headers["x-request-id"] == "up-1"
    assert got == answer


async def test_connections_are_kept_and_reused_and_the_pool_is_bounded() -> None:
    async def slow_ok(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await read_request(reader)
            await asyncio.sleep(0.2)
            writer.write(OK)
            await writer.drain()

    async with serving(slow_ok) as server, client(pool_size=3) as c:
        for _ in range(3):
            assert (await c.post(server.url, content=b"x")).status_code == 200
        assert server.connections == 1  # one kept-alive connection, three requests
        answers = await asyncio.gather(*(c.post(server.url, content=b"x") for _ in range(9)))
    assert [a.status_code for a in answers] == [200] * 9
    assert server.most_open == 3  # nine at once, never more than the pool's three connections


async def test_cookies_from_the_upstream_are_never_sent_back() -> None:
    heads: list[bytes] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head, _ = await read_request(reader)
            heads.append(head)
            writer.write(b"HTTP/1.1 200 OK\r\nset-cookie: session=abc\r\ncontent-length: 0\r\n\r\n")
            await writer.drain()

    async with serving(handler) as server, client() as c:
        await c.post(server.url, content=b"x")
        await c.post(server.url, content=b"x")
    assert len(heads) == 2 and b"cookie" not in heads[1].lower()


# ------------------------------------------------------------------------- what goes wrong
async def test_a_refused_connection_is_a_connect_error() -> None:
    async with client() as c:
        with pytest.raises(httpx.ConnectError):
            await c.post(f"http://127.0.0.1:{free_port()}/v1/images/edits", content=b"x")


async def test_an_upstream_silent_after_the_body_is_a_read_timeout() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        await asyncio.sleep(10)

    async with serving(silent) as server, client(read=0.3) as c:
        with pytest.raises(httpx.ReadTimeout):
            await c.post(server.url, content=chunks(b"x" * 1000))


async def test_an_upstream_that_stops_reading_the_body_is_a_write_timeout() -> None:
    """aiohttp has no write timeout of its own: without the transport's, an upstream that
    stops reading would hold the request (and its slot) forever."""
    async def deaf(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        await asyncio.sleep(10)  # never reads the body

    async with serving(deaf) as server, client(write=0.3, read=30) as c:
        loop = asyncio.get_running_loop()
        start = loop.time()
        with pytest.raises(httpx.WriteTimeout):
            await c.post(server.url, content=chunks(b"x" * (256 * 1024 * 1024), 1024 * 1024))
        assert loop.time() - start < 5


async def test_an_answer_cut_short_is_a_read_error_on_the_stream() -> None:
    async def cut(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\n" + b"a" * 300)
        await writer.drain()

    async with serving(cut) as server, client() as c:
        response = await c.send(c.build_request("POST", server.url, content=b"x"), stream=True)
        with pytest.raises(httpx.ReadError):
            async for _ in response.aiter_raw():
                pass
        await response.aclose()


async def test_a_connection_closed_before_any_answer_is_a_transport_error_not_a_timeout() -> None:
    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)

    async with serving(hang_up) as server, client() as c:
        with pytest.raises(httpx.TransportError) as info:
            await c.post(server.url, content=b"x")
    assert not isinstance(info.value, httpx.TimeoutException)


async def test_a_garbled_answer_is_a_protocol_error() -> None:
    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"SMTP ready\r\n\r\n")
        await writer.drain()

    async with serving(garbage) as server, client() as c:
        with pytest.raises(httpx.RemoteProtocolError):
            await c.post(server.url, content=b"x")


async def test_an_error_raised_by_the_body_comes_out_of_send_as_itself() -> None:
    """The gateway validates while it streams: its own error (a 400) must reach the route as
    itself, not as a connection error that would become a 502."""
    class Invalid(Exception):
        pass

    async def body() -> AsyncIterator[bytes]:
        yield b"first part"
        raise Invalid("bad image")

    async def reads(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1 << 20)
        await asyncio.sleep(10)

    async with serving(reads) as server, client() as c:
        with pytest.raises(Invalid, match="bad image"):
            await c.post(server.url, content=body())
