"""The admin HTTP API under /admin/keys: what `gateway keys` does, over HTTP.

Every route needs `Authorization: Bearer <GATEWAY_ADMIN_KEY>`, compared in constant time. With no
admin key configured the API is off and every route answers 404, so a deployment that did not ask
for it exposes no way in. Errors are OpenAI-shaped and rendered by the router itself (its route
class), so it behaves the same in any FastAPI app, whatever exception handlers the app has.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from pydantic import BaseModel, SecretStr, ValidationError
from redis.exceptions import RedisError

from gateway.errors import (
    GatewayError,
    InvalidRequest,
    NotFound,
    RequestTooLarge,
    ServiceUnavailable,
    Unauthorized,
)
from gateway.keyadmin.ops import (
    KeyChanges,
    KeyCreate,
    describe_error,
    find_key,
    new_record,
    revoke_key,
    update_key,
    usage_view,
)
from gateway.keys import KeyRecord
from gateway.quota.base import QuotaStore, StoreUnavailable

PREFIX = "/admin/keys"
MAX_BODY_BYTES = 64 * 1024
_NO_STORE = {"Cache-Control": "no-store"}
M = TypeVar("M", bound=BaseModel)


class _AdminRoute(APIRoute):
    """Renders GatewayError (and an unreachable store, as 503) in OpenAI's shape."""

    def get_route_handler(self) -> Callable[[Request], Awaitable[Response]]:
        handler = super().get_route_handler()

        async def guarded(request: Request) -> Response:
            try:
                return await handler(request)
            except (StoreUnavailable, RedisError):
                error: GatewayError = ServiceUnavailable(
                    "The key store is unavailable; retry shortly.")
            except GatewayError as exc:
                error = exc
            return Response(error.body(), status_code=error.status, media_type="application/json",
                            headers={**_NO_STORE, **error.headers})

        return guarded


def admin_router(store: QuotaStore | None, admin_key: str | SecretStr | None) -> APIRouter:
    """The /admin/keys routes over `store`; off (404) without an admin key, and without a store
    (an open gateway has no keys to manage) every authorized call answers 404 saying so."""
    secret = admin_key.get_secret_value() if isinstance(admin_key, SecretStr) else admin_key
    # Digests of equal length: compare_digest then leaks neither content nor the key's length.
    expected = hashlib.sha256(secret.encode()).digest() if secret else None

    async def authorized_store(request: Request) -> QuotaStore:
        if expected is None:
            raise NotFound("The admin API is disabled: set GATEWAY_ADMIN_KEY to enable it.")
        scheme, _, token = (request.headers.get("authorization") or "").partition(" ")
        matches = hmac.compare_digest(hashlib.sha256(token.strip().encode()).digest(), expected)
        if scheme.lower() != "bearer" or not matches:
            raise Unauthorized("Missing or incorrect admin key: send Authorization: Bearer "
                               "<GATEWAY_ADMIN_KEY>.", headers={"WWW-Authenticate": "Bearer"})
        if store is None:
            raise NotFound("This gateway has no key store (no GATEWAY_REDIS_URL and no [keys] in "
                           "the config), so it admits every request and has no keys to manage.")
        return store

    authorized = Depends(authorized_store)
    router = APIRouter(prefix=PREFIX, route_class=_AdminRoute, tags=["admin"])

    @router.post("", status_code=201)
    async def create_key(request: Request, keys: QuotaStore = authorized) -> JSONResponse:
        """A new key; the answer is the only place its secret (`key`) ever appears."""
        record, secret = new_record(await _body(request, KeyCreate))
        await keys.put_key(record)
        return JSONResponse({**record.public(), "key": secret}, status_code=201,
                            headers=_NO_STORE)

    @router.get("")
    async def list_keys(keys: QuotaStore = authorized) -> JSONResponse:
        records = await keys.list_keys()
        return _json({"object": "list", "data": [r.public() for r in records]})

    @router.get("/{key_id}")
    async def get_key(key_id: str, keys: QuotaStore = authorized) -> JSONResponse:
        record = _found(await find_key(keys, key_id), key_id)
        return _json({**record.public(), "usage": usage_view(await keys.usage(record.id))})

    @router.patch("/{key_id}")
    async def patch_key(key_id: str, request: Request, keys: QuotaStore = authorized) -> JSONResponse:
        """Changes only the fields the body names (`models: []` means every model again)."""
        changes = await _body(request, KeyChanges)
        return _json(_found(await update_key(keys, key_id, changes), key_id).public())

    async def revoke(key_id: str, keys: QuotaStore = authorized) -> JSONResponse:
        """Revoked, not deleted: the record (name, metadata) stays for the operator."""
        return _json(_found(await revoke_key(keys, key_id), key_id).public())

    router.add_api_route("/{key_id}", revoke, methods=["DELETE"], name="delete_key")
    router.add_api_route("/{key_id}/revoke", revoke, methods=["POST"], name="revoke_key")
    return router


async def _body(request: Request, model: type[M]) -> M:
    """The JSON body, validated here so every mistake is a 400 naming its field."""
    raw = await request.body()
    if len(raw) > MAX_BODY_BYTES:
        raise RequestTooLarge(f"The body is larger than {MAX_BODY_BYTES} bytes.")
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        message, param, code = describe_error(exc)
        raise InvalidRequest(message, param=param, code=code) from None


def _found(record: KeyRecord | None, key_id: str) -> KeyRecord:
    if record is None:
        raise NotFound(f"No key with id '{key_id[:100]}'.", param="id", code="key_not_found")
    return record


def _json(data: dict[str, Any]) -> JSONResponse:
    return JSONResponse(data, headers=_NO_STORE)
