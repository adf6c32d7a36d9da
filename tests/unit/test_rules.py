"""gateway.images.rules on plain values: a spec from the shipped catalog, a few fields, an
ImageInfo. No server, no request."""

from __future__ import annotations

import pytest

from gateway.catalog import Catalog
from gateway.errors import Forbidden, InvalidRequest, NotFound
from gateway.images import rules
from gateway.images.rules import IMAGE, MASK, Bounds
from gateway.sniff import ImageInfo
from tests.support.helpers import suite_settings


@pytest.fixture(scope="module")
def catalog() -> Catalog:
    return Catalog.from_settings(suite_settings())


def _png(w: int, h: int, *, alpha: bool = False) -> ImageInfo:
    return ImageInfo("png", w, h, alpha)


def _refused(call, *args, **kwargs) -> InvalidRequest:  # type: ignore[no-untyped-def]
    with pytest.raises(InvalidRequest) as caught:
        call(*args, **kwargs)
    return caught.value


def test_a_mask_of_other_dimensions_than_the_first_image_is_refused(catalog: Catalog) -> None:
    spec = catalog.models["gpt-image-1"]
    rules.judge_mask(spec, _png(64, 64, alpha=True), _png(64, 64))  # same size: fine
    err = _refused(rules.judge_mask, spec, _png(32, 64, alpha=True), _png(64, 64))
    assert (err.param, err.code) == ("mask", "invalid_image_dimensions")
    assert "32x64" in err.message and "64x64" in err.message
    # Until both are known there is nothing to compare.
    rules.judge_mask(spec, None, _png(64, 64))
    rules.judge_mask(spec, _png(32, 64, alpha=True), None)


def test_images_are_judged_by_format_side_squareness_and_alpha(catalog: Catalog) -> None:
    gpt, dalle = catalog.models["gpt-image-1"], catalog.models["dall-e-2"]
    rules.judge_image(gpt, IMAGE, "image[1]", ImageInfo("webp", 100, 50, False))
    err = _refused(rules.judge_image, dalle, IMAGE, "image", ImageInfo("jpeg", 64, 64, False))
    assert (err.param, err.code) == ("image", "invalid_image_format")
    err = _refused(rules.judge_image, dalle, IMAGE, "image", _png(64, 32))
    assert (err.param, err.code) == ("image", "invalid_image_dimensions")
    err = _refused(rules.judge_image, gpt, IMAGE, "image[2]", _png(gpt.max_image_side + 1, 8))
    assert (err.param, err.code) == ("image[2]", "invalid_image_dimensions")
    err = _refused(rules.judge_image, gpt, MASK, "mask", _png(64, 64, alpha=False))
    assert (err.param, err.code) == ("mask", "invalid_image_format")
    rules.judge_image(gpt, MASK, "mask", _png(64, 64, alpha=True))


def test_fields_are_normalized_and_defaults_filled(catalog: Catalog) -> None:
    spec = catalog.models["gpt-image-1"]
    judged = rules.judge_fields(catalog, spec, {"model": "gpt-image-1", "prompt": "p",
                                                "quality": " HIGH ", "n": "2"})
    assert judged is not None
    assert judged.values == {"model": "gpt-image-1", "prompt": "p", "quality": "high", "n": "2"}
    assert judged.sent == ["quality", "n"]
    assert rules.requested_n(spec, judged.values) == 2
    assert rules.final_values(judged)["quality"] == "high"


def test_a_combination_not_valid_yet_waits_unless_final(catalog: Catalog) -> None:
    spec = catalog.models["gpt-image-1"]
    fields = {"model": "gpt-image-1", "prompt": "p", "output_compression": "50"}
    # output_compression needs output_format jpeg or webp: a later field may still bring it.
    assert rules.judge_fields(catalog, spec, fields, final=False) is None
    err = _refused(rules.judge_fields, catalog, spec, fields)
    assert err.param == "output_compression"
    judged = rules.judge_fields(catalog, spec, {**fields, "output_format": "webp"})
    assert judged is not None and judged.values["output_format"] == "webp"


def test_prompt_and_field_refusals_name_the_field(catalog: Catalog) -> None:
    dalle = catalog.models["dall-e-2"]
    err = _refused(rules.judge_prompt, dalle, " ")
    assert (err.param, err.code) == ("prompt", "missing_required_parameter")
    err = _refused(rules.judge_prompt, dalle, "x" * (dalle.prompt_max_chars + 1))
    assert (err.param, err.code) == ("prompt", "string_above_max_length")
    err = _refused(rules.normalize, catalog, dalle, "input_fidelity", "high")
    assert (err.param, err.code) == ("input_fidelity", "unsupported_parameter")
    err = _refused(rules.normalize, catalog, dalle, "colour", "red")
    assert (err.param, err.code) == ("colour", "unknown_parameter")


def test_late_fields_cannot_repeat_model_or_prompt(catalog: Catalog) -> None:
    spec = catalog.models["gpt-image-1"]
    judged = rules.judge_fields(catalog, spec, {"model": "gpt-image-1", "prompt": "p"})
    assert judged is not None
    rules.judge_late_field(catalog, judged, "n", "3")
    assert judged.sent == ["n"] and rules.requested_n(spec, judged.values) == 3
    err = _refused(rules.judge_late_field, catalog, judged, "prompt", "again")
    assert (err.param, err.code) == ("prompt", "duplicate_parameter")


def test_counts_and_sizes_before_and_after_the_model_is_known(catalog: Catalog) -> None:
    bounds = Bounds.of(catalog)
    dalle = catalog.models["dall-e-2"]
    rules.judge_count(None, bounds.max_images - 1, "image[15]", bounds)
    err = _refused(rules.judge_count, None, bounds.max_images, "image[16]", bounds)
    assert err.code == "too_many_images"
    err = _refused(rules.judge_total, dalle, 2)
    assert (err.param, err.code) == ("image[1]", "too_many_images")
    assert rules.size_limit(None, IMAGE, bounds) == bounds.max_file_bytes
    err = _refused(rules.judge_size, dalle, IMAGE, "image", dalle.max_image_bytes + 1, bounds)
    assert (err.param, err.code) == ("image", "image_too_large")


def test_models_a_key_may_not_use_are_forbidden_before_anything_else() -> None:
    rules.allowed_model((), "anything")  # no list: every model
    rules.allowed_model(("gpt-image-1",), "gpt-image-1")
    with pytest.raises(Forbidden) as caught:
        rules.allowed_model(("gpt-image-1",), "dall-e-2")
    assert (caught.value.status, caught.value.code) == (403, "model_not_allowed")


def test_disabled_and_unknown_models(catalog: Catalog) -> None:
    with pytest.raises(InvalidRequest) as caught:
        catalog.resolve("no-such-model")
    assert caught.value.param == "model"
    with pytest.raises(NotFound):
        Catalog.from_settings(suite_settings(models={"dall-e-2": {"enabled": False}})
                              ).resolve("dall-e-2")
