"""Raw multipart on the wire: curl's order, odd names, malformed bodies, size limits, streaming."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import httpx
import pytest

from tests.conftest import GatewayProcess
from tests.support.fake_upstream import FakeUpstream
from tests.support.helpers import Part, edit_head, multipart, open_files_in, raw_exchange
from tests.support.images import jpeg, png, sha256


def post(gw: GatewayProcess, parts: list[Part], **kwargs: object) -> httpx.Response:
    body, ctype = multipart(parts)
    return httpx.post(f"{gw.url}/v1/images/edits", content=body,
                      headers={"content-type": ctype, "authorization": "Bearer sk-client"},
                      timeout=30, **kwargs)  # type: ignore[arg-type]


def error_of(response: httpx.Response) -> dict[str, object]:
    assert response.headers["content-type"] == "application/json"
    assert response.headers["x-request-id"]
    return response.json()["error"]


def test_curl_order_files_first_repeated_image(gateway: GatewayProcess, upstream: FakeUpstream) -> None:
    a, b = png(300, 200, size=2_000_000), jpeg(300, 200, size=1_500_000)
    r = post(gateway, [("image", a, "C:\\Users\\me\\example.png"), ("image", b, "scene2.png"),
                       ("prompt", "Merge them in one image", None), ("model", "gpt-image-1", None),
                       ("n", " 01 ", None), ("size", "1024X1536", None)])
    assert r.status_code == 200, r.text
    rec = upstream.last()
    assert [(f.name, f.filename, f.content_type, f.sha256) for f in rec.files] == [
        ("image[]", "image_0.png", "image/png", sha256(a)),
        ("image[]", "image_1.jpg", "image/jpeg", sha256(b))]
    assert rec.field("n") == "1" and rec.field("size") == "1024x1536"


def test_single_image_first_goes_as_image(gateway: GatewayProcess, upstream: FakeUpstream) -> None:
    img = png(64, 64)
    r = post(gateway, [("image", img, "a.png"), ("prompt", "x", None)])  # default model
    assert r.status_code == 200, r.text
    rec = upstream.last()
    assert rec.field("model") == "gpt-image-1"
    assert [(f.name, f.sha256) for f in rec.files] == [("image", sha256(img))]


def test_indexed_image_names(gateway: GatewayProcess, upstream: FakeUpstream) -> None:
    imgs = [png(64, 64, size=1000 + i) for i in range(3)]
    r = post(gateway, [("model", "gpt-image-1", None), ("prompt", "x", None)]
             + [(f"image[{i}]", img, f"{i}.png") for i, img in enumerate(imgs)])
    assert r.status_code == 200, r.text
    assert [(f.name, f.sha256) for f in upstream.last().files] == [("image[]", sha256(i)) for i in imgs]


def test_too_many_spooled_images_never_open_the_upstream(gateway: GatewayProcess,
                                                         upstream: FakeUpstream) -> None:
    # Files before the fields are spooled, so the count is judged before the upstream opens.
    r = post(gateway, [("image", png(256, 256), "a.png"), ("image", png(256, 256), "b.png"),
                       ("prompt", "x", None), ("model", "dall-e-2", None)])
    assert r.status_code == 400
    assert (error_of(r)["param"], error_of(r)["code"]) == ("image[1]", "too_many_images")
    assert upstream.records == []


def test_repeated_plain_image_after_fields_is_refused_like_openai(
        gateway: GatewayProcess, upstream: FakeUpstream) -> None:
    r = post(gateway, [("model", "gpt-image-1", None), ("prompt", "x", None),
                       ("image", png(), "a.png"), ("image", png(), "b.png")])
    assert r.status_code == 400
    assert error_of(r)["code"] == "duplicate_parameter" and error_of(r)["param"] == "image[1]"
    assert upstream.completed == []


def test_late_fields_after_streaming_began(gateway: GatewayProcess, upstream: FakeUpstream) -> None:
    """A field after the first file is checked alone, then in combination before the body ends."""
    r = post(gateway, [("model", "gpt-image-1", None), ("prompt", "x", None),
                       ("image", png(), "a.png"), ("quality", "LOW", None)])
    assert r.status_code == 200, r.text
    assert upstream.last().field("quality") == "low"

    # A small body arrives whole: the late field is judged before the upstream opens.
    upstream.reset()
    r = post(gateway, [("model", "gpt-image-1", None), ("prompt", "x", None),
                       ("image", png(), "a.png"), ("output_compression", "80", None)])
    assert r.status_code == 400 and error_of(r)["param"] == "output_compression"
    assert upstream.records == []

    # A large one is already streaming: the upstream request is cut off before its end.
    r = post(gateway, [("model", "gpt-image-1", None), ("prompt", "x", None),
                       ("image", png(size=4_000_000), "a.png"), ("quality", "ultra", None)])
    assert r.status_code == 400 and error_of(r)["param"] == "quality"
    upstream.wait_for(lambda: upstream.records and upstream.records[-1].aborted)
    assert upstream.completed == []


@pytest.mark.parametrize(("name", "value", "sent"), [("n", " 3", "3"), ("stream", "true", "true"),
                                                     ("model", "gpt-image-1-all", "gpt-image-1-all")])
def test_fields_after_the_files_are_normal_input(
        gateway: GatewayProcess, upstream: FakeUpstream, name: str, value: str, sent: str) -> None:
    """OpenAI takes fields in any order (the Node SDK writes them in the params' order)."""
    fields = [("prompt", "x", None)] + ([] if name == "model" else [("model", "gpt-image-1", None)])
    img = png(size=4_000_000)
    r = post(gateway, [*fields, ("image", img, "a.png"), (name, value, None)])
    assert r.status_code == 200, r.text
    rec = upstream.last()
    assert rec.completed and rec.field(name) == sent
    assert [f.sha256 for f in rec.files] == [sha256(img)]
    if name == "stream":  # relayed as what the upstream sent
        assert r.headers["content-type"].startswith("text/event-stream")
        assert "image_edit.completed" in r.text
    if name == "n":
        assert len(r.json()["data"]) == 3


def test_late_fields_equal_to_what_was_admitted_are_fine(gateway: GatewayProcess,
                                                         upstream: FakeUpstream) -> None:
    r = post(gateway, [("prompt", "x", None), ("image", png(), "a.png"), ("n", "1", None),
                       ("model", "gpt-image-1", None)])
    assert r.status_code == 200, r.text
    assert upstream.last().field("n") == "1" and upstream.last().field("model") == "gpt-image-1"


def test_spooled_mask_of_the_wrong_size_never_opens_the_upstream(
        gateway: GatewayProcess, upstream: FakeUpstream) -> None:
    r = post(gateway, [("image", png(64, 64), "a.png"), ("mask", png(32, 32, alpha=True), "m.png"),
                       ("prompt", "x", None)])
    assert r.status_code == 400 and error_of(r)["param"] == "mask"
    assert upstream.records == []


def test_mask_for_a_model_without_masks(start_gateway: Callable[..., GatewayProcess],
                                        upstream: FakeUpstream) -> None:
    gw = start_gateway(config='[models."no-mask"]\nextends = "gpt-image-1"\nmask = false\n')
    for parts in ([("model", "no-mask", None), ("prompt", "x", None), ("image", png(), "a.png"),
                   ("mask", png(alpha=True), "m.png")],
                  [("mask", png(alpha=True), "m.png"), ("image", png(), "a.png"),
                   ("model", "no-mask", None), ("prompt", "x", None)]):
        r = post(gw, parts)
        assert r.status_code == 400
        assert (error_of(r)["param"], error_of(r)["code"]) == ("mask", "unsupported_parameter")
    assert upstream.completed == []


def test_cross_field_rule_fixed_by_a_later_field_is_accepted(
        gateway: GatewayProcess, upstream: FakeUpstream) -> None:
    r = post(gateway, [("model", "gpt-image-1", None), ("prompt", "x", None),
                       ("output_compression", "80", None), ("image", png(), "a.png"),
                       ("output_format", "webp", None)])
    assert r.status_code == 200, r.text
    rec = upstream.last()
    assert (rec.field("output_compression"), rec.field("output_format")) == ("80", "webp")


@pytest.mark.parametrize(("parts", "param", "code"), [
    ([("prompt", "x", None), ("prompt", "y", None)], "prompt", "duplicate_parameter"),
    ([("prompt", "x", None), ("colour", "red", None)], "colour", "unknown_parameter"),
    ([("model", "gpt-image-1", None)], "prompt", "missing_required_parameter"),
    ([("prompt", "   ", None)], "prompt", "missing_required_parameter"),
    ([("prompt", "x", "p.txt")], "prompt", "invalid_value"),  # a text field sent as a file
    ([("prompt", b"caf\xe9", None)], "prompt", "invalid_value"),  # not UTF-8
    ([("prompt", "x" * 300_000, None)], "prompt", "string_above_max_length"),
    ([("prompt", "x", None), ("mask", png(64, 64, alpha=True), "m.png")], "image",
     "missing_required_parameter"),
])
def test_bad_text_fields(gateway: GatewayProcess, upstream: FakeUpstream, parts: list[Part],
                         param: str, code: str) -> None:
    has_image = any(p[0] == "image" for p in parts) or any(p[0] == "mask" for p in parts)
    r = post(gateway, parts + ([] if has_image else [("image", png(), "a.png")]))
    assert r.status_code == 400
    assert (error_of(r)["param"], error_of(r)["code"]) == (param, code)
    assert upstream.records == []


@pytest.mark.parametrize(("body", "ctype"), [
    (b"prompt=x", "application/x-www-form-urlencoded"),
    (b"--abc\r\nContent-Disposition: form-data; name=\"prompt\"\r\n\r\nx\r\n", "multipart/form-data"),
    # truncated: no closing boundary
    (b"--abc\r\nContent-Disposition: form-data; name=\"prompt\"\r\n\r\nx\r\n",
     "multipart/form-data; boundary=abc"),
    # a part without a name
    (b"--abc\r\nContent-Disposition: form-data\r\n\r\nx\r\n--abc--\r\n",
     "multipart/form-data; boundary=abc"),
    # a header line far over the bound
    (b"--abc\r\nContent-Disposition: form-data; name=\"" + b"p" * 10000 + b"\"\r\n\r\nx\r\n--abc--\r\n",
     "multipart/form-data; boundary=abc"),
], ids=["urlencoded", "no-boundary", "truncated", "nameless-part", "huge-header"])
def test_malformed_bodies(gateway: GatewayProcess, upstream: FakeUpstream, body: bytes,
                          ctype: str) -> None:
    r = httpx.post(f"{gateway.url}/v1/images/edits", content=body, headers={"content-type": ctype})
    assert r.status_code == 400
    assert error_of(r)["type"] == "invalid_request_error"
    assert upstream.records == []


def test_truncated_file_mid_stream_never_completes_upstream(
        gateway: GatewayProcess, upstream: FakeUpstream) -> None:
    body, ctype = multipart([("model", "gpt-image-1", None), ("prompt", "x", None),
                             ("image", png(64, 64, size=500_000), "a.png")])
    r = httpx.post(f"{gateway.url}/v1/images/edits", content=body[:300_000],
                   headers={"content-type": ctype})
    assert r.status_code == 400 and error_of(r)["code"] == "invalid_multipart"
    upstream.wait_for(lambda: len(upstream.records) == 1)
    assert upstream.completed == []


def test_too_many_parts(gateway: GatewayProcess, upstream: FakeUpstream) -> None:
    r = post(gateway, [("prompt", "x", None)] + [(f"f{i}", "v", None) for i in range(100)])
    assert r.status_code == 400 and error_of(r)["code"] == "too_many_parts"


def test_413_from_content_length_before_reading(start_gateway: Callable[..., GatewayProcess],
                                                upstream: FakeUpstream) -> None:
    gw = start_gateway(max_body_bytes=100_000)
    # Declare a huge body but send none of it: the answer must come from the header alone.
    head = raw_exchange(gw.port, b"POST /v1/images/edits HTTP/1.1\r\nHost: x\r\n"
                        b"Content-Length: 900000000\r\n"
                        b"Content-Type: multipart/form-data; boundary=abc\r\n\r\n").decode()
    assert head.startswith("HTTP/1.1 413")
    assert '"code": "request_too_large"' in head

    # Chunked (no Content-Length): decided by counting.
    body, ctype = multipart([("prompt", "x", None), ("image", png(size=200_000), "a.png")])

    def chunks():
        for i in range(0, len(body), 16384):
            yield body[i:i + 16384]

    r = httpx.post(f"{gw.url}/v1/images/edits", content=chunks(), headers={"content-type": ctype})
    assert r.status_code == 413 and error_of(r)["code"] == "request_too_large"
    assert upstream.completed == []


def test_default_body_limit_fits_the_largest_catalog_request(
        start_gateway: Callable[..., GatewayProcess]) -> None:
    gw = start_gateway()
    # 16 images x 50 MiB (gpt-image-1.5) + a 4 MiB mask fit; twice that does not.
    fits = 16 * 50 * 1024 * 1024 + 4 * 1024 * 1024
    for length, status in ((fits, None), (2 * fits, 413)):
        with socket.create_connection(("127.0.0.1", gw.port), timeout=5) as s:
            s.sendall(b"POST /v1/images/edits HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n"
                      b"Content-Type: multipart/form-data; boundary=abc\r\n\r\n" % length)
            s.settimeout(0.5)
            try:
                head = s.recv(100).decode()
            except TimeoutError:
                head = ""  # still waiting for the body: accepted
        assert head.startswith("HTTP/1.1 413") == (status == 413), head


def test_upload_streams_upstream_before_the_client_finishes(
        gateway: GatewayProcess, upstream: FakeUpstream) -> None:
    """The first 4 MB of a 12 MB image reach the upstream while the client still holds the rest."""
    img = png(1024, 1024, size=12 * 1024 * 1024)
    body, ctype = multipart([("model", "gpt-image-1", None), ("prompt", "x", None),
                             ("image", img, "a.png")])
    released = asyncio.Event()
    seen_while_paused: list[int] = []

    async def slow_body() -> AsyncIterator[bytes]:
        yield body[: 4 * 1024 * 1024]
        await released.wait()
        yield body[4 * 1024 * 1024:]

    async def scenario() -> httpx.Response:
        async with httpx.AsyncClient(timeout=30) as http:
            task = asyncio.create_task(http.post(f"{gateway.url}/v1/images/edits", content=slow_body(),
                                                 headers={"content-type": ctype}))
            deadline = time.monotonic() + 10
            while not upstream.records or upstream.records[-1].bytes_received < 3_500_000:
                assert time.monotonic() < deadline, "upstream received nothing while client paused"
                await asyncio.sleep(0.02)
            seen_while_paused.append(upstream.records[-1].bytes_received)
            released.set()
            return await task

    r = asyncio.run(scenario())
    assert r.status_code == 200, r.text
    assert 3_500_000 <= seen_while_paused[0] < len(body)
    assert upstream.last().files[0].sha256 == sha256(img)


def test_client_disconnect_mid_upload_cancels_upstream(
        gateway: GatewayProcess, upstream: FakeUpstream) -> None:
    body, ctype = multipart([("model", "gpt-image-1", None), ("prompt", "x", None),
                             ("image", png(size=3_000_000), "a.png")])
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=5) as s:
        s.sendall(edit_head(body, ctype) + body[:1_000_000])
        upstream.wait_for(lambda: upstream.records and upstream.records[-1].bytes_received > 500_000)
    # The client is gone: the upstream sees its request cut off, never completed.
    upstream.wait_for(lambda: upstream.records[0].aborted)
    assert len(upstream.records) == 1 and upstream.completed == []
    assert upstream.records[0].bytes_received < len(body)


def test_client_leaving_after_its_upload_lets_the_upstream_finish(
        gateway: GatewayProcess, upstream: FakeUpstream) -> None:
    """Once the upstream has the whole request it does (and bills) the work: the gateway reads
    the answer to its end to meter it rather than hanging up (tests/chaos/test_hardening.py checks the
    charge on a keyed gateway)."""
    upstream.behaviour.delay_headers = 1.5
    body, ctype = multipart([("model", "gpt-image-1", None), ("prompt", "x", None),
                             ("image", png(), "a.png")])
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{gateway.url}/v1/images/edits", content=body, headers={"content-type": ctype},
                   timeout=httpx.Timeout(5, read=0.5))
    time.sleep(2.5)
    assert upstream.records[0].completed and not upstream.records[0].aborted


def test_client_leaving_before_the_model_is_known_never_opens_the_upstream(
        gateway: GatewayProcess, upstream: FakeUpstream) -> None:
    """Without `model` before the files the upload waits in the spool, so a client that leaves
    mid-upload leaves nothing upstream."""
    body, ctype = multipart([("prompt", "x", None), ("image", png(size=3_000_000), "a.png")])
    head = edit_head(body, ctype)
    with socket.create_connection(("127.0.0.1", gateway.port)) as s:
        s.sendall(head + body[: len(body) // 2])
        time.sleep(0.5)
    time.sleep(0.3)
    assert upstream.records == []


def test_spooled_files_use_the_spool_dir_privately_and_leave_nothing(
        start_gateway: Callable[..., GatewayProcess], upstream: FakeUpstream, tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    spool.mkdir()
    gw = start_gateway(spool_dir=spool, spool_memory_bytes=65536)
    imgs = [png(64, 64, size=3_000_000), png(64, 64, size=2_000_000)]
    body, ctype = multipart([("image", imgs[0], "a.png"), ("image", imgs[1], "b.png"),
                             ("prompt", "x", None)])
    released = asyncio.Event()
    held: list[list[tuple[str, int]]] = []

    async def paused_body() -> AsyncIterator[bytes]:
        yield body[:4_000_000]  # the first image and part of the second: spooled, not sent
        await released.wait()
        yield body[4_000_000:]

    async def scenario() -> httpx.Response:
        async with httpx.AsyncClient(timeout=30) as http:
            task = asyncio.create_task(http.post(f"{gw.url}/v1/images/edits", content=paused_body(),
                                                 headers={"content-type": ctype}))
            deadline = time.monotonic() + 10
            while not (files := open_files_in(gw.proc.pid, spool)):
                assert time.monotonic() < deadline, "nothing was spooled to spool_dir"
                await asyncio.sleep(0.02)
            held.append(files)
            released.set()
            return await task

    r = asyncio.run(scenario())
    assert r.status_code == 200, r.text
    [(path, mode)] = held[0]
    assert path.endswith("(deleted)") and mode == 0o600  # unnamed, the gateway's user only
    assert upstream.records[0].bytes_received > 0 and upstream.completed  # streamed after
    assert [f.sha256 for f in upstream.last().files] == [sha256(i) for i in imgs]
    assert open_files_in(gw.proc.pid, spool) == [] and list(spool.iterdir()) == []


def test_unknown_fields_and_models_may_pass_through(start_gateway: Callable[..., GatewayProcess],
                                                    upstream: FakeUpstream) -> None:
    gw = start_gateway(unknown_fields="pass", unknown_models="pass")
    r = post(gw, [("model", "my-own-model", None), ("prompt", "x", None), ("colour", "Red", None),
                  ("image", png(), "a.png")])
    assert r.status_code == 200, r.text
    rec = upstream.last()
    assert (rec.field("model"), rec.field("colour")) == ("my-own-model", "Red")


def test_get_on_edits_and_unknown_paths_answer_openai_errors(gateway: GatewayProcess) -> None:
    r = httpx.get(f"{gateway.url}/v1/images/edits")
    assert r.status_code == 405 and "error" in r.json()
    r = httpx.get(f"{gateway.url}/v1/nothing")
    assert r.status_code == 404 and json.loads(r.text)["error"]["type"] == "invalid_request_error"
