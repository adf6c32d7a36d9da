"""Settings and the catalog as an operator meets them: config file, environment, start-up errors."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import httpx
import openai
import pytest

from gateway.catalog import Catalog
from gateway.errors import InvalidRequest, SettingsError
from gateway.settings import load_settings
from tests.conftest import GatewayProcess
from tests.support.fake_upstream import FakeUpstream
from tests.support.images import png

ROOT = Path(__file__).resolve().parents[2]


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


def test_environment_overrides_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "g.toml"
    path.write_text("upstream_read_timeout = 30\nmax_parts = 10\n")
    monkeypatch.setenv("GATEWAY_UPSTREAM_READ_TIMEOUT", "7.5")
    settings = load_settings(path)
    assert (settings.upstream_read_timeout, settings.max_parts) == (7.5, 10)
    monkeypatch.setenv("GATEWAY_CONFIG", str(path))
    assert load_settings().max_parts == 10


def test_shipped_example_config_is_valid(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in [k for k in os.environ if k.startswith("GATEWAY_")]:
        monkeypatch.delenv(key)
    settings = load_settings(ROOT / "config" / "gateway.example.toml")
    catalog = Catalog.from_settings(settings)
    # The example documents the computed default body limit; keep it true.
    assert f"max_body_bytes = {catalog.max_request_bytes + 1024 * 1024}" in (
        ROOT / "config" / "gateway.example.toml").read_text()


def test_catalog_extends_removes_and_disables(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    path = tmp_path / "g.toml"
    path.write_text('[models."dall-e-2"]\nenabled = false\n'
                    '[models."mine"]\nextends = "gpt-image-2"\nmax_images = 2\nfields.stream = false\n'
                    'mask = false\n')
    catalog = Catalog.from_settings(load_settings(path))
    assert "dall-e-2" not in catalog.models
    mine = catalog.models["mine"]
    assert (mine.max_images, mine.mask, "stream" in mine.fields) == (2, None, False)
    assert mine.fields["size"].normalize("size", "3840x1280") == "3840x1280"  # inherited rule, 3:1
    for bad in ("3840x1264", "3840x2176", "512x512"):  # aspect > 3, too many pixels, too few
        with pytest.raises(InvalidRequest):
            mine.fields["size"].normalize("size", bad)
    path.write_text('[models."a"]\nextends = "b"\n[models."b"]\nextends = "a"\n')
    with pytest.raises(SettingsError, match="cycle"):
        Catalog.from_settings(load_settings(path))


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


def test_admin_key_from_a_mounted_secret_loses_its_newline(tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """A secret file read into the environment or the config ends in a newline that no client
    could ever send in its Authorization header."""
    for key in [k for k in os.environ if k.startswith("GATEWAY_")]:
        monkeypatch.delenv(key)
    path = tmp_path / "g.toml"
    path.write_text(f'admin_key = "{ADMIN_KEY}\\n"\n')
    from_file = load_settings(path).admin_key
    assert from_file is not None and from_file.get_secret_value() == ADMIN_KEY
    monkeypatch.setenv("GATEWAY_ADMIN_KEY", f"  {ADMIN_KEY}\r\n")
    from_env = load_settings().admin_key
    assert from_env is not None and from_env.get_secret_value() == ADMIN_KEY
    monkeypatch.setenv("GATEWAY_ADMIN_KEY", "\n")  # an empty secret file: no admin API
    assert load_settings().admin_key is None


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


def test_fields_passed_through_still_have_n_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    """`n` is reserved against quotas: with unknown_fields = "pass", a model that declares no
    `n` still gets a plain count (what is reserved is what goes upstream)."""
    for name in list(os.environ):
        if name.startswith("GATEWAY_"):
            monkeypatch.delenv(name)
    settings = load_settings(unknown_fields="pass", unknown_models="pass",
                             models={"no-n": {"extends": "gpt-image-1", "fields": {"n": False}}})
    catalog = Catalog.from_settings(settings)
    for spec in (catalog.models["no-n"], catalog.resolve("some-model")):
        assert spec.fields["n"].normalize("n", " 3") == "3"
        for bad in ("+3", "3.0", "\u0663", "0", "11", "abc"):
            with pytest.raises(InvalidRequest):
                spec.fields["n"].normalize("n", bad)
