"""The upstream's answer relayed to the client as it streams, JSON or SSE, and metered on the way
(final images and token usage, gateway.usage), within the response bounds.

An SSE answer goes on in whole events, so that when the upstream breaks off, an `error` event can
follow what was sent and still parse. A JSON answer broken off is cut, never completed wrongly.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field

from gateway.errors import (
    GatewayError,
    UpstreamError,
    UpstreamRejectedKey,
    UpstreamResponseTooLarge,
)
from gateway.images.client import Client
from gateway.upstream import Answer
from gateway.usage import UsageMeter

log = logging.getLogger("gateway.edits")  # the name operators filter on

# Upstream answer headers worth passing on; hop-by-hop and rate-limit headers are the gateway's.
PASS_HEADERS = frozenset({
    b"content-type", b"content-length", b"content-encoding", b"cache-control",
    b"openai-processing-ms", b"openai-version", b"retry-after", b"retry-after-ms",
    b"x-should-retry"})
_STREAM_ERROR = b"event: error\ndata: %s\n\n"
_ERROR_BYTES = 64 * 1024  # the most of an upstream error answer read


class EventFramer:
    """Passes an SSE stream on in whole events, holding back an incomplete last one, so that an
    error event written after an upstream failure never lands inside a half-sent event.

    An event is held whole, so its size is bounded (`limit`): past it, UpstreamResponseTooLarge.
    """

    def __init__(self, limit: int) -> None:
        self._buf = bytearray()
        self.limit = limit

    @property
    def pending(self) -> bytes:
        return bytes(self._buf)

    def feed(self, chunk: bytes) -> bytes:
        """The complete events received so far (b"" if none yet)."""
        if not self._buf and chunk.endswith((b"\n\n", b"\r\n\r\n")):
            return chunk  # the usual case: the upstream writes whole events
        start = max(0, len(self._buf) - 2)
        self._buf += chunk
        # A blank line ends an event. Lines end in LF, CRLF or CR, so a blank line shows as
        # "\n\n", "\n\r" or "\r\r" (the CRLF forms contain one of these); a CRLF is kept whole.
        at = max(self._buf.rfind(b"\n\n", start), self._buf.rfind(b"\n\r", start),
                 self._buf.rfind(b"\r\r", start))
        out = b""
        if at >= 0:
            end = at + 2
            if self._buf[end - 1] == 13 and self._buf[end:end + 1] == b"\n":
                end += 1  # the blank line ended in CRLF
            out = bytes(self._buf[:end])
            del self._buf[:end]
        if len(self._buf) > self.limit:
            raise UpstreamResponseTooLarge(
                f"The upstream sent an event longer than {self.limit} bytes.")
        return out


@dataclass(slots=True)
class Relayed:
    """What a relayed success carried, as far as the gateway could count it."""

    images: int | None = None  # None: a whole answer the meter could not read (charge as reserved)
    usage: dict[str, int] = field(default_factory=dict)
    failure: str = ""  # how the upstream broke an event stream off (the error event was sent)


async def relay(answer: Answer, client: Client, headers: list[tuple[bytes, bytes]],
                out: Relayed) -> None:
    """Relay the answer's head and body (all but the closing empty message, which the flow sends
    once the request's slot is given back), filling in `out` as it goes. An upstream error status
    becomes an UpstreamError (or UpstreamRejectedKey) before anything is sent."""
    settings = client.settings
    if answer.status == 401:
        # The upstream refused the gateway's own key: the operator's problem, never the
        # client's, and the upstream's message may echo part of that key.
        log.error("request %s: upstream '%s' rejected the gateway's API key", client.request_id,
                  answer.upstream)
        raise UpstreamRejectedKey("The upstream rejected the gateway's credentials.")
    if answer.status >= 400:
        # Passed on in OpenAI's shape (a proxy's HTML page wrapped), without what would
        # identify the operator's account; an error is small, so a bounded head says all.
        head = bytearray()
        async for chunk in answer.chunks():
            head += chunk
            if len(head) >= _ERROR_BYTES:
                break
        raise UpstreamError(
            answer.status, bytes(head[:_ERROR_BYTES]), headers=answer.headers,
            is_json=answer.headers.get("content-type", "").startswith("application/json"))
    limit = settings.max_response_bytes
    length = answer.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise UpstreamResponseTooLarge(
            f"The upstream's answer ({length} bytes) is larger than {limit} bytes.")
    sse = False
    for key, value in answer.raw_headers:
        key = key.lower()
        if key in PASS_HEADERS:
            headers.append((key, value))
            sse = sse or (key == b"content-type" and value.startswith(b"text/event-stream"))
        elif key == b"x-request-id":
            headers.append((b"x-upstream-request-id", value))
    framer = EventFramer(settings.max_event_bytes) if sse else None
    # Only a success is metered: an error answer carries no images and no usage.
    meter = UsageMeter(sse=sse) if answer.status < 300 else None
    await client.send({"type": "http.response.start", "status": answer.status,
                       "headers": headers})
    received = 0
    try:
        async for chunk in answer.chunks():
            received += len(chunk)
            if received > limit:
                raise UpstreamResponseTooLarge(
                    f"The upstream's answer is larger than {limit} bytes.")
            if framer is not None and not (chunk := framer.feed(chunk)):
                continue
            if meter is not None:
                meter.feed(chunk)
            await client.send({"type": "http.response.body", "body": chunk, "more_body": True})
        if framer is not None and (rest := framer.pending):
            if meter is not None:
                meter.feed(rest)
            await client.send({"type": "http.response.body", "body": rest, "more_body": True})
    except GatewayError as exc:
        if framer is None or not exc.kind:
            raise  # cut the JSON answer off: a broken response, never a wrong one
        out.failure = exc.kind
        # The half-received event is dropped, so the error event stands on its own. (No
        # local holds the exception: with its traceback it would keep this frame alive.)
        event = json.dumps({"type": "error", "error": json.loads(exc.body())["error"]})
        await client.send({"type": "http.response.body",
                           "body": _STREAM_ERROR % event.encode(), "more_body": True})
    if meter is not None:
        meter.close()
        # A whole answer with no image found in it is one the meter could not read (a
        # provider's own format): None, and the reservation is charged. A stream broken off
        # counts what it delivered: the final images sent before the error event.
        out.images = meter.images if meter.images or out.failure else None
        out.usage = meter.usage
