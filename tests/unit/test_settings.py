"""Settings and the catalog as rules: the config file, the environment and the catalog, loaded
in-process (no gateway started)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from gateway.catalog import Catalog
from gateway.errors import InvalidRequest, SettingsError
from gateway.settings import load_settings

ROOT = Path(__file__).resolve().parents[2]


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
