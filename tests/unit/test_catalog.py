"""The shipped catalog (gateway/catalog.toml) as of 2026-12-02: which models are served, which are
shut down and what replaces them, aliases, and the 2.6 models' rules between fields. No server."""

from __future__ import annotations

import datetime as dt

import pytest

from gateway.catalog import Catalog
from gateway.errors import InvalidRequest, NotFound, SettingsError
from gateway.images import rules
from tests.support.helpers import shipped_settings

TODAY = dt.date(2026, 12, 2)


def _catalog(**values: object) -> Catalog:
    catalog = Catalog.from_settings(shipped_settings(**values))
    catalog.today = lambda: TODAY
    return catalog


@pytest.fixture(scope="module")
def catalog() -> Catalog:
    return _catalog()


def test_the_models_served_today(catalog: Catalog) -> None:
    served = {m.name for m in catalog.served()}
    assert {"gpt-image-2", "gpt-image-2-2026-04-21", "gpt-image-2.6-flare",
            "gpt-image-2.6-sunburst", "gpt-image-2.5-flare", "gpt-image-2.5-sunburst"} <= served
    # The seed provider's models stay, though they extend a shut-down model's table.
    assert {"gpt-image-1-all", "flux-kontext-pro", "flux-kontext-max"} <= served
    gone = {"gpt-image-1", "gpt-image-1.5", "gpt-image-1-mini", "chatgpt-image-latest", "dall-e-2"}
    assert not served & gone
    assert catalog.resolve(None).name == catalog.default_model == "gpt-image-2"


@pytest.mark.parametrize(("model", "date", "replacement"), [
    ("gpt-image-1", "2026-10-23", "gpt-image-2.5-sunburst"),
    ("gpt-image-1.5", "2026-12-01", "gpt-image-2.6-sunburst"),
    ("chatgpt-image-latest", "2026-12-01", "gpt-image-2.6-sunburst"),
    ("gpt-image-1-mini", "2026-12-01", "gpt-image-2.6-flare"),
    ("dall-e-2", "2026-05-12", "gpt-image-2.5-sunburst"),
])
def test_a_shut_down_model_is_404_naming_its_replacement(catalog: Catalog, model: str, date: str,
                                                          replacement: str) -> None:
    with pytest.raises(NotFound) as caught:
        catalog.resolve(model)
    err = caught.value
    assert (err.status, err.code, err.param) == (404, "model_not_found", "model")
    assert date in err.message and f"'{replacement}'" in err.message


def test_a_model_is_served_until_its_shutdown_date() -> None:
    catalog = _catalog()
    catalog.today = lambda: dt.date(2026, 11, 30)
    assert catalog.resolve("gpt-image-1.5").name == "gpt-image-1.5"
    catalog.today = lambda: dt.date(2026, 12, 1)
    with pytest.raises(NotFound):
        catalog.resolve("gpt-image-1.5")


def test_an_alias_is_judged_by_its_target_and_sent_under_its_name() -> None:
    catalog = _catalog(aliases={"gpt-image-1": "gpt-image-2.6-flare"})
    spec = catalog.resolve("gpt-image-1")
    assert spec.name == "gpt-image-2.6-flare"
    judged = rules.judge_fields(catalog, spec, {"model": "gpt-image-1", "prompt": "p",
                                                "complexity": "high"})
    assert judged is not None and judged.values["model"] == "gpt-image-2.6-flare"
    # A key may list either name.
    assert rules.allowed_model(("gpt-image-1",), "gpt-image-1", "gpt-image-2.6-flare") == \
        "gpt-image-1"
    assert rules.allowed_model(("gpt-image-2.6-flare",), "gpt-image-1", "gpt-image-2.6-flare") == \
        "gpt-image-2.6-flare"


def test_a_catalog_name_in_other_letters_is_not_passed_through() -> None:
    catalog = _catalog(unknown_models="pass")
    assert catalog.resolve("some-other-model").open_fields  # unknown names pass through ...
    for name in ("GPT-IMAGE-1", "Gpt-Image-2"):  # ... but not a catalog model's, unjudged
        with pytest.raises(InvalidRequest, match="Did you mean"):
            catalog.resolve(name)


def test_an_alias_to_a_model_not_served_is_one_start_up_error() -> None:
    with pytest.raises(SettingsError, match=r"aliases\.x: 'gpt-image-1\.5' is not a model"):
        _catalog(aliases={"x": "gpt-image-1.5"})
    with pytest.raises(SettingsError, match="default_model"):
        _catalog(default_model="gpt-image-1")
    with pytest.raises(SettingsError, match="itself an alias"):
        _catalog(aliases={"a": "b", "b": "gpt-image-2"})
    # A retired model names a replacement the operator switched off: still a valid catalog.
    _catalog(models={"gpt-image-2.5-sunburst": {"enabled": False}})
    # A model with a shutdown date ahead, as the default: served, and announced at start-up.
    ahead = _catalog(default_model="soon",
                     models={"soon": {"extends": "gpt-image-2", "shutdown_date": "2099-01-01",
                                      "replacement": "gpt-image-2"}})
    assert [(role, spec.name) for role, spec in ahead.retiring()] == [("default_model", "soon")]


def _judge(catalog: Catalog, fields: dict[str, str], *, mask: bool = False) -> dict[str, str]:
    spec = catalog.resolve(fields.get("model"))
    judged = rules.judge_fields(catalog, spec, {"prompt": "p", **fields})
    assert judged is not None
    return rules.final_values(judged, mask=mask)


def _refused(catalog: Catalog, fields: dict[str, str], *, mask: bool = False) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as caught:
        _judge(catalog, fields, mask=mask)
    return caught.value


def test_gif_output_on_the_2_6_models(catalog: Catalog) -> None:
    gif = {"model": "gpt-image-2.6-sunburst", "output_format": "gif"}
    values = _judge(catalog, {**gif, "frame_count": "9", "frame_duration_ms": "120",
                              "size": "960x960", "stream": "false"})
    assert values["frame_count"] == "9"
    for other in ({"stream": "true"}, {"partial_images": "1", "stream": "true"},
                  {"output_compression": "50"}):
        assert _refused(catalog, {**gif, **other}).param in ("output_format", "partial_images")
    assert _refused(catalog, gif, mask=True).param == "output_format"
    # Frames share one image's pixel budget: 9 of 1024x1024 are over it.
    err = _refused(catalog, {**gif, "frame_count": "9", "size": "1024x1024"})
    assert err.param == "frame_count"
    # ... also when the client leaves the count to the provider's default (9).
    assert _refused(catalog, {**gif, "size": "3840x2160"}).param == "size"
    assert _judge(catalog, {**gif, "size": "auto", "frame_count": "16"})["size"] == "auto"
    assert _refused(catalog, {"model": "gpt-image-2.6-flare", "frame_count": "4"}).param == \
        "frame_count"  # GIF only
    assert _refused(catalog, {**gif, "frame_count": "17"}).code == "integer_out_of_range"
    assert _refused(catalog, {**gif, "frame_duration_ms": "10"}).param == "frame_duration_ms"


def test_svg_is_one_image_and_complexity_is_new_in_2_6(catalog: Catalog) -> None:
    svg = {"model": "gpt-image-2.6-flare", "output_format": "svg"}
    assert _judge(catalog, svg)["output_format"] == "svg"
    assert _refused(catalog, {**svg, "n": "2"}).param == "output_format"
    assert _judge(catalog, {"model": "gpt-image-2.6-flare", "complexity": "LOW",
                            "quality": "max"})["complexity"] == "low"
    err = _refused(catalog, {"model": "gpt-image-2", "complexity": "low"})
    assert (err.param, err.code) == ("complexity", "unsupported_parameter")
    assert _refused(catalog, {"model": "gpt-image-2", "output_format": "gif"}).param == \
        "output_format"
