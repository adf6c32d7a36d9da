"""The gateway as OpenAI SDK users meet it: the official `openai` client pointed at base_url."""

from __future__ import annotations

import openai
import pytest

from tests.conftest import UPSTREAM_KEY, GatewayProcess
from tests.support.fake_upstream import FakeUpstream
from tests.support.images import jpeg, png, sha256, webp


def test_one_image_goes_upstream_normalized(client: openai.OpenAI, upstream: FakeUpstream) -> None:
    img = png(64, 64, size=300_000)
    raw = client.images.with_raw_response.edit(
        model="gpt-image-1", image=("photo.png", img, "image/png"), prompt="Add a hat", n=2,
        quality="HIGH", response_format="b64_json")
    result = raw.parse()
    assert len(result.data) == 2 and result.usage is not None and result.usage.total_tokens == 250

    rec = upstream.last()
    assert rec.path == "/v1/images/edits"
    assert rec.headers["authorization"] == f"Bearer {UPSTREAM_KEY}"
    assert dict(rec.fields) == {"model": "gpt-image-1", "prompt": "Add a hat", "n": "2",
                                "quality": "high", "size": "auto", "output_format": "png"}
    assert "response_format" not in rec.field_names  # gpt-image-1 always answers base64
    [f] = rec.files
    assert (f.name, f.filename, f.content_type) == ("image", "image_0.png", "image/png")
    assert (f.size, f.sha256) == (len(img), sha256(img))
    # One request id, sent upstream and returned; the upstream's own id returned beside it.
    assert raw.headers["x-request-id"] == rec.headers["x-request-id"]
    assert raw.headers["x-upstream-request-id"].startswith("req_upstream_")


def test_client_request_id_is_kept(client: openai.OpenAI, upstream: FakeUpstream) -> None:
    raw = client.images.with_raw_response.edit(
        model="gpt-image-1", image=png(), prompt="x", extra_headers={"x-request-id": "trace-42"})
    assert raw.headers["x-request-id"] == "trace-42"
    assert upstream.last().headers["x-request-id"] == "trace-42"


def test_image_list_with_mask(client: openai.OpenAI, upstream: FakeUpstream) -> None:
    images = [png(256, 128, size=50_000), jpeg(640, 480, size=80_000), webp(100, 100, size=20_000)]
    mask = png(256, 128, alpha=True)
    client.images.edit(model="gpt-image-1.5", image=[("a.png", images[0]), ("b.jpg", images[1]),
                                                     ("c.webp", images[2])],
                       mask=("m.png", mask), prompt="Merge", input_fidelity="high")
    rec = upstream.last()
    files = [(f.name, f.content_type, f.sha256) for f in rec.files]
    assert files == [("image[]", "image/png", sha256(images[0])),
                     ("image[]", "image/jpeg", sha256(images[1])),
                     ("image[]", "image/webp", sha256(images[2])),
                     ("mask", "image/png", sha256(mask))]
    assert [f.filename for f in rec.files] == ["image_0.png", "image_1.jpg", "image_2.webp", "mask.png"]
    assert rec.field("input_fidelity") == "high"


def test_raw_bytes_upload_gets_its_real_content_type(client: openai.OpenAI,
                                                     upstream: FakeUpstream) -> None:
    # The SDK sends raw bytes as filename "upload", application/octet-stream; OpenAI rejects that.
    img = jpeg(320, 200, size=10_000)
    client.images.edit(model="gpt-image-1", image=img, prompt="Brighter")
    [f] = upstream.last().files
    assert (f.content_type, f.filename, f.sha256) == ("image/jpeg", "image_0.jpg", sha256(img))


def test_stream_with_partial_images(client: openai.OpenAI, upstream: FakeUpstream) -> None:
    stream = client.images.edit(model="gpt-image-1", image=png(), prompt="Paint", stream=True,
                                partial_images=2, n=1)
    kinds = [event.type for event in stream]
    assert kinds == ["image_edit.partial_image", "image_edit.partial_image", "image_edit.completed"]
    rec = upstream.last()
    assert rec.field("stream") == "true" and rec.field("partial_images") == "2"


def test_dall_e_2_keeps_response_format_and_defaults(client: openai.OpenAI,
                                                    upstream: FakeUpstream) -> None:
    client.images.edit(model="dall-e-2", image=png(512, 512), prompt="x", response_format="url")
    rec = upstream.last()
    assert dict(rec.fields) == {"model": "dall-e-2", "prompt": "x", "response_format": "url",
                                "n": "1", "size": "1024x1024"}
    assert rec.files[0].name == "image"


def test_models_are_listed(client: openai.OpenAI) -> None:
    ids = {m.id for m in client.models.list()}
    assert {"gpt-image-1", "gpt-image-1-all", "flux-kontext-pro", "flux-kontext-max", "dall-e-2",
            "gpt-image-1-mini", "gpt-image-1.5", "gpt-image-2", "chatgpt-image-latest"} <= ids
    assert client.models.retrieve("gpt-image-2").id == "gpt-image-2"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-image-9")


REJECTIONS = [
    # (edit kwargs, param, code)
    ({"model": "gpt-image-1", "size": "999x999"}, "size", "invalid_value"),
    ({"model": "gpt-image-2", "size": "1000x1008"}, "size", "invalid_value"),
    ({"model": "gpt-image-2", "size": "4000x1008"}, "size", "invalid_value"),
    ({"model": "gpt-image-9"}, "model", "invalid_value"),
    ({"model": "gpt-image-1", "n": 11}, "n", "integer_out_of_range"),
    ({"model": "gpt-image-1", "quality": "ultra"}, "quality", "invalid_value"),
    ({"model": "dall-e-2", "background": "transparent"}, "background", "unsupported_parameter"),
    ({"model": "gpt-image-1-mini", "input_fidelity": "high"}, "input_fidelity", "unsupported_parameter"),
    ({"model": "gpt-image-1", "output_compression": 50}, "output_compression", "invalid_value"),
    ({"model": "gpt-image-1", "partial_images": 2}, "partial_images", "invalid_value"),
    ({"model": "gpt-image-1", "background": "transparent", "output_format": "jpeg"}, "background",
     "invalid_value"),
    ({"model": "dall-e-2", "prompt": "x" * 1001}, "prompt", "string_above_max_length"),
    ({"model": "gpt-image-1", "extra_body": {"colour": "red"}}, "colour", "unknown_parameter"),
]


@pytest.mark.parametrize(("kwargs", "param", "code"), REJECTIONS,
                         ids=[r[1] + "-" + str(i) for i, r in enumerate(REJECTIONS)])
def test_bad_fields_are_rejected_before_any_upstream_connection(
        client: openai.OpenAI, upstream: FakeUpstream, kwargs: dict, param: str, code: str) -> None:
    kwargs = {"prompt": "edit", "image": png(512, 512), **kwargs}
    with pytest.raises(openai.BadRequestError) as info:
        client.images.edit(**kwargs)
    assert info.value.param == param
    assert info.value.code == code
    assert info.value.type == "invalid_request_error"
    assert upstream.records == []


def test_wrong_images_are_rejected_with_their_index(client: openai.OpenAI,
                                                    upstream: FakeUpstream) -> None:
    cases = [
        ({"image": [png(), b"GIF89a not an image"]}, "image[1]"),
        ({"image": ("t.png", b"hello, i am text", "image/png")}, "image"),
        ({"image": [png()] * 17}, "image[16]"),
        ({"image": png(64, 64), "mask": png(64, 64)}, "mask"),  # no alpha channel
        ({"image": png(64, 64), "mask": png(32, 32, alpha=True)}, "mask"),  # other size
        ({"image": png(64, 64), "mask": jpeg(64, 64)}, "mask"),
        ({"image": png(20000, 100)}, "image"),  # past the catalog's side bound
        ({"image": png(512, 256), "model": "dall-e-2"}, "image"),  # dall-e-2: square only
        ({"image": jpeg(512, 512), "model": "dall-e-2"}, "image"),  # dall-e-2: PNG only
        ({"image": png(512, 512, size=5 * 1024 * 1024), "model": "dall-e-2"}, "image"),
    ]
    for kwargs, param in cases:
        kwargs = {"prompt": "edit", "model": "gpt-image-1", **kwargs}
        with pytest.raises(openai.BadRequestError) as info:
            client.images.edit(**kwargs)
        assert info.value.param == param, (kwargs.keys(), info.value.message)
    # Each was cut off before its body ended: the upstream never completed one.
    assert upstream.completed == []


def test_upstream_errors_pass_through(client: openai.OpenAI, upstream: FakeUpstream) -> None:
    upstream.behaviour.status = 400
    upstream.behaviour.error = {"message": "Your request was rejected by the safety system.",
                                "type": "image_generation_user_error", "param": None,
                                "code": "moderation_blocked"}
    with pytest.raises(openai.BadRequestError) as info:
        client.images.edit(model="gpt-image-1", image=png(), prompt="x")
    assert info.value.code == "moderation_blocked"
    assert info.value.response.headers["x-upstream-request-id"].startswith("req_upstream_")

    upstream.behaviour.status, upstream.behaviour.error = 500, None
    with pytest.raises(openai.InternalServerError) as err:
        client.images.edit(model="gpt-image-1", image=png(), prompt="x")
    assert err.value.message.endswith("upstream failure")


def test_upstream_auth_failure_is_not_passed_to_clients(client: openai.OpenAI,
                                                       upstream: FakeUpstream) -> None:
    upstream.behaviour.status = 401
    upstream.behaviour.error = {"message": f"Incorrect API key provided: {UPSTREAM_KEY[:8]}***",
                                "type": "invalid_request_error", "param": None,
                                "code": "invalid_api_key"}
    with pytest.raises(openai.APIStatusError) as info:
        client.images.edit(model="gpt-image-1", image=png(), prompt="x")
    assert info.value.status_code == 502
    assert UPSTREAM_KEY[:8] not in info.value.response.text


def test_unreachable_upstream_is_502(start_gateway, upstream: FakeUpstream) -> None:
    from tests.support.fake_upstream import _free_port

    gw: GatewayProcess = start_gateway(upstream_base_url=f"http://127.0.0.1:{_free_port()}/v1")
    with pytest.raises(openai.APIStatusError) as info:
        gw.client().images.edit(model="gpt-image-1", image=png(), prompt="x")
    assert info.value.status_code == 502
    assert info.value.code == "upstream_unavailable"


def test_silent_upstream_is_504(start_gateway, upstream: FakeUpstream) -> None:
    gw: GatewayProcess = start_gateway(upstream_read_timeout=0.5)
    upstream.behaviour.delay_headers = 2
    with pytest.raises(openai.APIStatusError) as info:
        gw.client().images.edit(model="gpt-image-1", image=png(), prompt="x")
    assert info.value.status_code == 504
    assert info.value.code == "upstream_timeout"


@pytest.mark.parametrize("cut", ["between-events", "mid-event"])
def test_stream_broken_mid_way_ends_with_an_error_event(client: openai.OpenAI,
                                                        upstream: FakeUpstream, cut: str) -> None:
    if cut == "mid-event":
        upstream.behaviour.cut_mid_event = True  # the half event is dropped, not corrupted
        expected = ["image_edit.partial_image"]
    else:
        upstream.behaviour.cut_after_events = 2
        expected = ["image_edit.partial_image", "image_edit.partial_image"]
    stream = client.images.edit(model="gpt-image-1", image=png(), prompt="x", stream=True,
                                partial_images=3)
    seen = []
    with pytest.raises(openai.APIError) as info:
        for event in stream:
            seen.append(event.type)
    assert seen == expected
    assert "upstream" in info.value.message


def test_json_answer_broken_mid_way_is_cut_off(client: openai.OpenAI,
                                               upstream: FakeUpstream) -> None:
    upstream.behaviour.cut_json = True
    with pytest.raises(openai.APIConnectionError):
        client.images.edit(model="gpt-image-1", image=png(), prompt="x")


def test_stream_events_arrive_as_the_upstream_sends_them(client: openai.OpenAI,
                                                         upstream: FakeUpstream) -> None:
    import time

    upstream.behaviour.event_delay = 0.4
    arrivals = []
    for _event in client.images.edit(model="gpt-image-1", image=png(), prompt="x", stream=True,
                                     partial_images=3):
        arrivals.append(time.monotonic())
    assert len(arrivals) == 4
    # Nothing is held back until the end: each event shows up about when it was sent.
    assert arrivals[-1] - arrivals[0] > 1.0


def test_several_workers_serve(start_gateway, upstream: FakeUpstream) -> None:
    gw: GatewayProcess = start_gateway(workers=2)
    client = gw.client()
    for _ in range(6):
        client.images.edit(model="gpt-image-1", image=png(), prompt="x")
    assert len(upstream.completed) == 6


def test_one_image_too_many_is_cut_off_mid_stream(client: openai.OpenAI,
                                                  upstream: FakeUpstream) -> None:
    # The SDK sends the text fields first, so the first image is on its way when the second
    # shows up: the upstream request is aborted before its body ends.
    with pytest.raises(openai.BadRequestError) as info:
        client.images.edit(model="dall-e-2", image=[png(256, 256), png(256, 256)], prompt="x")
    assert (info.value.param, info.value.code) == ("image[1]", "too_many_images")
    assert upstream.completed == []



def test_upstream_retry_advice_reaches_the_client(client: openai.OpenAI,
                                                  upstream: FakeUpstream) -> None:
    upstream.behaviour.status = 429
    upstream.behaviour.error = {"message": "slow down", "type": "requests", "param": None,
                                "code": "rate_limit_exceeded"}
    upstream.behaviour.headers = {"retry-after": "7", "retry-after-ms": "7000",
                                  "x-should-retry": "false"}
    with pytest.raises(openai.RateLimitError) as info:
        client.images.edit(model="gpt-image-1", image=png(), prompt="x")
    headers = info.value.response.headers
    assert (headers["retry-after"], headers["retry-after-ms"], headers["x-should-retry"]) == (
        "7", "7000", "false")


def test_every_answer_carries_a_request_id(gateway: GatewayProcess) -> None:
    import httpx

    for path in ("/v1/models", "/v1/nothing", "/healthz"):
        assert httpx.get(f"{gateway.url}{path}").headers["x-request-id"].startswith("req_")
    r = httpx.get(f"{gateway.url}/v1/models", headers={"x-request-id": "mine-1"})
    assert r.headers["x-request-id"] == "mine-1"
