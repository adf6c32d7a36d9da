"""The shipped catalog through `gateway serve` and the official SDK: today's models, a shut-down
model refused with its replacement named, an alias rewriting the model upstream, the default
model, and /v1/models with shutdown dates."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import httpx
import openai
import pytest

from tests.conftest import GatewayProcess
from tests.support.fake_upstream import FakeUpstream
from tests.support.helpers import make_key, scrape, value
from tests.support.images import png

SHIPPED = {"catalog_file": str(Path(__file__).parents[2] / "gateway" / "catalog.toml"),
           "default_model": "gpt-image-2"}


@pytest.fixture(scope="module")
def current(start_gateway: Callable[..., GatewayProcess]) -> GatewayProcess:
    return start_gateway(**SHIPPED, log_format="json")


@pytest.fixture(scope="module")
def aliased(start_gateway: Callable[..., GatewayProcess]) -> GatewayProcess:
    config = '[aliases]\n"gpt-image-1" = "gpt-image-2.6-flare"\n'
    return start_gateway(config, **SHIPPED, log_format="json")


def test_a_2_6_model_with_its_new_fields(current: GatewayProcess, upstream: FakeUpstream) -> None:
    result = current.client().images.edit(
        model="gpt-image-2.6-sunburst", image=png(), prompt="a poster", quality="max",
        extra_body={"complexity": "High", "output_format": "gif", "frame_count": 4,
                    "size": "1024x1024"})
    assert result.data
    rec = upstream.last()
    assert rec.field("model") == "gpt-image-2.6-sunburst"
    assert (rec.field("complexity"), rec.field("quality")) == ("high", "max")
    assert (rec.field("output_format"), rec.field("frame_count")) == ("gif", "4")


def test_gif_with_streaming_is_refused_before_the_upstream(current: GatewayProcess,
                                                           upstream: FakeUpstream) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        current.client().images.edit(model="gpt-image-2.6-flare", image=png(), prompt="x",
                                     stream=True, extra_body={"output_format": "gif"})
    assert caught.value.body["param"] == "output_format"  # type: ignore[index]
    assert upstream.records == []


def test_a_shut_down_model_is_404_with_its_replacement(current: GatewayProcess,
                                                       upstream: FakeUpstream) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        current.client().images.edit(model="gpt-image-1", image=png(), prompt="x")
    assert caught.value.code == "model_not_found"
    assert "2026-10-23" in caught.value.message and "gpt-image-2.5-sunburst" in caught.value.message
    assert upstream.records == []
    answer = httpx.get(f"{current.url}/v1/models/gpt-image-1.5")
    assert answer.status_code == 404 and "gpt-image-2.6-sunburst" in answer.text


def test_the_default_model_is_served_today(current: GatewayProcess, upstream: FakeUpstream
                                           ) -> None:
    body = (b'--b\r\nContent-Disposition: form-data; name="prompt"\r\n\r\nx\r\n'
            b'--b\r\nContent-Disposition: form-data; name="image"; filename="i.png"\r\n\r\n'
            + png() + b"\r\n--b--\r\n")
    answer = httpx.post(f"{current.url}/v1/images/edits", content=body,
                        headers={"content-type": "multipart/form-data; boundary=b"})
    assert answer.status_code == 200
    assert upstream.last().field("model") == "gpt-image-2"


def test_models_list_shows_shutdown_dates_and_only_served_models(current: GatewayProcess) -> None:
    models = {m.id: m for m in current.client().models.list()}
    assert "gpt-image-2.6-flare" in models and "gpt-image-1" not in models
    raw = httpx.get(f"{current.url}/v1/models/gpt-image-2").json()
    assert raw["shutdown_date"] is None and raw["id"] == "gpt-image-2"


def test_an_alias_is_served_by_its_target(aliased: GatewayProcess, upstream: FakeUpstream) -> None:
    rid = f"req-alias-{uuid.uuid4().hex}"
    raw = aliased.client().images.with_raw_response.edit(
        model="gpt-image-1", image=png(), prompt="x", extra_body={"complexity": "low"},
        extra_headers={"x-request-id": rid})
    assert raw.parse().data
    assert upstream.last().field("model") == "gpt-image-2.6-flare"  # rewritten in the body
    assert upstream.last().field("complexity") == "low"  # judged by the target's rules
    assert raw.headers["x-served-model"] == "gpt-image-2.6-flare"
    assert raw.headers["deprecation"] == "@1792713600"  # 2026-10-23, RFC 9745
    assert raw.headers["sunset"] == "Fri, 23 Oct 2026 00:00:00 GMT"  # RFC 8594
    samples = scrape(f"{aliased.url}/metrics")
    assert value(samples, "gateway_model_alias_requests_total", alias="gpt-image-1",
                 model="gpt-image-2.6-flare") == 1
    deadline = time.monotonic() + 5
    while True:
        lines = [json.loads(line) for line in aliased.log().splitlines()
                 if line.startswith("{") and rid in line and '"gateway.access"' in line]
        if lines or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    [line] = lines
    assert (line["model"], line["requested_model"]) == ("gpt-image-2.6-flare", "gpt-image-1")


def test_models_with_aliases_and_a_key_limited_by_name(
        keyed: Callable[..., GatewayProcess], redis_url: str) -> None:
    gw = keyed('[aliases]\n"legacy" = "gpt-image-2"\n"gpt-image-1" = "gpt-image-2.6-flare"\n',
               **SHIPPED)
    _, secret = make_key(redis_url, models=("legacy", "gpt-image-1"))
    headers = {"authorization": f"Bearer {secret}"}
    listed = [m["id"] for m in httpx.get(f"{gw.url}/v1/models", headers=headers).json()["data"]]
    assert sorted(listed) == ["gpt-image-2", "gpt-image-2.6-flare"]  # the aliases' targets
    legacy = httpx.get(f"{gw.url}/v1/models/legacy", headers=headers).json()
    assert (legacy["id"], legacy["shutdown_date"]) == ("legacy", None)
    old = httpx.get(f"{gw.url}/v1/models/gpt-image-1", headers=headers).json()
    assert old["shutdown_date"] == "2026-10-23"  # retired, still answering through the alias
    assert httpx.get(f"{gw.url}/v1/models/gpt-image-2.5-flare",
                     headers=headers).status_code == 404  # not in the key's list
