"""The bounded HTTP protocol: uvicorn's httptools protocol with request heads bounded in size and
in time, refused in OpenAI's error shape before any route runs."""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from gateway import metrics
from gateway.errors import GatewayError, HeadersTooLarge, InvalidRequest, RequestTimeout
from gateway.settings import Settings

# Seconds a request head may take to arrive; set by configure() in each process that serves.
_head_timeout: float = Settings.model_fields["header_read_timeout"].default


def configure(settings: Settings) -> None:
    """Hand the protocol the settings it reads per connection.

    Called from create_app, which uvicorn runs in every process that serves (each worker, with
    --workers N: spawned interpreters that never see a value set in the parent's serve()),
    before that process accepts a connection.
    """
    global _head_timeout
    _head_timeout = settings.header_read_timeout



class BoundedHttpTools(HttpToolsProtocol):
    """uvicorn's httptools protocol with the request head bounded in size and in time, and its
    own 400s in OpenAI's error shape.

    httptools keeps a header line, and any number of header lines, until the head is complete,
    and uvicorn sets no limit on that: a client could fill memory before any route sees the
    request. h11 has the bound (h11_max_incomplete_event_size) but parses in Python; this keeps
    httptools' speed and reads the bound from that same setting. A head still unfinished after
    that many bytes read is refused before the next read is parsed (so memory stays under the
    bound plus one read); a finished head is measured exactly.

    Nor does uvicorn time a head: a new connection has no timer at all, and its keep-alive timer
    stops at the next request's first byte, so a head trickled a line at a time (or never
    finished, or never begun, or a stream of blank lines between requests) held the connection
    forever. One timer per head runs from the connection's start (its first request) or from the
    read that brings the first byte after an answer (the next ones) to the head's end: past
    header_read_timeout, a 408 and the connection closed, or just the close when nothing at all
    came (an answer nobody asked for would confuse a client's pool). A keep-alive head that
    arrives in one read, as clients send them, never arms it; an idle keep-alive connection is
    left to uvicorn's own keep-alive timeout. A few attribute checks per read and per request,
    none per header or byte: the hot path stays as it was.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_limit = self.config.h11_max_incomplete_event_size or 65536
        self._head_timeout = _head_timeout
        self._read: int | None = 0  # bytes read since the head began; None while in a body
        self._refusal: GatewayError | None = None
        self._head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._head_timer = self.loop.call_later(self._head_timeout, self._head_timed_out)

    def data_received(self, data: bytes) -> None:
        if self._read is not None:
            if self._read > self._head_limit:
                self._refusal = self._too_large()
                self.send_400_response("")
                return
            self._read += len(data)
        super().data_received(data)
        # Still outside a body after this read, and no request in progress (a pipelined head's
        # time starts with the first byte read after its predecessor's answer): a head has begun.
        if self._head_timer is None and self._read is not None and \
                (self.cycle is None or self.cycle.response_complete) and \
                not self.transport.is_closing():
            self._head_timer = self.loop.call_later(self._head_timeout, self._head_timed_out)

    def on_headers_complete(self) -> None:
        self._read = None
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        size = len(self.url) + sum(len(name) + len(value) + 4 for name, value in self.headers)
        if size > self._head_limit:
            # Raised inside a parser callback: the parser stops, and uvicorn answers through
            # send_400_response, which sends this refusal instead.
            self._refusal = self._too_large()
            raise self._refusal
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._read = 0  # the next request's head starts here
        super().on_message_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        super().connection_lost(exc)

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport.is_closing():
            return
        if self.cycle is None and not self._read:  # not one byte since the connection opened
            self.transport.close()
            return
        error = RequestTimeout(f"The request's headers did not arrive within "
                               f"{self._head_timeout:g} seconds.")
        metrics.REJECTIONS.labels(metrics.rejection_reason(error.status, error.code)).inc()
        self._refuse(error)

    def _too_large(self) -> GatewayError:
        metrics.REJECTIONS.labels("too_large").inc()
        return HeadersTooLarge(f"The request's headers are longer than {self._head_limit} bytes.")

    def send_400_response(self, msg: str) -> None:
        self._refuse(self._refusal or InvalidRequest(msg, code="invalid_http_request"))

    def _refuse(self, error: GatewayError) -> None:
        """Answer before any ASGI cycle exists, and close the connection."""
        body = error.body()
        head = [STATUS_LINE[error.status]]
        head += [b"%s: %s\r\n" % header for header in self.server_state.default_headers]
        head.append(b"content-type: application/json\r\ncontent-length: %d\r\n"
                    b"connection: close\r\n\r\n" % len(body))
        self.transport.write(b"".join(head) + body)
        self.transport.close()
