"""`gateway serve --demo`: a built-in stand-in provider, so the gateway can be tried end to end
without a provider key or a network.

The gateway sends every upstream request to this app, mounted on its own port under /_demo/v1.
It reads the request as a provider would (multipart edits, JSON generations) and answers every
shape the SDKs expect: JSON with `n` real PNG images (a small gradient) and a usage block, or
with stream=true the `image_edit.*` / `image_generation.*` events, partial images included.
It is loudly a demo: a warning at start-up, `x-gateway-demo: true` on every image answer, and
each image's `revised_prompt` says so. Only the gateway itself may call it: a request without
the server's own random token is 404; bodies and counts are bounded.
"""

from __future__ import annotations

import base64
import hmac
import json
import os
import secrets
import struct
import time
import zlib
from typing import Any

from gateway.asgi import Receive, Scope, Send, headers_of
from gateway.errors import InvalidRequest
from gateway.multipart import PART_DATA, PART_START, MultipartReader, Part, boundary_of

PREFIX = "/_demo"
# The gateway's upstream client sends it as its API key. Set once in the process that starts the
# server (the CLI imports this module before uvicorn starts), so its workers inherit the same one.
TOKEN = os.environ.setdefault("IMAGE_GATEWAY_DEMO_TOKEN", secrets.token_hex(16))
_SIDE = 256
_MAX_BODY = 64 * 1024 * 1024  # the demo reads what the gateway forwards, never more
_MARK = "[demo: made by image-gateway's built-in stand-in, not by a model]"


def _png(side: int) -> bytes:
    """A real PNG: a diagonal gradient, RGB."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + \
            struct.pack(">I", zlib.crc32(kind + data))

    rows = b"".join(
        b"\0" + bytes(v for x in range(side) for v in (x * 255 // side, y * 255 // side, 160))
        for y in range(side))
    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + \
        chunk(b"IEND", b"")


IMAGE_B64 = base64.b64encode(_png(_SIDE)).decode()


class DemoProvider:
    """The ASGI app answering /_demo/v1/images/edits and /_demo/v1/images/generations."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope["path"].removeprefix(PREFIX)
        headers = headers_of(scope)
        if not hmac.compare_digest(headers.get("authorization", ""), f"Bearer {TOKEN}") or \
                path not in ("/v1/images/generations", "/v1/images/edits"):
            await _error(send, 404, "not found")
            return
        body = bytearray()
        while True:
            message = await receive()
            body += message.get("body", b"")
            if len(body) > _MAX_BODY:
                await _error(send, 413, "too large for the demo")
                return
            if not message.get("more_body", False):
                break
        try:
            if path == "/v1/images/generations":
                fields = json.loads(body)
                kind = "image_generation"
            else:
                fields = _form_fields(bytes(body), headers.get("content-type"))
                kind = "image_edit"
            n = min(max(int(fields.get("n") or 1), 1), 10)
            partials = min(max(int(fields.get("partial_images") or 0), 0), 3)
        except (ValueError, TypeError, AttributeError, RecursionError, InvalidRequest):
            await _error(send, 400, "unreadable request")
            return
        usage = _usage(str(fields.get("prompt", "")), n, images=body.count(b"filename="))
        shape = {"background": "opaque", "output_format": str(fields.get("output_format", "png")),
                 "size": f"{_SIDE}x{_SIDE}", "quality": str(fields.get("quality", "auto"))}
        if str(fields.get("stream", "")).lower() == "true":
            await _events(send, kind, n, partials, shape, usage)
            return
        await _json(send, 200, {
            "created": int(time.time()),
            "data": [{"b64_json": IMAGE_B64, "revised_prompt": _MARK} for _ in range(n)],
            **shape, "usage": usage})


def _form_fields(body: bytes, content_type: str | None) -> dict[str, str]:
    reader = MultipartReader(boundary_of(content_type), max_parts=1000, max_header_bytes=8192)
    fields: dict[str, str] = {}
    part: Part | None = None
    for kind, payload in reader.feed(body):
        if kind == PART_START:
            part = payload
            if not part.is_file:
                fields[part.name] = ""
        elif kind == PART_DATA and part is not None and not part.is_file:
            fields[part.name] += payload.decode(errors="replace")
    return fields


def _usage(prompt: str, n: int, images: int) -> dict[str, Any]:
    text, image = max(1, len(prompt) // 4), 194 * images
    output = 272 * n
    return {"input_tokens": text + image, "output_tokens": output,
            "total_tokens": text + image + output,
            "input_tokens_details": {"text_tokens": text, "image_tokens": image}}


async def _error(send: Send, status: int, message: str) -> None:
    await _json(send, status, {"error": {"message": message, "type": "invalid_request_error",
                                         "param": None, "code": None}})


async def _json(send: Send, status: int, answer: dict[str, Any]) -> None:
    body = json.dumps(answer).encode()
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
        (b"x-request-id", b"req_demo")]})
    await send({"type": "http.response.body", "body": body})


async def _events(send: Send, kind: str, n: int, partials: int, shape: dict[str, str],
                  usage: dict[str, Any]) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": [
        (b"content-type", b"text/event-stream"), (b"x-request-id", b"req_demo")]})
    for _ in range(n):
        events = [(f"{kind}.partial_image", {"partial_image_index": i}) for i in range(partials)]
        events.append((f"{kind}.completed", {"usage": usage}))
        for name, extra in events:
            data = {"type": name, "b64_json": IMAGE_B64, "created_at": int(time.time()),
                    "revised_prompt": _MARK, **shape, **extra}
            await send({"type": "http.response.body", "more_body": True,
                        "body": f"event: {name}\ndata: {json.dumps(data)}\n\n".encode()})
    await send({"type": "http.response.body", "body": b""})
