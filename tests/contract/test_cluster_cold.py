"""A cold Redis Cluster under a burst: two fresh gateways pointed at one node of a fresh
three-master cluster, 30 edits at once on a new key. Every request must get the answer its
quota says (200 or 429), never a 500 from the cluster client initialising under load."""

from __future__ import annotations

import concurrent.futures
import json
import os
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import GatewayProcess
from tests.support import redis_nodes
from tests.support.fake_upstream import FakeUpstream
from tests.support.images import png

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def fresh_cluster(tmp_path: Path) -> Iterator[str]:
    """A new cluster per test (no script loaded, no client has seen it): one node's URL."""
    with redis_nodes.cluster(tmp_path) as url:
        yield url


def create_key(redis_url: str, **limits: int) -> str:
    """A key created as an operator would (`gateway keys create`); its secret."""
    flags = [arg for name, value in limits.items()
             for arg in (f"--{name.replace('_', '-')}", str(value))]
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env["GATEWAY_REDIS_URL"] = redis_url
    proc = subprocess.run([sys.executable, "-m", "gateway.cli", "keys", "create", "--name", "cold",
                           *flags, "--json"], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=30)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)["key"]


@pytest.mark.parametrize("attempt", [1, 2])
def test_a_cold_cluster_answers_a_burst_exactly(
        attempt: int, fresh_cluster: str, start_gateway: Callable[..., GatewayProcess],
        upstream: FakeUpstream) -> None:
    gateways = [start_gateway(redis_url=fresh_cluster), start_gateway(redis_url=fresh_cluster)]
    secret = create_key(fresh_cluster, images_per_day=7)
    start = threading.Barrier(30)

    def one(i: int) -> int:
        start.wait()  # all 30 at once, against gateways that never talked to the cluster
        answer = httpx.post(
            f"{gateways[i % 2].url}/v1/images/edits", timeout=30,
            headers={"authorization": f"Bearer {secret}"},
            data={"model": "gpt-image-1", "prompt": "x"},
            files={"image": ("a.png", png(), "image/png")})
        return answer.status_code

    try:
        with concurrent.futures.ThreadPoolExecutor(30) as pool:
            statuses = list(pool.map(one, range(30)))
        logs = "".join(gw.log() for gw in gateways)
        trace = logs[logs.find("Traceback"):][:3000] if "Traceback" in logs else ""
        assert Counter(statuses) == {200: 7, 429: 23}, (Counter(statuses), trace)
        assert len(upstream.completed) == 7
        assert not trace, trace
    finally:
        for gw in gateways:
            gw.stop()
