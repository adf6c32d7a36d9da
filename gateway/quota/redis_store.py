"""The Redis quota store: every check-and-reserve is one Lua script (quota.lua), so limits hold
exactly across any number of gateway instances sharing the Redis."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import Any, TypeVar
from urllib.parse import urlsplit

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.sentinel import Sentinel
from redis.exceptions import RedisError

from gateway import metrics
from gateway.keys import KeyRecord, Limits, id_for_hash
from gateway.quota.base import Decision, QuotaStore, Snapshot, StoreUnavailable, Usage

T = TypeVar("T")
_SCRIPT = resources.files("gateway.quota").joinpath("quota.lua").read_text()
_ALL_KEYS = "gw:keys"  # ids of every key, for listing
log = logging.getLogger("gateway.quota")


def _keys(key_id: str) -> list[str]:
    tag = "{" + key_id + "}"  # one hash tag: one cluster slot for the script
    return [f"gw:{tag}:key", f"gw:{tag}:use", f"gw:{tag}:lease", f"gw:{tag}:resv",
            f"gw:{tag}:expired", f"gw:{tag}:reqs"]


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


def _decision(out: list[Any]) -> Decision:
    """quota.lua's answer: status, retry ms, then a Snapshot's fields."""
    return Decision(out[0], int(out[1]), Snapshot(*(int(v) for v in out[2:])).windows())


def connect(url: str, timeout: float) -> Any:
    """A client for a single Redis (`redis://`, `rediss://`) or Sentinel
    (`redis+sentinel://[:password@]host:port[,host:port...]/service[/db]`); a Redis Cluster is
    recognised when first used (see RedisStore._ready)."""
    options: dict[str, Any] = {"decode_responses": True, "socket_timeout": timeout,
                               "socket_connect_timeout": timeout, "retry_on_timeout": False}
    if not url.startswith("redis+sentinel://"):
        return aioredis.Redis.from_url(url, **options)
    parsed = urlsplit(url)
    nodes = [(host, int(port or 26379)) for host, _, port in
             (part.rpartition("@")[2].partition(":") for part in parsed.netloc.split(","))]
    service, _, db = parsed.path.strip("/").partition("/")
    if not service:
        raise ValueError("a Sentinel URL names the service: redis+sentinel://host:port/service")
    sentinel = Sentinel(nodes, sentinel_kwargs={"socket_timeout": timeout}, **options,
                        password=parsed.password, db=int(db or 0))
    return sentinel.master_for(service)


class RedisStore(QuotaStore):
    def __init__(self, url: str, *, timeout: float, lease_ttl_ms: int) -> None:
        self.url = url
        self.timeout = timeout
        self.redis = connect(url, timeout)
        self.lease_ttl_ms = lease_ttl_ms
        self._script = self.redis.register_script(_SCRIPT)
        self._checked = url.startswith("redis+sentinel://")  # Sentinel: never a cluster
        self._checking = asyncio.Lock()

    async def _ready(self) -> None:
        """On first use, switch to a cluster client if the node says it is part of a cluster,
        so one node's URL is all a Redis Cluster needs. The cluster client is initialised (slots,
        nodes, commands) here, under the lock, before any request may use it: left to the first
        commands, a burst of them would all start it at once and break each other's
        connections."""
        async with self._checking:
            if self._checked:
                return
            info = await self.redis.info("cluster")
            if info.get("cluster_enabled"):
                cluster = RedisCluster.from_url(
                    self.url, decode_responses=True, socket_timeout=self.timeout,
                    socket_connect_timeout=self.timeout)
                try:
                    await cluster.initialize()
                except BaseException:
                    await cluster.aclose()
                    raise  # not checked: the next call tries again
                plain, self.redis = self.redis, cluster
                self._script = cluster.register_script(_SCRIPT)
                await plain.aclose()
            self._checked = True

    async def _call(self, op: Callable[[], Awaitable[T]]) -> T:
        try:
            if not self._checked:
                await self._ready()
            result = await op()
        except Exception as exc:
            # Any trouble out of the client (Redis gone, slow, MOVED, OOM, read-only, or a
            # connection the client itself broke) is the store being away: the admission
            # policy (fail closed or open) decides, never a 500. Cancellation is not an
            # Exception and passes through.
            metrics.store_result(False)
            if not isinstance(exc, RedisError | OSError):
                log.warning("quota store: unexpected %s from the Redis client", type(exc).__name__,
                            exc_info=exc)
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
                              self.lease_ttl_ms)
        return _decision(out)

    async def extend(self, key_id: str, lease: str, extra: int) -> Decision:
        if extra < 0:
            raise ValueError("extend adds images: extra >= 0")
        return _decision(await self._run(key_id, "extend", lease, extra))

    async def settle(self, key_id: str, lease: str, *, answered: bool, images: int,
                     tokens: int) -> None:
        await self._run(key_id, "settle", lease, int(answered), images, tokens)

    async def renew(self, key_id: str, lease: str) -> None:
        await self._run(key_id, "renew", lease, self.lease_ttl_ms)

    async def usage(self, key_id: str) -> Usage | None:
        if await self.get_key(key_id) is None:
            return None
        out = await self._run(key_id, "usage")
        snap = Snapshot(*(int(v) for v in out[2:]))
        return Usage(snap.windows(), snap.in_flight)

    async def ping(self) -> None:
        await self._call(lambda: self.redis.ping())

    async def aclose(self) -> None:
        await self.redis.aclose()
