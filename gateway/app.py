"""The ASGI application: settings, catalog, upstreams and admission wired to the routes."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.routing import Route

from gateway import __version__, access, lifecycle, logs, loopwatch, metrics, openapi, protocol, server
from gateway.admission import Admission, QuotaAdmission
from gateway.asgi import Message, Receive, Scope, Send, headers_of, request_id
from gateway.catalog import Catalog
from gateway.demo import PREFIX as DEMO_PREFIX
from gateway.demo import DemoProvider
from gateway.errors import GatewayError, InvalidRequest
from gateway.images import EDITS_PATH, GENERATIONS_PATH
from gateway.images.capacity import Capacity
from gateway.images.flow import Edit, Generation, ImageRoute
from gateway.keyadmin.http import admin_router
from gateway.quota import build_store
from gateway.routes import api_router, install_error_handlers
from gateway.settings import Settings, load_settings
from gateway.upstream import Upstreams

log = logging.getLogger("gateway.app")


class Gateway:
    """The ASGI entry point. The image routes go straight to their endpoints, past FastAPI's
    per-request middleware (measurable on the hot path); everything else, lifespan included,
    goes to the FastAPI app."""

    def __init__(self, api: FastAPI, edits: ImageRoute, generations: ImageRoute,
                 demo: DemoProvider | None = None) -> None:
        self.api = api
        self.edits = edits
        self.generations = generations
        self.demo = demo

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.api(scope, receive, send)
        elif _repeated_authorization(scope):
            # Routes would each pick one of them (the first, the last): refuse them all alike.
            await _refuse(send, InvalidRequest("Send one Authorization header, not several.",
                                               code="duplicate_header"))
        elif scope["path"] == EDITS_PATH and scope["method"] == "POST":
            await self.edits(scope, receive, send)
        elif scope["path"] == GENERATIONS_PATH and scope["method"] == "POST":
            await self.generations(scope, receive, send)
        elif self.demo is not None and scope["path"].startswith(DEMO_PREFIX + "/"):
            await self.demo(scope, receive, send)
        else:
            await self._api(scope, receive, send)

    async def _api(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The other routes, each answer with its request id; API requests are counted too
        (health checks and scrapes are not, and build no record)."""
        rid = request_id(headers_of(scope))
        header = (b"x-request-id", rid.encode())
        path = scope["path"]
        endpoint = ("/v1/models" if path.startswith("/v1/models") else path) \
            if path.startswith("/v1/") else None
        start = time.perf_counter()
        status = 0

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), header]
            await send(message)

        try:
            await self.api(scope, receive, send_with_id)
        finally:
            if endpoint is not None:
                rec = metrics.RequestRecord(endpoint if status != 404 else "other", start,
                                            request_id=rid, status=status)
                if status >= 400:
                    rec.rejection = metrics.rejection_reason(status, None)
                access.api_request(rec, scope["method"])


def _repeated_authorization(scope: Scope) -> bool:
    seen = False
    for name, _ in scope["headers"]:
        if name == b"authorization":  # ASGI servers give header names in lower case
            if seen:
                return True
            seen = True
    return False


async def _refuse(send: Send, exc: GatewayError) -> None:
    """An error answer outside any route; the connection is closed, the body left unread."""
    body = exc.body()
    await send({"type": "http.response.start", "status": exc.status, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
        (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


def create_app(settings: Settings | None = None, admission: Admission | None = None) -> Gateway:
    """Build the app; with no arguments, settings come from GATEWAY_CONFIG and the environment."""
    settings = settings or load_settings()
    logs.configure(settings.log_level, settings.log_format)
    protocol.configure(settings)  # here, not in serve(): this runs in every worker process
    catalog = Catalog.from_settings(settings)
    for role, spec in catalog.retiring():
        log.warning("%s: model '%s' shuts down on %s (its replacement: %s); requests for it will "
                    "be refused from that day and the gateway will not start with this setting",
                    role, spec.name, spec.shutdown_date, spec.replacement)
    upstreams = Upstreams(settings)
    if admission is None:
        admission = _admission(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        lifecycle.install_drain(settings.drain_seconds)
        await admission.start()
        server.tune_gc()
        loopwatch.WATCH.start()
        yield
        loopwatch.WATCH.stop()
        metrics.worker_exit()
        await upstreams.aclose()
        await admission.aclose()

    app = FastAPI(title="image-gateway", version=__version__, lifespan=lifespan,
                  docs_url=None, redoc_url=None)
    app.state.settings = settings
    app.state.catalog = catalog
    app.include_router(admin_router(admission.store, settings.admin_key), include_in_schema=False)
    app.include_router(api_router(catalog, admission, metrics_route=settings.metrics_port is None))
    capacity = Capacity(settings)
    edits = ImageRoute(Edit, settings, catalog, upstreams, admission, capacity)
    generations = ImageRoute(Generation, settings, catalog, upstreams, admission, capacity)
    # Also routed here, so other methods get FastAPI's 405 in OpenAI's error shape.
    app.router.routes.append(Route(EDITS_PATH, edits, methods=["POST"]))
    app.router.routes.append(Route(GENERATIONS_PATH, generations, methods=["POST"]))
    install_error_handlers(app)
    openapi.install(app, catalog, keys=admission.store is not None)
    demo = None
    if settings.demo:
        log.warning("DEMO MODE: every image comes from the built-in stand-in provider "
                    "(gateway/demo.py), not from a model; nothing is sent to any provider")
        demo = DemoProvider()
    return Gateway(app, edits, generations, demo)


def _admission(settings: Settings) -> Admission:
    store = build_store(settings)
    if store is None:
        log.warning("no API keys configured (no GATEWAY_REDIS_URL, no [keys], no admin key): "
                    "every request is admitted without a key")
        return Admission()
    return QuotaAdmission(store, fail_open=settings.redis_failure == "open",
                          cache_seconds=settings.key_cache_seconds,
                          lease_ttl_seconds=settings.lease_ttl_seconds,
                          settle_retry_seconds=settings.settle_retry_seconds,
                          stale_seconds=settings.key_stale_seconds)
