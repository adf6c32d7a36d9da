"""The compose topology without Docker: the shipped config/nginx/nginx.conf in front of two gateway
processes sharing one redis-server, the fake upstream behind them, and the official SDK as the
client. nginx runs from the shipped file with only the lines a local run needs rewritten
(see tests/ops/test_deploy_files.py: local_nginx_conf)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
from pytest_redis import factories

from tests.conftest import GatewayProcess
from tests.ops.test_deploy_files import local_nginx_conf, nginx_args
from tests.support.fake_upstream import FakeUpstream, _free_port
from tests.support.helpers import edit, flush, make_key, multipart, raw_exchange
from tests.support.images import png, sha256

topology_redis = factories.redis_proc(port=None)


# ------------------------------------------------------------------------------------ servers
class Nginx:
    """nginx from the shipped config, in the foreground, inside its own temp prefix."""

    def __init__(self, gateways: tuple[GatewayProcess, GatewayProcess]) -> None:
        self.prefix = Path(tempfile.mkdtemp(prefix="nginx-topology-"))
        self.prefix.chmod(0o755)  # run as root, nginx's workers are `nobody`: they need to get in
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        conf = self.prefix / "nginx.conf"
        conf.write_text(local_nginx_conf(self.prefix, (gateways[0].port, gateways[1].port),
                                         self.port))
        self.log_path = self.prefix / "nginx.out"  # access log (stdout) and error log (stderr)
        with self.log_path.open("w") as out:
            self.proc = subprocess.Popen(nginx_args(self.prefix, conf), stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 10
        while True:
            if self.proc.poll() is not None:
                log = self.log()
                shutil.rmtree(self.prefix, ignore_errors=True)
                raise RuntimeError(f"nginx exited: {log}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{self.url}/nginx-health", timeout=0.5).status_code == 200:
                    break
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("nginx did not start")
            time.sleep(0.05)

    def workers(self) -> list[int]:
        found = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                with contextlib.suppress(OSError):
                    # The parent pid is the 2nd field after the parenthesised command name.
                    stat = (entry / "stat").read_text()
                    if int(stat.rsplit(")", 1)[1].split()[1]) == self.proc.pid:
                        found.append(int(entry.name))
        assert found, "nginx has no worker processes"
        return found

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def access_lines(self) -> list[dict]:
        return [json.loads(line) for line in self.log().splitlines() if line.startswith("{")]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()  # fast shutdown; the workers exit with the master
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)  # its own session: nginx's processes only
                self.proc.wait()
        shutil.rmtree(self.prefix, ignore_errors=True)


@dataclass
class Topology:
    gateways: tuple[GatewayProcess, GatewayProcess]
    nginx: Nginx
    secret: str  # a key without limits

    def sdk(self, secret: str | None = None, **kwargs: object) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.nginx.url}/v1", api_key=secret or self.secret,
                             max_retries=0, timeout=30, **kwargs)  # type: ignore[arg-type]


# Each gateway's /metrics port (by its API port): as in the container, metrics are served apart
# from the API, on a port nginx does not proxy.
_metrics_ports: dict[int, int] = {}


def start_like_the_container(start_gateway: Callable[..., GatewayProcess],
                             redis_url: str) -> GatewayProcess:
    metrics_port = _free_port()
    gw = start_gateway(redis_url=redis_url, forwarded_allow_ips="127.0.0.1",
                       metrics_port=metrics_port)
    _metrics_ports[gw.port] = metrics_port
    return gw


def metrics_url(gw: GatewayProcess) -> str:
    return f"http://127.0.0.1:{_metrics_ports[gw.port]}/metrics"


@contextlib.contextmanager
def topology(start_gateway: Callable[..., GatewayProcess], redis_url: str) -> Iterator[Topology]:
    gateways = (start_like_the_container(start_gateway, redis_url),
                start_like_the_container(start_gateway, redis_url))
    try:
        nginx = Nginx(gateways)
        try:
            yield Topology(gateways, nginx, make_key(redis_url)[1])
        finally:
            nginx.stop()
    finally:
        for gw in gateways:
            gw.stop()


@pytest.fixture(scope="module")
def redis_url(topology_redis) -> Iterator[str]:  # pytest-redis's executor: our own redis-server
    url = f"redis://{topology_redis.host}:{topology_redis.port}/0"
    yield url
    flush(url)


@pytest.fixture(scope="module")
def topo(start_gateway: Callable[..., GatewayProcess], redis_url: str) -> Iterator[Topology]:
    with topology(start_gateway, redis_url) as t:
        yield t


# ------------------------------------------------------------------------------------ helpers
def served(gw: GatewayProcess) -> float:
    """The API requests this gateway has answered (gateway_requests_total, every label)."""
    text = httpx.get(metrics_url(gw), timeout=5).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("gateway_requests_total{"))


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


class PeakRss(threading.Thread):
    """Samples VmRSS of some processes every ~20 ms: the baseline and the peak of each."""

    def __init__(self, pids: list[int]) -> None:
        super().__init__(daemon=True)
        self.baseline = {pid: _rss_kb(pid) for pid in pids}
        self.peak = dict(self.baseline)
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.02):
            for pid in self.peak:
                with contextlib.suppress(OSError):
                    self.peak[pid] = max(self.peak[pid], _rss_kb(pid))

    def growth_mb(self) -> dict[int, float]:
        self.done.set()
        self.join(5)
        return {pid: (self.peak[pid] - self.baseline[pid]) / 1024 for pid in self.peak}


# -------------------------------------------------------------------------------------- tests
def test_quotas_hold_across_both_instances(topo: Topology, redis_url: str,
                                           upstream: FakeUpstream) -> None:
    _, secret = make_key(redis_url, images_per_day=6)
    before = [served(gw) for gw in topo.gateways]

    def one(_: int) -> str:
        try:
            edit(topo.sdk(secret))
            return "ok"
        except openai.RateLimitError as exc:
            assert exc.code == "insufficient_quota", exc
            assert exc.response.headers["x-should-retry"] == "false"
            return "quota"

    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        results = list(pool.map(one, range(20)))
    assert results.count("ok") == 6 and results.count("quota") == 14, results
    assert len(upstream.completed) == 6
    delta = [served(gw) - b for gw, b in zip(topo.gateways, before, strict=True)]
    assert sum(delta) == 20 and all(d > 0 for d in delta), delta  # nginx used both


def test_large_upload_streams_through_nginx_with_bounded_memory(
        topo: Topology, upstream: FakeUpstream) -> None:
    edit(topo.sdk())  # each worker and gateway past its first request
    edit(topo.sdk())
    upstream.reset()
    img = png(1024, 1024, size=25 * 1024 * 1024)
    body, ctype = multipart([("model", "gpt-image-1", None), ("prompt", "x", None),
                             ("image", img, "big.png")])
    chunk, head = 256 * 1024, 5 * 1024 * 1024
    released = asyncio.Event()
    seen_while_paused: list[int] = []

    async def paused_body() -> AsyncIterator[bytes]:  # chunked: no Content-Length
        for i in range(0, head, chunk):
            yield body[i:i + chunk]
        await released.wait()
        for i in range(head, len(body), chunk):
            yield body[i:i + chunk]

    async def scenario() -> httpx.Response:
        async with httpx.AsyncClient(timeout=30) as http:
            task = asyncio.create_task(http.post(
                f"{topo.nginx.url}/v1/images/edits", content=paused_body(),
                headers={"content-type": ctype, "authorization": f"Bearer {topo.secret}"}))
            deadline = time.monotonic() + 10
            # nginx does not spool the body: most of what the client sent is already upstream.
            while not upstream.records or upstream.records[-1].bytes_received <= 4_000_000:
                assert not task.done(), task.result().text
                assert time.monotonic() < deadline, "the upstream got too little while the client paused"
                await asyncio.sleep(0.02)
            seen_while_paused.append(upstream.records[-1].bytes_received)
            released.set()
            return await task

    sampler = PeakRss(topo.nginx.workers() + [gw.proc.pid for gw in topo.gateways])
    sampler.start()
    try:
        r = asyncio.run(scenario())
    finally:
        growth = sampler.growth_mb()
    assert r.status_code == 200, r.text
    # The upstream's body is the gateway's re-framing of the client's: a few bytes longer.
    assert 4_000_000 < seen_while_paused[0] < head + 64 * 1024
    assert len(upstream.records) == 1 and upstream.last().files[0].sha256 == sha256(img)
    assert all(g < 40 for g in growth.values()), growth  # MB, for a 25 MB upload


def test_sse_arrives_event_by_event(topo: Topology, upstream: FakeUpstream) -> None:
    upstream.behaviour.event_delay = 0.4
    arrivals: list[tuple[float, str]] = []
    stream = topo.sdk().images.edit(model="gpt-image-1", image=png(), prompt="x", stream=True,
                                    partial_images=3)
    for event in stream:
        arrivals.append((time.monotonic(), event.type))
    assert [kind for _, kind in arrivals] == ["image_edit.partial_image"] * 3 + ["image_edit.completed"]
    gaps = [b[0] - a[0] for a, b in itertools.pairwise(arrivals)]
    assert arrivals[-1][0] - arrivals[0][0] > 1.0 and all(g > 0.25 for g in gaps), gaps


def _access_line(gateways: tuple[GatewayProcess, ...], request_id: str) -> dict:
    deadline = time.monotonic() + 5  # the gateway's log lines are written by a thread
    while True:
        for gw in gateways:
            for line in gw.log().splitlines():
                if line.startswith("{") and request_id in line:
                    record = json.loads(line)
                    if record.get("logger") == "gateway.access" and \
                            record.get("request_id") == request_id:
                        return record
        assert time.monotonic() < deadline, f"no access line for {request_id}"
        time.sleep(0.05)


def test_request_id_trace_and_client_address_pass_through(topo: Topology,
                                                          upstream: FakeUpstream) -> None:
    request_id, trace_id = f"req-topology-{uuid.uuid4().hex}", uuid.uuid4().hex
    traceparent = f"00-{trace_id}-b7ad6b7169203331-01"
    raw = topo.sdk().images.with_raw_response.edit(
        model="gpt-image-1", image=png(), prompt="x",
        extra_headers={"X-Request-Id": request_id, "traceparent": traceparent,
                       "X-Forwarded-For": "203.0.113.9"})
    assert raw.headers["x-request-id"] == request_id
    seen = upstream.last().headers
    assert seen["x-request-id"] == request_id
    # The gateway continues the client's trace with a span of its own.
    assert seen["traceparent"].split("-")[1] == trace_id and seen["traceparent"] != traceparent
    line = _access_line(topo.gateways, request_id)
    assert line["trace_id"] == trace_id
    # nginx replaces X-Forwarded-For with the address it saw (the test client's, 127.0.0.1):
    # the address the client claimed never reaches the gateway's log.
    assert line["client"].rsplit(":", 1)[0] == "127.0.0.1", line

    # No id from the client: nginx's $request_id is used, by nginx's log and the gateway alike.
    upstream.reset()
    r = httpx.post(f"{topo.nginx.url}/v1/images/edits", timeout=30,
                   headers={"authorization": f"Bearer {topo.secret}"},
                   files={"image": ("a.png", png(), "image/png")},
                   data={"model": "gpt-image-1", "prompt": "x"})
    assert r.status_code == 200, r.text
    generated = r.headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", generated), generated
    assert upstream.last().headers["x-request-id"] == generated
    assert _access_line(topo.gateways, generated)["client"].startswith("127.0.0.1:")
    deadline = time.monotonic() + 5  # nginx writes its line when the request ends
    while not any(a["request_id"] == generated for a in topo.nginx.access_lines()):
        assert time.monotonic() < deadline, topo.nginx.log()[-2000:]
        time.sleep(0.05)


def test_nginx_own_answers(topo: Topology) -> None:
    r = httpx.get(f"{topo.nginx.url}/nginx-health", timeout=5)
    assert (r.status_code, r.text) == (200, "ok\n")
    # /metrics (per-key usage) is on each gateway's metrics port, which nginx does not proxy:
    # neither the gateways' API port nor nginx serves it.
    assert httpx.get(metrics_url(topo.gateways[0]), timeout=5).status_code == 200
    for url in (topo.gateways[0].url, topo.nginx.url):
        for path in ("/metrics", "/metrics/", "//metrics", "/%6detrics", "/metrics?x=1"):
            answer = httpx.get(f"{url}{path}", timeout=5)
            assert answer.status_code == 404 and "gateway_" not in answer.text, (url, path)
    # Above client_max_body_size nginx refuses from the headers, in OpenAI's error shape.
    answer = raw_exchange(topo.nginx.port, b"POST /v1/images/edits HTTP/1.1\r\nHost: x\r\n"
                          b"Content-Length: 1000000000\r\n"
                          b"Content-Type: multipart/form-data; boundary=b\r\n\r\n")
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413"), head
    assert json.loads(body)["error"]["code"] == "request_too_large"


def test_killing_one_gateway_leaves_the_other_serving(
        start_gateway: Callable[..., GatewayProcess], redis_url: str,
        upstream: FakeUpstream) -> None:
    with topology(start_gateway, redis_url) as t:  # its own pair: this test kills one
        first, second = t.gateways
        for _ in range(4):
            edit(t.sdk())  # round robin: both gateways now hold idle keepalive connections
        assert served(first) > 0 and served(second) > 0
        before = served(second)
        first.proc.kill()
        first.proc.wait(timeout=5)
        # The kernel closed gateway 1's sockets: nginx sees its idle keepalive connections to it
        # close and drops them. Reusing one in that instant would be a sent POST, never retried.
        time.sleep(0.2)
        for _ in range(10):
            edit(t.sdk())
        # None failed: the first request nginx sent to gateway 1 got a refused connection (nothing
        # sent), was retried on gateway 2 (proxy_next_upstream error), and gateway 1 is then
        # skipped by every worker for fail_timeout (max_fails=1, shared zone).
        assert served(second) - before == 10
        assert len(upstream.completed) == 14
        refused = [line for line in t.nginx.log().splitlines() if "Connection refused" in line]
        assert len(refused) == 1 and f":{first.port}/" in refused[0], refused
        [retried] = [a for a in t.nginx.access_lines() if ", " in a["upstream"]]
        assert retried["upstream"] == f"127.0.0.1:{first.port}, 127.0.0.1:{second.port}"
        assert (retried["upstream_status"], retried["status"]) == ("502, 200", 200)
