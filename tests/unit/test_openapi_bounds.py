"""The OpenAPI document's bounds come from the catalog the gateway runs with, not literals."""

from __future__ import annotations

from gateway import openapi
from gateway.catalog import Catalog
from tests.support.helpers import suite_settings


def test_the_edit_and_generation_bounds_follow_the_catalog() -> None:
    catalog = Catalog.from_settings(suite_settings(models={"gpt-image-1": {
        "max_images": 40, "prompt_max_chars": 50_000,
        "fields": {"n": {"min": 1, "max": 12}, "user": {"max_chars": 700}}}}))
    form = openapi.edit_form(catalog)["properties"]
    assert form["image"]["maxItems"] == form["image[]"]["maxItems"] == 40
    assert "up to 40 images" in form["image"]["description"]
    assert form["prompt"]["maxLength"] == 50_000 and "50,000" in form["prompt"]["description"]
    assert (form["n"]["minimum"], form["n"]["maximum"]) == (1, 12)
    assert form["user"]["maxLength"] == 700
    body = openapi.generation_body(catalog)["properties"]
    assert body["prompt"]["maxLength"] == 50_000 and "image" not in body
    assert "input_fidelity" not in body
