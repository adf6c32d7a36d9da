"""Process-level faults (issue 6, chaos suite): a worker SIGKILLed mid-request, and client and
upstream faults driven at an in-process gateway that must leave no task, request object, lease
or file descriptor behind."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import gc
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
import uvicorn
import uvloop

from gateway.app import Gateway, create_app
from gateway.images.client import Client
from gateway.images.flow import Edit
from gateway.images.form import EditForm, Spool
from gateway.keys import KeyRecord, Limits
from gateway.settings import KeyEntry, Settings
from tests.conftest import UPSTREAM_KEY, GatewayProcess
from tests.support import redis_nodes
from tests.support.fake_upstream import FakeUpstream, Recorded, _free_port
from tests.support.helpers import (
    edit_head,
    make_key,
    multipart,
    open_files_in,
    raw_exchange,
    scrape,
    suite_settings,
    usage_of,
    value,
)
from tests.support.images import png

EDITS = "/v1/images/edits"
T = TypeVar("T")


def _edit_body(prompt: str = "x", *, image: bytes | None = None, files_first: bool = False,
               extra: tuple[tuple[str, str], ...] = ()) -> tuple[bytes, str]:
    fields = [("model", "gpt-image-1", None), ("prompt", prompt, None),
              *((k, v, None) for k, v in extra)]
    files = [("image", image if image is not None else png(), "a.png")]
    return multipart([*files, *fields] if files_first else [*fields, *files])


def _post(url: str, secret: str, prompt: str = "x", **kwargs: Any) -> httpx.Response:
    """One edit on a fresh connection (so each lands on whichever worker accepts it)."""
    body, ctype = _edit_body(prompt, **kwargs)
    return httpx.post(f"{url}{EDITS}", content=body, timeout=10,
                      headers={"content-type": ctype, "authorization": f"Bearer {secret}"})


def _wait(predicate: Callable[[], object], what: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.02)


# ----------------------------------------------------------------- processes and sockets
def _workers(gw: GatewayProcess) -> list[int]:
    """uvicorn's worker processes under the supervisor (not multiprocessing's resource tracker)."""
    pids = []
    for task in Path(f"/proc/{gw.proc.pid}/task").iterdir():
        for pid in (task / "children").read_text().split():
            with contextlib.suppress(OSError):
                if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    pids.append(int(pid))
    return pids


def _tcp_inodes(*, local_port: int | None = None, remote_port: int | None = None,
                either_port: int | None = None) -> set[int]:
    """Socket inodes of loopback TCP connections, selected by their ports (from /proc/net/tcp)."""
    found = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        cols = line.split()
        local, remote = int(cols[1].split(":")[1], 16), int(cols[2].split(":")[1], 16)
        if ((local_port is None or local == local_port)
                and (remote_port is None or remote == remote_port)
                and (either_port is None or either_port in (local, remote))):
            found.add(int(cols[9]))
    return found - {0}


def _socket_inodes(pid: int | str) -> dict[int, str]:
    """A process's socket inodes and the fd holding each."""
    out = {}
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                out[int(target[8:-1])] = fd.name
    return out


def _holder(pids: list[int], server_port: int, client: socket.socket) -> int | None:
    """Which of `pids` holds the server end of `client`'s connection to `server_port`."""
    inodes = _tcp_inodes(local_port=server_port, remote_port=client.getsockname()[1])
    for pid in pids:
        with contextlib.suppress(OSError):
            if inodes & set(_socket_inodes(pid)):
                return pid
    return None


def _metrics_dir(pid: int) -> Path:
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    [entry] = [e for e in environ if e.startswith(b"PROMETHEUS_MULTIPROC_DIR=")]
    return Path(entry.split(b"=", 1)[1].decode())


@dataclass
class Trickle:
    """Edits on another key, one at a time, each on a fresh connection, until stopped. `lock`
    is held for the length of each request, so a kill taken under it never hits one of these."""

    url: str
    secret: str
    lock: threading.Lock = field(default_factory=threading.Lock)
    stop: threading.Event = field(default_factory=threading.Event)
    done: list[float] = field(default_factory=list)  # when each success ended
    failures: list[str] = field(default_factory=list)

    def run(self) -> None:
        while not self.stop.is_set():
            with self.lock:
                try:
                    answer = _post(self.url, self.secret, "key-b")
                    if answer.status_code == 200 and answer.json()["data"]:
                        self.done.append(time.monotonic())
                    else:
                        self.failures.append(f"{answer.status_code} {answer.text[:200]}")
                except httpx.HTTPError as exc:
                    self.failures.append(repr(exc))
            self.stop.wait(0.05)  # the trickle's pace, not a wait for anything


@pytest.fixture
def redis_url(tmp_path: Path) -> Iterator[str]:
    with redis_nodes.single(tmp_path) as url:
        yield url


LEASE_TTL = 3.0


def test_sigkill_of_a_worker_mid_request(start_gateway: Callable[..., GatewayProcess],
                                         upstream: FakeUpstream, redis_url: str) -> None:
    """A worker killed outright never settles its request: the other worker keeps serving, the
    dead request's concurrency slot and image reservation hold until the lease TTL, then heal
    without charging it; uvicorn's supervisor replaces the worker; the in-flight gauge heals."""
    _, secret_a = make_key(redis_url, name="a", max_concurrent=1, images_per_day=2)
    _, secret_b = make_key(redis_url, name="b")
    gw = start_gateway(workers=2, redis_url=redis_url, lease_ttl_seconds=LEASE_TTL)
    _wait(lambda: len(_workers(gw)) == 2, "both workers are up")
    assert _post(gw.url, secret_a, "key-a").status_code == 200  # one image used, settled

    # The request to kill: parked at the upstream, which holds back its answer.
    upstream.behaviour.delay_headers = 30
    body, ctype = _edit_body("key-a")
    first = len(upstream.records)
    held = socket.create_connection(("127.0.0.1", gw.port), timeout=10)
    held.sendall(edit_head(body, ctype, secret_a) + body)

    def held_at_upstream() -> list[Recorded]:
        # Found by its prompt, not its place: a late request from an earlier test's gateway
        # may reach the shared fake upstream in between.
        return [r for r in upstream.records[first:] if r.completed and r.field("prompt") == "key-a"]

    upstream.wait_for(lambda: bool(held_at_upstream()), timeout=10)
    held_record = held_at_upstream()[0]
    time.sleep(0.05)  # the fake reads delay_headers just after recording the body
    upstream.behaviour.delay_headers = 0  # everything else is answered at once
    workers = _workers(gw)
    victim = _holder(workers, gw.port, held)
    assert victim is not None, f"no worker of {workers} holds the held request's connection"
    [survivor] = [w for w in workers if w != victim]
    metrics_dir = _metrics_dir(victim)
    assert usage_of(gw.url, secret_a)["in_flight"] == 1

    trickle = Trickle(gw.url, secret_b)
    runner = threading.Thread(target=trickle.run, daemon=True)
    runner.start()
    try:
        _wait(lambda: len(trickle.done) >= 3, "the trickle is flowing")
        held.setblocking(False)
        with pytest.raises(BlockingIOError):
            held.recv(1)  # still waiting for its answer
        held.setblocking(True)
        with trickle.lock:  # between two trickle requests: only the held one is on the victim
            os.kill(victim, signal.SIGKILL)
            killed_at = time.monotonic()

        # The client of the killed request gets no answer: its connection just ends.
        received = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := held.recv(65536):
                received += chunk
        held.close()
        assert received == b"", received[:200]
        upstream.wait_for(lambda: held_record.aborted)  # the upstream saw its caller vanish

        # Leaked: the dead worker's lease still holds the key's one slot and its reservation.
        refused = _post(gw.url, secret_a, "key-a")
        assert time.monotonic() - killed_at < LEASE_TTL - 1, "too slow to see the leak"
        assert refused.status_code == 429, refused.text
        assert refused.json()["error"]["code"] == "rate_limit_exceeded"
        assert "concurrent" in refused.json()["error"]["message"]
        usage = usage_of(gw.url, secret_a)
        assert usage["in_flight"] == 1 and usage["limits"]["images"]["used"] == 2

        # Healed by the lease TTL alone (the last renewal was at most TTL/3 before the kill).
        deadline = killed_at + LEASE_TTL + 2
        while (usage := usage_of(gw.url, secret_a))["in_flight"] != 0:
            assert time.monotonic() < deadline, "the dead worker's lease never expired"
            time.sleep(0.05)
        healed_after = time.monotonic() - killed_at
        assert LEASE_TTL * 2 / 3 - 0.5 < healed_after < LEASE_TTL + 1, healed_after
        # quota.lua gives an expired lease's reservation back and charges nothing for it:
        # images used are exactly the answers the upstream gave this key.
        answered = [r for r in upstream.records
                    if r.field("prompt") == "key-a" and r.completed and not r.aborted]
        assert len(answered) == 1
        assert usage["limits"]["images"]["used"] == len(answered)

        # So the key's second image of the day is still there, and then its quota is exact.
        assert _post(gw.url, secret_a, "key-a").status_code == 200
        over = _post(gw.url, secret_a, "key-a")
        assert over.status_code == 429 and over.json()["error"]["code"] == "insufficient_quota"
        assert usage_of(gw.url, secret_a)["limits"]["images"]["used"] == 2

        # uvicorn 0.54's supervisor notices the death (it polls every 0.5 s) and starts a new
        # worker, which takes connections too.
        _wait(lambda: victim not in _workers(gw) and len(_workers(gw)) == 2,
              "the supervisor replaced the dead worker")
        [replacement] = [w for w in _workers(gw) if w != survivor]
        _wait(lambda: _healthz_served_by(gw, replacement), "the replacement serves", timeout=15)
        assert f"Child process [{victim}] died" in gw.log()
        served_after_kill = [t for t in trickle.done if t > killed_at]
        assert len(served_after_kill) >= 3
    finally:
        trickle.stop.set()
        runner.join(15)
    assert trickle.failures == []

    # The dead worker's live gauge is dropped: nothing is in flight any more.
    _wait(lambda: value(scrape(f"{gw.url}/metrics"), "gateway_in_flight_requests") == 0,
          "gateway_in_flight_requests is back to 0")
    assert not list(metrics_dir.glob(f"gauge_live*_{victim}.db"))


def _healthz_served_by(gw: GatewayProcess, pid: int) -> bool:
    """One GET /healthz on a fresh connection; whether `pid` is the worker that answered."""
    with socket.create_connection(("127.0.0.1", gw.port), timeout=5) as s:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert s.recv(65536).startswith(b"HTTP/1.1 200")
        return _holder([pid], gw.port, s) == pid


# ----------------------------------------------------------------- in-process gateway
@dataclass(frozen=True)
class State:
    """What a finished request must have given back."""

    tasks: int  # asyncio tasks on the server's loop
    in_flight: int  # the endpoint's counter
    leases: int  # the key's leases in the quota store
    fds: int  # this process's fds, minus the sockets between the gateway's pool and the upstream
    busy_upstream_connections: int  # pool connections not idle (a response never closed)
    spool_files: int
    edits: int = 0  # live Edit, Client, EditForm, Spool objects after gc.collect() (slow: last)


_REQUEST_TYPES = frozenset({Edit, Client, EditForm, Spool})


def _live_edits(*, collect: bool = True) -> int:
    if collect:
        gc.collect()
    # isinstance() would wake lazy proxies; the parts too: a timer or a file can hold one alone
    return sum(type(o) in _REQUEST_TYPES for o in gc.get_objects())


class InProcessGateway:
    """The real app under uvicorn (uvloop, the gateway's httptools protocol, lifespan) in a
    thread with its own loop, so the test can look inside: its tasks, its objects, this
    process's fds."""

    def __init__(self, settings: Settings, upstream_port: int, key_id: str) -> None:
        self.app: Gateway = create_app(settings)
        self.port = settings.port
        self.url = f"http://127.0.0.1:{self.port}"
        self.upstream_port = upstream_port
        self.key_id = key_id
        assert settings.spool_dir is not None
        self.spool_dir: Path = settings.spool_dir
        config = uvicorn.Config(self.app, host="127.0.0.1", port=self.port, loop="none",
                                http="gateway.protocol:BoundedHttpTools", interface="asgi3",
                                lifespan="on", h11_max_incomplete_event_size=settings.max_header_bytes,
                                log_level="warning", access_log=False, server_header=False,
                                proxy_headers=False)
        self.server = uvicorn.Server(config)
        self.loop = uvloop.new_event_loop()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self.server.serve())

    def start(self) -> InProcessGateway:
        self.thread.start()
        _wait(lambda: self.server.started, "the in-process gateway started")
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(15)
        assert not self.thread.is_alive(), "the in-process gateway did not shut down"
        self.loop.close()

    def on_loop(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(5)

    def state(self) -> State:
        """Everything but the Edit count, which costs a full garbage collection."""
        async def tasks() -> int:
            return len(asyncio.all_tasks()) - 1  # not this one

        async def leases() -> int:
            # The store's own table, not usage(): that would give expired leases back, and the
            # lease TTL would hide a request that never settled.
            store = self.app.edits.admission.store  # type: ignore[attr-defined]
            counters = store._counters.get(self.key_id)
            return len(counters.leases) if counters else 0

        transport = self.app.edits.upstreams["default"].transport  # type: ignore[attr-defined]
        fds = os.listdir("/proc/self/fd")
        pool_sockets = _tcp_inodes(either_port=self.upstream_port) & set(_socket_inodes("self"))
        return State(
            tasks=self.on_loop(tasks()), in_flight=self.app.edits.capacity.in_flight,
            leases=self.on_loop(leases()), fds=len(fds) - len(pool_sockets),
            busy_upstream_connections=transport.in_use,
            spool_files=len(open_files_in(os.getpid(), self.spool_dir)))

    def settled(self, baseline: State, what: str, timeout: float = 8) -> None:
        """Poll until every count is back at the baseline; fail naming what stayed behind."""
        deadline = time.monotonic() + timeout
        while True:
            now = self.state()
            if now == replace(baseline, edits=0):
                now = replace(now, edits=_live_edits())
                if now == baseline:
                    return
            if time.monotonic() > deadline:
                now = replace(now, edits=_live_edits())
                raise AssertionError(f"{what} left something behind:\n  now      {now}\n"
                                     f"  baseline {baseline}")
            time.sleep(0.05)


@pytest.fixture(scope="module")
def inproc(upstream: FakeUpstream, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[tuple[InProcessGateway, str, State]]:
    """The gateway, its key's secret, and the baseline: the state once a warm-up JSON and SSE
    edit are over (the pool's connection, lazily built objects, etc. exist by then)."""
    upstream.reset()  # set up before the per-test reset: a failed earlier test may have left it steered
    record, secret = KeyRecord.new("faults", Limits())
    spool = tmp_path_factory.mktemp("spool")
    settings = suite_settings(
        port=_free_port(), upstream_base_url=upstream.url, upstream_api_key=UPSTREAM_KEY,
        upstream_read_timeout=1.0, body_read_timeout=1.0, lease_ttl_seconds=3,
        spool_dir=spool, spool_memory_bytes=1, drain_seconds=0, shutdown_timeout=2,
        log_level="warning", keys={record.id: KeyEntry(hash=record.hash, name="faults")})
    gw = InProcessGateway(settings, upstream.port, record.id).start()
    try:
        assert _post(gw.url, secret).status_code == 200
        with httpx.stream("POST", f"{gw.url}{EDITS}", timeout=10,
                          **_request(secret, extra=(("stream", "true"),))) as answer:
            assert answer.status_code == 200 and b"image_edit.completed" in answer.read()
        previous = None
        deadline = time.monotonic() + 10
        while (now := gw.state()) != previous:  # the same twice in a row: idle
            assert time.monotonic() < deadline, f"the gateway never went quiet: {now}"
            previous = now
            time.sleep(0.1)
        baseline = replace(now, edits=_live_edits())
        assert (baseline.in_flight, baseline.leases, baseline.edits, baseline.spool_files,
                baseline.busy_upstream_connections) == (0, 0, 0, 0, 0), baseline
        yield gw, secret, baseline
    finally:
        gw.stop()


def _request(secret: str, **kwargs: Any) -> dict[str, Any]:
    body, ctype = _edit_body(**kwargs)
    return {"content": body, "headers": {"content-type": ctype,
                                         "authorization": f"Bearer {secret}"}}


# The faults, each as a client sees it. Each runs alone (the fake's behaviour is global).
def _leave_mid_upload_streaming(gw: InProcessGateway, up: FakeUpstream, secret: str) -> None:
    body, ctype = _edit_body(image=png(size=2_000_000))  # fields first: streams upstream live
    with socket.create_connection(("127.0.0.1", gw.port), timeout=5) as s:
        s.sendall(edit_head(body, ctype, secret) + body[:1_000_000])
        up.wait_for(lambda: up.records and up.records[-1].bytes_received > 0)
    up.wait_for(lambda: up.records[-1].aborted)
    assert up.completed == []


def _leave_mid_upload_spooled(gw: InProcessGateway, up: FakeUpstream, secret: str) -> None:
    body, ctype = _edit_body(image=png(size=2_000_000), files_first=True)
    with socket.create_connection(("127.0.0.1", gw.port), timeout=5) as s:
        s.sendall(edit_head(body, ctype, secret) + body[:1_000_000])
        _wait(lambda: open_files_in(os.getpid(), gw.spool_dir), "the upload is spooled")
    assert up.records == []


def _leave_before_body(gw: InProcessGateway, up: FakeUpstream, secret: str) -> None:
    body, ctype = _edit_body()
    with socket.create_connection(("127.0.0.1", gw.port), timeout=5) as s:
        s.sendall(edit_head(body, ctype, secret))
        _wait(lambda: gw.app.edits.capacity.in_flight == 1, "the request reached the endpoint")
    assert up.records == []


def _leave_awaiting_answer(gw: InProcessGateway, up: FakeUpstream, secret: str) -> None:
    up.behaviour.delay_headers = 5
    body, ctype = _edit_body()
    with socket.create_connection(("127.0.0.1", gw.port), timeout=5) as s:
        s.sendall(edit_head(body, ctype, secret) + body)
        up.wait_for(lambda: up.completed)
    up.wait_for(lambda: up.records[-1].aborted)  # the gateway hung up on the upstream too


def _leave_mid_answer(gw: InProcessGateway, up: FakeUpstream, secret: str) -> None:
    up.behaviour.event_delay = 0.3
    body, ctype = _edit_body(extra=(("stream", "true"), ("partial_images", "2")))
    with socket.create_connection(("127.0.0.1", gw.port), timeout=5) as s:
        s.sendall(edit_head(body, ctype, secret) + body)
        answer = b""
        while b"event: image_edit.partial_image" not in answer:
            chunk = s.recv(65536)
            assert chunk, answer
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 200") and b"image_edit.completed" not in answer


def _slow_loris(gw: InProcessGateway, up: FakeUpstream, secret: str) -> None:
    body, ctype = _edit_body(image=png(size=2_000_000))
    answer = raw_exchange(gw.port, edit_head(body, ctype, secret) + body[:500_000])
    assert answer.startswith(b"HTTP/1.1 408") and b"request_timeout" in answer
    up.wait_for(lambda: up.records and up.records[-1].aborted)


def _upstream_stalls(gw: InProcessGateway, up: FakeUpstream, secret: str) -> None:
    up.behaviour.delay_headers = 3  # past upstream_read_timeout (1 s)
    answer = _post(gw.url, secret)
    assert answer.status_code == 504 and answer.json()["error"]["code"] == "upstream_timeout"


def _upstream_drops_upload(gw: InProcessGateway, up: FakeUpstream, secret: str) -> None:
    up.behaviour.reset_after_bytes = 500_000
    answer = _post(gw.url, secret, image=png(size=2_000_000))
    assert answer.status_code >= 500 and answer.json()["error"]["message"]
    assert up.completed == []


def _upstream_500(gw: InProcessGateway, up: FakeUpstream, secret: str) -> None:
    up.behaviour.status = 500
    assert _post(gw.url, secret).status_code == 500


def _upstream_error_page(gw: InProcessGateway, up: FakeUpstream, secret: str) -> None:
    # A proxy's big HTML page: the gateway reads only its first bytes, then must let go of it.
    up.behaviour.status = 502
    up.behaviour.headers = {"content-type": "text/html"}
    up.behaviour.error = {"message": "<html>" + "x" * 200_000}
    answer = _post(gw.url, secret)
    assert answer.status_code == 502 and answer.json()["error"]["code"] == "upstream_error"


def _invalid(gw: InProcessGateway, up: FakeUpstream, secret: str) -> None:
    answer = _post(gw.url, secret, extra=(("size", "1x1"),))
    assert answer.status_code == 400 and answer.json()["error"]["param"] == "size"
    assert up.records == []


FAULTS: dict[str, Callable[[InProcessGateway, FakeUpstream, str], None]] = {
    "client leaves mid-upload (streaming)": _leave_mid_upload_streaming,
    "client leaves mid-upload (spooled)": _leave_mid_upload_spooled,
    "client leaves before any body": _leave_before_body,
    "client leaves awaiting the answer": _leave_awaiting_answer,
    "client leaves mid-answer (SSE)": _leave_mid_answer,
    "slow-loris client timed out": _slow_loris,
    "upstream stalls past its read timeout": _upstream_stalls,
    "upstream drops the upload": _upstream_drops_upload,
    "upstream answers 500": _upstream_500,
    "upstream answers a big error page": _upstream_error_page,
    "client sends an invalid field": _invalid,
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_a_fault_leaves_nothing_behind(inproc: tuple[InProcessGateway, str, State],
                                       upstream: FakeUpstream, fault: str) -> None:
    """However a request ends, its task, Edit, in-flight count, lease, spool file and
    sockets go with it, back to the warm-up baseline; and the gateway still serves."""
    gw, secret, baseline = inproc
    FAULTS[fault](gw, upstream, secret)
    gw.settled(baseline, fault)
    upstream.reset()
    assert _post(gw.url, secret).status_code == 200
    gw.settled(baseline, f"a good request after '{fault}'")


def _good_json(gw: InProcessGateway, up: FakeUpstream, secret: str) -> None:
    assert _post(gw.url, secret).status_code == 200


def _good_sse(gw: InProcessGateway, up: FakeUpstream, secret: str) -> None:
    with httpx.stream("POST", f"{gw.url}{EDITS}", timeout=10,
                      **_request(secret, extra=(("stream", "true"),))) as answer:
        assert answer.status_code == 200 and b"image_edit.completed" in answer.read()


def _gone_before_body(gw: InProcessGateway, up: FakeUpstream, secret: str) -> None:
    body, ctype = _edit_body()
    with socket.create_connection(("127.0.0.1", gw.port), timeout=5) as s:
        s.sendall(edit_head(body, ctype, secret))
        time.sleep(0.2)  # among many requests there is no one count to poll for


def _gone_mid_spool(gw: InProcessGateway, up: FakeUpstream, secret: str) -> None:
    body, ctype = _edit_body(image=png(size=2_000_000), files_first=True)
    with socket.create_connection(("127.0.0.1", gw.port), timeout=5) as s:
        s.sendall(edit_head(body, ctype, secret) + body[:1_000_000])
        time.sleep(0.2)


def _loris(gw: InProcessGateway, up: FakeUpstream, secret: str) -> None:
    body, ctype = _edit_body(image=png(size=2_000_000))
    assert raw_exchange(gw.port, edit_head(body, ctype, secret) + body[:500_000]).startswith(
        b"HTTP/1.1 408")


def _bad_field(gw: InProcessGateway, up: FakeUpstream, secret: str) -> None:
    assert _post(gw.url, secret, extra=(("size", "1x1"),)).status_code == 400


def test_faults_at_once_leave_nothing_behind(inproc: tuple[InProcessGateway, str, State],
                                             upstream: FakeUpstream) -> None:
    """The client-side faults interleaved with good JSON and SSE edits on one loop: what one
    request's cleanup does must not disturb another's."""
    gw, secret, baseline = inproc
    upstream.behaviour.event_delay = 0.2  # slows only the streams
    mix = [_gone_before_body, _gone_mid_spool, _leave_mid_answer, _loris, _bad_field,
           _good_json, _good_sse] * 3
    with concurrent.futures.ThreadPoolExecutor(len(mix)) as pool:
        for done in [pool.submit(f, gw, upstream, secret) for f in mix]:
            done.result()
    gw.settled(baseline, "the mixed faults")


@pytest.mark.parametrize("ending", ["a good request", "upstream answers a big error page"])
def test_a_finished_request_is_freed_without_the_cycle_collector(
        inproc: tuple[InProcessGateway, str, State], upstream: FakeUpstream, ending: str) -> None:
    """A request's state should go when the request does. Held in a reference cycle instead,
    it lives until a garbage collection reaches its generation: on a busy worker, whose long
    requests are promoted to the oldest generation while they run, that is the rare full
    collection, so finished requests' objects pile up meanwhile."""
    gw, secret, baseline = inproc
    gc.collect()
    gc.disable()  # for the whole process: the server thread's garbage stays where it is
    try:
        if ending == "a good request":
            assert _post(gw.url, secret).status_code == 200
        else:
            FAULTS[ending](gw, upstream, secret)
        _wait(lambda: gw.state() == replace(baseline, edits=0), "the request is over")
        assert _live_edits(collect=False) == 0
    finally:
        gc.enable()
