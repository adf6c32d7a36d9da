"""A lean fake OpenAI images upstream for the benchmarks and the soak.

Raw ASGI, no form parsing: it reads and drops the body (counting bytes) and answers a small fixed
OpenAI-like JSON, so that the upstream is never what the benchmark measures. Only the first few
KiB are looked at, for the text fields the gateway writes before the files: `stream=true` gets an
SSE answer (`n` images, `partial_images` partial events each), and `[fault:NAME]` in the prompt
asks for one of the faults below.

`GET /_stats` reports what it took and served, for the benchmarks' and the soak's checks:
`requests` (bodies received whole), `bytes`, `answered` (200 answers sent to their end), `images`
and `tokens` (served: see the faults), and `fault:NAME` (faults carried out).

Faults, and what each counts as served. `images` is the upstream's record of images it completed
and sent; the soak holds the gateway's Redis image counter to it, so a fault counts only what went
out whole:
  500        body read, then a 500 OpenAI error                                -> 0 images
  429        body read, then a 429 rate_limit_exceeded with retry-after: 1     -> 0 images
  stall      body read, then silence until the gateway hangs up (its upstream read timeout)
             -> 0 images; if nobody hangs up within STALL_MAX it answers after all, and counts
  drop       the connection is closed once DROP_AFTER body bytes arrived (or at the body's end,
             if shorter), with no answer                                       -> 0 images
  cut        SSE: events up to and including the first image_edit.completed, then half of the
             next event (if any) and the connection closed                     -> 1 image
             JSON: half the answer (Content-Length promises all), then closed  -> 0 images
  cut-early  SSE: events before the first completed one, half of that one, closed -> 0 images
Tokens follow images: every completed image carries 250 tokens of usage.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

# A 1x1 RGB PNG: the answer's size does not matter, only that it looks like OpenAI's.
_PIXEL = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAIAAACQd1PeAAAADElEQVR4nGNgYGAAAAAEAAH2FzhVAAAAAElFTkSuQmCC"
_TOKENS = 250  # total tokens per image
_DETAILS = {"text_tokens": 10, "image_tokens": 40}


def _usage(n: int) -> dict[str, Any]:
    return {"input_tokens": 50 * n, "output_tokens": 200 * n, "total_tokens": _TOKENS * n,
            "input_tokens_details": {k: v * n for k, v in _DETAILS.items()}}


def _json_answer(n: int) -> bytes:
    return json.dumps({
        "created": int(time.time()),
        "data": [{"b64_json": _PIXEL}] * n,
        "background": "opaque", "output_format": "png", "size": "1024x1024", "quality": "low",
        "usage": _usage(n),
    }).encode()


def _json_reply(n: int) -> tuple[bytes, list[tuple[bytes, bytes]]]:
    answer = _json_answer(n)
    return answer, [(b"content-type", b"application/json"),
                    (b"content-length", str(len(answer)).encode()), (b"openai-processing-ms", b"1")]


_REPLIES = {1: _json_reply(1)}  # by n; built on first use
_EVENT_FIELDS = {"b64_json": _PIXEL, "size": "1024x1024", "quality": "low", "background": "opaque",
                 "output_format": "png"}
_COMPLETED = "image_edit.completed"

_HEAD = 8192  # the gateway writes the text fields first; the files start within this
_FIELD = re.compile(rb'name="([a-z_]+)"\r\n\r\n([^\r]*)\r\n')
_FAULT = re.compile(rb"\[fault:([a-z0-9-]+)\]")
DROP_AFTER = 128 * 1024  # bytes of a body taken before a `drop`: the upload is still under way
STALL_MAX = 30.0  # seconds a `stall` waits for the gateway to give up before answering anyway

stats: dict[str, int] = {"requests": 0, "bytes": 0, "answered": 0, "images": 0, "tokens": 0}
DELAY = 0.0  # seconds every answer waits once the body is in (--delay): a provider at work


class Ask:
    """What a request asks for, read from its text fields."""

    __slots__ = ("fault", "n", "partials", "stream")

    @classmethod
    def of(cls, head: bytes) -> Ask:
        end = head.find(b'filename="')
        text = head if end < 0 else head[:end]  # the text fields
        # Most requests ask for nothing: a few substring scans instead of a regex parse.
        if b"[fault:" in text or b'name="stream"' in text or b'name="n"' in text:
            return cls(text)
        return _PLAIN

    def __init__(self, text: bytes) -> None:
        fields = dict(_FIELD.findall(text))
        fault = _FAULT.search(fields.get(b"prompt", b""))
        self.fault = fault[1].decode() if fault else ""
        self.stream = fields.get(b"stream") == b"true"
        n, partials = fields.get(b"n", b"1"), fields.get(b"partial_images", b"0")
        self.n = int(n) if n.isdigit() else 1
        self.partials = int(partials) if partials.isdigit() else 0


_PLAIN = Ask(b"")


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    """Take the body, then answer as asked: JSON, SSE or a fault."""
    if scope["type"] != "http":
        return
    if scope["method"] == "GET" and scope["path"] == "/_stats":
        body = json.dumps(stats).encode()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": body})
        return
    head = b""
    ask: Ask | None = None
    received = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        chunk = message.get("body", b"")
        received += len(chunk)
        stats["bytes"] += len(chunk)
        more = message.get("more_body", False)
        if ask is None:
            head += chunk[:_HEAD - len(head)]
            if not more or len(head) >= _HEAD or b'filename="' in head:
                ask = Ask.of(head)
        if ask is not None and ask.fault == "drop" and (received >= DROP_AFTER or not more):
            _fault("drop")
            await _hang_up(receive)
            return
        if not more:
            break
    stats["requests"] += 1
    assert ask is not None
    rid = b"req_up_%d" % stats["requests"]
    if ask.fault:
        _fault(ask.fault)
    if ask.fault in ("500", "429"):
        await _error(send, rid, int(ask.fault))
        return
    if ask.fault == "stall" and await _stalled(receive):
        return
    if DELAY:
        await asyncio.sleep(DELAY)
    if ask.stream:
        await _events(receive, send, rid, ask)
        return
    answer, headers = _REPLIES.get(ask.n) or _REPLIES.setdefault(ask.n, _json_reply(ask.n))
    await send({"type": "http.response.start", "status": 200,
                "headers": [*headers, (b"x-request-id", rid)]})
    if ask.fault == "cut":
        await send({"type": "http.response.body", "body": answer[:len(answer) // 2],
                    "more_body": True})
        await _hang_up(receive)
        return
    await send({"type": "http.response.body", "body": answer})
    _served(ask.n)
    stats["answered"] += 1


def _fault(name: str) -> None:
    key = f"fault:{name}"
    stats[key] = stats.get(key, 0) + 1


def _served(images: int) -> None:
    stats["images"] += images
    stats["tokens"] += images * _TOKENS


async def _error(send: Send, rid: bytes, status: int) -> None:
    if status == 429:
        error = {"message": "Rate limit reached for requests (bench upstream fault).",
                 "type": "requests", "param": None, "code": "rate_limit_exceeded"}
        extra = [(b"retry-after", b"1"), (b"retry-after-ms", b"1000")]
    else:
        error = {"message": "The server had an error (bench upstream fault).",
                 "type": "server_error", "param": None, "code": None}
        extra = []
    body = json.dumps({"error": error}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()),
                            (b"x-request-id", rid), *extra]})
    await send({"type": "http.response.body", "body": body})


async def _stalled(receive: Receive) -> bool:
    """Silence until the gateway hangs up (True), or STALL_MAX passed (False: answer after all)."""
    try:
        async with asyncio.timeout(STALL_MAX):
            while (await receive())["type"] != "http.disconnect":
                pass
    except TimeoutError:
        return False
    return True


async def _events(receive: Receive, send: Send, rid: bytes, ask: Ask) -> None:
    """An SSE answer: per image, its partial events then its completed one (with usage)."""
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/event-stream"),
                            (b"cache-control", b"no-cache"), (b"x-request-id", rid)]})
    events: list[tuple[str, dict[str, Any]]] = []
    for _ in range(ask.n):
        events += [("image_edit.partial_image", {"partial_image_index": i})
                   for i in range(ask.partials)]
        events.append((_COMPLETED, {"usage": _usage(1)}))
    completed = 0
    for kind, extra in events:
        data = json.dumps({"type": kind, "created_at": int(time.time()), **_EVENT_FIELDS, **extra})
        event = f"event: {kind}\ndata: {data}\n\n".encode()
        if (ask.fault == "cut" and completed == 1) or (ask.fault == "cut-early"
                                                       and kind == _COMPLETED):
            # Half an event, then gone: the half is not served (the gateway drops it too).
            await send({"type": "http.response.body", "body": event[:len(event) // 2],
                        "more_body": True})
            await _hang_up(receive)
            return
        await send({"type": "http.response.body", "body": event, "more_body": True})
        if kind == _COMPLETED:
            completed += 1
            _served(1)  # counted as it goes: a stream cut later keeps what it sent whole
    if ask.fault == "cut":  # a single image: cut where the stream would have ended
        await _hang_up(receive)
        return
    await send({"type": "http.response.body", "body": b"", "more_body": False})
    stats["answered"] += 1


async def _hang_up(receive: Receive) -> None:
    """Close the connection with no (further) answer.

    uvicorn does not expose the connection to the app, but its `receive` is a method of the
    request cycle that holds the transport. Closing it with body bytes still unread makes the
    kernel send a reset, as a crashed upstream would. Waiting for the disconnect lets uvicorn
    see the request as ended by the peer, so it logs nothing.
    """
    transport = getattr(getattr(receive, "__self__", None), "transport", None)
    if transport is None:  # another server: an exception also ends the connection
        raise ConnectionResetError("bench upstream fault")
    transport.close()
    while (await receive())["type"] != "http.disconnect":
        pass


def main() -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--delay", type=float, default=0.0,
                        help="seconds each answer waits after the body, as a provider at work")
    parser.add_argument("--backlog", type=int, default=2048, help="listen backlog")
    args = parser.parse_args()
    global DELAY
    DELAY = args.delay
    uvicorn.run(app, host="127.0.0.1", port=args.port, loop="uvloop", http="httptools",
                lifespan="off", log_level="warning", access_log=False, server_header=False,
                date_header=False, backlog=args.backlog)


if __name__ == "__main__":
    main()
