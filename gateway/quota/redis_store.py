"""The Redis quota store: every check-and-reserve is one Lua script (quota.lua), so limits hold
exactly across any number of gateway instances sharing the Redis."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from gateway.keys import KeyRecord, Limits, id_for_hash
from gateway.quota.base import (
    OK,
    Decision,
    QuotaStore,
    StoreUnavailable,
    Usage,
    Window,
)
from gateway.quota.memory import gcra_remaining, periods

T = TypeVar("T")
_SCRIPT = resources.files("gateway.quota").joinpath("quota.lua").read_text()
_ALL_KEYS = "gw:keys"  # ids of every key, for listing


def _keys(key_id: str) -> list[str]:
    tag = "{" + key_id + "}"  # one hash tag: one cluster slot for the script
    return [f"gw:{tag}:key", f"gw:{tag}:use", f"gw:{tag}:lease", f"gw:{tag}:resv"]


def _record_fields(record: KeyRecord) -> dict[str, str | int]:
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
            return await op()
        except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
            raise StoreUnavailable(f"redis: {exc}") from None

    async def put_key(self, record: KeyRecord) -> None:
        async def op() -> None:
            key = _keys(record.id)[0]
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.delete(key).hset(key, mapping=_record_fields(record)).sadd(_ALL_KEYS, record.id)
                await pipe.execute()
        await self._call(op)

    async def get_key(self, key_id: str) -> KeyRecord | None:
        raw = await self._call(lambda: self.redis.hgetall(_keys(key_id)[0]))
        return _record(key_id, raw) if raw else None

    async def list_keys(self) -> list[KeyRecord]:
        ids = sorted(await self._call(lambda: self.redis.smembers(_ALL_KEYS)))
        records = [await self.get_key(i) for i in ids]
        return sorted((r for r in records if r), key=lambda r: r.created)

    async def admit(self, key_hash: str, model: str, n: int, lease: str) -> Decision:
        args = ["admit", key_hash, model, n, lease, self.lease_ttl_ms, self.rpm_burst_seconds]
        out: list[Any] = await self._call(
            lambda: self._script(keys=_keys(id_for_hash(key_hash)), args=args))
        status, retry = out[0], int(out[1])
        values = [int(v) for v in out[2:]] + [0] * (9 - len(out[2:]))
        rpm, req_remaining, req_reset, ipd, img, day_reset, tpm, tok, month_reset = values
        windows = {}
        if rpm:
            windows["requests"] = Window(rpm, 0, req_remaining, req_reset)
        if ipd and (status == OK or status == "images"):
            windows["images"] = Window(ipd, img, max(0, ipd - img), day_reset)
        if tpm and (status == OK or status == "tokens"):
            windows["tokens"] = Window(tpm, tok, max(0, tpm - tok), month_reset)
        return Decision(status, retry, windows)

    async def settle(self, key_id: str, lease: str, *, answered: bool, images: int,
                     tokens: int) -> None:
        args = ["settle", lease, int(answered), images, tokens]
        await self._call(lambda: self._script(keys=_keys(key_id), args=args))

    async def usage(self, key_id: str) -> Usage | None:
        record = await self.get_key(key_id)
        if record is None:
            return None
        keys = _keys(key_id)

        async def op() -> list[Any]:
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.time().hmget(keys[1], "tat", "day", "img", "month", "tok")
                return await pipe.execute()

        (secs, micros), (tat, day_, img, month_, tok) = await self._call(op)
        now = int(secs) * 1000 + int(micros) // 1000
        in_flight = await self._call(lambda: self.redis.zcount(keys[2], now, "+inf"))
        day, day_reset, month, month_reset = periods(now)
        images = int(img or 0) if int(day_ or -1) == day else 0
        tokens = int(tok or 0) if int(month_ or -1) == month else 0
        limits = record.limits
        windows = {
            "images": Window(limits.images_per_day, images,
                             max(0, limits.images_per_day - images), day_reset),
            "tokens": Window(limits.tokens_per_month, tokens,
                             max(0, limits.tokens_per_month - tokens), month_reset)}
        if limits.rpm:
            tat_ms = int(float(tat or 0))
            windows["requests"] = Window(
                limits.rpm, 0, gcra_remaining(tat_ms, now, limits.rpm, self.rpm_burst_seconds),
                max(0, tat_ms - now))
        return Usage(windows, int(in_flight))

    async def ping(self) -> None:
        await self._call(self.redis.ping)

    async def aclose(self) -> None:
        await self.redis.aclose()
