"""POST /v1/images/edits: a raw ASGI endpoint that validates while it streams.

The body is parsed as it arrives. Text fields that come before the files are validated before
any byte goes upstream; files that come before the fields wait in a spool. Once the model and
prompt are known (at the first file part after them, or at the end of the body) the request is
admitted and the upstream request opens with a body generator that keeps reading the client.
The upstream's closing boundary is written only after every check has passed, so a request found
wrong mid-stream is cut off and never completed upstream.

Raw ASGI rather than a FastAPI route: no per-request middleware, dependency solving or double
parsing on the hot path, and direct access to `receive` for disconnect handling.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from typing import IO, Any

import httpx

from gateway import logs, metrics
from gateway.admission import Admission, EditRequest, KeyPrincipal, Outcome, Principal, Ticket
from gateway.asgi import Message, Receive, Scope, Send, headers_of, request_id
from gateway.catalog import Catalog, ModelSpec
from gateway.errors import (
    GatewayError,
    InvalidRequest,
    RateLimited,
    RequestTimeout,
    RequestTooLarge,
    ServiceUnavailable,
    UpstreamError,
    UpstreamResponseTooLarge,
    UpstreamUnavailable,
)
from gateway.multipart import (
    PART_DATA,
    PART_START,
    MultipartReader,
    MultipartWriter,
    Part,
    boundary_of,
)
from gateway.settings import Settings
from gateway.sniff import SNIFF_LIMIT, ImageError, ImageInfo, sniff
from gateway.upstream import Upstreams, transport_error, transport_kind
from gateway.usage import UsageMeter

log = logging.getLogger("gateway.edits")

_IMAGE_NAME = re.compile(r"image(\[\d*\])?")
_EXTENSIONS = {"png": "png", "jpeg": "jpg", "webp": "webp"}
# Upstream answer headers worth passing on; hop-by-hop and rate-limit headers are the gateway's.
_PASS_HEADERS = frozenset({
    b"content-type", b"content-length", b"content-encoding", b"cache-control",
    b"openai-processing-ms", b"openai-version", b"retry-after", b"retry-after-ms",
    b"x-should-retry"})
_STREAM_ERROR = b"event: error\ndata: %s\n\n"
_ERROR_BYTES = 64 * 1024  # the most of an upstream error answer read
EDITS_ENDPOINT = "/v1/images/edits"


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


class ClientGone(Exception):
    """The client disconnected; there is nobody left to answer."""


@dataclass(slots=True)
class Upload:
    """One file part: where it is in the request and what its bytes turned out to be."""

    kind: str  # "image" | "mask"
    param: str  # how errors name it: image, image[1], mask
    index: int
    head: bytes | bytearray  # bytes kept until the header is sniffed
    sniffed: int = 0  # len(head) at the last sniff
    info: ImageInfo | None = None
    size: int = 0
    spooled: bool = False  # its bytes wait in the request's spool
    spool_start: int = 0

    @property
    def filename(self) -> str:
        ext = _EXTENSIONS[self.info.format] if self.info else "bin"
        return f"mask.{ext}" if self.kind == "mask" else f"image_{self.index}.{ext}"


def _count(counts: dict[str, int], key: str | None, delta: int) -> None:
    """Add to a key's count (no key: nothing), dropping it at zero so idle keys cost nothing."""
    if key is None:
        return
    left = counts.get(key, 0) + delta
    if left:
        counts[key] = left
    else:
        del counts[key]


class EditsEndpoint:
    """The ASGI app for POST /v1/images/edits; one instance serves every request."""

    def __init__(self, settings: Settings, catalog: Catalog, upstreams: Upstreams,
                 admission: Admission) -> None:
        self.settings = settings
        self.catalog = catalog
        self.upstreams = upstreams
        self.admission = admission
        # Default: the largest request the catalog allows, plus room for text fields and framing.
        self.max_body = settings.max_body_bytes or catalog.max_request_bytes + 1024 * 1024
        specs = [*catalog.models.values(), *filter(None, [catalog.passthrough])]
        self.max_file_bytes = max(
            max(m.max_image_bytes, m.mask.max_bytes if m.mask else 0) for m in specs)
        self.max_images = max(m.max_images for m in specs)
        self.in_flight = 0
        self.by_key: dict[str, int] = {}  # edit slots each key holds here
        self.spooled = 0  # bytes waiting in spools, all requests
        self.spooled_by_key: dict[str, int] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = headers_of(scope)
        edit = _Edit(self, receive, request_id(headers))
        edit.trace_id, edit.traceparent = logs.trace_context(headers.get("traceparent"))
        client = scope.get("client")
        edit.client = f"{client[0]}:{client[1]}" if client else ""
        edit.expects_continue = headers.get("expect", "").lower() == "100-continue"
        try:
            # Nothing is held before the key is accepted: no slot, no body read (so no
            # `100 Continue` either), and a refusal is answered and the connection closed.
            edit.principal = await self.admission.authenticate(headers.get("authorization"))
            self._take_slot(edit)
        except Exception as exc:
            if not isinstance(exc, GatewayError):
                log.exception("request %s: internal error", edit.request_id)
                exc = GatewayError("The gateway failed to handle the request.")
            try:
                await edit.fail(send, exc)
            finally:
                exc = None  # type: ignore[assignment]  # no cycle through its traceback
                edit.close()
                self._observe(edit)
            return
        metrics.IN_FLIGHT.inc()
        error: GatewayError | None = None
        try:
            try:
                await edit.run(headers, send)
            except GatewayError as exc:
                if edit.response_started:
                    log.warning("request %s: error after the answer began: %s", edit.request_id,
                                exc)
                else:
                    error = exc
            except ClientGone:
                log.info("request %s: client disconnected", edit.request_id)
            except httpx.TransportError as exc:
                # The upstream broke off a JSON answer already under way: returning without
                # completing it makes the server cut the connection, so the client sees a
                # broken response rather than a wrong one.
                log.warning("request %s: upstream failed mid-answer: %r", edit.request_id, exc)
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if not edit.timed_out or task is None or task.uncancel() != 0:
                    raise  # a server shutdown, not the body watchdog
                log.info("request %s: %s", edit.request_id, edit.timed_out)
                error = RequestTimeout(edit.timed_out)
            except Exception:
                log.exception("request %s: internal error", edit.request_id)
                if not edit.response_started:
                    error = GatewayError("The gateway failed to handle the request.")
            finally:
                # The slot and the spool go back before any error is answered (a refused
                # client's drain holds nothing).
                edit.release_slot()
                metrics.IN_FLIGHT.dec()
                edit.release_spool()
            if error is not None:
                await edit.fail(send, error)
        finally:
            # The error's traceback holds this frame, which holds the error: break the cycle so
            # the request is freed now, not by the cycle collector.
            error = None
            edit.close()
            self._observe(edit)

    def _take_slot(self, edit: _Edit) -> None:
        """An edit slot of this instance, at most the key's own concurrency of them.

        Taken when the head is read, before any body: a key's trickling or spooling requests
        can fill only its own share, never the instance. The store still enforces the key's
        concurrency across instances at admission.
        """
        principal = edit.principal
        key = principal.id if isinstance(principal, KeyPrincipal) else None
        if key is not None:
            limit = principal.record.limits.max_concurrent or \
                self.settings.max_in_flight_per_key or self.settings.max_in_flight
            if self.by_key.get(key, 0) >= limit:
                raise RateLimited(
                    "Rate limit reached for concurrent requests on this API key. Try again in 1s.",
                    headers={"retry-after": "1", "retry-after-ms": "1000"})
        if self.in_flight >= self.settings.max_in_flight:
            raise ServiceUnavailable("The gateway is at capacity; retry shortly.",
                                     code="overloaded", headers={"retry-after": "1"})
        self.in_flight += 1
        _count(self.by_key, key, 1)
        edit.slot_key = key
        edit.holds_slot = True

    def give_slot(self, key: str | None) -> None:
        self.in_flight -= 1
        _count(self.by_key, key, -1)

    def spool_take(self, key: str | None, size: int) -> None:
        """Account `size` more spooled bytes, or refuse (retryable) past either cap."""
        settings = self.settings
        if self.spooled + size > settings.max_spool_bytes or (
                key is not None
                and self.spooled_by_key.get(key, 0) + size > settings.max_spool_bytes_per_key):
            raise ServiceUnavailable(
                "The gateway holds too many uploads waiting for their text fields; retry "
                "shortly, or send the text fields before the files.", code="spool_full",
                headers={"retry-after": "1"})
        self.spooled += size
        _count(self.spooled_by_key, key, size)

    def spool_give(self, key: str | None, size: int) -> None:
        self.spooled -= size
        _count(self.spooled_by_key, key, -size)

    def _observe(self, edit: _Edit) -> None:
        """The request's metrics and its one log line."""
        rec = edit.rec
        # As the client sees it: up to the last byte sent (settling the quota comes after).
        total = (rec.end or time.perf_counter()) - rec.start
        rec.bytes_in = edit.received
        model = edit.spec.name if edit.spec is not None else ""
        # Pass-through models are named by clients: one label for all, to bound cardinality.
        rec.model = model if not model or model in self.catalog.models else "passthrough"
        if isinstance(edit.principal, KeyPrincipal):
            rec.key_id = edit.principal.id
        metrics.record(rec, total, key_labels=self.settings.metrics_key_labels)
        fields = {
            "request_id": edit.request_id, "upstream_request_id": rec.upstream_request_id,
            "trace_id": edit.trace_id, "client": edit.client, "key_id": rec.key_id,
            "model": model, "n": rec.n,
            "status": rec.status or 499, "bytes_in": rec.bytes_in, "bytes_out": rec.bytes_out,
            "upstream_ms": round(rec.upstream_seconds * 1000, 3),
            "total_ms": round(total * 1000, 3), "rejection": rec.rejection,
            "upstream_error": rec.upstream_error, "images": rec.images}
        if self.settings.log_prompts and edit.prompt is not None:
            fields["prompt"] = edit.prompt
        logs.access(fields)


class _Edit:
    """The state of one edit request, from the first body byte to the last answer byte."""

    def __init__(self, endpoint: EditsEndpoint, receive: Receive, request_id: str) -> None:
        self.ep = endpoint
        self.receive = receive
        self.request_id = request_id
        self.settings = endpoint.settings
        self.received = 0
        self.body_done = asyncio.Event()  # the last body message has been received
        self.parsed = False  # ... and every part in it handled
        self.response_started = False
        self.client_gone = False  # left before the upstream had the whole request: cancelled
        self.client_left = False  # left (or stopped reading) later: the answer is still metered
        self.upload_done = False  # the upstream has the whole request body
        # While the gateway itself waits (admission, the upstream connecting or reading slowly),
        # the client's body-read clocks stop: that time is not the client's silence.
        self.paused_since: float | None = None
        self.paused = 0.0
        self.timed_out = ""  # why the body watchdog cancelled the request
        self.expects_continue = False
        self.receiving = False  # receive() was called: uvicorn has sent any `100 Continue`
        self.slot_key: str | None = None
        self.holds_slot = False
        self.spooled = 0
        self.text_bytes = 0
        self.n_changed = False  # `n` arrived after admission
        self.started = 0.0
        self.last_body = 0.0
        self._watchdog: asyncio.TimerHandle | None = None
        self._task: asyncio.Task[Any] | None = None
        self.fields: dict[str, str] = {}  # raw text fields before the model is known
        self.values: dict[str, str] = {}  # normalized values, defaults included, for checks
        self.sent: list[str] = []  # fields the client sent, in order
        self.uploads: list[Upload] = []
        self.images = 0
        self.first_image_name = ""
        self.image_field = ""  # the upstream name of image parts, once decided
        self.spec: ModelSpec | None = None
        self.final_values: dict[str, str] | None = None  # set once every field is known
        self.spool: IO[bytes] | None = None
        self.writer = MultipartWriter()
        self._part: Part | None = None
        self._text = bytearray()
        self._upload: Upload | None = None
        self._reader: MultipartReader | None = None
        self.principal: Principal | None = None
        self.ticket: Ticket | None = None
        self.rec = metrics.RequestRecord(EDITS_ENDPOINT, time.perf_counter())
        self.trace_id = self.traceparent = self.client = ""
        self.prompt: str | None = None

    # ----------------------------------------------------------------------------- the flow
    async def run(self, headers: dict[str, str], send: Send) -> None:
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.ep.max_body:
            raise RequestTooLarge(f"Request body is larger than {self.ep.max_body} bytes.")
        boundary = boundary_of(headers.get("content-type"))
        self._arm_body_watchdog()
        self._reader = MultipartReader(
            boundary, max_parts=self.settings.max_parts,
            max_header_bytes=self.settings.max_part_header_bytes)
        live, events = await self._read_until_ready()
        spec = self.spec or self._accept_fields()
        prepared: list[bytes] = []
        if live and self.body_done.is_set():
            # The rest of the body is already here (small requests arrive in one message):
            # handle it now, so that nothing invalid in it opens the upstream.
            self._handle(events, prepared)
            live, events = False, []
        if not live:
            self.parsed = True
            self.final_values = self._final_checks()
        self._pause()  # until the upstream asks for the body (see _upstream_body)
        ticket = self.ticket = await self._admit(self.principal, spec)
        outcome = Outcome(answered=False)
        try:
            await self._race_disconnect(
                self._forward(live, events, prepared, ticket, send, outcome))
        finally:
            try:
                await ticket.finish(outcome)
            except Exception:
                # Never let the bookkeeping hide how the request itself ended.
                log.exception("request %s: admission finish failed", self.request_id)

    async def _admit(self, principal: Principal, spec: ModelSpec) -> Ticket:
        # `n` is normalized by the model's rule (pass-through models too): the value sent
        # upstream is the value reserved.
        n = self.rec.n = self._n()
        stream = self.values.get("stream") == "true"
        return await self.ep.admission.admit(
            principal, EditRequest(self.request_id, spec, n, stream))

    def _n(self) -> int:
        """The images this request asks for: as sent upstream (its catalog default included)."""
        assert self.spec is not None
        rule = self.spec.fields.get("n")
        return int(self.values.get("n") or (rule.default if rule and rule.default else "1"))

    async def _extend(self) -> None:
        """`n` came after the files began streaming: reserve the difference before the upstream
        request can complete (QuotaExceeded cuts it off)."""
        self.n_changed = False
        n = self._n()
        if self.ticket is not None and n > self.rec.n:
            await self.ticket.extend(n - self.rec.n)
            self.rec.n = n

    async def _forward(self, live: bool, events: list[tuple[int, Any]], prepared: list[bytes],
                       ticket: Ticket, send: Send, outcome: Outcome) -> None:
        assert self.spec is not None
        upstream = self.ep.upstreams[self.spec.upstream]
        request = upstream.edit_request(
            self._upstream_body(live, events, prepared), self.writer.content_type,
            self.request_id, self.traceparent)
        start = time.perf_counter()
        try:
            try:
                response = await upstream.client.send(request, stream=True)
            except httpx.TransportError as exc:
                self.rec.upstream_error = transport_kind(exc)
                raise transport_error(exc, upstream.name) from None
            try:
                outcome.answered = True
                outcome.status = response.status_code
                self.rec.upstream_request_id = response.headers.get("x-request-id", "")
                if response.status_code >= 500:  # a 4xx is the request's, not the upstream's
                    self.rec.upstream_error = "status"
                await self._relay(response, ticket, send, outcome)
            except httpx.TransportError as exc:
                self.rec.upstream_error = transport_kind(exc)
                raise
            finally:
                await response.aclose()
        finally:
            self.rec.upstream_seconds = time.perf_counter() - start
            self.rec.images = outcome.images or 0
            self.rec.usage = outcome.usage

    async def _race_disconnect(self, work: Awaitable[None]) -> None:
        """Run work here, cancelled by a watcher if the client leaves after its body was read.

        One extra task per request: the work stays in the request's own task, and only a
        cancellation the watcher asked for becomes ClientGone (a server shutdown stays one).
        """
        main = asyncio.current_task()
        assert main is not None
        watcher = asyncio.ensure_future(self._watch_disconnect(main))
        try:
            await work
        except asyncio.CancelledError:
            if self.client_gone and main.uncancel() == 0:
                raise ClientGone from None
            raise
        finally:
            watcher.cancel()

    async def _watch_disconnect(self, main: asyncio.Task[Any]) -> None:
        await self.body_done.wait()
        while (await self.receive())["type"] != "http.disconnect":
            pass
        if not self.response_started and not self.upload_done:
            # Gone before the upstream had the whole request: hang up on it, the reservation
            # is given back (an incomplete request is never served).
            self.client_gone = True
            main.cancel()
            return
        # Gone once the upstream has the request: it does (and bills) the work, so its answer
        # is still read to its end (sends to a closed client are dropped) and charged.
        self.client_left = True

    # ------------------------------------------------------------------------- reading
    def _arm_body_watchdog(self) -> None:
        """One timer per request (not one per chunk): cancels the request when the client has
        sent no body bytes for body_read_timeout while its body is unfinished (slow loris), or
        when its body arrives slower than min_body_rate on average (the gateway's own waits
        aside)."""
        loop = asyncio.get_running_loop()
        self._task = asyncio.current_task()
        self.started = self.last_body = loop.time()
        self._watchdog = loop.call_later(self._next_check(self.started), self._check_body)

    def _next_check(self, now: float) -> float:
        """Seconds until the body watchdog must look again; sets `timed_out` if it is over."""
        settings = self.settings
        if self.paused_since is not None:
            return 1.0  # the clocks stand still; look again soon after the gateway resumes
        wait = self.last_body + settings.body_read_timeout - now
        if wait <= 0:
            self.timed_out = f"No request body bytes for {settings.body_read_timeout:g} seconds."
        rate = settings.min_body_rate
        if rate and not self.timed_out:
            due = self.started + settings.body_rate_grace_seconds + self.paused + \
                self.received / rate
            if due <= now:
                self.timed_out = f"The request body arrived slower than {rate} bytes a second."
            wait = min(wait, due - now)
        return wait

    def _pause(self) -> None:
        self.paused_since = asyncio.get_running_loop().time()

    def _resume(self) -> None:
        if self.paused_since is not None:
            now = asyncio.get_running_loop().time()
            self.paused += now - self.paused_since
            self.paused_since = None
            self.last_body = now

    def _check_body(self) -> None:
        # A method, not a closure that re-arms itself: no reference cycle keeps the request.
        task = self._task
        if self.body_done.is_set() or task is None or task.done():
            return
        loop = asyncio.get_running_loop()
        wait = self._next_check(loop.time())
        if self.timed_out:
            task.cancel()
        else:
            self._watchdog = loop.call_later(wait, self._check_body)

    async def _read(self) -> list[tuple[int, Any]]:
        """The multipart events of the next body message, counting bytes against the limit."""
        assert self._reader is not None
        self.receiving = True
        if self.spec is None:  # before the upstream opens: the client's pace, not the gateway's
            waited = time.perf_counter()
            message = await self.receive()
            self.rec.client_seconds += time.perf_counter() - waited
        else:
            message = await self.receive()
        self.last_body = asyncio.get_running_loop().time()
        if message["type"] == "http.disconnect":
            raise ClientGone
        chunk = message.get("body", b"")
        self.received += len(chunk)
        if self.received > self.ep.max_body:
            raise RequestTooLarge(f"Request body is larger than {self.ep.max_body} bytes.")
        more = message.get("more_body", False)
        if not more:
            self.body_done.set()
        events = self._reader.feed(chunk)
        if not more:
            self._reader.close()
        return events

    async def _read_until_ready(self) -> tuple[bool, list[tuple[int, Any]]]:
        """Read (spooling files) until the fields are known. Returns whether the rest streams
        live (the part just started does) and the events still to handle."""
        while not self.body_done.is_set():
            events = await self._read()
            for i, (kind, payload) in enumerate(events):
                if kind == PART_START:
                    ready = payload.is_file and self._ready()
                    self._start_part(payload)  # spooled, or with `ready` the first live part
                    if ready:
                        return True, events[i + 1:]
                elif kind == PART_DATA:
                    self._part_data(payload, [])  # spooled: nothing goes upstream yet
                else:
                    self._end_part([])
        self.parsed = True
        return False, []

    def _ready(self) -> bool:
        """Fields are final enough to stream: the model and prompt seen and the combination
        valid.

        A combination that fails may still be fixed by a later field (curl sends fields in any
        order), so it keeps the request spooling; the end of the body decides.
        """
        if "prompt" not in self.fields or "model" not in self.fields:
            return False  # the upstream never opens before the model (and its rules) is known
        return self._accept_fields(final=False) is not None

    def _start_part(self, part: Part) -> None:
        self._part = part
        name = part.name
        is_image = _IMAGE_NAME.fullmatch(name) is not None
        if is_image or name == "mask":
            if not part.is_file:
                raise InvalidRequest(f"'{name}' must be a file.", param=name)
            if part.filename and len(part.filename) > self.settings.max_filename_chars:
                raise InvalidRequest("File name is too long.", param=name)
            self._upload = self._new_upload("image" if is_image else "mask", name)
        elif part.is_file:
            raise InvalidRequest(f"'{name}' must be a text field, not a file.", param=name)
        else:
            if name in self.fields or name in self.sent:
                raise InvalidRequest(f"Duplicate parameter: '{name}'.", param=name,
                                     code="duplicate_parameter")
            if self.spec is None and self.ep.catalog.unknown_field(name):
                # No model takes it: refused now, not after the rest of the upload is read.
                raise InvalidRequest(f"Unknown parameter: '{name}'.", param=name,
                                     code="unknown_parameter")
            self._text.clear()

    def _new_upload(self, kind: str, client_name: str) -> Upload:
        if kind == "mask":
            if any(u.kind == "mask" for u in self.uploads):
                raise InvalidRequest("Duplicate parameter: 'mask'.", param="mask",
                                     code="duplicate_parameter")
            upload = Upload("mask", "mask", 0, b"")
        else:
            index = self.images
            self.images += 1
            if index == 0:
                self.first_image_name = client_name
            param = "image" if index == 0 and client_name == "image" else f"image[{index}]"
            limit = self.spec.max_images if self.spec else self.ep.max_images
            if index >= limit:
                raise InvalidRequest(f"Too many images: at most {limit} are accepted.",
                                     param=param, code="too_many_images")
            if self.image_field == "image":
                raise InvalidRequest(
                    "Duplicate parameter: 'image'. Send several images as 'image[]', or send the"
                    " files before the text fields.", param=param, code="duplicate_parameter")
            upload = Upload("image", param, index, b"")
        if self.spec is None:
            upload.spooled = True
            upload.spool_start = self._spool().tell()
        elif kind == "mask" and self.spec.mask is None:
            raise InvalidRequest(f"'mask' is not supported by model '{self.spec.name}'.",
                                 param="mask", code="unsupported_parameter")
        self.uploads.append(upload)
        return upload

    def _part_data(self, data: bytes, out: list[bytes]) -> None:
        """Take a chunk of the current part; when streaming live, add what goes upstream to out."""
        upload = self._upload
        if upload is None:
            self._text += data
            self.text_bytes += len(data)
            assert self._part is not None
            if len(self._text) > self.settings.max_field_bytes:
                raise InvalidRequest(f"'{self._part.name}' is too long.", param=self._part.name,
                                     code="string_above_max_length")
            if self.text_bytes > self.settings.max_text_bytes:
                raise InvalidRequest(
                    f"The text fields are longer than {self.settings.max_text_bytes} bytes "
                    "together.", param=self._part.name, code="text_too_large")
            return
        upload.size += len(data)
        limit = self._size_limit(upload)
        if upload.size > limit:
            raise InvalidRequest(f"'{upload.param}' is larger than {limit} bytes.",
                                 param=upload.param, code="image_too_large")
        if upload.info is None:
            # Usually the first chunk holds the whole header: keep a reference, copy only if not.
            if not upload.head:
                upload.head = data
            else:
                if not isinstance(upload.head, bytearray):
                    upload.head = bytearray(upload.head)
                upload.head += data
            # Re-walk the header only when the buffer has doubled: a header dribbled in tiny
            # chunks must not cost quadratic time.
            if len(upload.head) >= min(2 * upload.sniffed, SNIFF_LIMIT):
                upload.sniffed = len(upload.head)
                self._sniff(upload, final=False)
            if upload.info is not None:
                if self.spec is not None:
                    out += (self._file_head(upload), upload.head)
                upload.head = b""
        elif self.spec is not None:
            out.append(data)
        if self.spec is None:
            self.ep.spool_take(self._spool_key(), len(data))
            self.spooled += len(data)
            self._spool().write(data)

    def _spool_key(self) -> str | None:
        return self.principal.id if isinstance(self.principal, KeyPrincipal) else None

    def _end_part(self, out: list[bytes]) -> None:
        """Finish the current part; when streaming live, add what goes upstream to out."""
        upload, self._upload = self._upload, None
        if upload is None:
            assert self._part is not None
            name = self._part.name
            try:
                value = self._text.decode()
            except UnicodeDecodeError:
                raise InvalidRequest(f"'{name}' is not valid UTF-8.", param=name) from None
            if self.spec is None:
                self.fields[name] = value
            else:
                self._late_field(name, value)
            return
        if upload.info is None:
            self._sniff(upload, final=True)
            if self.spec is not None:
                out += (self._file_head(upload), upload.head)
            upload.head = b""
        if self.spec is not None:
            self._check_mask()
            out.append(self.writer.file_tail)

    def _sniff(self, upload: Upload, *, final: bool) -> None:
        try:
            upload.info = sniff(upload.head, final=final)
        except ImageError as exc:
            raise InvalidRequest(f"Invalid '{upload.param}': {exc}.", param=upload.param,
                                 code="invalid_image_format") from None
        if upload.info is not None and self.spec is not None:
            self._check_upload(upload)

    def _spool(self) -> IO[bytes]:
        if self.spool is None:
            # An unnamed temp file (O_TMPFILE, mode 0600) once past the memory bound: nothing to
            # clean up even if the process dies. Writes hit the page cache, so they stay inline.
            memory, where = self.settings.spool_memory_bytes, self.settings.spool_dir
            self.spool = (  # closed in close()
                tempfile.SpooledTemporaryFile(max_size=memory, dir=where)  # noqa: SIM115
                if memory else tempfile.TemporaryFile(dir=where))  # noqa: SIM115
        return self.spool

    # ---------------------------------------------------------------------- validation
    def _accept_fields(self, *, final: bool = True) -> ModelSpec | None:
        """Validate the text fields read so far against the model; None if not final and the
        combination is not valid yet."""
        assert self.principal is not None
        model = self.fields.get("model")
        self.ep.admission.check_model(
            self.principal, self.ep.catalog.default_model if model is None else model.strip())
        spec = self.ep.catalog.resolve(model)
        prompt = self.fields.get("prompt")
        if prompt is None or not prompt.strip():
            raise InvalidRequest("Missing required parameter: 'prompt'.", param="prompt",
                                 code="missing_required_parameter")
        if len(prompt) > spec.prompt_max_chars:
            raise InvalidRequest(
                f"'prompt' is longer than {spec.prompt_max_chars} characters for {spec.name}.",
                param="prompt", code="string_above_max_length")
        self.prompt = prompt
        values = {"model": spec.upstream_model or spec.name, "prompt": prompt}
        sent = []
        for name, raw in self.fields.items():
            if name not in values:
                values[name] = self._normalize(spec, name, raw)
                sent.append(name)
        try:
            spec.check_combination(self._with_defaults(spec, values), sent)
        except InvalidRequest:
            if final:
                raise
            return None
        self.spec, self.values, self.sent = spec, values, sent
        self.fields = {}
        for upload in self.uploads:
            if upload.info is not None:
                self._check_upload(upload)
            if upload.size > self._size_limit(upload):
                limit = self._size_limit(upload)
                raise InvalidRequest(f"'{upload.param}' is larger than {limit} bytes.",
                                     param=upload.param, code="image_too_large")
        self._check_mask()
        if self.images > spec.max_images:
            param = f"image[{spec.max_images}]"
            raise InvalidRequest(f"Too many images: {spec.name} takes at most {spec.max_images}.",
                                 param=param, code="too_many_images")
        return spec

    def _normalize(self, spec: ModelSpec, name: str, raw: str) -> str:
        rule = spec.fields.get(name)
        if rule is not None:
            return rule.normalize(name, raw)
        if spec.open_fields:
            return raw
        if name in self.ep.catalog.known_fields:
            raise InvalidRequest(f"'{name}' is not supported by model '{spec.name}'.", param=name,
                                 code="unsupported_parameter")
        raise InvalidRequest(f"Unknown parameter: '{name}'.", param=name, code="unknown_parameter")

    @staticmethod
    def _with_defaults(spec: ModelSpec, values: dict[str, str]) -> dict[str, str]:
        out = dict(values)
        for name, rule in spec.fields.items():
            if rule.default is not None and name not in out:
                out[name] = rule.default
        return out

    def _late_field(self, name: str, raw: str) -> None:
        """A text field after streaming began (any order is valid, as at OpenAI): checked alone
        now, in combination at the end. A late `n` extends the reservation before the upstream
        request completes; a late `stream` is forwarded, and the answer is relayed as what the
        upstream sends (JSON or SSE).
        """
        assert self.spec is not None
        if name in ("prompt", "model"):  # streaming begins only once both are known
            raise InvalidRequest(f"Duplicate parameter: '{name}'.", param=name,
                                 code="duplicate_parameter")
        self.values[name] = self._normalize(self.spec, name, raw)
        self.sent.append(name)
        if name == "n":
            self.n_changed = True

    def _size_limit(self, upload: Upload) -> int:
        spec = self.spec
        if spec is None:
            return self.ep.max_file_bytes
        if upload.kind == "mask":
            return spec.mask.max_bytes if spec.mask else 0
        return spec.max_image_bytes

    def _check_upload(self, upload: Upload) -> None:
        spec, info = self.spec, upload.info
        assert spec is not None and info is not None
        if upload.kind == "mask":
            if spec.mask is None:
                raise InvalidRequest(f"'mask' is not supported by model '{spec.name}'.",
                                     param="mask", code="unsupported_parameter")
            formats = spec.mask.formats
        else:
            formats = spec.image_formats
        if info.format not in formats:
            raise InvalidRequest(
                f"Invalid '{upload.param}': {info.format} is not accepted by {spec.name}; use "
                + " or ".join(formats) + ".", param=upload.param, code="invalid_image_format")
        if max(info.width, info.height) > spec.max_image_side:
            raise InvalidRequest(
                f"Invalid '{upload.param}': {info.width}x{info.height} exceeds "
                f"{spec.max_image_side} pixels a side.", param=upload.param,
                code="invalid_image_dimensions")
        if upload.kind == "image" and spec.square_images and info.width != info.height:
            raise InvalidRequest(f"Invalid '{upload.param}': {spec.name} needs a square image.",
                                 param=upload.param, code="invalid_image_dimensions")
        if upload.kind == "mask" and spec.mask.require_alpha and not info.has_alpha:
            raise InvalidRequest("Invalid 'mask': it must have an alpha channel.", param="mask",
                                 code="invalid_image_format")

    def _check_mask(self) -> None:
        """The mask must match the first image, once both are known."""
        mask = next((u for u in self.uploads if u.kind == "mask"), None)
        first = next((u for u in self.uploads if u.kind == "image"), None)
        spec = self.spec
        if mask is None or first is None or spec is None or spec.mask is None:
            return
        if mask.info and first.info and spec.mask.match_first_image and (
            (mask.info.width, mask.info.height) != (first.info.width, first.info.height)
        ):
            raise InvalidRequest(
                f"Invalid 'mask': its size {mask.info.width}x{mask.info.height} differs from the "
                f"first image's {first.info.width}x{first.info.height}.", param="mask",
                code="invalid_image_dimensions")

    def _final_checks(self) -> dict[str, str]:
        assert self.spec is not None
        if self.images == 0:
            raise InvalidRequest("Missing required parameter: 'image'.", param="image",
                                 code="missing_required_parameter")
        self._check_mask()
        values = self._with_defaults(self.spec, self.values)
        self.spec.check_combination(values, self.sent)
        return values

    # ------------------------------------------------------------------------- writing
    def _decide_image_field(self) -> None:
        """`image` for one image, `image[]` for several, decided before the first image goes."""
        if self.image_field:
            return
        assert self.spec is not None
        alone = self.images == 1 and (self.parsed or self.first_image_name == "image")
        self.image_field = "image" if self.spec.max_images == 1 or alone else "image[]"

    def _file_head(self, upload: Upload) -> bytes:
        assert upload.info is not None
        if upload.kind == "mask":
            name = "mask"
        else:
            self._decide_image_field()
            name = self.image_field
        return self.writer.file_head(name, upload.filename, upload.info.content_type)

    def _fields_out(self, names: list[str], values: dict[str, str]) -> bytes:
        assert self.spec is not None
        rules = self.spec.fields
        return b"".join(
            self.writer.field(name, values[name]) for name in names
            if not (name in rules and rules[name].drop))

    def _handle(self, events: list[tuple[int, Any]], out: list[bytes]) -> None:
        """Handle parser events once the model is known, adding upstream bytes to out."""
        for kind, payload in events:
            if kind == PART_DATA:
                self._part_data(payload, out)
            elif kind == PART_START:
                self._start_part(payload)
            else:
                self._end_part(out)

    async def _upstream_body(self, live: bool, events: list[tuple[int, Any]],
                             prepared: list[bytes]) -> AsyncIterator[bytes]:
        """The upstream body, with the time each write waits on the upstream (backpressure)
        kept off the client's body-read clocks; `upload_done` once the upstream has it all."""
        self._resume()
        async for chunk in self._body_chunks(live, events, prepared):
            self._pause()
            yield chunk
            self._resume()
        self.upload_done = True

    async def _body_chunks(self, live: bool, events: list[tuple[int, Any]],
                           prepared: list[bytes]) -> AsyncIterator[bytes]:
        """The upstream multipart body: fields, spooled files, then the client's parts as they
        arrive (or as already handled, in `prepared`).

        One write per client message: framing is joined to the data around it, and a message
        that is all file data passes through without a copy.
        """
        early = ["model", "prompt", *self.sent]
        out = [self._fields_out(early, self.values)]
        for upload in self.uploads:
            if not upload.spooled:
                continue
            out.append(self._file_head(upload))
            yield b"".join(out)
            assert self.spool is not None
            self.spool.seek(upload.spool_start)
            remaining = upload.size
            while remaining:
                chunk = self.spool.read(min(remaining, 256 * 1024))
                remaining -= len(chunk)
                yield chunk
            out = [self.writer.file_tail]
        self.release_spool()  # replayed: its bytes no longer count against the spool caps
        out += prepared
        values = self.final_values
        if live:
            while True:
                self._handle(events, out)
                if self.n_changed:
                    await self._extend()
                if self.body_done.is_set():
                    break
                if out:
                    yield out[0] if len(out) == 1 else b"".join(out)
                    out = []
                events = await self._read()
            self.parsed = True
            values = self._final_checks()
        assert values is not None
        late = [n for n in values if n not in early]
        out.append(self._fields_out(late, values) + self.writer.close())
        yield b"".join(out)

    # ------------------------------------------------------------------------- answering
    async def _relay(self, response: httpx.Response, ticket: Ticket, send: Send,
                     outcome: Outcome) -> None:
        if response.status_code == 401:
            # The upstream refused the gateway's own key: the operator's problem, never the
            # client's, and the upstream's message may echo part of that key.
            log.error("request %s: upstream '%s' rejected the gateway's API key",
                      self.request_id, self.spec.upstream if self.spec else "")
            self.rec.upstream_error = "status"
            raise UpstreamUnavailable("The upstream rejected the gateway's credentials.")
        if response.status_code >= 400:
            # Passed on in OpenAI's shape (a proxy's HTML page wrapped), without what would
            # identify the operator's account; an error is small, so a bounded head says all.
            head = bytearray()
            async for chunk in response.aiter_raw():
                head += chunk
                if len(head) >= _ERROR_BYTES:
                    break
            raise UpstreamError(
                response.status_code, bytes(head[:_ERROR_BYTES]), headers=response.headers,
                is_json=response.headers.get("content-type", "").startswith("application/json"))
        limit = self.settings.max_response_bytes
        length = response.headers.get("content-length", "")
        if length.isdigit() and int(length) > limit:
            self.rec.upstream_error = "too_large"
            raise UpstreamResponseTooLarge(
                f"The upstream's answer ({length} bytes) is larger than {limit} bytes.")
        headers = self._common_headers(ticket)
        sse = False
        for key, value in response.headers.raw:
            key = key.lower()
            if key in _PASS_HEADERS:
                headers.append((key, value))
                sse = sse or (key == b"content-type" and value.startswith(b"text/event-stream"))
            elif key == b"x-request-id":
                headers.append((b"x-upstream-request-id", value))
        framer = EventFramer(self.settings.max_event_bytes) if sse else None
        # Only a success is metered: an error answer carries no images and no usage.
        meter = UsageMeter(sse=sse) if response.status_code < 300 else None
        self.response_started = True
        await self._send(send, {"type": "http.response.start", "status": response.status_code,
                                "headers": headers})
        self.rec.status = response.status_code
        received = 0
        broken = False  # the upstream broke the answer off
        try:
            async for chunk in response.aiter_raw():
                received += len(chunk)
                if received > limit:
                    raise UpstreamResponseTooLarge(
                        f"The upstream's answer is larger than {limit} bytes.")
                if framer is not None and not (chunk := framer.feed(chunk)):
                    continue
                if meter is not None:
                    meter.feed(chunk)
                await self._send(send, {"type": "http.response.body", "body": chunk,
                                        "more_body": True})
            if framer is not None and (rest := framer.pending):
                if meter is not None:
                    meter.feed(rest)
                await self._send(send, {"type": "http.response.body", "body": rest,
                                        "more_body": True})
        except (httpx.TransportError, UpstreamResponseTooLarge) as exc:
            broken = True
            too_large = isinstance(exc, UpstreamResponseTooLarge)
            self.rec.upstream_error = "too_large" if too_large else transport_kind(exc)
            if framer is None:
                raise  # cut the JSON answer off: a broken response, never a wrong one
            # The half-received event is dropped, so the error event stands on its own. (No
            # local holds the exception: with its traceback it would keep this frame alive.)
            body = exc.body() if isinstance(exc, UpstreamResponseTooLarge) else \
                transport_error(exc, self.spec.upstream if self.spec else "").body()
            event = json.dumps({"type": "error", "error": json.loads(body)["error"]})
            await self._send(send, {"type": "http.response.body",
                                    "body": _STREAM_ERROR % event.encode(), "more_body": True})
        if meter is not None:
            meter.close()
            # A whole answer with no image found in it is one the meter could not read (a
            # provider's own format): None, and the reservation is charged. A stream broken off
            # counts what it delivered: the final images sent before the error event.
            outcome.images = meter.images if meter.images or broken else None
            outcome.usage = meter.usage
        self.release_slot()
        await self._send(send, {"type": "http.response.body", "body": b"", "more_body": False})
        self.rec.end = time.perf_counter()

    async def _send(self, send: Send, message: Message) -> None:
        """Send part of the answer, unless the client left; a client that stops reading for
        client_send_timeout counts as gone, and the rest of the answer is read and metered
        without it (its slot and the upstream connection are not held hostage)."""
        if self.client_left:
            return
        try:
            async with asyncio.timeout(self.settings.client_send_timeout):
                await send(message)
            self.rec.bytes_out += len(message.get("body", b""))
        except TimeoutError:
            log.info("request %s: the client stopped reading the answer", self.request_id)
            self.client_left = True

    def _common_headers(self, ticket: Ticket | None = None) -> list[tuple[bytes, bytes]]:
        headers = [(b"x-request-id", self.request_id.encode())]
        if ticket is not None:
            headers += [(k.encode(), v.encode()) for k, v in ticket.headers.items()]
        return headers

    async def fail(self, send: Send, exc: GatewayError) -> None:
        """Answer an OpenAI-format error (the answer has not begun: errors after that are cuts).

        A body not read to its end is read a little further after the answer is written (a
        client that writes its whole body before reading still finds the error waiting), and
        then the connection is closed."""
        if self._watchdog is not None:
            self._watchdog.cancel()  # the drain below bounds its own waits
        headers = [(b"content-type", b"application/json")]
        drain = False
        if not self.body_done.is_set():
            headers.append((b"connection", b"close"))
            # Reading would make uvicorn send `100 Continue`, inviting the very upload refused.
            unasked = self.expects_continue and not self.receiving
            drain = not (unasked or self.timed_out or exc.status == 413)
        body = exc.body()
        headers += [(b"content-length", str(len(body)).encode()),
                    *self._common_headers(self.ticket)]
        if self.ticket is None and self.principal is not None and exc.status < 500 and \
                exc.status != 429:
            # Authenticated but refused before admission: the key's limits, for the headers.
            # (Not for a 503: an overloaded gateway makes no store calls for its refusals.)
            rate = await self.ep.admission.headers_for(self.principal)
            headers += [(k.encode(), v.encode()) for k, v in rate.items()]
        headers += [(k.encode(), v.encode()) for k, v in exc.headers.items()]
        self.rec.status = exc.status
        if not self.rec.upstream_error and not isinstance(exc, UpstreamError):
            # the gateway's own refusal, not the upstream's answer
            self.rec.rejection = metrics.rejection_reason(exc.status, exc.code)
        await send({"type": "http.response.start", "status": exc.status, "headers": headers})
        await send({"type": "http.response.body", "body": body, "more_body": drain})
        self.rec.bytes_out = len(body)
        self.rec.end = time.perf_counter()
        if drain:  # the whole answer is written (its Content-Length says so): now linger
            waited = time.perf_counter()
            await self._drain()
            self.rec.client_seconds += time.perf_counter() - waited
            await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _drain(self) -> None:
        """Read and drop a little more of a refused body (refusal_drain_bytes, for at most
        refusal_drain_seconds), so that a client that sends a small body whole before reading
        sees the error instead of a reset; a large or slow one is cut off."""
        limit = self.received + self.settings.refusal_drain_bytes
        self.receiving = True
        try:
            async with asyncio.timeout(self.settings.refusal_drain_seconds):
                while self.received <= limit:
                    message = await self.receive()
                    if message["type"] == "http.disconnect":
                        return
                    self.received += len(message.get("body", b""))
                    if not message.get("more_body", False):
                        self.body_done.set()
                        return
        except TimeoutError:  # a slow client gets its error regardless
            return

    def release_slot(self) -> None:
        """Give the edit slot back (once): when the answer's last byte goes, so that a client
        sending its next request at once finds its key's slot free here."""
        if self.holds_slot:
            self.holds_slot = False
            self.ep.give_slot(self.slot_key)

    def release_spool(self) -> None:
        if self.spooled:
            self.ep.spool_give(self._spool_key(), self.spooled)
            self.spooled = 0
        if self.spool is not None:
            spool, self.spool = self.spool, None
            spool.close()

    def close(self) -> None:
        self._task = None
        if self._watchdog is not None:
            self._watchdog.cancel()
        self.release_spool()
