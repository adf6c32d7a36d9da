"""Settings and the catalog as an operator meets them: start-up errors from the CLI, and gateways
started with a config of their own (the rules alone: tests/unit/test_settings.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import httpx
import openai
import pytest

from tests.conftest import GatewayProcess
from tests.support.fake_upstream import FakeUpstream
from tests.support.images import png


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    return subprocess.run([sys.executable, "-m", "gateway.cli", *args], env={**clean, **(env or {})},
                          capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize(("env", "config", "expected"), [
    ({"GATEWAY_UPSTREAM_READ_TIMEOUT": "soon"}, None,
     "upstream_read_timeout (GATEWAY_UPSTREAM_READ_TIMEOUT)"),
    ({"GATEWAY_UPSTREAM_BASE_URL": "api.openai.com"}, None, "must start with http"),
    ({"GATEWAY_SPOOL_DIR": "/nonexistent/spool"}, None, "spool_dir (GATEWAY_SPOOL_DIR)"),
    ({"GATEWAY_UNKNOWN_MODELS": "maybe"}, None, "unknown_models"),
    ({"GATEWAY_DEFAULT_MODEL": "gpt-image-9"}, None, "default_model"),
    ({}, "upstream_read_timout = 5\n",
     "upstream_read_timout (GATEWAY_UPSTREAM_READ_TIMOUT): unknown setting"),
    ({}, "port = [", "not valid TOML"),
    ({}, '[models."x"]\nextends = "gpt-image-1"\nupstream = "nowhere"\n',
     "upstream 'nowhere' is not defined"),
    ({}, '[models."x"]\nextends = "nope"\n', "extends unknown model 'nope'"),
    ({}, '[models."x"]\nmax_images = "many"\n', "catalog model 'x'"),
    ({}, '[upstreams.b]\nbase_url = "http://b"\napi_key_env = "NO_SUCH_VAR_X"\n', "NO_SUCH_VAR_X is not set"),
])
def test_bad_settings_stop_startup_with_one_line(tmp_path: Path, env: dict[str, str],
                                                 config: str | None, expected: str) -> None:
    args = ["serve", "--port", "0"]
    if config is not None:
        (tmp_path / "g.toml").write_text(config)
        args += ["--config", str(tmp_path / "g.toml")]
    result = run_cli(*args, env=env)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gateway: "), result.stderr
    assert expected in lines[0]
    assert "Traceback" not in result.stderr


def test_missing_config_file_is_one_line() -> None:
    result = run_cli("serve", "--config", "/nonexistent/gateway.toml")
    assert result.returncode == 2
    assert result.stderr.strip() == "gateway: config file /nonexistent/gateway.toml does not exist"


def test_an_operator_adds_a_model_on_its_own_upstream(
        start_gateway: Callable[..., GatewayProcess], upstream: FakeUpstream) -> None:
    other = FakeUpstream().start()
    try:
        os.environ["TEST_OTHER_KEY"] = "sk-other-upstream"
        gw = start_gateway(config=f"""
[upstreams.other]
base_url = "{other.url}"
api_key_env = "TEST_OTHER_KEY"

[models."house-style"]
extends = "flux-kontext-pro"
upstream = "other"
upstream_model = "flux-kontext-max"
max_images = 2
""")
        client = gw.client()
        assert "house-style" in {m.id for m in client.models.list()}
        client.images.edit(model="house-style", image=png(), prompt="x", response_format="url")
        rec = other.last()
        assert rec.headers["authorization"] == "Bearer sk-other-upstream"
        assert (rec.field("model"), rec.field("response_format")) == ("flux-kontext-max", "url")
        assert upstream.records == []
    finally:
        os.environ.pop("TEST_OTHER_KEY", None)
        other.stop()


ADMIN_KEY = "admin-0123456789abcdef"


def test_the_admin_api_accepts_the_key_without_its_newline(
        start_gateway: Callable[..., GatewayProcess], upstream: FakeUpstream) -> None:
    gw = start_gateway(admin_key=f"{ADMIN_KEY}\n")
    created = httpx.post(f"{gw.url}/admin/keys", json={"name": "from-secret"},
                         headers={"authorization": f"Bearer {ADMIN_KEY}"})
    assert created.status_code in (200, 201), created.text
    assert created.json()["key"].startswith("sk-gw-")
    assert httpx.get(f"{gw.url}/admin/keys", headers={
        "authorization": f"Bearer {ADMIN_KEY}x"}).status_code == 401
    sdk = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=created.json()["key"], max_retries=0)
    assert sdk.images.edit(model="gpt-image-1", image=png(), prompt="x").data
