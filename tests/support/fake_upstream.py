"""A fake OpenAI images API on loopback that answers like OpenAI and records what it received.

It reads each body as it streams in (so tests can watch bytes arrive before the client has
finished), then parses it with Starlette's form parser, independent of the gateway's own code.
Tests steer it through `FakeUpstream.behaviour`; `reset()` restores the defaults.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from tests.support.images import png

IMAGE_B64 = base64.b64encode(png(8, 8)).decode()


SVG_USAGE = {"input_tokens": 30, "model": "gpt-5.5", "output_tokens": 900, "reasoning_tokens": 400,
             "total_tokens": 930}


@dataclass
class RecordedFile:
    name: str
    filename: str | None
    content_type: str | None
    size: int
    sha256: str


@dataclass
class Recorded:
    """One request as the upstream saw it."""

    method: str
    path: str
    headers: dict[str, str]
    completed: bool = False  # the whole body arrived and parsed
    aborted: bool = False  # the gateway hung up: mid-body, or while the answer was awaited
    bytes_received: int = 0
    paused_at: int = 0  # body bytes received when reading paused (Behaviour.read_pause_at)
    fields: list[tuple[str, str]] = field(default_factory=list)
    files: list[RecordedFile] = field(default_factory=list)
    json: dict[str, Any] | None = None  # a JSON body (generations) as it arrived

    def field(self, name: str) -> str | None:
        values = [v for k, v in self.fields if k == name]
        assert len(values) <= 1, f"{name} sent {len(values)} times"
        return values[0] if values else None

    @property
    def field_names(self) -> list[str]:
        return [k for k, _ in self.fields]


@dataclass
class Behaviour:
    status: int = 200
    error: dict[str, Any] | None = None  # an OpenAI error body to answer with `status`
    delay_headers: float = 0.0  # seconds of silence before the response headers
    cut_after_events: int | None = None  # SSE: drop the connection after this many events
    event_delay: float = 0.0
    cut_json: bool = False  # send half the JSON body, then drop the connection
    cut_mid_event: bool = False  # SSE: drop the connection halfway through the second event
    headers: dict[str, str] = field(default_factory=dict)  # extra answer headers
    reset_after_bytes: int = 0  # drop the connection once this much body has arrived
    huge_answer: int = 0  # answer with this many bytes: JSON, or SSE with one event this long
    huge_content_length: bool = False  # ... announcing its length up front
    # Stop reading the request body for read_pause_seconds once read_pause_at bytes of it have
    # arrived (once per request): an upstream applying backpressure, not a silent client.
    read_pause_at: int = 0
    read_pause_seconds: float = 0.0
    usage: dict[str, Any] = field(default_factory=lambda: {
        "input_tokens": 50, "output_tokens": 200, "total_tokens": 250,
        "input_tokens_details": {"text_tokens": 10, "image_tokens": 40}})


class FakeUpstream:
    def __init__(self) -> None:
        self.records: list[Recorded] = []
        self.behaviour = Behaviour()
        self._lock = threading.Lock()
        self._counter = 0
        self.answer_bytes_sent = 0  # of the last huge answer
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        config = uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="error",
                                loop="asyncio", lifespan="off", interface="asgi3")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, daemon=True)

    def start(self) -> FakeUpstream:
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("fake upstream did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(5)

    def reset(self) -> None:
        with self._lock:
            self.records.clear()
        self.behaviour = Behaviour()

    @property
    def completed(self) -> list[Recorded]:
        return [r for r in self.records if r.completed]

    def last(self) -> Recorded:
        done = self.completed
        assert done, f"upstream completed no request (saw {len(self.records)})"
        return done[-1]

    def wait_for(self, predicate: Any, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError("condition not met in time")
            time.sleep(0.01)

    # ------------------------------------------------------------------------ the ASGI app
    async def app(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        request = Request(scope, receive)
        record = Recorded(scope["method"], scope["path"],
                          {k.lower(): v for k, v in request.headers.items()})
        with self._lock:
            self.records.append(record)
            self._counter += 1
            upstream_id = f"req_upstream_{self._counter}"
        if scope["path"] == "/v1/images/generations":
            await self._generation(record, request, upstream_id, scope, receive, send)
            return
        if scope["path"] != "/v1/images/edits":
            await JSONResponse({"error": {"message": "not found"}}, 404)(scope, receive, send)
            return
        body = bytearray()
        try:
            async for chunk in request.stream():
                body += chunk
                record.bytes_received = len(body)
                b = self.behaviour
                if b.read_pause_seconds and not record.paused_at and len(body) >= b.read_pause_at:
                    # uvicorn stops reading the socket while its buffer is full: TCP pushes back.
                    record.paused_at = len(body)
                    await asyncio.sleep(b.read_pause_seconds)
                if 0 < self.behaviour.reset_after_bytes < len(body):
                    # Gives up on the upload: the server answers 500 and drops the connection.
                    raise ConnectionResetError("fake upstream drops the upload")
            form = await Request(scope, _replay(bytes(body))).form(
                max_files=1000, max_fields=1000, max_part_size=1 << 20)
        except Exception:  # a cut body (ClientDisconnect, or a parse error) is what we record
            record.aborted = True
            return
        for name, value in form.multi_items():
            if isinstance(value, str):
                record.fields.append((name, value))
            else:
                data = await value.read()
                record.files.append(RecordedFile(name, value.filename, value.content_type,
                                                 len(data), hashlib.sha256(data).hexdigest()))
        record.completed = True
        if self.behaviour.delay_headers:
            # Silence before the headers, watching for the gateway giving up on us.
            try:
                while (await asyncio.wait_for(receive(), self.behaviour.delay_headers))["type"] \
                        != "http.disconnect":
                    pass
                record.aborted = True
                return
            except TimeoutError:
                pass
        response = await self._answer(record, upstream_id)
        await response(scope, receive, send)

    async def _generation(self, record: Recorded, request: Request, upstream_id: str,
                          scope: Any, receive: Any, send: Any) -> None:
        """A generation: a JSON body, recorded as it came and as fields (values written out as
        a form would carry them), answered like an edit with image_generation.* events."""
        try:
            record.json = json.loads(await request.body())
        except Exception:
            record.aborted = True
            return
        assert isinstance(record.json, dict)
        for name, value in record.json.items():
            text = ("true" if value else "false") if isinstance(value, bool) else str(value)
            record.fields.append((name, text))
        record.completed = True
        response = await self._answer(record, upstream_id)
        await response(scope, receive, send)

    async def _answer(self, record: Recorded, upstream_id: str) -> Response:
        b = self.behaviour
        headers = {"x-request-id": upstream_id, "openai-processing-ms": "42", **b.headers}
        if b.error is not None or b.status != 200:
            error = b.error or {"message": "upstream failure", "type": "server_error",
                                "param": None, "code": None}
            return JSONResponse({"error": error}, b.status, headers=headers)
        n = int(record.field("n") or 1)
        if b.huge_answer:
            return self._huge(record.field("stream") == "true", headers)
        if record.field("stream") == "true":
            return StreamingResponse(self._events(record, n), media_type="text/event-stream",
                                     headers=headers)
        answer: dict[str, Any] = {"created": int(time.time()),
                                  "data": [{"b64_json": IMAGE_B64} for _ in range(n)]}
        if record.field("model") != "dall-e-2":
            answer.update(background="opaque", output_format=record.field("output_format") or "png",
                          size="1024x1024", quality="low", usage=b.usage)
            if record.field("output_format") == "svg":  # the SVG author's tokens, as OpenAI adds them
                answer["svg_usage"] = SVG_USAGE
        raw = json.dumps(answer).encode()
        if b.cut_json:
            return StreamingResponse(_cut(raw), media_type="application/json", headers=headers)
        return Response(raw, media_type="application/json", headers=headers)

    def _huge(self, sse: bool, headers: dict[str, str]) -> Response:
        """An answer of `huge_answer` bytes, made of one enormous image, sent 1 MB at a time."""
        b = self.behaviour
        if sse:
            head = b'event: image_edit.partial_image\ndata: {"type": "image_edit.partial_image", ' \
                b'"b64_json": "'
            tail = b'"}\n\n'
        else:
            head, tail = b'{"created": 1, "data": [{"b64_json": "', b'"}]}'
        self.answer_bytes_sent = 0

        async def body() -> Any:
            yield head
            left = b.huge_answer - len(head) - len(tail)
            while left > 0:
                chunk = b"A" * min(left, 1 << 20)
                left -= len(chunk)
                self.answer_bytes_sent += len(chunk)
                yield chunk
                # uvicorn drops writes to a closed connection without a word: pausing lets
                # Starlette notice the disconnect and stop, so answer_bytes_sent stays honest.
                await asyncio.sleep(0.001)
            yield tail

        if b.huge_content_length:
            headers = {**headers, "content-length": str(b.huge_answer)}
        media = "text/event-stream" if sse else "application/json"
        return StreamingResponse(body(), media_type=media, headers=headers)

    async def _events(self, record: Recorded, n: int) -> Any:
        b = self.behaviour
        partials = int(record.field("partial_images") or 0)
        prefix = "image_generation" if record.json is not None else "image_edit"
        sent = 0
        for _image in range(n):
            events = [(f"{prefix}.partial_image", {"partial_image_index": i})
                      for i in range(partials)]
            events.append((f"{prefix}.completed", {"usage": b.usage}))
            for kind, extra in events:
                if b.cut_after_events is not None and sent >= b.cut_after_events:
                    raise ConnectionResetError("fake upstream cuts the stream")
                data = {"type": kind, "b64_json": IMAGE_B64, "created_at": int(time.time()),
                        "size": "1024x1024", "quality": "low", "background": "opaque",
                        "output_format": "png", **extra}
                event = f"event: {kind}\ndata: {json.dumps(data)}\n\n".encode()
                if b.cut_mid_event and sent == 1:
                    yield event[: len(event) // 2]
                    await asyncio.sleep(0.05)
                    raise ConnectionResetError("fake upstream cuts an event in half")
                yield event
                sent += 1
                if b.event_delay:
                    await asyncio.sleep(b.event_delay)


def _replay(body: bytes) -> Any:
    sent = False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return receive


async def _cut(raw: bytes) -> Any:
    yield raw[: len(raw) // 2]
    await asyncio.sleep(0.05)
    raise ConnectionResetError("fake upstream cuts the answer")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ResettingUpstream:
    """A raw TCP server that reads a request's head and `after` bytes of its body, then resets
    the connection (SO_LINGER 0: an RST, not a FIN), as a crashing upstream or a middlebox
    does. uvicorn cannot do this: it only ever closes politely."""

    def __init__(self, after: int) -> None:
        self.after = after
        self.received: list[int] = []  # body bytes read on each connection before the reset
        self._sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._sock.getsockname()[1]}/v1"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return  # closed
            threading.Thread(target=self._reset, args=(conn,), daemon=True).start()

    def _reset(self, conn: socket.socket) -> None:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = conn.recv(65536)
            if not chunk:
                conn.close()
                return
            data += chunk
        body = len(data) - data.index(b"\r\n\r\n") - 4
        while body < self.after and (chunk := conn.recv(65536)):
            body += len(chunk)
        self.received.append(body)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        conn.close()

    def stop(self) -> None:
        self._sock.close()
