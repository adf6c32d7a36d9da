"""Admission on the in-process store (gateway.quota.memory): the same interface the routes use,
no Redis and no server. The Redis store passes the same contract in tests/contract."""

from __future__ import annotations

import pytest

from gateway.admission import ANONYMOUS, Admission, ImageRequest, Outcome, QuotaAdmission
from gateway.catalog import ModelSpec
from gateway.errors import NotFound, QuotaExceeded, RateLimited, Unauthorized
from gateway.keys import KeyRecord, Limits
from gateway.quota.memory import MemoryStore

SPEC = ModelSpec(name="gpt-image-1")


async def _keyed(limits: Limits, models: tuple[str, ...] = ()
                 ) -> tuple[QuotaAdmission, MemoryStore, KeyRecord, str]:
    store = MemoryStore(lease_ttl_ms=60_000)
    record, secret = KeyRecord.new("unit", limits, models)
    await store.put_key(record)
    admission = QuotaAdmission(store, fail_open=False, cache_seconds=60, lease_ttl_seconds=60)
    return admission, store, record, secret


async def test_a_key_is_known_by_its_secret_only() -> None:
    admission, _, record, secret = await _keyed(Limits(), models=("gpt-image-1",))
    principal = await admission.authenticate(f"Bearer {secret}")
    assert (principal.key_id, principal.name, principal.models) == \
        (record.id, "unit", ("gpt-image-1",))
    for wrong in (None, "Bearer sk-gw-nope", f"Basic {secret}", secret):
        with pytest.raises(Unauthorized):
            await admission.authenticate(wrong)
    admission.renewer.stop()


async def test_images_per_day_admit_exactly_what_fits_and_answers_settle_them() -> None:
    admission, _, _, secret = await _keyed(Limits(images_per_day=5))
    principal = await admission.authenticate(f"Bearer {secret}")
    first = await admission.admit(principal, ImageRequest("r1", SPEC, 2, False))
    second = await admission.admit(principal, ImageRequest("r2", SPEC, 3, False))
    assert second.headers["x-ratelimit-remaining-images"] == "0"
    with pytest.raises(QuotaExceeded) as caught:
        await admission.admit(principal, ImageRequest("r3", SPEC, 1, False))
    assert caught.value.headers["x-should-retry"] == "false"
    # The first delivered one image of two; the second never reached the upstream.
    await first.finish(Outcome(answered=True, status=200, images=1))
    await second.finish(Outcome(answered=False))
    await first.finish(Outcome(answered=True, status=200, images=1))  # once only
    usage = await admission.usage(principal)
    assert usage is not None and usage.windows["images"].used == 1 and usage.in_flight == 0
    admission.renewer.stop()


async def test_concurrency_is_a_slot_given_back_at_finish() -> None:
    admission, _, _, secret = await _keyed(Limits(max_concurrent=1))
    principal = await admission.authenticate(f"Bearer {secret}")
    ticket = await admission.admit(principal, ImageRequest("r1", SPEC, 1, False))
    with pytest.raises(RateLimited):
        await admission.admit(principal, ImageRequest("r2", SPEC, 1, False))
    await ticket.finish(Outcome(answered=False))
    await (await admission.admit(principal, ImageRequest("r3", SPEC, 1, False))).finish(
        Outcome(answered=False))
    admission.renewer.stop()


async def test_the_open_gateway_has_the_same_interface() -> None:
    admission = Admission()
    principal = await admission.authenticate(None)
    assert principal is ANONYMOUS and principal.key_id is None and principal.models == ()
    ticket = await admission.admit(principal, ImageRequest("r", SPEC, 1, False))
    await ticket.extend(3)
    await ticket.finish(Outcome(answered=True, status=200, images=1))
    assert await admission.headers_for(principal) == {}
    assert await admission.ready() == (True, "ok") and admission.store is None
    with pytest.raises(NotFound):
        await admission.usage(principal)
