"""The image routes, one request top to bottom: who is calling, read and judge the body, admit
against the key, send it upstream, relay the answer, settle, log. `ImageFlow.run` and `_serve`
are those steps; an edit (`Edit`, multipart) and a generation (`Generation`, JSON) differ only
in how they read and judge the body (`_read`).

An edit's body is judged as it arrives (gateway.images.form with gateway.images.rules). Once the
model and prompt are known the request is admitted and the upstream request opens with a body
that keeps reading the client; the upstream's closing boundary is written only after every
check has passed, so a request found wrong mid-stream is cut off and never completed upstream.

A raw ASGI endpoint rather than a FastAPI route: no per-request middleware, dependency solving
or double parsing on the hot path, and direct access to `receive` for disconnect handling.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import email.utils
import logging
import time
from collections.abc import AsyncIterator

from gateway import access, logs, metrics
from gateway.admission import Admission, ImageRequest, Outcome, Principal, Ticket
from gateway.asgi import Receive, Scope, Send, headers_of, request_id
from gateway.catalog import Catalog, ModelSpec
from gateway.errors import (
    GatewayError,
    InvalidRequest,
    RequestTimeout,
    RequestTooLarge,
    UpstreamError,
)
from gateway.images import (
    EDITS_PATH,
    GENERATIONS,
    GENERATIONS_PATH,
    UPSTREAM_EDITS_PATH,
    UPSTREAM_GENERATIONS_PATH,
    jsonbody,
    rules,
)
from gateway.images.capacity import Capacity, Slot
from gateway.images.client import Client, ClientGone
from gateway.images.form import EditForm, Events, Spool
from gateway.images.outgoing import UpstreamForm
from gateway.images.relay import Relayed, relay
from gateway.images.rules import Bounds, Judged
from gateway.multipart import boundary_of
from gateway.settings import Settings
from gateway.upstream import Upstreams

log = logging.getLogger("gateway.edits")  # the name operators filter on


class ImageRoute:
    """The ASGI app of one image route; one instance serves every request."""

    def __init__(self, flow: type[ImageFlow], settings: Settings, catalog: Catalog,
                 upstreams: Upstreams, admission: Admission, capacity: Capacity) -> None:
        self.flow = flow
        self.settings = settings
        self.catalog = catalog
        self.upstreams = upstreams
        self.admission = admission
        self.bounds = Bounds.of(catalog)
        self.max_body = flow.max_body(settings, self.bounds)
        self.capacity = capacity  # shared by the image routes: one instance's slots

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.flow(self, scope, receive, send).run()


class ImageFlow:
    """One image request, from its head to the access log line."""

    __slots__ = ("client", "headers", "judged", "principal", "rec", "route", "slot", "ticket",
                 "traceparent", "uploaded")
    path = ""  # the route's path (the metrics' endpoint label); upstream, under its base_url
    upstream_path = ""

    def __init__(self, route: ImageRoute, scope: Scope, receive: Receive, send: Send) -> None:
        self.route = route
        self.headers = headers = headers_of(scope)
        rid = request_id(headers)
        self.client = Client(receive, send, route.settings, route.max_body, rid,
                             expects_continue=headers.get("expect", "").lower() == "100-continue")
        self.rec = rec = metrics.RequestRecord(self.path, time.perf_counter(), request_id=rid)
        rec.trace_id, self.traceparent = logs.trace_context(headers.get("traceparent"))
        peer = scope.get("client")
        rec.client = f"{peer[0]}:{peer[1]}" if peer else ""
        self.principal: Principal | None = None
        self.slot: Slot | None = None
        self.judged: Judged | None = None  # once the body's fields are judged
        self.ticket: Ticket | None = None
        self.uploaded = False  # the upstream has the whole request body

    # ------------------------------------------------------------------------------ the steps
    async def run(self) -> None:
        route = self.route
        try:
            # 1. Who is calling. Nothing is held before the key is accepted: no slot, no body
            # read (so no `100 Continue` either); a refusal is answered, the connection closed.
            self.principal = await route.admission.authenticate(self.headers.get("authorization"))
            self.slot = route.capacity.take(self.principal)
        except Exception as exc:
            try:
                await self._refuse(_as_gateway_error(exc, self.rec.request_id))
            finally:
                exc = None  # type: ignore[assignment]  # no cycle through its traceback
                self._close()
            return
        metrics.IN_FLIGHT.inc()
        error: GatewayError | None = None
        try:
            try:
                await self._serve()
            except GatewayError as exc:
                if not self.client.response_started:
                    error = exc
                elif exc.kind:
                    # The upstream broke off a JSON answer already under way: returning without
                    # completing it makes the server cut the connection, so the client sees a
                    # broken response rather than a wrong one.
                    log.warning("request %s: upstream failed mid-answer: %r",
                                self.rec.request_id, exc.__context__ or exc)
                else:
                    log.warning("request %s: error after the answer began: %s",
                                self.rec.request_id, exc)
            except ClientGone:
                log.info("request %s: client disconnected", self.rec.request_id)
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if not self.client.timed_out or task is None or task.uncancel() != 0:
                    raise  # a server shutdown, not the body watchdog
                log.info("request %s: %s", self.rec.request_id, self.client.timed_out)
                error = RequestTimeout(self.client.timed_out)
            except Exception:
                log.exception("request %s: internal error", self.rec.request_id)
                if not self.client.response_started:
                    error = GatewayError("The gateway failed to handle the request.")
            finally:
                # The slot and the spool go back before any error is answered (a refused
                # client's drain holds nothing).
                self.slot.release()
                metrics.IN_FLIGHT.dec()
                self._release()
            if error is not None:
                await self._refuse(error)
        finally:
            # The error's traceback holds this frame, which holds the error: break the cycle so
            # the request is freed now, not by the cycle collector.
            error = None
            self._close()

    async def _serve(self) -> None:
        route, client = self.route, self.client
        principal = self.principal
        assert principal is not None
        # 2. Read the body until its fields can be judged.
        length = self.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > route.max_body:
            raise RequestTooLarge(f"Request body is larger than {route.max_body} bytes.")
        client.arm_watchdog()
        body, content_type = await self._read(principal)
        judged = self.judged
        assert judged is not None
        # 3. Admit against the key (429 here spends nothing upstream).
        client.pause()  # until the upstream asks for the body
        self.rec.n = rules.requested_n(judged.spec, judged.values)
        ticket = self.ticket = await route.admission.admit(principal, ImageRequest(
            self.rec.request_id, judged.spec, self.rec.n, rules.wants_stream(judged.values),
            judged.allowed_as))
        # 4. Send it upstream, relay the answer; 5. settle, whatever happened.
        outcome = Outcome(answered=False)
        try:
            await client.race_disconnect(
                self._exchange(body, content_type, ticket, outcome),
                # Gone before the upstream had the whole request: hang up on it, the
                # reservation is given back (an incomplete request is never served). Once it
                # has it, the upstream does (and bills) the work: its answer is still read to
                # its end, sends to the closed client dropped, and charged.
                cancellable=lambda: not client.response_started and not self.uploaded)
        finally:
            try:
                await ticket.finish(outcome)
            except Exception:
                # Never let the bookkeeping hide how the request itself ended.
                log.exception("request %s: admission finish failed", self.rec.request_id)

    @staticmethod
    def max_body(settings: Settings, bounds: Bounds) -> int:
        """The largest body the route reads."""
        raise NotImplementedError

    async def _read(self, principal: Principal) -> tuple[AsyncIterator[bytes], str]:
        """Read and judge the body (setting `judged`); the upstream body and its content type."""
        raise NotImplementedError

    def _release(self) -> None:
        """Give back what the reading holds (spooled bytes)."""

    def _prompt(self) -> str | None:
        """The prompt for the access log, once judged (also when a later field failed)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ shared by every route
    async def _exchange(self, body: AsyncIterator[bytes], content_type: str, ticket: Ticket,
                        outcome: Outcome) -> None:
        """Send the request upstream with its body streaming, relay the answer."""
        assert self.judged is not None
        rec, spec = self.rec, self.judged.spec
        upstream = self.route.upstreams[spec.upstream]
        relayed = Relayed()
        start = time.perf_counter()
        try:
            answer = await upstream.send(self.upstream_path, body, content_type, rec.request_id,
                                         self.traceparent)
            try:
                outcome.answered, outcome.status = True, answer.status
                rec.upstream_request_id = answer.headers.get("x-request-id", "")
                if answer.status >= 500:  # a 4xx is the request's, not the upstream's
                    rec.upstream_error = "status"
                await relay(answer, self.client, self._common_headers(ticket), relayed)
                outcome.images, outcome.usage = relayed.images, relayed.usage
                assert self.slot is not None
                self.slot.release()
                await self.client.send({"type": "http.response.body", "body": b"",
                                        "more_body": False})
            finally:
                await answer.aclose()
        except GatewayError as exc:
            rec.upstream_error = exc.kind or rec.upstream_error
            raise
        finally:
            rec.upstream_error = relayed.failure or rec.upstream_error
            rec.upstream_seconds = time.perf_counter() - start
            rec.images = outcome.images or 0
            rec.usage = outcome.usage

    # ---------------------------------------------------------------------------- refusals
    async def _refuse(self, exc: GatewayError) -> None:
        """Answer an OpenAI-format error (the answer has not begun: errors after that are cuts)."""
        client, rec = self.client, self.rec
        client.cancel_watchdog()  # before the waits below
        body = exc.body()
        headers = [(b"content-type", b"application/json"),
                   (b"content-length", str(len(body)).encode()),
                   *self._common_headers(self.ticket)]
        if self.ticket is None and self.principal is not None and exc.status < 500 and \
                exc.status != 429:
            # Authenticated but refused before admission: the key's limits, for the headers.
            # (Not for a 503: an overloaded gateway makes no store calls for its refusals.)
            rate = await self.route.admission.headers_for(self.principal)
            headers += [(k.encode(), v.encode()) for k, v in rate.items()]
        headers += [(k.encode(), v.encode()) for k, v in exc.headers.items()]
        if not rec.upstream_error and not isinstance(exc, UpstreamError):
            # the gateway's own refusal, not the upstream's answer
            rec.rejection = metrics.rejection_reason(exc.status, exc.code)
        await client.send_error(exc.status, headers, body)

    def _common_headers(self, ticket: Ticket | None) -> list[tuple[bytes, bytes]]:
        headers = [(b"x-request-id", self.rec.request_id.encode())]
        if self.route.settings.demo:
            headers.append((b"x-gateway-demo", b"true"))
        judged = self.judged
        if judged is not None and judged.requested:
            headers += alias_headers(self.route.catalog, judged.requested, judged.spec)
        if ticket is not None:
            headers += [(k.encode(), v.encode()) for k, v in ticket.headers.items()]
        return headers

    def _close(self) -> None:
        """The request's metrics and its one log line; nothing of it is held after this."""
        client, rec, route = self.client, self.rec, self.route
        client.close()
        self._release()
        judged = self.judged
        model = judged.spec.name if judged is not None else ""
        # Pass-through models are named by clients: one label for all, to bound cardinality.
        rec.model = model if not model or model in route.catalog.models else "passthrough"
        rec.requested_model = judged.requested if judged is not None else ""
        rec.key_id = self.principal.key_id or "" if self.principal is not None else ""
        rec.bytes_in, rec.bytes_out = client.received, client.bytes_out
        rec.client_seconds, rec.end = client.waited, client.answered_at
        rec.status = client.status
        prompt = self._prompt() if route.settings.log_prompts else None
        access.image_request(rec, model=model, prompt=prompt,
                             key_labels=route.settings.metrics_key_labels)


class Edit(ImageFlow):
    """POST /v1/images/edits: a multipart body, judged and streamed upstream as it arrives."""

    __slots__ = ("form", "spool")
    path = EDITS_PATH
    upstream_path = UPSTREAM_EDITS_PATH

    def __init__(self, route: ImageRoute, scope: Scope, receive: Receive, send: Send) -> None:
        super().__init__(route, scope, receive, send)
        self.spool: Spool | None = None
        self.form: EditForm | None = None

    @staticmethod
    def max_body(settings: Settings, bounds: Bounds) -> int:
        # Default: the largest request the catalog allows, plus room for text fields and framing.
        return settings.max_body_bytes or bounds.max_request_bytes + 1024 * 1024

    async def _read(self, principal: Principal) -> tuple[AsyncIterator[bytes], str]:
        route, client = self.route, self.client
        boundary = boundary_of(self.headers.get("content-type"))
        self.spool = Spool(route.settings, route.capacity, principal.key_id)
        out = UpstreamForm()
        form = self.form = EditForm(route.catalog, route.settings, route.bounds, boundary,
                                    principal.models, self.spool, out)
        live = await self._read_until_judged(form)
        judged = self.judged = form.judged or form.judge()
        assert judged is not None
        values: dict[str, str] | None = None
        if live is not None and client.body_done.is_set():
            # The rest of the body is already here (small requests arrive in one message):
            # handle it now, so that nothing invalid in it opens the upstream.
            form.feed(live)
            live = None
        if live is None:
            values = form.finish()
        prepared = out.detach()  # goes after the fields and spooled files
        return self._upload(judged, out, prepared, live, values), out.content_type

    async def _read_until_judged(self, form: EditForm) -> Events | None:
        """Read (spooling files) until the fields are judged at a file part; the events still
        to handle, which stream live from there, or None if the body ended first."""
        client = self.client
        while not client.body_done.is_set():
            live = form.spool_events(form.parse(*await client.read(clocked=True)))
            if live is not None:
                return live
        form.parsed = True
        return None

    async def _upload(self, judged: Judged, out: UpstreamForm, prepared: list[bytes],
                      live: Events | None, values: dict[str, str] | None
                      ) -> AsyncIterator[bytes]:
        """The upstream body: the judged fields, the spooled files, then the client's parts as
        they arrive (or as already handled). The time each write waits on the upstream
        (backpressure) is kept off the client's body-read clocks."""
        client, form = self.client, self.form
        assert form is not None
        client.resume()
        early = ["model", "prompt", *judged.sent]
        out.fields(judged.spec, early, judged.values)
        for chunks in form.spooled():
            client.pause()
            yield out.take()
            client.resume()
            for chunk in chunks:
                client.pause()
                yield chunk
                client.resume()
            out.file_end()
        self._release()  # replayed: its bytes no longer count against the spool caps
        out.attach(prepared)
        while live is not None:
            form.feed(live)
            if form.n_changed:
                await self._extend()
            if client.body_done.is_set():
                values = form.finish()
                break
            if chunk := out.take():
                client.pause()
                yield chunk
                client.resume()
            live = form.parse(*await client.read(clocked=False))
        assert values is not None
        out.fields(judged.spec, [n for n in values if n not in early], values)
        out.close()
        client.pause()
        yield out.take()
        client.resume()
        self.uploaded = True

    async def _extend(self) -> None:
        """`n` came after the files began streaming: reserve the difference before the upstream
        request can complete (QuotaExceeded cuts it off)."""
        form = self.form
        assert form is not None and form.judged is not None and self.ticket is not None
        form.n_changed = False
        n = rules.requested_n(form.judged.spec, form.judged.values)
        if n > self.rec.n:
            await self.ticket.extend(n - self.rec.n)
            self.rec.n = n

    def _release(self) -> None:
        if self.spool is not None:
            self.spool.release()

    def _prompt(self) -> str | None:
        return self.form.prompt if self.form is not None else None


class Generation(ImageFlow):
    """POST /v1/images/generations: a JSON body, read whole (it carries no images), judged by
    the same rules as an edit's fields and sent upstream as JSON."""

    __slots__ = ("prompt",)
    path = GENERATIONS_PATH
    upstream_path = UPSTREAM_GENERATIONS_PATH

    def __init__(self, route: ImageRoute, scope: Scope, receive: Receive, send: Send) -> None:
        super().__init__(route, scope, receive, send)
        self.prompt: str | None = None

    @staticmethod
    def max_body(settings: Settings, bounds: Bounds) -> int:
        return settings.max_json_body_bytes

    async def _read(self, principal: Principal) -> tuple[AsyncIterator[bytes], str]:
        catalog = self.route.catalog
        if not jsonbody.is_json(self.headers.get("content-type", "")):
            raise InvalidRequest("Content-Type must be application/json.",
                                 code="invalid_content_type")
        body = await jsonbody.read(self.client)
        fields = jsonbody.fields_of(body)
        spec, requested, allowed_as = rules.judge_model(catalog, principal.models, fields)
        self.prompt = rules.judge_prompt(spec, fields.get("prompt"))
        judged = rules.judge_fields(catalog, spec, fields, route=GENERATIONS, prompt=self.prompt)
        assert judged is not None
        judged.requested, judged.allowed_as = requested, allowed_as
        self.judged = judged
        values = rules.final_values(judged)
        return self._send(jsonbody.encode(spec, values, body)), "application/json"

    async def _send(self, data: bytes) -> AsyncIterator[bytes]:
        yield data
        self.uploaded = True

    def _prompt(self) -> str | None:
        return self.prompt


def alias_headers(catalog: Catalog, requested: str, spec: ModelSpec) -> list[tuple[bytes, bytes]]:
    """What served an aliased request, and (RFC 9745) when the name it used was deprecated."""
    headers = [(b"x-served-model", spec.name.encode())]
    old = catalog.models.get(requested)
    if old is not None and old.shutdown_date is not None:
        when = dt.datetime.combine(old.shutdown_date, dt.time(), dt.UTC)
        headers += [(b"deprecation", f"@{int(when.timestamp())}".encode()),
                    (b"sunset", email.utils.format_datetime(when, usegmt=True).encode())]  # RFC 8594
    return headers


def _as_gateway_error(exc: Exception, rid: str) -> GatewayError:
    if isinstance(exc, GatewayError):
        return exc
    log.exception("request %s: internal error", rid, exc_info=exc)
    return GatewayError("The gateway failed to handle the request.")
