"""Real servers on loopback: the fake upstream (a thread) and the gateway (a `gateway serve`
process, started through the CLI as an operator would)."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import openai
import pytest
from pytest_redis import factories

from tests.support.fake_upstream import FakeUpstream, _free_port
from tests.support.helpers import TEST_CATALOG, flush

UPSTREAM_KEY = "sk-upstream-secret-0123456789"
# Gateways run on the test catalog (tests/support/catalog.toml) unless a test names another.
TEST_CATALOG_ENV = {"GATEWAY_CATALOG_FILE": str(TEST_CATALOG), "GATEWAY_DEFAULT_MODEL": "gpt-image-1"}


class GatewayProcess:
    def __init__(self, env: dict[str, str], config: Path | None = None,
                 log_path: Path | None = None) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        args = [sys.executable, "-m", "gateway.cli", "serve", "--port", str(self.port)]
        if config is not None:
            args += ["--config", str(config)]
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
        full_env.update(TEST_CATALOG_ENV)
        full_env.update(env)
        # A file, not a pipe: a pipe nobody reads fills up and blocks the gateway's logging.
        self.log_path = log_path or Path(tempfile.mkstemp(prefix="gateway-", suffix=".log")[1])
        with self.log_path.open("w") as log:
            self.proc = subprocess.Popen(args, env=full_env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gateway exited: {self.log()}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=0.5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("gateway did not start")
            time.sleep(0.05)

    def client(self, **kwargs: object) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="sk-client", max_retries=0,
                             **kwargs)  # type: ignore[arg-type]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> str:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=40)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        return self.log()


@pytest.fixture(scope="session")
def upstream() -> Iterator[FakeUpstream]:
    fake = FakeUpstream().start()
    yield fake
    fake.stop()


@pytest.fixture(autouse=True)
def _reset_upstream(request: pytest.FixtureRequest) -> None:
    if "upstream" in request.fixturenames:
        request.getfixturevalue("upstream").reset()


@pytest.fixture(scope="session")
def start_gateway(upstream: FakeUpstream, tmp_path_factory: pytest.TempPathFactory
                  ) -> Iterator[Callable[..., GatewayProcess]]:
    """Start a gateway against the fake upstream; keyword settings become GATEWAY_* variables,
    `config` is TOML text for --config."""
    started: list[GatewayProcess] = []

    def start(config: str | None = None, **settings: object) -> GatewayProcess:
        env = {"GATEWAY_UPSTREAM_BASE_URL": upstream.url, "GATEWAY_UPSTREAM_API_KEY": UPSTREAM_KEY,
               "GATEWAY_DRAIN_SECONDS": "0"}  # tests of the drain set their own
        env.update({f"GATEWAY_{k.upper()}": str(v) for k, v in settings.items()})
        path = None
        if config is not None:
            path = tmp_path_factory.mktemp("config") / "gateway.toml"
            path.write_text(config)
        gw = GatewayProcess(env, path)
        started.append(gw)
        return gw

    yield start
    for gw in started:  # all at once: each takes a moment to shut down
        gw.proc.terminate()
    for gw in started:
        gw.stop()


@pytest.fixture(scope="session")
def gateway(start_gateway: Callable[..., GatewayProcess]) -> GatewayProcess:
    return start_gateway()


@pytest.fixture
def client(gateway: GatewayProcess) -> openai.OpenAI:
    return gateway.client()


# One redis-server of our own (pytest-redis, a free port) for the gateways with keys.
keys_redis = factories.redis_proc(port=None)


@pytest.fixture
def redis_url(keys_redis) -> Iterator[str]:  # pytest-redis's executor
    url = f"redis://{keys_redis.host}:{keys_redis.port}/0"
    yield url
    flush(url)  # our own redis-server, started for these tests


@pytest.fixture
def keyed(start_gateway: Callable[..., GatewayProcess], redis_url: str
          ) -> Callable[..., GatewayProcess]:
    """Start a gateway whose keys and quotas live in that Redis."""
    def start(config: str | None = None, **settings: object) -> GatewayProcess:
        return start_gateway(config, redis_url=redis_url, **settings)
    return start
