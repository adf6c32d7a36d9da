"""The admin API (/admin/keys) in a FastAPI app over httpx's ASGI transport, on a real
redis-server this suite starts and on the in-process store."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator

import httpx
import pytest
from fastapi import FastAPI
from pytest_redis import factories

from gateway.keyadmin.http import admin_router
from gateway.keys import hash_secret, id_for_hash
from gateway.quota.base import OK, UNKNOWN_KEY, QuotaStore
from gateway.quota.memory import MemoryStore
from gateway.quota.redis_store import RedisStore

redis_server = factories.redis_proc(port=None)

ADMIN_KEY = "admin-secret-0123456789"
AUTH = {"Authorization": f"Bearer {ADMIN_KEY}"}
UNKNOWN_ID = "key_0123456789abcdef"


def client_for(store: QuotaStore | None, admin_key: str | None = ADMIN_KEY) -> httpx.AsyncClient:
    app = FastAPI()
    app.include_router(admin_router(store, admin_key))
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway")


def assert_error(response: httpx.Response, status: int, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if code is not None:
        assert error["code"] == code
    return error


@pytest.fixture(params=["memory", "redis"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[QuotaStore]:
    if request.param == "memory":
        s: QuotaStore = MemoryStore(lease_ttl_ms=60_000)
    else:
        proc = request.getfixturevalue("redis_server")
        s = RedisStore(f"redis://{proc.host}:{proc.port}/0", timeout=1.0, lease_ttl_ms=60_000)
    yield s
    if isinstance(s, RedisStore):
        await s.redis.flushdb()  # our own redis-server, started for this suite
    await s.aclose()


@pytest.fixture
async def api(store: QuotaStore) -> AsyncIterator[httpx.AsyncClient]:
    async with client_for(store) as client:
        yield client


async def test_key_lifecycle(api: httpx.AsyncClient, store: QuotaStore) -> None:
    body = {"name": "alice", "rpm": 60, "images_per_day": 100, "models": ["gpt-image-1"],
            "metadata": {"team": "a"}}
    created = await api.post("/admin/keys", json=body, headers=AUTH)
    assert created.status_code == 201 and created.headers["cache-control"] == "no-store"
    key = created.json()
    secret, key_id = key["key"], key["id"]
    assert secret.startswith("sk-gw-") and key_id == id_for_hash(hash_secret(secret))
    assert key["status"] == "active" and key["models"] == ["gpt-image-1"] and "hash" not in key
    assert key["limits"] == {"rpm": 60, "images_per_day": 100, "tokens_per_month": 0,
                             "max_concurrent": 0}
    record = await store.get_key(key_id)
    assert record is not None and record.hash == hash_secret(secret)
    assert (await store.admit(record.hash, "gpt-image-1", 3, "lease-1")).status == OK

    listed = await api.get("/admin/keys", headers=AUTH)
    assert listed.status_code == 200
    assert [k["id"] for k in listed.json()["data"]] == [key_id]
    got = await api.get(f"/admin/keys/{key_id}", headers=AUTH)
    assert got.status_code == 200
    for text in (listed.text, got.text):  # the secret is shown once, the hash never
        assert secret not in text and record.hash not in text and '"key"' not in text
    usage = got.json()["usage"]
    assert usage["in_flight"] == 1
    assert {k: usage["limits"]["images"][k] for k in ("limit", "used", "remaining")} == {
        "limit": 100, "used": 3, "remaining": 97}

    patched = await api.patch(f"/admin/keys/{key_id}", json={"rpm": 0, "models": []},
                              headers=AUTH)
    assert patched.status_code == 200
    assert patched.json()["limits"]["rpm"] == 0 and patched.json()["models"] == []
    record = await store.get_key(key_id)
    assert record is not None and record.models == () and record.limits.images_per_day == 100
    assert record.name == "alice" and record.metadata == {"team": "a"}  # not named: unchanged
    patched = await api.patch(f"/admin/keys/{key_id}", json={"name": "alice2",
                                                             "metadata": {"x": [1]}}, headers=AUTH)
    assert patched.json()["name"] == "alice2" and patched.json()["metadata"] == {"x": [1]}

    revoked = await api.delete(f"/admin/keys/{key_id}", headers=AUTH)
    assert revoked.status_code == 200 and revoked.json()["status"] == "revoked"
    assert (await store.admit(hash_secret(secret), "gpt-image-1", 1, "lease-2")).status == (
        UNKNOWN_KEY)
    kept = await api.get(f"/admin/keys/{key_id}", headers=AUTH)
    assert kept.json()["status"] == "revoked" and kept.json()["name"] == "alice2"

    other = (await api.post("/admin/keys", json={"name": "bob"}, headers=AUTH)).json()
    assert other["limits"] == {"rpm": 0, "images_per_day": 0, "tokens_per_month": 0,
                               "max_concurrent": 0}
    again = await api.post(f"/admin/keys/{other['id']}/revoke", headers=AUTH)
    assert again.status_code == 200 and again.json()["status"] == "revoked"
    stored = await store.get_key(other["id"])
    assert stored is not None and stored.status == "revoked"


async def test_admin_key_is_required(api: httpx.AsyncClient, store: QuotaStore) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {ADMIN_KEY}"},
                    {"Authorization": f"Bearer {ADMIN_KEY[:-1]}"}, {"Authorization": ADMIN_KEY}):
        for method, path in (("GET", "/admin/keys"), ("POST", "/admin/keys"),
                             ("GET", f"/admin/keys/{UNKNOWN_ID}"),
                             ("PATCH", f"/admin/keys/{UNKNOWN_ID}"),
                             ("DELETE", f"/admin/keys/{UNKNOWN_ID}")):
            response = await api.request(method, path, headers=headers, json={"name": "x"})
            assert_error(response, 401, "invalid_api_key")
            assert response.headers["www-authenticate"] == "Bearer"
    assert await store.list_keys() == []
    assert (await api.get("/admin/keys", headers={"authorization": f"bearer {ADMIN_KEY}"})
            ).status_code == 200


async def test_unknown_ids_are_404(api: httpx.AsyncClient) -> None:
    for key_id in (UNKNOWN_ID, "nonsense", "key_{x}"):
        for method, path in (("GET", ""), ("PATCH", ""), ("DELETE", ""), ("POST", "/revoke")):
            response = await api.request(method, f"/admin/keys/{key_id}{path}", headers=AUTH,
                                         json={"rpm": 1} if method == "PATCH" else None)
            error = assert_error(response, 404, "key_not_found")
            assert error["param"] == "id"


@pytest.mark.parametrize(("body", "param", "code"), [
    ({"name": "x", "rpm": -1}, "rpm", "invalid_value"),
    ({"name": "x", "max_concurrent": "5"}, "max_concurrent", "invalid_value"),
    ({"name": "x", "images_per_day": 1.5}, "images_per_day", "invalid_value"),
    ({"name": "x", "colour": "red"}, "colour", "unknown_parameter"),
    ({"name": "x", "limits": {"rpm": 1}}, "limits", "unknown_parameter"),
    ({"rpm": 1}, "name", "missing_required_parameter"),
    ({"name": ""}, "name", "invalid_value"),
    ({"name": "x", "models": ["a,b"]}, "models", "invalid_value"),
    ({"name": "x", "metadata": [1]}, "metadata", "invalid_value"),
    ([1], None, "invalid_value"),
])
async def test_bad_bodies_are_400(api: httpx.AsyncClient, store: QuotaStore, body: object,
                                  param: str | None, code: str) -> None:
    error = assert_error(await api.post("/admin/keys", json=body, headers=AUTH), 400, code)
    assert error["param"] == param and error["type"] == "invalid_request_error"
    assert await store.list_keys() == []


async def test_bad_patches_are_400_and_change_nothing(api: httpx.AsyncClient) -> None:
    key = (await api.post("/admin/keys", json={"name": "a", "rpm": 5}, headers=AUTH)).json()
    for body in ({"rpm": -1}, {"rpm": None}, {"status": "active"}, {"key": "sk-gw-x"}):
        response = await api.patch(f"/admin/keys/{key['id']}", json=body, headers=AUTH)
        assert_error(response, 400)
    response = await api.patch(f"/admin/keys/{key['id']}", content=b"not json", headers=AUTH)
    assert_error(response, 400)
    got = (await api.get(f"/admin/keys/{key['id']}", headers=AUTH)).json()
    assert got["limits"]["rpm"] == 5 and got["status"] == "active"


async def test_disabled_without_an_admin_key(store: QuotaStore) -> None:
    for admin_key in (None, ""):
        async with client_for(store, admin_key) as api:
            for headers in ({}, AUTH, {"Authorization": "Bearer "}):
                response = await api.post("/admin/keys", json={"name": "x"}, headers=headers)
                assert "disabled" in assert_error(response, 404)["message"]
                assert_error(await api.get("/admin/keys", headers=headers), 404)
    assert await store.list_keys() == []


async def test_open_gateway_has_no_keys_to_manage() -> None:
    async with client_for(None) as api:
        assert_error(await api.get("/admin/keys"), 401)
        error = assert_error(await api.post("/admin/keys", json={"name": "x"}, headers=AUTH), 404)
        assert "no key store" in error["message"]


async def test_store_unavailable_is_503() -> None:
    with socket.socket() as s:  # a loopback port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    store = RedisStore(f"redis://127.0.0.1:{port}/0", timeout=0.5, lease_ttl_ms=60_000)
    async with client_for(store) as api:
        assert_error(await api.get("/admin/keys", headers=AUTH), 503, "service_unavailable")
        response = await api.post("/admin/keys", json={"name": "x"}, headers=AUTH)
        assert "sk-gw-" not in response.text
        assert_error(response, 503)
    await store.aclose()
