"""The quota-store contract: the Redis store (on a real redis-server this suite starts) and the
in-process store must behave the same, to the image."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import redis.asyncio
from pytest_redis import factories
from redis.asyncio.cluster import RedisCluster as RedisClusterType

from gateway.keys import KeyRecord, Limits
from gateway.quota.base import (
    CONCURRENCY,
    IMAGES,
    MODEL,
    OK,
    RPM,
    TOKENS,
    UNKNOWN_KEY,
    Decision,
    QuotaStore,
    StoreUnavailable,
)
from gateway.quota.memory import MemoryStore
from gateway.quota.redis_store import Deadline, RedisStore
from tests.support import redis_nodes

redis_server = factories.redis_proc(port=None)

MakeStore = Callable[..., QuotaStore]
TOPOLOGIES = ("memory", "redis", "cluster", "sentinel")


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with redis_nodes.cluster(tmp_path_factory.mktemp("cluster")) as url:
        yield url


@pytest.fixture(scope="session")
def redis_sentinel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with redis_nodes.sentinel(tmp_path_factory.mktemp("sentinel")) as url:
        yield url


@pytest.fixture(params=TOPOLOGIES)
async def make_store(request: pytest.FixtureRequest) -> AsyncIterator[MakeStore]:
    stores: list[QuotaStore] = []

    def make(lease_ttl_ms: int = 60_000) -> QuotaStore:
        store = build(request, request.param, lease_ttl_ms)
        stores.append(store)
        return store

    yield make
    for store in stores:
        await close(store)


def build(request: pytest.FixtureRequest, topology: str, lease_ttl_ms: int = 60_000) -> QuotaStore:
    if topology == "memory":
        return MemoryStore(lease_ttl_ms=lease_ttl_ms)
    if topology == "redis":
        proc = request.getfixturevalue("redis_server")
        url = f"redis://{proc.host}:{proc.port}/0"
    else:  # one node's URL: the store finds out it is a cluster / asks the Sentinel
        url = request.getfixturevalue(f"redis_{topology}")
    return RedisStore(url, timeout=1.0, lease_ttl_ms=lease_ttl_ms)


async def close(store: QuotaStore) -> None:
    if isinstance(store, RedisStore):
        await store.redis.flushall()  # our own redis-servers, started for this suite
    await store.aclose()


async def new_key(store: QuotaStore, **limits: int) -> tuple[KeyRecord, str]:
    models = tuple(str(m) for m in limits.pop("models", ()))  # type: ignore[call-overload]
    record, secret = KeyRecord.new("test", Limits(**limits), models=models,
                                   metadata={"team": "a"})
    await store.put_key(record)
    return record, secret


def lease(i: int | str = 0) -> str:
    return f"lease-{i}-{time.monotonic_ns()}"


async def test_keys_round_trip(make_store: MakeStore) -> None:
    store = make_store()
    record, _ = await new_key(store, rpm=5, images_per_day=10, models=("gpt-image-1",))
    assert await store.get_key(record.id) == record
    assert record.id in [r.id for r in await store.list_keys()]
    assert await store.get_key("key_0000000000000000") is None


async def test_unknown_revoked_and_model(make_store: MakeStore) -> None:
    store = make_store()
    record, _ = await new_key(store, models=("gpt-image-1",))
    assert (await store.admit("0" * 64, "gpt-image-1", 1, lease())).status == UNKNOWN_KEY
    assert (await store.admit(record.hash, "dall-e-2", 1, lease())).status == MODEL
    assert (await store.admit(record.hash, "gpt-image-1", 1, lease())).status == OK
    await store.put_key(replace(record, status="revoked"))
    assert (await store.admit(record.hash, "gpt-image-1", 1, lease())).status == UNKNOWN_KEY


async def test_images_per_day_are_reserved_exactly(make_store: MakeStore) -> None:
    store = make_store()
    record, _ = await new_key(store, images_per_day=5)
    first = await store.admit(record.hash, "m", 2, "a")
    assert first.status == OK and first.windows["images"].remaining == 3
    assert (await store.admit(record.hash, "m", 2, "b")).status == OK
    refused = await store.admit(record.hash, "m", 2, "c")
    assert refused.status == IMAGES and refused.windows["images"].used == 4
    assert 0 < refused.retry_after_ms <= 86_400_000
    assert (await store.admit(record.hash, "m", 1, "d")).status == OK
    # The upstream failed for "a": its two images come back; "b" answered with one image.
    await store.settle(record.id, "a", answered=False, images=0, tokens=0)
    await store.settle(record.id, "b", answered=True, images=1, tokens=0)
    usage = await store.usage(record.id)
    assert usage is not None and usage.windows["images"].used == 2 and usage.in_flight == 1


async def test_concurrent_admissions_never_overdraw(make_store: MakeStore) -> None:
    store = make_store()
    record, _ = await new_key(store, images_per_day=7)
    results = await asyncio.gather(*(store.admit(record.hash, "m", 1, lease(i)) for i in range(40)))
    assert [r.status for r in results].count(OK) == 7
    assert {r.status for r in results} == {OK, IMAGES}


async def test_tokens_admit_until_spent(make_store: MakeStore) -> None:
    store = make_store()
    record, _ = await new_key(store, tokens_per_month=1000)
    assert (await store.admit(record.hash, "m", 1, "a")).status == OK
    await store.settle(record.id, "a", answered=True, images=1, tokens=999)
    assert (await store.admit(record.hash, "m", 1, "b")).status == OK  # 1 token left: admitted
    await store.settle(record.id, "b", answered=True, images=1, tokens=250)  # the last overruns
    refused = await store.admit(record.hash, "m", 1, "c")
    assert refused.status == TOKENS and refused.windows["tokens"].used == 1249
    assert refused.retry_after_ms <= 31 * 86_400_000
    await store.settle(record.id, "x", answered=False, images=0, tokens=500)  # no answer: none
    usage = await store.usage(record.id)
    assert usage is not None and usage.windows["tokens"].used == 1249


async def test_concurrency_slots(make_store: MakeStore) -> None:
    store = make_store()
    record, _ = await new_key(store, max_concurrent=2)
    assert (await store.admit(record.hash, "m", 1, "a")).status == OK
    assert (await store.admit(record.hash, "m", 1, "b")).status == OK
    refused = await store.admit(record.hash, "m", 1, "c")
    assert refused.status == CONCURRENCY and refused.retry_after_ms > 0
    await store.settle(record.id, "a", answered=True, images=1, tokens=0)
    assert (await store.admit(record.hash, "m", 1, "d")).status == OK


def requests(decision: Decision) -> tuple[int, int, int]:
    w = decision.windows["requests"]
    return w.used, w.remaining, w.reset_ms


async def test_requests_per_minute_are_a_sliding_window(make_store: MakeStore) -> None:
    store = make_store()
    record, _ = await new_key(store, rpm=3)
    first = await store.admit(record.hash, "m", 1, lease(1))
    used, remaining, reset = requests(first)
    assert first.status == OK and (used, remaining) == (1, 2)  # the answer counts itself
    assert 59_000 < reset <= 60_000  # when this one leaves the window
    await asyncio.sleep(0.5)
    second, third = [await store.admit(record.hash, "m", 1, lease(i)) for i in (2, 3)]
    assert (second.status, third.status) == (OK, OK)
    assert requests(second)[:2] == (2, 1) and requests(third)[:2] == (3, 0)
    assert 58_500 < requests(third)[2] <= 59_500  # still the oldest's departure, not the newest
    refused = await store.admit(record.hash, "m", 1, lease(4))
    assert refused.status == RPM
    assert refused.retry_after_ms == requests(refused)[2]  # retry exactly when room is made
    assert 58_500 < refused.retry_after_ms <= 59_500
    usage = await store.usage(record.id)
    assert usage is not None
    w = usage.windows["requests"]
    assert (w.limit, w.used, w.remaining) == (3, 3, 0)  # the refusal was not counted
    assert refused.retry_after_ms - 100 <= w.reset_ms <= refused.retry_after_ms


async def test_a_changed_rpm_applies_to_the_next_request(make_store: MakeStore) -> None:
    store = make_store()
    record, _ = await new_key(store, rpm=2)
    assert (await store.admit(record.hash, "m", 1, lease(1))).status == OK
    await asyncio.sleep(0.5)
    assert (await store.admit(record.hash, "m", 1, lease(2))).status == OK
    assert (await store.admit(record.hash, "m", 1, lease(3))).status == RPM
    await store.update_key(record.id, replace(record, limits=Limits(rpm=3)))
    raised = await store.admit(record.hash, "m", 1, lease(4))
    assert raised.status == OK and requests(raised)[:2] == (3, 0)
    # Lowered below what the window holds: remaining never negative, and the wait is until
    # enough have left for one more (the newest of the three), not until the oldest leaves.
    await store.update_key(record.id, replace(record, limits=Limits(rpm=1)))
    lowered = await store.admit(record.hash, "m", 1, lease(5))
    assert lowered.status == RPM and requests(lowered)[:2] == (3, 0)
    assert 59_700 < lowered.retry_after_ms <= 60_000
    await store.update_key(record.id, replace(record, limits=Limits(rpm=0)))
    unlimited = await store.admit(record.hash, "m", 1, lease(6))
    assert unlimited.status == OK and "requests" not in unlimited.windows


@pytest.fixture
async def every_store(request: pytest.FixtureRequest) -> AsyncIterator[list[QuotaStore]]:
    stores = [build(request, topology) for topology in TOPOLOGIES]
    yield stores
    for store in stores:
        await close(store)


async def test_the_requests_window_slides_exactly(every_store: list[QuotaStore]) -> None:
    """A minute of real time, every topology at once: an admission leaves the window exactly
    60 s after it was made, and the one refused in between is told exactly when."""

    async def scenario(store: QuotaStore) -> None:
        record, _ = await new_key(store, rpm=3)
        t0 = time.monotonic()
        assert (await store.admit(record.hash, "m", 1, lease("a"))).status == OK
        await asyncio.sleep(1.0)
        assert [(await store.admit(record.hash, "m", 1, lease(i))).status for i in "bcd"] == [
            OK, OK, RPM]
        while time.monotonic() < t0 + 60.2:  # "a" has left then; "b" and "c" leave at 61
            # Not idle meanwhile: pytest-redis's server closes connections idle for 30 s.
            await asyncio.sleep(min(10.0, t0 + 60.2 - time.monotonic()))
            await store.usage(record.id)
        after = await store.admit(record.hash, "m", 1, lease("e"))
        assert after.status == OK and requests(after)[:2] == (3, 0)
        refused = await store.admit(record.hash, "m", 1, lease("f"))
        assert refused.status == RPM and 500 < refused.retry_after_ms <= 850
        await asyncio.sleep(refused.retry_after_ms / 1000 + 0.05)
        assert [(await store.admit(record.hash, "m", 1, lease(i))).status for i in "ghi"] == [
            OK, OK, RPM]
        usage = await store.usage(record.id)
        assert usage is not None and usage.windows["requests"].used == 3  # e, g, h

    await asyncio.gather(*(scenario(store) for store in every_store))


async def test_extend_adds_to_a_live_reservation(make_store: MakeStore) -> None:
    store = make_store(lease_ttl_ms=300)
    record, _ = await new_key(store, images_per_day=5)
    assert (await store.admit(record.hash, "m", 2, "a")).status == OK
    grown = await store.extend(record.id, "a", 2)
    assert grown.status == OK and grown.windows["images"].used == 4
    assert grown.windows["images"].remaining == 1
    refused = await store.extend(record.id, "a", 2)  # 6 > 5: refused, nothing changes
    assert refused.status == IMAGES and refused.windows["images"].used == 4
    assert 0 < refused.retry_after_ms <= 86_400_000
    assert (await store.extend(record.id, "never-admitted", 1)).status == UNKNOWN_KEY
    # The upstream failed: the whole reservation, n + extra, comes back.
    await store.settle(record.id, "a", answered=False, images=0, tokens=0)
    usage = await store.usage(record.id)
    assert usage is not None and usage.windows["images"].used == 0 and usage.in_flight == 0
    assert (await store.extend(record.id, "a", 1)).status == UNKNOWN_KEY  # settled: gone

    # Answered: what the answer carried is charged in place of the grown reservation.
    assert (await store.admit(record.hash, "m", 1, "b")).status == OK
    assert (await store.extend(record.id, "b", 3)).status == OK
    assert (await store.admit(record.hash, "m", 2, "c")).status == IMAGES  # 4 held + 2 > 5
    await store.settle(record.id, "b", answered=True, images=3, tokens=0)
    usage = await store.usage(record.id)
    assert usage is not None and usage.windows["images"].used == 3

    # A lease that expired gave its reservation back: there is nothing left to extend.
    assert (await store.admit(record.hash, "m", 1, "lost")).status == OK
    await asyncio.sleep(0.4)
    assert (await store.extend(record.id, "lost", 1)).status == UNKNOWN_KEY
    usage = await store.usage(record.id)
    assert usage is not None and usage.windows["images"].used == 3


async def test_extend_without_an_images_limit(make_store: MakeStore) -> None:
    store = make_store()
    record, _ = await new_key(store, rpm=10)
    assert (await store.admit(record.hash, "m", 1, "a")).status == OK
    grown = await store.extend(record.id, "a", 100)
    assert grown.status == OK and grown.windows["images"].used == 101
    assert requests(grown)[:2] == (1, 9)  # extending is not another request
    await store.settle(record.id, "a", answered=True, images=101, tokens=0)
    usage = await store.usage(record.id)
    assert usage is not None and usage.windows["images"].used == 101


async def test_unsettled_leases_expire_and_heal(make_store: MakeStore) -> None:
    store = make_store(lease_ttl_ms=300)
    record, _ = await new_key(store, images_per_day=3, max_concurrent=1)
    assert (await store.admit(record.hash, "m", 3, "lost")).status == OK  # never settled
    assert (await store.admit(record.hash, "m", 1, "b")).status == CONCURRENCY
    await asyncio.sleep(0.4)
    assert (await store.admit(record.hash, "m", 3, "c")).status == OK
    # The lost request did get its answer after all: its images are counted, late.
    await store.settle(record.id, "lost", answered=True, images=3, tokens=0)
    usage = await store.usage(record.id)
    assert usage is not None and usage.windows["images"].used == 6 and usage.in_flight == 1


async def test_a_settle_retried_counts_once(make_store: MakeStore) -> None:
    """A settle whose reply was lost is retried: the store must count it exactly once, whether
    the lease was still held, had expired meanwhile, or never existed."""
    store = make_store(lease_ttl_ms=300)
    record, _ = await new_key(store, images_per_day=100)
    assert (await store.admit(record.hash, "m", 2, "held")).status == OK
    for _ in range(3):
        await store.settle(record.id, "held", answered=True, images=2, tokens=100)
    assert (await store.admit(record.hash, "m", 4, "late")).status == OK
    await asyncio.sleep(0.4)
    await store.usage(record.id)  # the expired lease is swept: its 4 images given back
    for _ in range(3):
        await store.settle(record.id, "late", answered=True, images=3, tokens=10)
    await store.settle(record.id, "never-admitted", answered=True, images=5, tokens=5)
    usage = await store.usage(record.id)
    assert usage is not None and usage.in_flight == 0
    assert (usage.windows["images"].used, usage.windows["tokens"].used) == (5, 110)


async def test_an_update_never_undoes_a_revocation(make_store: MakeStore) -> None:
    store = make_store()
    record, _ = await new_key(store, rpm=5)
    stale = await store.get_key(record.id)  # an update read the record before the revoke
    await store.update_key(record.id, replace(record, status="revoked"), status_only=True)
    assert stale is not None
    await store.update_key(record.id, replace(stale, limits=Limits(rpm=20)))
    now = await store.get_key(record.id)
    assert now is not None and (now.status, now.limits.rpm) == ("revoked", 20)
    assert (await store.admit(record.hash, "m", 1, lease())).status == UNKNOWN_KEY


async def test_renewed_leases_do_not_expire(make_store: MakeStore) -> None:
    store = make_store(lease_ttl_ms=300)
    record, _ = await new_key(store, max_concurrent=1)
    assert (await store.admit(record.hash, "m", 1, "long")).status == OK
    for _ in range(3):
        await asyncio.sleep(0.2)
        await store.renew(record.id, ["long", "never-admitted"])
    assert (await store.admit(record.hash, "m", 1, "other")).status == CONCURRENCY
    # Renewing creates nothing: a lease that was never admitted holds no slot.
    assert (await store.usage(record.id)).in_flight == 1
    await store.settle(record.id, "long", answered=True, images=1, tokens=0)
    assert (await store.admit(record.hash, "m", 1, "other")).status == OK


async def test_a_cluster_is_recognised_from_one_node(make_store: MakeStore,
                                                     request: pytest.FixtureRequest) -> None:
    store = make_store()
    record, _ = await new_key(store, images_per_day=1)  # the first call decides
    if "[cluster]" in request.node.name:
        from redis.asyncio.cluster import RedisCluster

        assert isinstance(store, RedisStore) and isinstance(store.redis, RedisCluster)
        slots = {await store.redis.cluster_keyslot(k) for k in redis_store_keys(record.id)}
        assert len(slots) == 1  # every key of one API key in one slot: the script runs
    assert (await store.admit(record.hash, "m", 1, "a")).status == OK


def redis_store_keys(key_id: str) -> list[str]:
    from gateway.quota.redis_store import _keys

    return _keys(key_id)


# --------------------------------------------------------------- the Redis store under a burst
@pytest.fixture(params=("redis", "cluster"))
async def redis_store(request: pytest.FixtureRequest) -> AsyncIterator[RedisStore]:
    store = build(request, request.param)
    assert isinstance(store, RedisStore)
    yield store
    await close(store)


async def server_stats(store: RedisStore) -> tuple[int, int, int]:
    """(EVALSHA calls that ran, connections ever accepted, nodes), over a cluster's nodes."""
    if isinstance(store.redis, RedisClusterType):
        every = {"target_nodes": RedisClusterType.ALL_NODES}
        stats = await store.redis.info("commandstats", **every)
        conns = await store.redis.info("stats", **every)
    else:
        stats = {"one": await store.redis.info("commandstats")}
        conns = {"one": await store.redis.info("stats")}
    evalsha = sum(e["calls"] - e.get("failed_calls", 0) - e.get("rejected_calls", 0)
                  for node in stats.values() if (e := node.get("cmdstat_evalsha")))
    accepted = sum(node["total_connections_received"] for node in conns.values())
    return evalsha, accepted, len(conns)


async def test_a_burst_shares_pipelines_on_few_connections_and_stays_exact(
        redis_store: RedisStore) -> None:
    """2,000 admissions at once on a store allowed two connections: every one decided exactly
    (1,500 images fit), each sent once, over at most two connections per node (plus the few
    that finding a cluster takes), not one per waiting request; a warmed store (as at start-up)
    opens none during the burst on a single Redis."""
    await new_key(redis_store)  # the checking store is connected (and knows its topology)
    calls, accepted, nodes = await server_stats(redis_store)
    store = RedisStore(redis_store.url, timeout=1.0, lease_ttl_ms=60_000, max_connections=2)
    try:
        record, _ = await new_key(store, images_per_day=1500)
        await store.warm()
        _, warmed, _ = await server_stats(redis_store)
        results = await asyncio.gather(
            *(store.admit(record.hash, "m", 1, lease(i)) for i in range(2000)))
    finally:
        await store.aclose()
    assert [r.status for r in results].count(OK) == 1500
    assert {r.status for r in results} == {OK, IMAGES}
    calls_after, accepted_after, _ = await server_stats(redis_store)
    assert calls_after - calls == 2000  # each sent once (a NOSCRIPT retry ran only once)
    assert accepted_after - accepted <= 2 * nodes + 4
    if nodes == 1:
        assert accepted_after == warmed


async def test_a_busy_loop_does_not_make_a_healthy_redis_time_out(tmp_path: Path) -> None:
    """Redis answers in 50 ms, but the loop is busy from 20 ms to 420 ms (a burst of requests
    being parsed), past the 100 ms timeout: the answer is in the socket when the loop comes
    back, and the call succeeds, where a plain timeout would report a healthy store away."""
    with redis_nodes.single(tmp_path, "--enable-debug-command", "local") as url:
        store = RedisStore(url, timeout=0.1, lease_ttl_ms=60_000)
        sleeper = redis.asyncio.Redis.from_url(url)
        try:
            record, _ = await new_key(store, images_per_day=10)
            await store.ping()  # connected
            slow = asyncio.ensure_future(sleeper.execute_command("DEBUG", "SLEEP", "0.05"))
            await asyncio.sleep(0.005)
            loop = asyncio.get_running_loop()
            loop.call_later(0.02, time.sleep, 0.4)
            assert (await store.admit(record.hash, "m", 1, lease())).status == OK
            await slow
        finally:
            await sleeper.aclose()
            await store.aclose()


async def test_the_deadline_waits_for_the_loop_to_read_what_arrived() -> None:
    """The same at the level of the Deadline alone, on a socket pair: data arrives while the
    loop is blocked past the deadline; it is read, not timed out."""
    ours, theirs = socket.socketpair()
    reader, writer = await asyncio.open_connection(sock=ours)
    try:
        threading.Timer(0.05, theirs.send, (b"answer",)).start()
        asyncio.get_running_loop().call_later(0.02, time.sleep, 0.4)
        async with Deadline(0.1):
            assert await reader.readexactly(6) == b"answer"
        with pytest.raises(TimeoutError):  # nothing arrives, the loop is free: on time
            async with Deadline(0.05):
                await reader.read(1)
    finally:
        writer.close()
        theirs.close()
async def test_a_silent_redis_still_times_out(tmp_path: Path) -> None:
    """Put off only while the loop is busy: a Redis that does not answer is away after the
    timeout, however many calls wait."""
    with redis_nodes.single(tmp_path, "--enable-debug-command", "local") as url:
        store = RedisStore(url, timeout=0.2, lease_ttl_ms=60_000)
        try:
            record, _ = await new_key(store, images_per_day=10)
            sleeper = redis.asyncio.Redis.from_url(url)
            sleeping = asyncio.ensure_future(sleeper.execute_command("DEBUG", "SLEEP", "1.5"))
            await asyncio.sleep(0.05)
            loop = asyncio.get_running_loop()
            start = loop.time()
            results = await asyncio.gather(
                *(store.admit(record.hash, "m", 1, lease(i)) for i in range(500)),
                return_exceptions=True)
            assert all(isinstance(r, StoreUnavailable) for r in results)
            assert loop.time() - start < 0.6
            await sleeping
            await sleeper.aclose()
            assert (await store.admit(record.hash, "m", 1, lease())).status == OK  # recovered
        finally:
            await store.aclose()


async def test_a_redis_that_forgot_the_script_is_given_it_again(redis_store: RedisStore) -> None:
    record, _ = await new_key(redis_store, images_per_day=10)
    assert (await redis_store.admit(record.hash, "m", 1, lease())).status == OK
    await redis_store.redis.script_flush()  # as after a restart without persistence
    results = await asyncio.gather(*(redis_store.admit(record.hash, "m", 1, lease(i))
                                     for i in range(5)))
    assert [r.status for r in results] == [OK] * 5
    usage = await redis_store.usage(record.id)
    assert usage is not None and usage.windows["images"].used == 6
