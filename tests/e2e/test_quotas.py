"""Keys and quotas end to end: gateway processes on a real redis-server (started by this suite),
the fake upstream, and the official SDK as the client."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import math
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import replace

import httpx
import openai
import pytest

from gateway.admission import Admission, ImageRequest, Outcome, QuotaAdmission, QuotaTicket, Ticket
from gateway.catalog import Catalog, ModelSpec
from gateway.errors import QuotaExceeded, ServiceUnavailable
from gateway.keys import KeyRecord, Limits
from gateway.quota.redis_store import RedisStore
from tests.conftest import GatewayProcess
from tests.support.fake_upstream import FakeUpstream
from tests.support.helpers import edit, edit_head, make_key, multipart, put_key, suite_settings, usage_of
from tests.support.images import png


def sdk(gw: GatewayProcess, secret: str, **kwargs: object) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gw.url}/v1", api_key=secret, max_retries=0,
                         **kwargs)  # type: ignore[arg-type]


def test_keys_are_required_and_checked_first(keyed, redis_url: str, upstream: FakeUpstream) -> None:
    gw = keyed()
    _record, secret = make_key(redis_url, models=("gpt-image-1",))
    for key in ("sk-client", "sk-gw-" + "x" * 43):
        with pytest.raises(openai.AuthenticationError) as info:
            edit(sdk(gw, key), size="999x999")  # 401 comes before the bad size
        assert info.value.code == "invalid_api_key"
    with pytest.raises(openai.PermissionDeniedError) as denied:
        edit(sdk(gw, secret), model="dall-e-2", size="999x999")  # 403 before the bad size
    assert denied.value.param == "model"
    with pytest.raises(openai.BadRequestError):
        edit(sdk(gw, secret), size="999x999")
    assert upstream.records == []
    edit(sdk(gw, secret))
    assert len(upstream.completed) == 1
    assert secret not in str(upstream.records[0].headers)


def test_budget_is_exact_across_two_instances(keyed, redis_url: str, upstream: FakeUpstream) -> None:
    gateways = [keyed(), keyed()]
    _record, secret = make_key(redis_url, images_per_day=5)

    def one(i: int) -> str:
        try:
            edit(sdk(gateways[i % 2], secret))
            return "ok"
        except openai.RateLimitError as exc:
            assert exc.code == "insufficient_quota"
            assert exc.response.headers["x-should-retry"] == "false"
            assert exc.response.headers["x-ratelimit-limit-images"] == "5"
            assert int(exc.response.headers["x-ratelimit-remaining-images"]) <= 1
            return "quota"

    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        results = list(pool.map(one, range(24)))
    assert results.count("ok") == 5 and results.count("quota") == 19
    assert len(upstream.completed) == 5
    assert usage_of(gateways[1].url, secret)["limits"]["images"]["used"] == 5


def test_sdk_does_not_retry_a_spent_budget(keyed, redis_url: str, upstream: FakeUpstream) -> None:
    gw = keyed()
    _, secret = make_key(redis_url, images_per_day=1)
    sent: list[str] = []
    client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=secret, max_retries=2,
                           http_client=openai.DefaultHttpxClient(
                               event_hooks={"request": [lambda r: sent.append(r.url.path)]}))
    edit(client)
    with pytest.raises(openai.RateLimitError):
        edit(client)
    assert len(sent) == 2  # the refused call went out once: no retries, no re-uploads


def test_reservations_come_back_when_no_answer(keyed, redis_url: str, upstream: FakeUpstream) -> None:
    gw = keyed()
    _, secret = make_key(redis_url, images_per_day=4)
    upstream.behaviour.status = 500
    with pytest.raises(openai.InternalServerError):
        edit(sdk(gw, secret), n=3)
    assert usage_of(gw.url, secret)["limits"]["images"]["used"] == 0

    # The client leaves mid-upload, the upstream request under way: hung up, given back. (Once
    # the upstream has the whole request it is charged: tests/chaos/test_hardening.py.)
    upstream.reset()
    body, ctype = multipart([("model", "gpt-image-1", None), ("prompt", "x", None), ("n", "3", None),
                             ("image", png(size=4_000_000), "a.png")])
    with socket.create_connection(("127.0.0.1", gw.port)) as s:
        s.sendall(edit_head(body, ctype, secret) + body[: len(body) // 2])
        upstream.wait_for(lambda: upstream.records and upstream.records[-1].bytes_received > 0)
    upstream.wait_for(lambda: upstream.records[-1].aborted, timeout=3)
    assert not upstream.records[-1].completed
    deadline = time.monotonic() + 3
    while usage_of(gw.url, secret)["limits"]["images"]["used"] != 0:
        assert time.monotonic() < deadline, "reservation was not given back"
        time.sleep(0.05)
    assert usage_of(gw.url, secret)["in_flight"] == 0


def test_tokens_are_settled_from_the_answer(keyed, redis_url: str, upstream: FakeUpstream) -> None:
    gw = keyed()
    _, secret = make_key(redis_url, tokens_per_month=600)
    raw = sdk(gw, secret).images.with_raw_response.edit(model="gpt-image-1", image=png(), prompt="x")
    assert raw.headers["x-ratelimit-limit-tokens"] == "600"
    assert usage_of(gw.url, secret)["limits"]["tokens"]["used"] == 250  # the JSON answer's usage
    for _ in sdk(gw, secret).images.edit(model="gpt-image-1", image=png(), prompt="x", n=2,
                                         stream=True, partial_images=1):
        pass
    # Two image_edit.completed events of 250 each; partial images carry no usage.
    assert usage_of(gw.url, secret)["limits"]["tokens"]["used"] == 750
    with pytest.raises(openai.RateLimitError) as info:  # spent: the last request overran it
        edit(sdk(gw, secret))
    assert info.value.code == "insufficient_quota"


def seconds(duration: str) -> float:
    """An x-ratelimit-reset-* duration (20ms, 59.981s, 1m0s, 1h2m3s) in seconds."""
    if duration.endswith("ms"):
        return int(duration[:-2]) / 1000
    total, number = 0.0, ""
    for char in duration:
        if char.isdigit() or char == ".":
            number += char
        else:
            total += float(number) * {"h": 3600, "m": 60, "s": 1}[char]
            number = ""
    return total


def test_requests_per_minute(keyed, redis_url: str, upstream: FakeUpstream) -> None:
    """rpm as users read it: rpm requests in any 60 s, what the headers, /v1/usage and
    `gateway keys show` say is what the next request gets, and a changed rpm applies at once."""
    gw = keyed()
    record, secret = make_key(redis_url, rpm=3)
    client = sdk(gw, secret)
    raw = client.images.with_raw_response.edit(model="gpt-image-1", image=png(), prompt="x")
    assert raw.headers["x-ratelimit-limit-requests"] == "3"
    assert raw.headers["x-ratelimit-remaining-requests"] == "2"
    assert 59 < seconds(raw.headers["x-ratelimit-reset-requests"]) <= 60
    with concurrent.futures.ThreadPoolExecutor(2) as pool:  # the other two, at once
        answers = list(pool.map(lambda _: client.images.with_raw_response.edit(
            model="gpt-image-1", image=png(), prompt="x"), range(2)))
    assert sorted(a.headers["x-ratelimit-remaining-requests"] for a in answers) == ["0", "1"]
    with pytest.raises(openai.RateLimitError) as info:
        edit(client)
    headers = info.value.response.headers
    assert info.value.code == "rate_limit_exceeded" and headers["x-ratelimit-remaining-requests"] == "0"
    reset = seconds(headers["x-ratelimit-reset-requests"])
    assert 58 < reset <= 60 and int(headers["retry-after-ms"]) == round(reset * 1000)
    assert int(headers["retry-after"]) == math.ceil(reset)
    requests = usage_of(gw.url, secret)["limits"]["requests"]
    assert (requests["limit"], requests["used"], requests["remaining"]) == (3, 3, 0)
    assert reset - 1 < requests["reset_seconds"] <= reset
    shown = json.loads(ok(keys("show", record.id, "--json", redis_url=redis_url)))
    assert shown["usage"]["limits"]["requests"]["used"] == 3
    assert "requests  3 used, limit 3, 0 remaining" in ok(keys("show", record.id,
                                                               redis_url=redis_url))

    ok(keys("update", record.id, "--rpm", "5", redis_url=redis_url))
    raw = client.images.with_raw_response.edit(model="gpt-image-1", image=png(), prompt="x")
    assert raw.headers["x-ratelimit-limit-requests"] == "5"  # at once, not seconds later
    assert raw.headers["x-ratelimit-remaining-requests"] == "1"
    assert len(upstream.completed) == 4


def keys(*args: str, redis_url: str) -> subprocess.CompletedProcess[str]:
    """`gateway keys ARGS` as an operator runs it, on the Redis at `redis_url`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env["GATEWAY_REDIS_URL"] = redis_url
    return subprocess.run([sys.executable, "-m", "gateway.cli", "keys", *args], env=env,
                          capture_output=True, text=True, timeout=30)


def ok(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_concurrency_limit(keyed, redis_url: str, upstream: FakeUpstream) -> None:
    gw = keyed()
    _, secret = make_key(redis_url, max_concurrent=1)
    upstream.behaviour.delay_headers = 1.0
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        slow = pool.submit(edit, sdk(gw, secret))
        upstream.wait_for(lambda: upstream.records)
        with pytest.raises(openai.RateLimitError) as info:
            edit(sdk(gw, secret))
        assert info.value.response.headers["retry-after-ms"]
        slow.result()
    edit(sdk(gw, secret))  # the slot was released


def test_revocation_reaches_every_instance(keyed, redis_url: str, upstream: FakeUpstream) -> None:
    first, second = keyed(), keyed()
    record, secret = make_key(redis_url)
    edit(sdk(second, secret))  # `second` has the key cached now
    put_key(redis_url, replace(record, status="revoked"))
    time.sleep(1.1)  # records are cached for at most a second
    for gw in (first, second):
        with pytest.raises(openai.AuthenticationError):
            edit(sdk(gw, secret))


def test_redis_outage_fails_closed_then_recovers(keyed, redis_url: str, keys_redis,
                                                 upstream: FakeUpstream) -> None:
    gw = keyed(redis_timeout=0.2)
    _, secret = make_key(redis_url, images_per_day=10)
    edit(sdk(gw, secret))
    keys_redis.stop()
    try:
        t0 = time.monotonic()
        with pytest.raises(openai.APIStatusError) as info:
            edit(sdk(gw, secret))
        assert info.value.status_code == 503 and time.monotonic() - t0 < 2
    finally:
        keys_redis.start()
    # The store forgot everything (no persistence): the key is put back, and serving resumes.
    _record, secret = make_key(redis_url, images_per_day=10)
    edit(sdk(gw, secret))
    assert len(upstream.completed) == 2


def test_redis_outage_can_fail_open(keyed, redis_url: str, keys_redis,
                                    upstream: FakeUpstream) -> None:
    gw = keyed(redis_timeout=0.2, redis_failure="open")
    _, secret = make_key(redis_url, images_per_day=10)
    _, unseen = make_key(redis_url, images_per_day=10)
    edit(sdk(gw, secret))  # seen, so known while Redis is away
    keys_redis.stop()
    try:
        edit(sdk(gw, secret))
        with pytest.raises(openai.APIStatusError) as info:  # never seen: cannot be checked
            edit(sdk(gw, unseen))
        assert info.value.status_code == 503
    finally:
        keys_redis.start()
    assert len(upstream.completed) == 2


def test_in_process_store_from_config(start_gateway: Callable[..., GatewayProcess],
                                      upstream: FakeUpstream) -> None:
    record, secret = KeyRecord.new("local", Limits(images_per_day=2))
    gw = start_gateway(config=f'[keys.{record.id}]\nhash = "{record.hash}"\nname = "local"\n'
                              'images_per_day = 2\n')
    with pytest.raises(openai.AuthenticationError):
        edit(gw.client())
    edit(sdk(gw, secret), n=2)
    with pytest.raises(openai.RateLimitError):
        edit(sdk(gw, secret))
    images = usage_of(gw.url, secret)["limits"]["images"]
    assert (images["limit"], images["used"], images["remaining"]) == (2, 2, 0)
    assert 0 < images["reset_seconds"] <= 86_400


def test_authenticated_refusals_carry_rate_limit_headers(keyed, redis_url: str,
                                                         upstream: FakeUpstream) -> None:
    gw = keyed()
    _, secret = make_key(redis_url, rpm=100, images_per_day=50)
    edit(sdk(gw, secret), n=3)
    with pytest.raises(openai.BadRequestError) as info:
        edit(sdk(gw, secret), size="999x999")
    headers = info.value.response.headers
    assert headers["x-ratelimit-limit-images"] == "50"
    assert headers["x-ratelimit-remaining-images"] == "47"
    assert headers["x-ratelimit-limit-requests"] == "100"
    assert "x-ratelimit-limit-tokens" not in headers  # the key has no token limit


def test_models_list_follows_the_key(keyed, redis_url: str) -> None:
    gw = keyed()
    _, secret = make_key(redis_url, models=("gpt-image-1", "dall-e-2"))
    with pytest.raises(openai.AuthenticationError):
        gw.client().models.list()
    assert {m.id for m in sdk(gw, secret).models.list()} == {"gpt-image-1", "dall-e-2"}
    with pytest.raises(openai.NotFoundError):
        sdk(gw, secret).models.retrieve("gpt-image-2")


def test_readiness_follows_the_store(keyed, redis_url: str, keys_redis) -> None:
    closed, open_ = keyed(redis_timeout=0.2), keyed(redis_timeout=0.2, redis_failure="open")
    assert httpx.get(f"{closed.url}/readyz").json()["status"] == "ok"
    keys_redis.stop()
    try:
        r = httpx.get(f"{closed.url}/readyz")
        assert r.status_code == 503 and "quota store" in r.json()["reason"]
        r = httpx.get(f"{open_.url}/readyz")
        assert r.status_code == 200 and r.json()["status"] == "degraded"
    finally:
        keys_redis.start()
    assert httpx.get(f"{closed.url}/readyz").status_code == 200


def test_in_process_keys_refuse_several_workers(tmp_path) -> None:
    import subprocess
    import sys

    record, _ = KeyRecord.new("local")
    config = tmp_path / "g.toml"
    config.write_text(f'[keys.{record.id}]\nhash = "{record.hash}"\n')
    result = subprocess.run([sys.executable, "-m", "gateway.cli", "serve", "--workers", "2",
                             "--config", str(config)], capture_output=True, text=True, timeout=30,
                            env={"PATH": "/usr/bin:/bin"})
    assert result.returncode == 2 and "GATEWAY_REDIS_URL" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_admin_api_on_a_running_gateway(keyed, redis_url: str, upstream: FakeUpstream) -> None:
    gw = keyed(admin_key="admin-secret-0123456789")
    admin = {"authorization": "Bearer admin-secret-0123456789"}
    assert httpx.post(f"{gw.url}/admin/keys", json={"name": "x"}).status_code == 401
    created = httpx.post(f"{gw.url}/admin/keys", headers=admin,
                         json={"name": "team-b", "images_per_day": 1}).json()
    edit(sdk(gw, created["key"]))
    with pytest.raises(openai.RateLimitError):
        edit(sdk(gw, created["key"]))
    shown = httpx.get(f"{gw.url}/admin/keys/{created['id']}", headers=admin).json()
    assert shown["usage"]["limits"]["images"]["used"] == 1 and "key" not in shown
    assert httpx.delete(f"{gw.url}/admin/keys/{created['id']}", headers=admin).status_code == 200
    time.sleep(1.1)
    with pytest.raises(openai.AuthenticationError):
        edit(sdk(gw, created["key"]))


def test_long_requests_keep_their_lease(keyed, redis_url: str, upstream: FakeUpstream) -> None:
    gw = keyed(lease_ttl_seconds=3)  # renewed every second while the request runs
    _, secret = make_key(redis_url, max_concurrent=1)
    upstream.behaviour.delay_headers = 4.5
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        slow = pool.submit(edit, sdk(gw, secret, timeout=20))
        time.sleep(4)  # past the TTL: without renewal the slot would have been given back
        with pytest.raises(openai.RateLimitError):
            edit(sdk(gw, secret))
        slow.result()
    assert usage_of(gw.url, secret)["in_flight"] == 0


def test_usage_is_counted_when_the_client_leaves_mid_answer(keyed, redis_url: str,
                                                            upstream: FakeUpstream) -> None:
    gw = keyed()
    _, secret = make_key(redis_url, tokens_per_month=10_000)
    upstream.behaviour.event_delay = 0.3
    stream = sdk(gw, secret).images.edit(model="gpt-image-1", image=png(), prompt="x", n=2,
                                         stream=True, partial_images=1)
    next(iter(stream))  # the first partial image, then the client hangs up
    stream.close()
    deadline = time.monotonic() + 5
    while usage_of(gw.url, secret)["limits"]["tokens"]["used"] != 500:  # both completed events
        assert time.monotonic() < deadline, usage_of(gw.url, secret)
        time.sleep(0.1)
    assert usage_of(gw.url, secret)["in_flight"] == 0


# ------------------------------------------------------------- admission on a real Redis, in-process
@pytest.fixture
def gpt_image() -> ModelSpec:
    return Catalog.from_settings(suite_settings()).resolve("gpt-image-1")


async def test_a_ticket_extends_its_reservation(redis_url: str, keys_redis,
                                                gpt_image: ModelSpec) -> None:
    """`n` learnt after admission: reserved like admission's (429 and nothing changes when the
    day's images do not allow it), then released or charged as a whole; with the store away,
    the policy decides."""
    store = RedisStore(redis_url, timeout=0.2, lease_ttl_ms=60_000)
    closed = QuotaAdmission(store, fail_open=False, cache_seconds=1, lease_ttl_seconds=60)
    open_ = QuotaAdmission(store, fail_open=True, cache_seconds=1, lease_ttl_seconds=60)
    record, secret = KeyRecord.new("x", Limits(images_per_day=6))
    await store.put_key(record)
    principal = await closed.authenticate(f"Bearer {secret}")

    async def admit(admission: QuotaAdmission, n: int = 1) -> Ticket:
        return await admission.admit(principal, ImageRequest("req", gpt_image, n, False))

    async def images_used() -> int:
        usage = await store.usage(record.id)
        assert usage is not None
        return usage.windows["images"].used

    ticket = await admit(closed)
    await ticket.extend(2)
    assert isinstance(ticket, QuotaTicket) and ticket.n == 3
    assert ticket.headers["x-ratelimit-remaining-images"] == "3"  # the answer's headers follow
    with pytest.raises(QuotaExceeded) as refused:
        await ticket.extend(4)
    assert refused.value.status == 429 and "images per day" in refused.value.message
    assert refused.value.headers["x-should-retry"] == "false"
    assert refused.value.headers["x-ratelimit-remaining-images"] == "3"
    assert ticket.n == 3 and await images_used() == 3
    await ticket.finish(Outcome(answered=False))  # the upstream never answered: all 3 back
    assert await images_used() == 0

    ticket = await admit(closed)
    await ticket.extend(1)
    await ticket.finish(Outcome(answered=True, status=200))  # images unknown: n is charged
    assert await images_used() == 2

    fail_closed, fail_open = await admit(closed), await admit(open_)
    keys_redis.stop()
    try:
        with pytest.raises(ServiceUnavailable) as away:
            await fail_closed.extend(1)
        assert away.value.status == 503 and away.value.headers["retry-after"] == "1"
        await fail_open.extend(2)  # admitted: an answer of unknown size is charged as 3
        assert isinstance(fail_open, QuotaTicket) and fail_open.n == 3
    finally:
        keys_redis.start()
        for t in (fail_closed, fail_open):
            await t.finish(Outcome(answered=False))
        await store.aclose()
    open_ticket = await Admission().admit(principal, ImageRequest("req", gpt_image, 1, False))
    await open_ticket.extend(3)  # the open gateway reserves nothing: nothing to do


async def test_failing_open_believes_a_key_for_stale_seconds_only(
        redis_url: str, keys_redis) -> None:
    """While the store is away, a key seen recently still works (fail open), but one not
    re-read for `stale_seconds` may have been revoked meanwhile: it gets 503."""
    store = RedisStore(redis_url, timeout=0.2, lease_ttl_ms=60_000)
    admission = QuotaAdmission(store, fail_open=True, cache_seconds=0.1, lease_ttl_seconds=60,
                               stale_seconds=1.0)
    record, secret = KeyRecord.new("x", Limits())
    await store.put_key(record)
    await admission.authenticate(f"Bearer {secret}")
    keys_redis.stop()
    try:
        await asyncio.sleep(0.3)  # past cache_seconds: the store is asked, and is away
        assert (await admission.authenticate(f"Bearer {secret}")).key_id == record.id
        await asyncio.sleep(0.8)  # the record was read 1.1 s ago
        with pytest.raises(ServiceUnavailable):
            await admission.authenticate(f"Bearer {secret}")
    finally:
        keys_redis.start()
        await store.aclose()
