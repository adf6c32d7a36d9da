"""The API's small routes (FastAPI): /v1/models, /v1/usage, /healthz, /readyz, /metrics, and
the handlers that answer every error of theirs in OpenAI's shape."""

from __future__ import annotations

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException

from gateway import lifecycle, metrics
from gateway.admission import Admission
from gateway.catalog import Catalog, ModelSpec
from gateway.errors import GatewayError, InvalidRequest, MethodNotAllowed, NotFound
from gateway.keyadmin.ops import usage_view


def api_router(catalog: Catalog, admission: Admission, *, metrics_route: bool) -> APIRouter:
    router = APIRouter()

    async def allowed_models(request: Request) -> set[str]:
        """The models the caller's key may use, an alias in its list standing for its target
        too, as the image routes take them (empty: every model); 401 without a key."""
        principal = await admission.authenticate(request.headers.get("authorization"))
        names = set(principal.models)
        return names | {catalog.aliases[name] for name in names if name in catalog.aliases}

    @router.get("/v1/models")
    async def list_models(request: Request) -> dict[str, object]:
        allowed = await allowed_models(request)
        return {"object": "list", "data": [_model(m) for m in catalog.served()
                                           if not allowed or m.name in allowed]}

    @router.get("/v1/models/{model:path}")
    async def get_model(model: str, request: Request) -> dict[str, object]:
        allowed = await allowed_models(request)
        target = catalog.aliases.get(model, model)
        # A catalog name shows its own entry (a retired one its shutdown date, while an alias
        # keeps it answering); an alias name its target's, under the alias's id.
        spec = catalog.models.get(model) or catalog.models.get(target)
        if spec is None or (allowed and model not in allowed and target not in allowed):
            raise NotFound(f"The model '{model}' does not exist.", param="model",
                           code="model_not_found")
        catalog.resolve(model)  # 404 naming the replacement once it is shut down, unless aliased
        return _model(spec) | {"id": model}

    @router.get("/v1/usage")
    async def usage(request: Request) -> dict[str, object]:
        """The calling key's own limits, usage and reset times."""
        principal = await admission.authenticate(request.headers.get("authorization"))
        found = await admission.usage(principal)
        if found is None:
            raise NotFound("Unknown key.")
        return {"object": "usage", "key": {"id": principal.key_id, "name": principal.name},
                **(usage_view(found) or {})}

    @router.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @router.get("/readyz")
    async def readyz() -> Response:
        """Ready unless the quota store is away and the gateway fails closed."""
        if lifecycle.draining:
            return JSONResponse({"status": "draining", "reason": "shutting down"}, 503)
        ready, status = await admission.ready()
        body = {"status": status} | ({} if status == "ok" else {"reason": "quota store unreachable"})
        return JSONResponse(body, 200 if ready else 503)

    if metrics_route:
        @router.get("/metrics")
        def metrics_endpoint() -> Response:  # sync: a big exposition runs in the threadpool
            body, content_type = metrics.exposition()
            return Response(body, media_type=content_type)

    return router


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(GatewayError, _gateway_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)


def _model(spec: ModelSpec) -> dict[str, object]:
    shutdown = spec.shutdown_date.isoformat() if spec.shutdown_date else None
    return {"id": spec.name, "object": "model", "created": spec.created, "owned_by": spec.owned_by,
            "shutdown_date": shutdown}


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
