"""The Redis quota store: every check-and-reserve is one Lua script (quota.lua), so limits hold
exactly across any number of gateway instances sharing the Redis."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from gateway import metrics
from gateway.keys import KeyRecord, Limits, id_for_hash
from gateway.quota.base import Decision, QuotaStore, Snapshot, StoreUnavailable, Usage

T = TypeVar("T")
_SCRIPT = resources.files("gateway.quota").joinpath("quota.lua").read_text()
_ALL_KEYS = "gw:keys"  # ids of every key, for listing


def _keys(key_id: str) -> list[str]:
    tag = "{" + key_id + "}"  # one hash tag: one cluster slot for the script
    return [f"gw:{tag}:key", f"gw:{tag}:use", f"gw:{tag}:lease", f"gw:{tag}:resv"]


def _fields(record: KeyRecord) -> dict[str, str | int]:
    return {"hash": record.hash, "name": record.name, "created": record.created,
            "status": record.status, "models": "," + ",".join(record.models) + ","
            if record.models else "", "metadata": json.dumps(record.metadata),
            **record.limits.as_dict()}


def _record(key_id: str, raw: dict[str, str]) -> KeyRecord:
    return KeyRecord(
        id=key_id, hash=raw["hash"], name=raw.get("name", ""), created=int(raw.get("created", 0)),
        status=raw.get("status", "active"),
        limits=Limits(**{k: int(raw.get(k, 0)) for k in Limits().as_dict()}),
        models=tuple(m for m in raw.get("models", "").split(",") if m),
        metadata=json.loads(raw.get("metadata") or "{}"))


class RedisStore(QuotaStore):
    def __init__(self, url: str, *, timeout: float, lease_ttl_ms: int,
                 rpm_burst_seconds: float) -> None:
        self.redis = aioredis.Redis.from_url(
            url, decode_responses=True, socket_timeout=timeout, socket_connect_timeout=timeout,
            retry_on_timeout=False)
        self.lease_ttl_ms = lease_ttl_ms
        self.rpm_burst_seconds = rpm_burst_seconds
        self._script = self.redis.register_script(_SCRIPT)

    async def _call(self, op: Callable[[], Awaitable[T]]) -> T:
        try:
            result = await op()
        except (RedisError, OSError) as exc:
            # Any Redis trouble (gone, slow, MOVED, OOM, read-only) is the store being away:
            # the admission policy (fail closed or open) decides, never a 500.
            metrics.store_result(False)
            raise StoreUnavailable(f"redis: {type(exc).__name__}") from None
        metrics.store_result(True)
        return result

    async def _run(self, key_id: str, *args: object) -> Any:
        return await self._call(lambda: self._script(keys=_keys(key_id), args=list(args)))

    async def put_key(self, record: KeyRecord) -> None:
        # Two calls, not one transaction: the listing set lives in another cluster slot.
        await self._call(lambda: self.redis.hset(_keys(record.id)[0], mapping=_fields(record)))
        await self._call(lambda: self.redis.sadd(_ALL_KEYS, record.id))

    async def update_key(self, key_id: str, record: KeyRecord, *, status_only: bool = False
                         ) -> None:
        fields = _fields(record)
        changes = {"status": fields["status"]} if status_only else {
            k: v for k, v in fields.items() if k not in ("status", "hash", "created")}
        key = _keys(key_id)[0]

        async def op() -> None:
            # Only an existing record is changed (HSET would create a partial one).
            if await self.redis.exists(key):
                await self.redis.hset(key, mapping=changes)

        await self._call(op)

    async def get_key(self, key_id: str) -> KeyRecord | None:
        raw = await self._call(lambda: self.redis.hgetall(_keys(key_id)[0]))
        return _record(key_id, raw) if raw else None

    async def list_keys(self) -> list[KeyRecord]:
        ids = sorted(await self._call(lambda: self.redis.smembers(_ALL_KEYS)))

        async def op() -> list[dict[str, str]]:
            async with self.redis.pipeline(transaction=False) as pipe:
                for key_id in ids:
                    pipe.hgetall(_keys(key_id)[0])
                return await pipe.execute()

        raws = await self._call(op) if ids else []
        records = [_record(i, raw) for i, raw in zip(ids, raws, strict=True) if raw]
        return sorted(records, key=lambda r: r.created)

    async def admit(self, key_hash: str, model: str, n: int, lease: str) -> Decision:
        out = await self._run(id_for_hash(key_hash), "admit", key_hash, model, n, lease,
                              self.lease_ttl_ms, self.rpm_burst_seconds)
        return Decision(out[0], int(out[1]), Snapshot(*(int(v) for v in out[2:])).windows())

    async def settle(self, key_id: str, lease: str, *, answered: bool, images: int,
                     tokens: int) -> None:
        await self._run(key_id, "settle", lease, int(answered), images, tokens)

    async def renew(self, key_id: str, lease: str) -> None:
        await self._run(key_id, "renew", lease, self.lease_ttl_ms)

    async def usage(self, key_id: str) -> Usage | None:
        if await self.get_key(key_id) is None:
            return None
        out = await self._run(key_id, "usage", self.rpm_burst_seconds)
        snap = Snapshot(*(int(v) for v in out[2:]))
        return Usage(snap.windows(), snap.in_flight)

    async def ping(self) -> None:
        await self._call(self.redis.ping)

    async def aclose(self) -> None:
        await self.redis.aclose()
