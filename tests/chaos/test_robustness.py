"""Bounds a client cannot push past: slow clients are timed out, load beyond capacity is shed.
(The start of the chaos suite: more faults arrive with it.)"""

from __future__ import annotations

import functools
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pytest_redis import factories

from gateway.keys import KeyRecord, Limits
from tests.conftest import UPSTREAM_KEY, GatewayProcess
from tests.support import redis_nodes
from tests.support.fake_upstream import FakeUpstream, ResettingUpstream, _free_port
from tests.support.helpers import (
    edit_head,
    make_key,
    multipart,
    open_files_in,
    raw_exchange,
    scrape,
    usage_of,
    value,
)
from tests.support.images import png


def _send_then_stall(gw: GatewayProcess, head: bytes, body: bytes, sent: int) -> bytes:
    """Send the headers and the first `sent` body bytes, then nothing; return the answer."""
    return raw_exchange(gw.port, head + body[:sent])


def test_a_client_silent_mid_body_is_timed_out(start_gateway: Callable[..., GatewayProcess],
                                               upstream: FakeUpstream) -> None:
    gw = start_gateway(body_read_timeout=1)
    # Fields first: the upload is already streaming upstream when the client goes quiet.
    body, ctype = multipart([("model", "gpt-image-1", None), ("prompt", "x", None),
                             ("image", png(size=2_000_000), "a.png")])
    t0 = time.monotonic()
    answer = _send_then_stall(gw, edit_head(body, ctype), body, 500_000)
    assert answer.startswith(b"HTTP/1.1 408") and b'"request_timeout"' in answer
    assert 0.9 < time.monotonic() - t0 < 5
    upstream.wait_for(lambda: upstream.records and upstream.records[-1].aborted)
    assert upstream.completed == []

    # Files first: spooled, the upstream never opened.
    upstream.reset()
    body, ctype = multipart([("image", png(size=2_000_000), "a.png"), ("prompt", "x", None)])
    answer = _send_then_stall(gw, edit_head(body, ctype), body, 500_000)
    assert answer.startswith(b"HTTP/1.1 408")
    assert upstream.records == []
    assert gw.client().images.edit(model="gpt-image-1", image=png(), prompt="x").data


def test_load_beyond_capacity_is_shed_fast(start_gateway: Callable[..., GatewayProcess],
                                           upstream: FakeUpstream) -> None:
    gw = start_gateway(max_in_flight=1)
    upstream.behaviour.delay_headers = 1.5
    body, ctype = multipart([("model", "gpt-image-1", None), ("prompt", "x", None),
                             ("image", png(), "a.png")])
    with httpx.Client(timeout=10) as http:
        import concurrent.futures

        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            slow = pool.submit(http.post, f"{gw.url}/v1/images/edits", content=body,
                               headers={"content-type": ctype})
            upstream.wait_for(lambda: upstream.records)
            t0 = time.monotonic()
            shed = httpx.post(f"{gw.url}/v1/images/edits", content=body,
                              headers={"content-type": ctype})
            assert time.monotonic() - t0 < 0.5
            assert shed.status_code == 503 and shed.json()["error"]["code"] == "overloaded"
            assert shed.headers["retry-after"] == "1"
            assert slow.result().status_code == 200
    upstream.behaviour.delay_headers = 0
    assert httpx.post(f"{gw.url}/v1/images/edits", content=body,
                      headers={"content-type": ctype}).status_code == 200
    assert value(scrape(f"{gw.url}/metrics"), "gateway_rejections_total", reason="overloaded") == 1
    assert len(upstream.completed) == 2


VALID_PARTS = [("model", "gpt-image-1", None), ("prompt", "a hat", None), ("n", "1", None),
               ("image", png(32, 32), "a.png"), ("mask", png(32, 32, alpha=True), "m.png")]


ODD_PARTS = [
    ("image[]", png(4000, 4000), "big.png"), ("image", b"GIF89a....", "x.gif"),
    ("prompt", "again", None), ("n", "99", None), ("\xff\xfename", "v", None),
    ("image", b"\x89PNG\r\n\x1a\n" + b"\x00" * 30, "broken.png"),
    ("mask", png(4, 4), "m.png"), ("size", "1024X1024", None), ("stream", "true", None),
    # Absurd dimensions, and a decompression bomb within the side bound: the gateway reads
    # headers only and never decodes, so neither costs it more than its bytes.
    ("image", png(100_000, 100_000), "absurd.png"), ("image", png(16_000, 16_000), "bomb.png"),
    ('x" ; name="y', "quoted", None), ("p" * 10_000, "a part header far over its bound", None)]
# Thousands of parts, far past max_parts.
MANY_PARTS = multipart([("prompt", "x", None), *[("f", "v", None)] * 3000])


def _mutations() -> st.SearchStrategy[tuple[bytes, str]]:
    """Bodies a broken or hostile client sends: a valid edit cut, flipped, padded or
    reassembled from odd parts, random bytes, and bad Content-Types."""
    base, ctype = multipart(VALID_PARTS)

    def truncate(at: int) -> tuple[bytes, str]:
        return base[: at % len(base)], ctype

    def flip(points: list[tuple[int, int]]) -> tuple[bytes, str]:
        body = bytearray(base)
        for at, byte in points:
            body[at % len(body)] = byte
        return bytes(body), ctype

    def insert(at: int, junk: bytes) -> tuple[bytes, str]:
        at %= len(base)
        return base[:at] + junk + base[at:], ctype

    parts = st.lists(st.sampled_from([*VALID_PARTS, *ODD_PARTS]), max_size=12)
    return st.one_of(
        st.integers(min_value=0).map(truncate),
        st.lists(st.tuples(st.integers(min_value=0), st.integers(0, 255)), min_size=1,
                 max_size=20).map(flip),
        st.tuples(st.integers(min_value=0), st.binary(max_size=300)).map(lambda a: insert(*a)),
        parts.map(multipart),
        st.just(MANY_PARTS),
        st.binary(max_size=2000).map(lambda b: (b, ctype)),
        st.tuples(st.binary(max_size=500), st.sampled_from([
            "multipart/form-data", "multipart/form-data; boundary=", "text/plain",
            "multipart/form-data; boundary=" + "x" * 300])),
    )


@pytest.fixture(scope="module")
def fuzz_gateway(start_gateway: Callable[..., GatewayProcess]) -> GatewayProcess:
    gw = start_gateway(body_read_timeout=2)
    FUZZ_RSS.append(_rss_kb(gw.proc.pid))
    return gw


FUZZ_RSS: list[int] = []  # the fuzzed gateway's resident memory at its start, in KiB


@settings(max_examples=250, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(_mutations())
def test_mangled_bodies_get_openai_errors_never_5xx(fuzz_gateway: GatewayProcess,
                                                    case: tuple[bytes, str]) -> None:
    body, ctype = case
    r = httpx.post(f"{fuzz_gateway.url}/v1/images/edits", content=body,
                   headers={"content-type": ctype}, timeout=10)
    assert r.status_code < 500, (r.status_code, r.text)
    assert r.headers["x-request-id"]
    if r.status_code >= 400:
        error = r.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"]


def test_fuzzing_left_memory_flat(fuzz_gateway: GatewayProcess) -> None:
    """Runs after the fuzz above (file order): hundreds of hostile bodies, 1 MiB spools and
    3000-part requests among them, leave the gateway's memory where it started."""
    assert _rss_kb(fuzz_gateway.proc.pid) - FUZZ_RSS[0] < 30_000


slow_redis = factories.redis_proc(port=None)


def test_secrets_stay_where_they_belong(start_gateway: Callable[..., GatewayProcess],
                                        upstream: FakeUpstream, slow_redis) -> None:
    url = f"redis://{slow_redis.host}:{slow_redis.port}/0"
    record, secret = make_key(url, images_per_day=5)
    gw = start_gateway(redis_url=url, admin_key="admin-secret-0123456789")
    sdk = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=secret, max_retries=0)
    answers = [sdk.images.with_raw_response.edit(model="gpt-image-1", image=png(), prompt="x")]
    for _ in sdk.images.edit(model="gpt-image-1", image=png(), prompt="x", stream=True):
        pass
    upstream.behaviour.status = 401  # the upstream refuses the gateway's own key
    with pytest.raises(openai.APIStatusError) as info:
        sdk.images.edit(model="gpt-image-1", image=png(), prompt="x")
    answers.append(info.value.response)
    with pytest.raises(openai.BadRequestError) as bad:
        sdk.images.edit(model="gpt-image-1", image=png(), prompt="x", size="1x1")
    answers.append(bad.value.response)

    # The client's key: not upstream, not in Redis, not in logs or metrics.
    for rec in upstream.records:
        assert secret not in str(rec.headers) and secret not in str(rec.fields)
    client = redis.Redis(host=slow_redis.host, port=slow_redis.port, decode_responses=True)
    stored = [str(client.hgetall(k) if client.type(k) == "hash" else client.dump(k))
              for k in client.scan_iter()]
    assert stored and not any(secret in s for s in stored)
    assert secret not in gw.log() and secret not in httpx.get(f"{gw.url}/metrics").text
    # The upstream's key: in no answer, head or body.
    for answer in answers:
        assert UPSTREAM_KEY not in str(answer.headers) + answer.text
        assert UPSTREAM_KEY[:12] not in answer.text
    # No admin key, no admin API; one key sees only its own usage.
    assert httpx.get(f"{gw.url}/admin/keys").status_code == 401
    other, other_secret = make_key(url)
    mine = httpx.get(f"{gw.url}/v1/usage", headers={"authorization": f"Bearer {secret}"}).json()
    theirs = httpx.get(f"{gw.url}/v1/usage",
                       headers={"authorization": f"Bearer {other_secret}"}).json()
    assert (mine["key"]["id"], theirs["key"]["id"]) == (record.id, other.id)
    assert mine["limits"]["images"]["used"] == 2 and theirs["limits"]["images"]["used"] == 0


@pytest.fixture
def debuggable_redis(tmp_path: Path) -> Iterator[str]:
    with redis_nodes.single(tmp_path, "--enable-debug-command", "local") as url:
        yield url


def test_a_slow_redis_never_hangs_a_request(start_gateway: Callable[..., GatewayProcess],
                                            upstream: FakeUpstream, debuggable_redis: str) -> None:
    url = debuggable_redis
    _, secret = make_key(url)
    gw = start_gateway(redis_url=url, redis_timeout=0.2)
    sdk = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=secret, max_retries=0)
    sdk.images.edit(model="gpt-image-1", image=png(), prompt="x")  # the key is cached now
    sleeper = threading.Thread(target=lambda: redis.Redis.from_url(url).execute_command(
        "DEBUG", "SLEEP", "2"))
    sleeper.start()
    time.sleep(0.1)
    t0 = time.monotonic()
    with pytest.raises(openai.APIStatusError) as info:
        sdk.images.edit(model="gpt-image-1", image=png(), prompt="x")
    assert info.value.status_code == 503 and time.monotonic() - t0 < 1.5
    sleeper.join()
    sdk.images.edit(model="gpt-image-1", image=png(), prompt="x")  # recovered by itself
    assert len(upstream.completed) == 2


@pytest.fixture
def restartable_redis(tmp_path: Path) -> Iterator[redis_nodes.Restartable]:
    server = redis_nodes.Restartable(tmp_path)
    server.start()
    yield server
    server.kill()


def test_redis_killed_under_traffic_loses_and_doubles_nothing(
        start_gateway: Callable[..., GatewayProcess], upstream: FakeUpstream,
        restartable_redis: redis_nodes.Restartable) -> None:
    """Redis dies while requests are in flight and comes back: requests meanwhile are refused
    fast (fail closed), and once it is back every image served is counted exactly once (the
    settles that failed in the outage are retried; settling is idempotent)."""
    store = restartable_redis
    _, secret = make_key(store.url, images_per_day=100_000)
    gw = start_gateway(redis_url=store.url, redis_timeout=0.2, lease_ttl_seconds=3)
    upstream.behaviour.delay_headers = 0.2  # so requests are in flight when Redis goes
    body, ctype = multipart([("model", "gpt-image-1", None), ("prompt", "x", None),
                             ("image", png(), "a.png")])
    results: list[tuple[int, float]] = []
    stop = threading.Event()

    def traffic() -> None:
        with httpx.Client(timeout=10) as http:
            while not stop.is_set():
                t0 = time.monotonic()
                r = http.post(f"{gw.url}/v1/images/edits", content=body, headers={
                    "authorization": f"Bearer {secret}", "content-type": ctype})
                results.append((r.status_code, time.monotonic() - t0))

    threads = [threading.Thread(target=traffic) for _ in range(4)]
    for t in threads:
        t.start()
    time.sleep(1)
    store.kill()
    time.sleep(1.5)
    store.start()
    time.sleep(1.5)
    stop.set()
    for t in threads:
        t.join()

    statuses = {status for status, _ in results}
    served = sum(1 for status, _ in results if status == 200)
    assert statuses == {200, 503} and served == len(upstream.completed)
    assert max(seconds for _, seconds in results) < 2  # nobody waited on the dead Redis
    deadline = time.monotonic() + 15
    while (used := _usage(gw, secret)) != (0, served):
        assert time.monotonic() < deadline, (used, served)
        time.sleep(0.2)


def _in_flight(gw: GatewayProcess) -> float:
    return value(scrape(f"{gw.url}/metrics"), "gateway_in_flight_requests")


def test_clients_leaving_leave_nothing_behind(start_gateway: Callable[..., GatewayProcess],
                                              upstream: FakeUpstream, tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    spool.mkdir()
    gw = start_gateway(spool_dir=spool, spool_memory_bytes=1)
    # A client that goes away before sending any body, and one mid-upload with files spooled.
    body, ctype = multipart([("image", png(size=2_000_000), "a.png"), ("prompt", "x", None)])
    for sent in (0, 1_000_000):
        with socket.create_connection(("127.0.0.1", gw.port), timeout=5) as s:
            s.sendall(edit_head(body, ctype) + body[:sent])
        time.sleep(0.3)
    assert upstream.records == []

    deadline = time.monotonic() + 5
    while _in_flight(gw) != 0:
        assert time.monotonic() < deadline, "a request is still counted in flight"
        time.sleep(0.05)
    assert open_files_in(gw.proc.pid, spool) == []  # spool files are unnamed: look at fds
    assert value(scrape(f"{gw.url}/metrics"), "gateway_requests_total", status="499") == 2
    gw.client().images.edit(model="gpt-image-1", image=png(), prompt="x")  # still serving


@dataclass(frozen=True)
class Fault:
    """One way an upstream fails, and what the client, the key's quota and the metrics see."""

    behaviour: dict[str, object]  # FakeUpstream.behaviour settings
    status: int | None  # the client's status; None: a JSON answer cut off (a broken response)
    code: str | None  # the error's code, in the body or in the stream's error event
    kind: str | None  # gateway_upstream_errors_total{kind}; None: not the upstream's failure
    charged: int  # images charged to the key
    model: str = "gpt-image-1"
    fields: tuple[tuple[str, str], ...] = ()
    image_size: int = 0


FAULTS = {
    "5xx": Fault({"status": 500}, 500, None, "status", 0),
    "429": Fault({"status": 429, "error": {"message": "Slow down.", "type": "requests",
                                           "param": None, "code": "rate_limit_exceeded"}},
                 429, "rate_limit_exceeded", None, 0),
    "connection-refused": Fault({}, 502, "upstream_unavailable", "connect", 0, model="refused"),
    # A real TCP reset (see ResettingUpstream) while the upload is still flowing.
    "reset-mid-upload": Fault({}, 502, "upstream_unavailable", "reset", 0, model="resets",
                              image_size=5_000_000),
    "stall-before-headers": Fault({"delay_headers": 3}, 504, "upstream_timeout", "timeout", 0),
    # Streams that break off count the final images they delivered: none, then one of two.
    "stall-mid-stream": Fault({"event_delay": 3}, 200, "upstream_timeout", "timeout", 0,
                              fields=(("stream", "true"), ("partial_images", "2"))),
    "cut-mid-stream": Fault({"cut_after_events": 1}, 200, "upstream_unavailable", "reset", 1,
                            fields=(("stream", "true"), ("n", "2"))),
    # An answer the gateway could not read to its end: the reservation (the upstream worked).
    "cut-json": Fault({"cut_json": True}, None, None, "reset", 1),
    "huge-announced": Fault({"huge_answer": 5_000_000, "huge_content_length": True}, 502,
                            "upstream_response_too_large", "too_large", 1),
    "huge-event": Fault({"huge_answer": 5_000_000}, 200, "upstream_response_too_large",
                        "too_large", 0, fields=(("stream", "true"),)),
}


@pytest.fixture(scope="module")
def fault_gateway(start_gateway: Callable[..., GatewayProcess]
                  ) -> Iterator[tuple[GatewayProcess, str, ResettingUpstream]]:
    """A gateway with one key (one request at a time, so a leaked slot shows at once) and two
    broken upstreams: one that resets uploads, one where nothing listens."""
    resetting = ResettingUpstream(after=1_000_000)
    record, secret = KeyRecord.new("chaos", Limits(max_concurrent=1, images_per_day=1000))
    config = (f"upstream_read_timeout = 1\nmax_response_bytes = 2000000\n"
              f"max_event_bytes = 1000000\n"
              f'[keys.{record.id}]\nhash = "{record.hash}"\nmax_concurrent = 1\n'
              "images_per_day = 1000\n"
              f'[upstreams.resets]\nbase_url = "{resetting.url}"\n'
              f'[upstreams.refused]\nbase_url = "http://127.0.0.1:{_free_port()}/v1"\n'
              '[models."resets"]\nextends = "gpt-image-1"\nupstream = "resets"\n'
              '[models."refused"]\nextends = "gpt-image-1"\nupstream = "refused"\n')
    yield start_gateway(config=config), secret, resetting
    resetting.stop()


def _usage(gw: GatewayProcess, secret: str) -> tuple[int, int]:
    """The key's (requests in flight, images used today), as /v1/usage shows them."""
    usage = usage_of(gw.url, secret)
    return usage["in_flight"], usage["limits"]["images"]["used"]


@pytest.mark.parametrize("fault", FAULTS.values(), ids=FAULTS.keys())
def test_upstream_faults_answer_release_and_count(
        fault_gateway: tuple[GatewayProcess, str, ResettingUpstream], upstream: FakeUpstream,
        fault: Fault) -> None:
    gw, secret, resetting = fault_gateway
    for name, setting in fault.behaviour.items():
        setattr(upstream.behaviour, name, setting)
    _, used_before = _usage(gw, secret)
    before = scrape(f"{gw.url}/metrics")
    body, ctype = multipart([("model", fault.model, None), ("prompt", "x", None),
                             *((k, v, None) for k, v in fault.fields),
                             ("image", png(size=fault.image_size), "a.png")])
    post = functools.partial(httpx.post, f"{gw.url}/v1/images/edits", content=body, timeout=10,
                             headers={"authorization": f"Bearer {secret}", "content-type": ctype})
    if fault.status is None:
        with pytest.raises(httpx.RemoteProtocolError):  # cut off: never a wrong answer
            post()
    else:
        r = post()
        assert r.status_code == fault.status, r.text[:300]
        if r.headers["content-type"].startswith("text/event-stream"):
            assert r.text.endswith("\n\n") and "event: error\n" in r.text
            error = json.loads(r.text.rsplit("data: ", 1)[1])["error"]
        else:
            error = r.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"]
        assert error["code"] == fault.code
    if fault.model == "resets":
        assert len(resetting.received) == 1 and 1_000_000 <= resetting.received[0] < len(body)

    # The slot and the reservation are settled: nothing in flight, exactly `charged` images.
    deadline = time.monotonic() + 5
    while _usage(gw, secret) != (0, used_before + fault.charged):
        assert time.monotonic() < deadline, (_usage(gw, secret), used_before, fault.charged)
        time.sleep(0.05)
    after = scrape(f"{gw.url}/metrics")

    def grew(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert grew("gateway_requests_total", model=fault.model) == 1
    assert grew("gateway_upstream_errors_total", model=fault.model) == (1 if fault.kind else 0)
    if fault.kind:
        assert grew("gateway_upstream_errors_total", model=fault.model, kind=fault.kind) == 1
    assert value(after, "gateway_in_flight_requests") == 0
    assert "ASGI callable returned" not in gw.log()  # a deliberate cut is not uvicorn's ERROR
    upstream.reset()  # the key's one slot serves the next request
    sdk = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=secret, max_retries=0)
    assert sdk.images.edit(model="gpt-image-1", image=png(), prompt="x").data


def test_a_runaway_answer_is_not_read_on(
        start_gateway: Callable[..., GatewayProcess], upstream: FakeUpstream) -> None:
    """Past max_response_bytes the gateway hangs up on the upstream instead of reading on."""
    gw = start_gateway(max_response_bytes=2_000_000)
    upstream.behaviour.huge_answer = 100_000_000
    body, ctype = multipart([("model", "gpt-image-1", None), ("prompt", "x", None),
                             ("image", png(), "a.png")])
    with pytest.raises(httpx.RemoteProtocolError):
        httpx.post(f"{gw.url}/v1/images/edits", content=body, timeout=10,
                   headers={"content-type": ctype})
    upstream.wait_for(lambda: upstream.answer_bytes_sent >= 2_000_000)
    time.sleep(0.5)
    sent = upstream.answer_bytes_sent
    time.sleep(0.5)  # read on, it would be many MB further by now
    assert upstream.answer_bytes_sent == sent < upstream.behaviour.huge_answer


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_request_heads_are_bounded(start_gateway: Callable[..., GatewayProcess],
                                   upstream: FakeUpstream) -> None:
    gw = start_gateway(max_header_bytes=4096)
    body, ctype = multipart([("model", "gpt-image-1", None), ("prompt", "x", None),
                             ("image", png(), "a.png")])

    def post(extra: bytes) -> bytes:
        return raw_exchange(gw.port, edit_head(body, ctype).replace(b"Host: x\r\n", b"Host: x\r\n" + extra)
                            + body)

    # Just under the bound: served. Over it, in one line or in many: a 431 in OpenAI's shape,
    # before any route (or the upstream) sees the request.
    assert post(b"X-Pad: " + b"a" * 3500 + b"\r\n").startswith(b"HTTP/1.1 200")
    for extra in (b"X-Pad: " + b"a" * 5000 + b"\r\n", b"".join(b"X-%d: v\r\n" % i for i in range(1000))):
        answer = post(extra)
        assert answer.startswith(b"HTTP/1.1 431"), answer[:100]
        error = json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]
        assert error["code"] == "request_header_fields_too_large"
    assert len(upstream.completed) == 1

    # The bound is per request: heads that add up past it on one connection are fine.
    ping = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 3000 + b"\r\n\r\n"
    with socket.create_connection(("127.0.0.1", gw.port), timeout=5) as s:
        for _ in range(3):
            s.sendall(ping)
            answer = b""
            while not answer.endswith(b'"ok"}'):
                chunk = s.recv(65536)
                assert chunk, answer  # closed: the second request was refused
                answer += chunk
            assert answer.startswith(b"HTTP/1.1 200")

    # A head that never ends: refused once past the bound, memory untouched.
    before = _rss_kb(gw.proc.pid)
    with socket.create_connection(("127.0.0.1", gw.port), timeout=5) as s:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Pad: ")
        with pytest.raises(OSError):  # reset or broken pipe: the gateway hung up
            for _ in range(100):
                s.sendall(b"a" * 1_000_000)
    assert _rss_kb(gw.proc.pid) - before < 10_000

    # Bytes that are not HTTP get an OpenAI-format 400 too (uvicorn's own is plain text).
    answer = raw_exchange(gw.port, b"NOT HTTP AT ALL\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 400")
    assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "invalid_http_request"
    assert value(scrape(f"{gw.url}/metrics"), "gateway_rejections_total", reason="too_large") == 3
