"""What operators see: Prometheus metrics after real traffic, request logs, traces, health and a
graceful shutdown, all from `gateway serve` processes."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import re
import signal
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import httpx
import openai
import pytest

from gateway.keys import KeyRecord, Limits
from tests.conftest import GatewayProcess
from tests.support.fake_upstream import FakeUpstream, _free_port
from tests.support.helpers import scrape, value
from tests.support.images import png


def keyed_gateway(start_gateway: Callable[..., GatewayProcess], **settings: object
                  ) -> tuple[GatewayProcess, KeyRecord, str]:
    record, secret = KeyRecord.new("obs", Limits())
    gw = start_gateway(config=f'[keys.{record.id}]\nhash = "{record.hash}"\n', **settings)
    return gw, record, secret


def client(gw: GatewayProcess, secret: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gw.url}/v1", api_key=secret, max_retries=0)


def test_metrics_count_exactly_what_happened(start_gateway, upstream: FakeUpstream) -> None:
    gw, record, secret = keyed_gateway(start_gateway)
    sdk = client(gw, secret)
    sdk.images.edit(model="gpt-image-1", image=png(size=10_000), prompt="x", n=2)  # 200, JSON
    for _ in sdk.images.edit(model="gpt-image-1", image=png(), prompt="x", n=2, stream=True,
                             partial_images=1):
        pass  # 200, SSE: 2 partial images (not counted) and 2 completed events
    with pytest.raises(openai.BadRequestError):
        sdk.images.edit(model="gpt-image-1", image=png(), prompt="x", size="1x1")
    with pytest.raises(openai.AuthenticationError):
        client(gw, "sk-gw-" + "x" * 43).images.edit(model="gpt-image-1", image=png(), prompt="x")
    upstream.behaviour.status = 500
    with pytest.raises(openai.InternalServerError):
        sdk.images.edit(model="gpt-image-1", image=png(), prompt="x")
    httpx.get(f"{gw.url}/healthz")  # not counted

    m = scrape(f"{gw.url}/metrics")
    edits = {"endpoint": "/v1/images/edits"}
    assert value(m, "gateway_requests_total", **edits) == 5
    assert value(m, "gateway_requests_total", **edits, model="gpt-image-1", status="200") == 2
    assert value(m, "gateway_requests_total", **edits, status="400") == 1
    assert value(m, "gateway_requests_total", **edits, status="401") == 1
    assert value(m, "gateway_requests_total", **edits, status="500") == 1
    assert value(m, "gateway_key_requests_total", key_id=record.id) == 4  # the 401 had no key
    assert value(m, "gateway_images_total", model="gpt-image-1", key_id=record.id) == 4
    # The fake reports input 50 (text 10, image 40), output 200 per JSON answer and per event.
    for kind, tokens in (("input", 150), ("output", 600), ("input_text", 30),
                         ("input_image", 120)):
        assert value(m, "gateway_tokens_total", key_id=record.id, type=kind) == tokens, kind
    assert value(m, "gateway_rejections_total", reason="validation") == 1
    assert value(m, "gateway_rejections_total", reason="auth") == 1
    assert value(m, "gateway_upstream_errors_total", model="gpt-image-1", kind="status") == 1
    assert value(m, "gateway_request_duration_seconds_count", **edits) == 5
    assert value(m, "gateway_overhead_seconds_count", **edits) == 5
    assert value(m, "gateway_upstream_duration_seconds_count", model="gpt-image-1") == 3
    assert value(m, "gateway_upload_bytes_total", model="gpt-image-1") > 10_000
    assert value(m, "gateway_in_flight_requests") == 0
    assert 0 <= value(m, "gateway_event_loop_lag_seconds") < 1  # ticking, on an idle loop
    assert value(m, "gateway_overhead_seconds_bucket", le="0.001", **edits) >= 1  # sub-ms buckets
    assert record.hash not in str(m) and secret not in str(m)


def test_upstream_failures_by_kind(start_gateway, upstream: FakeUpstream) -> None:
    down = start_gateway(upstream_base_url=f"http://127.0.0.1:{_free_port()}/v1")
    with pytest.raises(openai.APIStatusError):
        down.client().images.edit(model="gpt-image-1", image=png(), prompt="x")
    slow = start_gateway(upstream_read_timeout=0.3)
    upstream.behaviour.delay_headers = 1
    with pytest.raises(openai.APIStatusError):
        slow.client().images.edit(model="gpt-image-1", image=png(), prompt="x")
    assert value(scrape(f"{down.url}/metrics"), "gateway_upstream_errors_total",
                 kind="connect") == 1
    upstream.behaviour.delay_headers = 0
    upstream.behaviour.status = 400  # the request's fault (a content policy), not the upstream's
    with pytest.raises(openai.BadRequestError):
        slow.client().images.edit(model="gpt-image-1", image=png(), prompt="x")
    assert value(scrape(f"{slow.url}/metrics"), "gateway_upstream_errors_total",
                 kind="timeout") == 1


def test_key_labels_can_be_switched_off(start_gateway, upstream: FakeUpstream) -> None:
    gw, record, secret = keyed_gateway(start_gateway, metrics_key_labels="false")
    client(gw, secret).images.edit(model="gpt-image-1", image=png(), prompt="x")
    text = httpx.get(f"{gw.url}/metrics").text
    assert record.id not in text
    assert value(scrape(f"{gw.url}/metrics"), "gateway_images_total", model="gpt-image-1") == 1


def workers_of(gw: GatewayProcess) -> list[int]:
    """uvicorn's worker processes (not multiprocessing's resource tracker)."""
    children = [int(pid) for task in Path(f"/proc/{gw.proc.pid}/task").iterdir()
                for pid in (task / "children").read_text().split()]
    return [pid for pid in children
            if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()]


def metrics_dir_of(pid: int) -> Path:
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    [entry] = [e for e in environ if e.startswith(b"PROMETHEUS_MULTIPROC_DIR=")]
    return Path(entry.split(b"=", 1)[1].decode())


def test_workers_add_up(start_gateway, upstream: FakeUpstream) -> None:
    gw = start_gateway(workers=2)
    workers = workers_of(gw)
    directory = metrics_dir_of(workers[0])
    sent = 0
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        while sent < 96:  # until both workers have served (each writes its own counter file)
            list(pool.map(lambda _: gw.client().images.edit(
                model="gpt-image-1", image=png(), prompt="x"), range(12)))
            sent += 12
            served = {int(f.stem.rsplit("_", 1)[1]) for f in directory.glob("counter_*.db")}
            if served >= set(workers):
                break
    assert served >= set(workers), "one worker served every request: nothing to add up"
    totals = {value(scrape(f"{gw.url}/metrics"), "gateway_requests_total",
                    endpoint="/v1/images/edits") for _ in range(6)}  # whichever worker answers
    assert totals == {sent}


def test_drain_with_workers_and_a_group_wide_sigterm(start_gateway,
                                                     upstream: FakeUpstream) -> None:
    gw = start_gateway(workers=2, drain_seconds=2)
    workers = workers_of(gw)
    for pid in [gw.proc.pid, *workers]:  # as systemd or `kill -- -PGID` would
        os.kill(pid, signal.SIGTERM)
    time.sleep(0.8)
    assert httpx.get(f"{gw.url}/readyz").status_code == 503
    assert httpx.get(f"{gw.url}/v1/models").status_code == 200  # still serving
    assert gw.proc.wait(timeout=20) == 0


def test_metrics_on_their_own_port(start_gateway, upstream: FakeUpstream) -> None:
    port = _free_port()
    gw = start_gateway(metrics_port=port)
    gw.client().images.edit(model="gpt-image-1", image=png(), prompt="x")
    assert httpx.get(f"{gw.url}/metrics").status_code == 404
    assert value(scrape(f"http://127.0.0.1:{port}/metrics"), "gateway_requests_total") == 1


def test_one_json_line_per_request_and_traces(start_gateway, upstream: FakeUpstream) -> None:
    gw, record, secret = keyed_gateway(start_gateway)
    trace = "0af7651916cd43dd8448eb211c80319c"
    raw = client(gw, secret).images.with_raw_response.edit(
        model="gpt-image-1", image=png(), prompt="a secret plan", n=2,
        extra_headers={"traceparent": f"00-{trace}-b7ad6b7169203331-01"})
    sent = upstream.last().headers["traceparent"].split("-")
    assert sent[1] == trace and sent[2] != "b7ad6b7169203331"  # our own span, same trace
    deadline = time.monotonic() + 5
    while True:  # the line is written just after the answer's last byte
        lines = [json.loads(line) for line in gw.log().splitlines()
                 if line.startswith("{") and '"gateway.access"' in line]
        found = [x for x in lines if x["request_id"] == raw.headers["x-request-id"]]
        if found or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    [line] = found
    assert line["trace_id"] == trace and line["key_id"] == record.id and line["n"] == 2
    assert (line["status"], line["model"], line["images"]) == (200, "gpt-image-1", 2)
    assert line["upstream_request_id"] == raw.headers["x-upstream-request-id"]
    assert line["bytes_in"] > 0 and line["bytes_out"] > 0 and line["total_ms"] >= line["upstream_ms"]
    log = gw.log()
    assert secret not in log and record.hash not in log and "a secret plan" not in log

    upstream.reset()
    gw2 = start_gateway(log_prompts="true")
    gw2.client().images.edit(model="gpt-image-1", image=png(), prompt="a secret plan")
    deadline = time.monotonic() + 5
    while "a secret plan" not in gw2.log():
        assert time.monotonic() < deadline, "the prompt was not logged"
        time.sleep(0.05)
    assert len(upstream.last().headers["traceparent"].split("-")[1]) == 32  # started here


_TEXT_FIELD = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|\S*)')


def _access_line(gw: GatewayProcess, request_id: str) -> str:
    deadline = time.monotonic() + 5  # the line is written by a thread after the answer
    while True:
        found = [line for line in gw.log().splitlines()
                 if "gateway.access" in line and request_id in line]
        if found or time.monotonic() > deadline:
            assert len(found) == 1, gw.log()[-2000:]
            return found[0]
        time.sleep(0.05)


def _text_fields(line: str) -> dict[str, object]:
    """key=value pairs of a text access line: JSON strings, numbers, true/false/null, or bare."""
    prefix = "INFO:gateway.access: request "
    assert line.startswith(prefix), line
    rest = line[len(prefix):]
    pairs = _TEXT_FIELD.findall(rest)
    assert " ".join(f"{k}={v}" for k, v in pairs) == rest, line  # nothing else on the line
    fields: dict[str, object] = {}
    for key, raw in pairs:
        try:
            fields[key] = json.loads(raw)
        except json.JSONDecodeError:
            fields[key] = raw
    return fields


def test_text_log_lines_carry_every_field_of_the_json_line(start_gateway,
                                                          upstream: FakeUpstream) -> None:
    record, secret = KeyRecord.new("obs", Limits())
    config = f'[keys.{record.id}]\nhash = "{record.hash}"\n'
    lines = {}
    prompt = 'a "quoted" plan\nwith key=value'
    for fmt in ("json", "text"):
        gw = start_gateway(config=config, log_format=fmt, log_prompts="true")
        rid = f"req-{fmt}-{uuid.uuid4().hex}"
        client(gw, secret).images.edit(model="gpt-image-1", image=png(), prompt=prompt, n=2,
                                       extra_headers={"x-request-id": rid})
        other = f"req-{fmt}-{uuid.uuid4().hex}"
        assert httpx.get(f"{gw.url}/v1/models", headers={
            "x-request-id": other, "authorization": f"Bearer {secret}"}).status_code == 200
        lines[fmt] = (_access_line(gw, rid), _access_line(gw, other))

    for json_line, text_line in zip(*lines.values(), strict=True):
        expected = json.loads(json_line)
        for key in ("time", "level", "logger", "message"):
            expected.pop(key)
        fields = _text_fields(text_line)
        assert fields.keys() == expected.keys(), text_line
        for key in ("request_id", "trace_id", "client", "upstream_request_id", "bytes_out",
                    "upstream_ms", "total_ms"):  # differ from one request to the next
            if key in expected:
                assert type(fields[key]) is type(expected[key]), (key, fields[key])
                fields[key] = expected[key] = None
        assert fields == expected, text_line
    edit = _text_fields(lines["text"][0])
    assert (edit["key_id"], edit["model"], edit["status"], edit["n"], edit["images"]) == \
        (record.id, "gpt-image-1", 200, 2, 2)
    assert edit["prompt"] == prompt and edit["rejection"] == ""


def test_sigterm_drains_and_lets_uploads_finish(start_gateway, upstream: FakeUpstream) -> None:
    gw = start_gateway(drain_seconds=1.5, shutdown_timeout=20)
    # model and prompt first: the upload is admitted, and streams upstream, before its end.
    body = (b'--b\r\nContent-Disposition: form-data; name="model"\r\n\r\ngpt-image-1\r\n'
            b'--b\r\nContent-Disposition: form-data; name="prompt"\r\n\r\nx\r\n'
            b'--b\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n\r\n'
            + png(size=3_000_000) + b"\r\n--b--\r\n")
    released = asyncio.Event()

    async def slow_body() -> AsyncIterator[bytes]:
        yield body[:1_000_000]
        await released.wait()
        yield body[1_000_000:]

    async def scenario() -> tuple[int, int, int, int]:
        async with httpx.AsyncClient(timeout=30) as http:
            upload = asyncio.create_task(http.post(
                f"{gw.url}/v1/images/edits", content=slow_body(),
                headers={"content-type": "multipart/form-data; boundary=b"}))
            deadline = time.monotonic() + 10
            while not upstream.records:  # the fake runs in another thread
                assert not upload.done(), (await upload).text
                assert time.monotonic() < deadline, "the upload never reached the upstream"
                await asyncio.sleep(0.02)
            gw.proc.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.3)
            ready = (await http.get(f"{gw.url}/readyz")).status_code
            fresh = (await http.post(f"{gw.url}/v1/images/edits", content=body,
                                     headers={"content-type": "multipart/form-data; boundary=b"}
                                     )).status_code  # still served while draining
            await asyncio.sleep(2)  # past the drain: no new connections now, the upload goes on
            released.set()
            return ready, fresh, (await upload).status_code, 0

    ready, fresh, uploaded, _ = asyncio.run(scenario())
    assert ready == 503 and fresh == 200 and uploaded == 200
    assert gw.proc.wait(timeout=20) == 0
    assert len(upstream.completed) == 2
    t0 = time.monotonic()
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{gw.url}/healthz", timeout=1)
    assert time.monotonic() - t0 < 2
