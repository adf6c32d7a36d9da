"""httpx's interface on aiohttp's connection pool: the upstream transport.

httpx stays the gateway's client API (requests, responses, timeouts, errors); this module is the
only one that imports aiohttp, and every aiohttp error becomes the httpx error it means here, on
the request body and on the answer stream alike. Why aiohttp and not httpx's own transport
(httpcore), and why not the `httpx-aiohttp` package, is measured and written down in the README
(section "Scale: thousands in flight").

What httpx's transport does that aiohttp does not, this adds: a write timeout (aiohttp has none:
an upstream that stops reading the body would hold the request forever), and an exception raised
by the request body (the gateway validates while it streams) comes out of `send` as itself, not
wrapped in a connection error.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, AsyncIterator
from contextvars import ContextVar
from typing import Any, NoReturn

import aiohttp
import httpx
from yarl import URL

# Most specific first: the first class that matches says what went wrong.
_ERRORS: tuple[tuple[type[BaseException], type[httpx.TransportError]], ...] = (
    (aiohttp.ConnectionTimeoutError, httpx.ConnectTimeout),
    (aiohttp.SocketTimeoutError, httpx.ReadTimeout),
    (aiohttp.ServerTimeoutError, httpx.ReadTimeout),
    (aiohttp.ClientConnectorError, httpx.ConnectError),
    (aiohttp.ClientResponseError, httpx.RemoteProtocolError),  # a malformed answer
    (aiohttp.ClientPayloadError, httpx.ReadError),  # the answer broken off
    (aiohttp.ClientConnectionError, httpx.ReadError),  # disconnected, reset
    (aiohttp.ClientError, httpx.TransportError),
    (OSError, httpx.ReadError),
    (TimeoutError, httpx.TimeoutException),  # any other timeout out of aiohttp
)
_SKIP = frozenset({"transfer-encoding", "content-length"})  # aiohttp frames the body itself


class _Body:
    """The request's httpx stream as aiohttp pulls it: each chunk has `write` seconds to be
    written (else the connection is aborted and `timed_out` is set), and whatever the stream
    itself raised is kept in `error`, to come out of `send` as itself."""

    __slots__ = ("_stream", "_write", "connection", "error", "timed_out")

    def __init__(self, stream: AsyncIterable[bytes], write: float | None) -> None:
        self._stream = stream
        self._write = write
        self.connection: aiohttp.connector.Connection | None = None  # set by _Connector
        self.error: Exception | None = None
        self.timed_out = False

    async def chunks(self) -> AsyncIterator[bytes]:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()  # aiohttp's body-writing task
        try:
            async for chunk in self._stream:
                if self._write is None or task is None:
                    yield chunk
                    continue
                timer = loop.call_later(self._write, self._expire, task)
                try:
                    yield chunk  # aiohttp writes it (and waits for room) before asking again
                finally:
                    timer.cancel()
        except Exception as exc:
            self.error = exc
            raise
        if self._write is not None and task is not None:
            # aiohttp still writes the body's end and waits for the upstream to take it all
            # (no timer of its own): the write timeout covers that wait too.
            timer = loop.call_later(self._write, self._expire, task)
            task.add_done_callback(lambda _: timer.cancel())
        connection = self.connection
        if connection is not None and (connection.transport is None
                                       or connection.transport.is_closing()):
            # The upstream hung up during the body. aiohttp would write the body's end outside
            # its own error handling, leaving an exception no one retrieves (logged as such);
            # failing here, inside it, reports the hang-up as any other.
            raise ConnectionResetError("the upstream closed the connection during the body")

    def _expire(self, task: asyncio.Task[Any]) -> None:
        if task.done():
            return
        self.timed_out = True
        # Aborted, not closed: a close waits to flush the unread body first, which an upstream
        # that stopped reading never lets happen; the abort fails the write and the wait for
        # the answer at once.
        transport = self.connection.transport if self.connection is not None else None
        if transport is not None:
            transport.abort()
        else:
            task.cancel()


_SENDING: ContextVar[_Body | None] = ContextVar("gateway_transport_body", default=None)


class _Connector(aiohttp.TCPConnector):
    """Hands the request being sent (its _Body) the connection that carries it."""

    async def connect(self, req: Any, traces: Any, timeout: Any  # noqa: ASYNC109 (aiohttp's)
                      ) -> aiohttp.connector.Connection:
        connection = await super().connect(req, traces, timeout)
        body = _SENDING.get()
        if body is not None:
            body.connection = connection
        return connection


def _raise(exc: BaseException, body: _Body | None) -> NoReturn:
    """Raise what `exc` (raised while the request was sent or its answer read) means in httpx's
    terms: the body's own error first, then a write timeout, then the mapped aiohttp error."""
    if body is not None and body.error is not None:
        raise body.error from None
    if body is not None and body.timed_out:
        raise httpx.WriteTimeout("The upstream did not take the request body in time.") from exc
    for foreign, ours in _ERRORS:
        if isinstance(exc, foreign):
            raise ours(str(exc) or type(exc).__name__) from exc
    raise exc


class _Answer(httpx.AsyncByteStream):
    """The answer's body as it arrives, with aiohttp errors mapped."""

    __slots__ = ("_body", "_closed", "_response", "_transport")

    def __init__(self, response: aiohttp.ClientResponse, body: _Body | None,
                 transport: AiohttpTransport) -> None:
        self._response = response
        self._body = body
        self._transport = transport
        self._closed = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        content = self._response.content
        try:
            while chunk := await content.readany():
                yield chunk
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            _raise(exc, self._body)

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._transport.in_use -= 1
        # Read to its end: the connection goes back to the pool; otherwise it is closed.
        if self._response.content.at_eof():
            self._response.release()
        else:
            self._response.close()


class AiohttpTransport(httpx.AsyncBaseTransport):
    """One aiohttp connection pool behind an httpx.AsyncClient.

    The pool holds at most `limits.max_connections` connections (None: unbounded) and keeps
    idle ones `limits.keepalive_expiry` seconds. The session is made on first use, inside the
    running loop, as aiohttp wants.
    """

    def __init__(self, limits: httpx.Limits) -> None:
        self._limits = limits
        self.in_use = 0  # requests holding a connection: sending, or their answer not closed
        self._session: aiohttp.ClientSession | None = None
        self._timeouts: dict[tuple[Any, ...], aiohttp.ClientTimeout] = {}
        self._urls: dict[str, URL] = {}

    def _open(self) -> aiohttp.ClientSession:
        limits = self._limits
        connector = _Connector(
            limit=limits.max_connections or 0, limit_per_host=0,
            keepalive_timeout=limits.keepalive_expiry or 5.0)
        self._session = aiohttp.ClientSession(
            connector=connector, cookie_jar=aiohttp.DummyCookieJar(), auto_decompress=False,
            trust_env=False, skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding"))
        return self._session

    def _timeout(self, timeout: dict[str, float | None]) -> aiohttp.ClientTimeout:
        connect, read, pool = timeout.get("connect"), timeout.get("read"), timeout.get("pool")
        key = (connect, read, pool)
        cached = self._timeouts.get(key)
        if cached is None:
            # aiohttp's `connect` covers the wait for a pooled connection and the connecting.
            total_connect = None if connect is None or pool is None else connect + pool
            cached = self._timeouts[key] = aiohttp.ClientTimeout(
                total=None, connect=total_connect, sock_connect=connect, sock_read=read)
        return cached

    def _url(self, url: httpx.URL) -> URL:
        text = str(url)
        cached = self._urls.get(text)
        if cached is None:
            if len(self._urls) > 256:
                self._urls.clear()
            cached = self._urls[text] = URL(text, encoded=True)
        return cached

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        session = self._session or self._open()
        timeouts = request.extensions.get("timeout", {})
        body: _Body | None = None
        data: Any = None
        if isinstance(request.stream, httpx.ByteStream):
            data = request.read() or None
        else:
            assert isinstance(request.stream, httpx.AsyncByteStream)
            body = _Body(request.stream, timeouts.get("write"))
            data = body.chunks()
        headers = [(k, v) for k, v in request.headers.multi_items() if k.lower() not in _SKIP]
        sending = _SENDING.set(body)
        self.in_use += 1
        try:
            response = await session.request(
                request.method, self._url(request.url), headers=headers, data=data,
                allow_redirects=False, timeout=self._timeout(timeouts))
        except BaseException as exc:
            self.in_use -= 1
            if isinstance(exc, TimeoutError | aiohttp.ClientError | OSError):
                _raise(exc, body)
            raise
        finally:
            _SENDING.reset(sending)
        return httpx.Response(
            status_code=response.status, headers=response.raw_headers,
            stream=_Answer(response, body, self), request=request,
            extensions={"http_version": b"HTTP/1.1",
                        "reason_phrase": (response.reason or "").encode()})

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
