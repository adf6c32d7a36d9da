"""The Redis quota store: every check-and-reserve is one Lua script (quota.lua), so limits hold
exactly across any number of gateway instances sharing the Redis."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from collections.abc import Awaitable, Callable, Sequence
from importlib import resources
from typing import Any, TypeVar
from urllib.parse import urlsplit

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.sentinel import Sentinel
from redis.exceptions import NoScriptError, RedisError

from gateway import metrics
from gateway.keys import KeyRecord, Limits, id_for_hash
from gateway.loopwatch import LATE, WATCH
from gateway.quota.base import (
    Decision,
    QuotaStore,
    Snapshot,
    StoreUnavailable,
    Usage,
)
from gateway.tasks import background

T = TypeVar("T")
_SCRIPT = resources.files("gateway.quota").joinpath("quota.lua").read_text()
_ALL_KEYS = "gw:keys"  # ids of every key, for listing
_SOCKET_FACTOR = 10  # socket timeouts, in redis_timeouts (see connect)
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
    recognised when first used (see RedisStore._ready).

    Each call is bounded by RedisStore's Deadline, which a busy loop does not trip. The sockets
    keep timeouts too, `_SOCKET_FACTOR` times longer (past what a burst's loop turns take), so
    that redis-py's own failover still runs: it moves to the next Sentinel, or marks a cluster
    node failed and reads the slots again, only on a socket timeout or connection error, never
    on a cancellation. Sentinels, asked only when a connection is made, answer within `timeout`.
    """
    socket_timeout = _SOCKET_FACTOR * timeout
    options: dict[str, Any] = {"decode_responses": True, "retry_on_timeout": False,
                               "socket_timeout": socket_timeout,
                               "socket_connect_timeout": socket_timeout}
    if not url.startswith("redis+sentinel://"):
        return aioredis.Redis.from_url(url, **options)
    parsed = urlsplit(url)
    nodes = [(host, int(port or 26379)) for host, _, port in
             (part.rpartition("@")[2].partition(":") for part in parsed.netloc.split(","))]
    service, _, db = parsed.path.strip("/").partition("/")
    if not service:
        raise ValueError("a Sentinel URL names the service: redis+sentinel://host:port/service")
    sentinel = Sentinel(nodes, sentinel_kwargs={"socket_timeout": timeout,
                                                "socket_connect_timeout": timeout},
                        **options, password=parsed.password, db=int(db or 0))
    return sentinel.master_for(service)


class Deadline:
    """`asyncio.timeout(seconds)` for a store call that tells "away" from "busy".

    Under a burst of thousands of requests a call can outlast a short timeout while nothing is
    wrong with Redis: the gateway's loop, busy with the burst, takes several long turns to send
    a pipeline and read its answer (and a plain timeout fires at the start of a turn, before the
    sockets are read). Reporting the store away then fails healthy requests closed. So when the
    deadline comes due, it is put off by a few milliseconds, again and again up to `_PATIENCE`
    times `seconds`, while the loop is or has been busy in the last `seconds` (this timer ran
    late, or loopwatch saw one run late) or the store has answered some call in that time
    (`answered_at`: it is working); it expires when the loop has been free for `seconds` and
    the store silent as long.
    """

    __slots__ = ("_answered_at", "_due", "_expired", "_handle", "_last", "_loop", "_seconds",
                 "_task")
    _PATIENCE = 40

    def __init__(self, seconds: float, answered_at: Callable[[], float] = lambda: -1e9) -> None:
        self._seconds = seconds
        self._answered_at = answered_at
        self._expired = False

    async def __aenter__(self) -> Deadline:
        self._loop = asyncio.get_running_loop()
        WATCH.start()
        task = asyncio.current_task()
        assert task is not None
        self._task = task
        now = self._loop.time()
        self._last = now + self._PATIENCE * self._seconds
        self._due = now + self._seconds
        self._handle = self._loop.call_at(self._due, self._fire)
        return self

    def _fire(self) -> None:
        now = self._loop.time()
        busy = (now - self._due > LATE  # this very timer ran late
                or WATCH.busy_within(self._seconds)
                or now - self._answered_at() < self._seconds)
        if busy and now < self._last:
            self._due = now + 0.005
            self._handle = self._loop.call_at(self._due, self._fire)
            return
        self._expired = True
        self._task.cancel()

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                        tb: object) -> None:
        self._handle.cancel()
        if self._expired and kind is asyncio.CancelledError and self._task.uncancel() == 0:
            raise TimeoutError from None


class RedisStore(QuotaStore):
    """Commands issued in the same turn of the loop go to Redis as one pipeline (one write, one
    connection, one round trip for a burst of admissions), at most `batch` commands a pipeline
    and `max_connections` pipelines (or other calls) at once; each is bounded by a Deadline of
    `timeout` (up to 40 times that while the loop stays busy)."""

    def __init__(self, url: str, *, timeout: float, lease_ttl_ms: int,
                 max_connections: int = 16, batch: int = 256) -> None:
        self.url = url
        self.timeout = timeout
        self.redis = connect(url, timeout)
        self.lease_ttl_ms = lease_ttl_ms
        self.batch = batch
        self.max_connections = max_connections
        self._slots = asyncio.Semaphore(max_connections)
        self._queue: list[tuple[tuple[Any, ...], asyncio.Future[Any]]] = []
        self._sha = hashlib.sha1(_SCRIPT.encode()).hexdigest()
        self._answered = float("-inf")  # loop time of the last call the store answered
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
                    self.url, decode_responses=True,
                    socket_timeout=_SOCKET_FACTOR * self.timeout,
                    socket_connect_timeout=_SOCKET_FACTOR * self.timeout)
                try:
                    await cluster.initialize()
                except BaseException:
                    await cluster.aclose()
                    raise  # not checked: the next call tries again
                plain, self.redis = self.redis, cluster
                await plain.aclose()
            self._checked = True

    async def warm(self) -> None:
        """Find the topology and open every connection now, at start-up: opened during the
        first burst instead, each connect waits its turn under the client's pool lock on a
        loop that is busy with the burst, and the burst's first pipelines wait for them."""
        await asyncio.gather(*(self._call(lambda: self.redis.ping())
                               for _ in range(self.max_connections)))
        await self._call(lambda: self.redis.script_load(_SCRIPT))

    async def _call(self, op: Callable[[], Awaitable[T]]) -> T:
        """Run `op` on a free connection within the deadline; any failure is StoreUnavailable."""
        try:
            if not self._checked:  # once: the topology (a cluster's slots) takes round trips
                async with Deadline(10 * self.timeout):
                    await self._ready()
            async with Deadline(self.timeout, self._answered_at), self._slots:
                result = await op()
            self._answered = asyncio.get_running_loop().time()
        except Exception as exc:
            # Any trouble out of the client (Redis gone, slow, MOVED, OOM, read-only, or a
            # connection the client itself broke) is the store being away: the admission
            # policy (fail closed or open) decides, never a 500. Cancellation is not an
            # Exception and passes through.
            metrics.store_result(False)
            if not isinstance(exc, RedisError | OSError | TimeoutError):
                log.warning("quota store: unexpected %s from the Redis client", type(exc).__name__,
                            exc_info=exc)
            raise StoreUnavailable(f"redis: {type(exc).__name__}") from None
        metrics.store_result(True)
        return result

    def _answered_at(self) -> float:
        return self._answered

    async def _command(self, *args: Any) -> Any:
        """One command, sent in this loop turn's pipeline."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._queue.append((args, future))
        if len(self._queue) == 1:
            loop.call_soon(self._flush)
        return await future

    def _flush(self) -> None:
        queue, self._queue = self._queue, []
        for i in range(0, len(queue), self.batch):
            background(self._pipeline(queue[i:i + self.batch]))

    async def _pipeline(self, batch: list[tuple[tuple[Any, ...], asyncio.Future[Any]]]) -> None:
        try:
            results = await self._call(lambda: self._execute([args for args, _ in batch]))
        except StoreUnavailable as exc:
            results = [exc] * len(batch)
        for (_, future), result in zip(batch, results, strict=True):
            if future.done():
                continue  # its caller gave up (cancelled)
            if isinstance(result, Exception):
                error = result if isinstance(result, StoreUnavailable) else \
                    StoreUnavailable(f"redis: {type(result).__name__}")
                future.set_exception(error)
            else:
                future.set_result(result)

    async def _execute(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        results = await self._send(commands)
        # A Redis restarted (or failed over) has forgotten the script: load it, send those again.
        missing = [i for i, r in enumerate(results) if isinstance(r, NoScriptError)]
        if missing:
            await self.redis.script_load(_SCRIPT)
            again = await self._send([commands[i] for i in missing])
            for i, result in zip(missing, again, strict=True):
                results[i] = result
        return results

    async def _send(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        async with self.redis.pipeline(transaction=False) as pipe:
            for command in commands:
                pipe.execute_command(*command)
            return await pipe.execute(raise_on_error=False)

    async def _run(self, key_id: str, *args: object) -> Any:
        keys = _keys(key_id)
        return await self._command("EVALSHA", self._sha, len(keys), *keys, *args)

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
        raw = await self._command("HGETALL", _keys(key_id)[0])
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

    async def renew(self, key_id: str, leases: Sequence[str]) -> None:
        for i in range(0, len(leases), 1000):  # bounded script arguments
            await self._run(key_id, "renew", self.lease_ttl_ms, *leases[i:i + 1000])

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

