"""The quota-store contract: the Redis store (on a real redis-server this suite starts) and the
in-process store must behave the same, to the image."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import replace

import pytest
from pytest_redis import factories

from gateway.keys import KeyRecord, Limits
from gateway.quota.base import CONCURRENCY, IMAGES, MODEL, OK, RPM, TOKENS, UNKNOWN_KEY, QuotaStore
from gateway.quota.memory import MemoryStore
from gateway.quota.redis_store import RedisStore
from tests import redis_nodes

redis_server = factories.redis_proc(port=None)

MakeStore = Callable[..., QuotaStore]


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with redis_nodes.cluster(tmp_path_factory.mktemp("cluster")) as url:
        yield url


@pytest.fixture(scope="session")
def redis_sentinel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with redis_nodes.sentinel(tmp_path_factory.mktemp("sentinel")) as url:
        yield url


@pytest.fixture(params=["memory", "redis", "cluster", "sentinel"])
async def make_store(request: pytest.FixtureRequest) -> AsyncIterator[MakeStore]:
    stores: list[QuotaStore] = []

    def make(lease_ttl_ms: int = 60_000, rpm_burst_seconds: float = 1.0) -> QuotaStore:
        if request.param == "memory":
            store: QuotaStore = MemoryStore(lease_ttl_ms=lease_ttl_ms,
                                            rpm_burst_seconds=rpm_burst_seconds)
        else:
            if request.param == "redis":
                proc = request.getfixturevalue("redis_server")
                url = f"redis://{proc.host}:{proc.port}/0"
            else:  # one node's URL: the store finds out it is a cluster / asks the Sentinel
                url = request.getfixturevalue(f"redis_{request.param}")
            store = RedisStore(url, timeout=1.0, lease_ttl_ms=lease_ttl_ms,
                               rpm_burst_seconds=rpm_burst_seconds)
        stores.append(store)
        return store

    yield make
    for store in stores:
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


async def test_requests_per_minute_are_smooth(make_store: MakeStore) -> None:
    store = make_store(rpm_burst_seconds=1.0)
    record, _ = await new_key(store, rpm=120)  # one per 500 ms, a burst of 2
    statuses = [(await store.admit(record.hash, "m", 1, lease(i))) for i in range(3)]
    assert [d.status for d in statuses] == [OK, OK, RPM]
    assert statuses[0].windows["requests"].remaining == 1
    assert 0 < statuses[2].retry_after_ms <= 500
    await asyncio.sleep(statuses[2].retry_after_ms / 1000 + 0.02)
    assert (await store.admit(record.hash, "m", 1, lease())).status == OK
    assert (await store.admit(record.hash, "m", 1, lease())).status == RPM  # no double burst


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


async def test_burst_rounds_half_up(make_store: MakeStore) -> None:
    store = make_store(rpm_burst_seconds=10.0)
    record, _ = await new_key(store, rpm=15)  # 2.5 requests' worth of burst: 3, in both stores
    statuses = [(await store.admit(record.hash, "m", 1, lease(i))).status for i in range(4)]
    assert statuses == [OK, OK, OK, RPM]


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
        await store.renew(record.id, "long")
    assert (await store.admit(record.hash, "m", 1, "other")).status == CONCURRENCY
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
