"""The ASGI application: wires settings, catalog, upstreams and admission to the routes."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException
from starlette.routing import Route

from gateway import __version__, health, logs, loopwatch, metrics, openapi, server
from gateway.admin import admin_router
from gateway.admission import Admission, KeyPrincipal, QuotaAdmission
from gateway.asgi import Message, Receive, Scope, Send, headers_of, request_id
from gateway.catalog import Catalog, ModelSpec
from gateway.edits import EditsEndpoint
from gateway.errors import (
    GatewayError,
    InvalidRequest,
    MethodNotAllowed,
    NotFound,
)
from gateway.keyops import usage_view
from gateway.quota import build_store
from gateway.settings import Settings, load_settings
from gateway.upstream import Upstreams

EDITS_PATH = "/v1/images/edits"
log = logging.getLogger("gateway.app")


class Gateway:
    """The ASGI entry point. The edit route goes straight to its endpoint, past FastAPI's
    per-request middleware (measurable on the hot path); everything else, lifespan included,
    goes to the FastAPI app."""

    def __init__(self, api: FastAPI, edits: EditsEndpoint) -> None:
        self.api = api
        self.edits = edits

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.api(scope, receive, send)
        elif _repeated_authorization(scope):
            # Routes would each pick one of them (the first, the last): refuse them all alike.
            await _refuse(send, InvalidRequest("Send one Authorization header, not several.",
                                               code="duplicate_header"))
        elif scope["path"] == EDITS_PATH and scope["method"] == "POST":
            await self.edits(scope, receive, send)
        else:
            rid = request_id(headers_of(scope)).encode()
            path = scope["path"]
            # Other API requests are counted too; health checks and scrapes are not.
            endpoint = ("/v1/models" if path.startswith("/v1/models") else path) \
                if path.startswith("/v1/") else None
            start = time.perf_counter()
            status = 0

            async def send_with_id(message: Message) -> None:
                nonlocal status
                if message["type"] == "http.response.start":
                    status = message["status"]
                    message["headers"] = [*message.get("headers", []), (b"x-request-id", rid)]
                await send(message)

            try:
                await self.api(scope, receive, send_with_id)
            finally:
                if endpoint is not None:
                    total = time.perf_counter() - start
                    rec = metrics.RequestRecord(endpoint if status != 404 else "other", start,
                                                status=status)
                    if status >= 400:
                        rec.rejection = metrics.rejection_reason(status, None)
                    metrics.record(rec, total, key_labels=False)
                    logs.access({"request_id": rid.decode(), "endpoint": rec.endpoint,
                                 "method": scope["method"], "status": status,
                                 "total_ms": round(total * 1000, 3), "rejection": rec.rejection})


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
    server.configure(settings)  # here, not in serve(): this runs in every worker process
    catalog = Catalog.from_settings(settings)
    upstreams = Upstreams(settings)
    if admission is None:
        admission = _admission(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        server.install_drain(settings.drain_seconds)
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
    store = admission.store if isinstance(admission, QuotaAdmission) else None
    app.include_router(admin_router(store, settings.admin_key), include_in_schema=False)
    edits = EditsEndpoint(settings, catalog, upstreams, admission)
    # Also routed here, so other methods get FastAPI's 405 in OpenAI's error shape.
    app.router.routes.append(Route(EDITS_PATH, edits, methods=["POST"]))

    async def allowed_models(request: Request) -> tuple[str, ...]:
        """The models the caller's key may use (all, on an open gateway); 401 without a key."""
        principal = await admission.authenticate(request.headers.get("authorization"))
        return principal.record.models if isinstance(principal, KeyPrincipal) else ()

    @app.get("/v1/models")
    async def list_models(request: Request) -> dict[str, object]:
        allowed = await allowed_models(request)
        return {"object": "list", "data": [_model(m) for m in catalog.models.values()
                                           if not allowed or m.name in allowed]}

    @app.get("/v1/models/{model:path}")
    async def get_model(model: str, request: Request) -> dict[str, object]:
        allowed = await allowed_models(request)
        spec = catalog.models.get(model)
        if spec is None or (allowed and model not in allowed):
            raise NotFound(f"The model '{model}' does not exist.", param="model",
                           code="model_not_found")
        return _model(spec)

    @app.get("/v1/usage")
    async def usage(request: Request) -> dict[str, object]:
        """The calling key's own limits, usage and reset times."""
        if not isinstance(admission, QuotaAdmission):
            raise NotFound("This gateway has no API keys, so no usage to show.")
        principal = await admission.authenticate(request.headers.get("authorization"))
        assert isinstance(principal, KeyPrincipal)
        found = await admission.usage(principal)
        if found is None:
            raise NotFound("Unknown key.")
        return {"object": "usage", "key": {"id": principal.id, "name": principal.record.name},
                **(usage_view(found) or {})}

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> Response:
        """Ready unless the quota store is away and the gateway fails closed."""
        if health.draining:
            return JSONResponse({"status": "draining", "reason": "shutting down"}, 503)
        if not isinstance(admission, QuotaAdmission):
            return JSONResponse({"status": "ok"})
        ready, status = await admission.ready()
        body = {"status": status} | ({} if status == "ok" else {"reason": "quota store unreachable"})
        return JSONResponse(body, 200 if ready else 503)

    if settings.metrics_port is None:
        @app.get("/metrics")
        def metrics_endpoint() -> Response:  # sync: a big exposition runs in the threadpool
            body, content_type = metrics.exposition()
            return Response(body, media_type=content_type)

    app.add_exception_handler(GatewayError, _gateway_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    openapi.install(app, keys=store is not None)
    return Gateway(app, edits)


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


def _model(spec: ModelSpec) -> dict[str, object]:
    return {"id": spec.name, "object": "model", "created": spec.created, "owned_by": spec.owned_by}


def _error_response(exc: GatewayError) -> Response:
    return Response(exc.body(), status_code=exc.status, media_type="application/json",
                    headers=exc.headers)


async def _gateway_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, GatewayError)
    return _error_response(exc)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404:
        return _error_response(NotFound(f"Unknown path: {request.method} {request.url.path}."))
    if exc.status_code == 405:  # with Starlette's Allow header, as RFC 9110 requires
        return _error_response(MethodNotAllowed(f"Method {request.method} is not allowed here.",
                                                headers=dict(exc.headers or {})))
    return JSONResponse({"error": {"message": str(exc.detail), "type": "invalid_request_error",
                                   "param": None, "code": None}}, status_code=exc.status_code)


async def _validation_error(request: Request, exc: Exception) -> Response:
    return _error_response(InvalidRequest(str(exc)))
