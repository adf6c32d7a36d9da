"""POST /v1/images/generations through `gateway serve` with the official SDK: the same rules,
keys, quotas, relay and metrics as an edit, with a JSON body."""

from __future__ import annotations

from collections.abc import Callable

import httpx
import openai
import pytest

from tests.conftest import GatewayProcess
from tests.e2e.test_catalog_current import SHIPPED
from tests.support.fake_upstream import SVG_USAGE, FakeUpstream
from tests.support.helpers import make_key, scrape, usage_of, value


def test_a_generation_goes_upstream_as_typed_json(client: openai.OpenAI,
                                                  upstream: FakeUpstream) -> None:
    raw = client.images.with_raw_response.generate(
        model="gpt-image-1", prompt="a lighthouse", n=2, quality="HIGH", moderation="low",
        response_format="b64_json")
    result = raw.parse()
    assert len(result.data) == 2 and result.usage is not None
    rec = upstream.last()
    assert rec.path == "/v1/images/generations"
    assert rec.headers["content-type"] == "application/json"
    assert rec.json == {"model": "gpt-image-1", "prompt": "a lighthouse", "n": 2,
                        "quality": "high", "moderation": "low", "size": "auto",
                        "output_format": "png"}  # response_format: GPT image models drop it
    assert raw.headers["x-request-id"] == rec.headers["x-request-id"]


def test_a_streamed_generation_is_relayed_event_by_event(client: openai.OpenAI,
                                                         upstream: FakeUpstream) -> None:
    stream = client.images.generate(model="gpt-image-1", prompt="x", stream=True,
                                    partial_images=2)
    kinds = [event.type for event in stream]
    assert kinds == ["image_generation.partial_image"] * 2 + ["image_generation.completed"]
    assert upstream.last().json == {"model": "gpt-image-1", "prompt": "x", "stream": True,
                                    "partial_images": 2, "n": 1, "size": "auto",
                                    "quality": "auto", "output_format": "png"}


def test_the_2_6_fields_on_a_generation(start_gateway: Callable[..., GatewayProcess],
                                        upstream: FakeUpstream) -> None:
    gw = start_gateway(**SHIPPED)
    gw.client().images.generate(
        model="gpt-image-2.6-flare", prompt="a spinning coin", size="960x960",
        extra_body={"output_format": "gif", "frame_count": 9, "frame_duration_ms": 80,
                    "complexity": "low"})
    sent = upstream.last().json
    assert sent is not None
    assert (sent["output_format"], sent["frame_count"], sent["frame_duration_ms"]) == \
        ("gif", 9, 80)
    with pytest.raises(openai.BadRequestError) as caught:  # an edit's field
        gw.client().images.generate(model="gpt-image-2", prompt="x",
                                    extra_body={"input_fidelity": "high"})
    assert caught.value.body["param"] == "input_fidelity"  # type: ignore[index]
    assert caught.value.code == "unsupported_parameter"


@pytest.mark.parametrize(("body", "headers", "status", "code", "param"), [
    (b'{"prompt": "x", ', {}, 400, "invalid_json", None),
    (b'["prompt"]', {}, 400, "invalid_json", None),
    (b'{"prompt": "x", "n": [1]}', {}, 400, "invalid_type", "n"),
    (b'{"prompt": "x", "n": 1.5}', {}, 400, "invalid_type", "n"),
    (b'{"prompt": "x", "n": NaN}', {}, 400, "invalid_type", "n"),
    (b'{"prompt": 123}', {}, 400, "invalid_type", "prompt"),
    (b'{"prompt": "x", "user": ' + b"[" * 1500 + b"]" * 1500 + b"}", {}, 400, "invalid_json",
     None),
    (b'{"prompt": "x", "image": "a"}', {}, 400, "unknown_parameter", "image"),
    (b'{"prompt": "x"}', {"content-type": "text/plain"}, 400, "invalid_content_type", None),
    (b'{"prompt": "' + b"x" * 5000 + b'"}', {}, 413, "request_too_large", None),
])
def test_bad_bodies_are_refused_in_openai_shape(start_gateway: Callable[..., GatewayProcess],
                                                upstream: FakeUpstream, body: bytes,
                                                headers: dict[str, str], status: int, code: str,
                                                param: str | None) -> None:
    gw = start_gateway(max_json_body_bytes=4096)
    answer = httpx.post(f"{gw.url}/v1/images/generations", content=body,
                        headers={"content-type": "application/json", **headers})
    error = answer.json()["error"]
    assert (answer.status_code, error["code"], error["param"]) == (status, code, param)
    assert upstream.records == []


def test_a_lone_surrogate_is_sent_escaped(client: openai.OpenAI, upstream: FakeUpstream) -> None:
    answer = httpx.post(f"{client.base_url}images/generations", content=b'{"prompt": "x\\ud800"}',
                        headers={"content-type": "application/json"})
    assert answer.status_code == 200
    assert upstream.last().json == {"model": "gpt-image-1", "prompt": "x\ud800", "n": 1,
                                    "size": "auto", "quality": "auto", "output_format": "png"}


def test_generations_spend_the_same_quota_and_show_in_the_metrics(
        keyed: Callable[..., GatewayProcess], redis_url: str, upstream: FakeUpstream) -> None:
    gw = keyed()
    _, secret = make_key(redis_url, images_per_day=3)
    client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=secret, max_retries=0)
    client.images.generate(model="gpt-image-1", prompt="x", n=2)
    with pytest.raises(openai.RateLimitError) as caught:
        client.images.generate(model="gpt-image-1", prompt="x", n=2)
    assert caught.value.code == "insufficient_quota"
    assert usage_of(gw.url, secret)["limits"]["images"]["used"] == 2
    assert len(upstream.completed) == 1
    samples = scrape(f"{gw.url}/metrics")
    assert value(samples, "gateway_requests_total", endpoint="/v1/images/generations",
                 status="200") == 1
    assert value(samples, "gateway_requests_total", endpoint="/v1/images/generations",
                 status="429") == 1


def test_svg_tokens_are_charged_and_counted_apart(keyed: Callable[..., GatewayProcess],
                                                  redis_url: str, upstream: FakeUpstream) -> None:
    gw = keyed(**SHIPPED)
    _, secret = make_key(redis_url, tokens_per_month=100_000)
    client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=secret, max_retries=0)
    client.images.generate(model="gpt-image-2.6-flare", prompt="a logo",
                           extra_body={"output_format": "svg"})
    # The image model's 250 tokens and the SVG author's 930: what the operator pays for.
    assert usage_of(gw.url, secret)["limits"]["tokens"]["used"] == 250 + SVG_USAGE["total_tokens"]
    samples = scrape(f"{gw.url}/metrics")
    assert value(samples, "gateway_tokens_total", type="svg") == SVG_USAGE["total_tokens"]
    assert value(samples, "gateway_tokens_total", type="input") == 50
