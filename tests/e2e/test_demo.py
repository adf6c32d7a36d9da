"""`gateway serve --demo`: the whole gateway without a provider, loudly marked as a demo."""

from __future__ import annotations

import base64
from collections.abc import Callable

import httpx
import openai
import pytest

from gateway.sniff import sniff
from tests.conftest import GatewayProcess
from tests.e2e.test_catalog_current import SHIPPED
from tests.support.fake_upstream import FakeUpstream
from tests.support.images import png


def test_every_shape_answers_with_real_images_and_usage(
        start_gateway: Callable[..., GatewayProcess], upstream: FakeUpstream) -> None:
    gw = start_gateway(demo="true", **SHIPPED)
    client = gw.client()
    raw = client.images.with_raw_response.generate(model="gpt-image-2.6-flare", prompt="a cat",
                                                   n=2)
    result = raw.parse()
    assert raw.headers["x-gateway-demo"] == "true"
    assert len(result.data) == 2 and result.usage is not None and result.usage.output_tokens
    image = base64.b64decode(result.data[0].b64_json or "")
    info = sniff(image, final=True)
    assert info is not None and (info.format, info.width) == ("png", 256)
    assert "demo" in (result.data[0].revised_prompt or "")

    edit = client.images.edit(model="gpt-image-2", image=png(), prompt="a hat", n=3)
    assert len(edit.data) == 3
    events = client.images.edit(model="gpt-image-2", image=png(), prompt="x", stream=True,
                                partial_images=1)
    assert [e.type for e in events] == ["image_edit.partial_image", "image_edit.completed"]
    events = client.images.generate(model="gpt-image-2", prompt="x", stream=True)
    assert [e.type for e in events] == ["image_generation.completed"]
    assert upstream.records == []  # nothing went to a provider
    assert "DEMO MODE" in gw.log()


def test_the_demo_keeps_the_gateways_rules(start_gateway: Callable[..., GatewayProcess]) -> None:
    gw = start_gateway(demo="true", **SHIPPED)
    with pytest.raises(openai.NotFoundError) as caught:
        gw.client().images.generate(model="gpt-image-1", prompt="x")
    assert caught.value.code == "model_not_found"


def test_only_the_gateway_may_call_the_stand_in(start_gateway: Callable[..., GatewayProcess]
                                                ) -> None:
    gw = start_gateway(demo="true", **SHIPPED)
    for headers in ({}, {"authorization": "Bearer guess"}):
        answer = httpx.post(f"{gw.url}/_demo/v1/images/generations", headers=headers,
                            json={"prompt": "x", "n": 1_000_000})
        assert answer.status_code == 404
    off = start_gateway()
    assert httpx.post(f"{off.url}/_demo/v1/images/generations", json={}).status_code == 404
