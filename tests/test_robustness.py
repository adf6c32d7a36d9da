"""Bounds a client cannot push past: slow clients are timed out, load beyond capacity is shed.
(The start of the chaos suite: more faults arrive with it.)"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable

import httpx

from tests.conftest import GatewayProcess
from tests.fake_upstream import FakeUpstream
from tests.helpers import multipart
from tests.images import png


def _send_then_stall(gw: GatewayProcess, head: bytes, body: bytes, sent: int) -> bytes:
    """Send the headers and the first `sent` body bytes, then nothing; return the answer."""
    with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as s:
        s.sendall(head + body[:sent])
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
            chunk = s.recv(65536)
            if not chunk:
                break
            answer += chunk
    return answer


def _head(body: bytes, ctype: str) -> bytes:
    return (f"POST /v1/images/edits HTTP/1.1\r\nHost: x\r\nContent-Type: {ctype}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()


def test_a_client_silent_mid_body_is_timed_out(start_gateway: Callable[..., GatewayProcess],
                                               upstream: FakeUpstream) -> None:
    gw = start_gateway(body_read_timeout=1)
    # Fields first: the upload is already streaming upstream when the client goes quiet.
    body, ctype = multipart([("model", "gpt-image-1", None), ("prompt", "x", None),
                             ("image", png(size=2_000_000), "a.png")])
    t0 = time.monotonic()
    answer = _send_then_stall(gw, _head(body, ctype), body, 500_000)
    assert answer.startswith(b"HTTP/1.1 408") and b'"request_timeout"' in answer
    assert 0.9 < time.monotonic() - t0 < 5
    upstream.wait_for(lambda: upstream.records and upstream.records[-1].aborted)
    assert upstream.completed == []

    # Files first: spooled, the upstream never opened.
    upstream.reset()
    body, ctype = multipart([("image", png(size=2_000_000), "a.png"), ("prompt", "x", None)])
    answer = _send_then_stall(gw, _head(body, ctype), body, 500_000)
    assert answer.startswith(b"HTTP/1.1 408")
    assert upstream.records == []
    assert gw.client().images.edit(model="gpt-image-1", image=png(), prompt="x").data


def test_load_beyond_capacity_is_shed_fast(start_gateway: Callable[..., GatewayProcess],
                                           upstream: FakeUpstream) -> None:
    gw = start_gateway(max_in_flight=1)
    upstream.behaviour.delay_headers = 1.5
    body, ctype = multipart([("model", "gpt-image-1", None), ("prompt", "x", None),
                             ("image", png(), "a.png")])
    with httpx.Client(timeout=10) as http:
        import concurrent.futures

        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            slow = pool.submit(http.post, f"{gw.url}/v1/images/edits", content=body,
                               headers={"content-type": ctype})
            upstream.wait_for(lambda: upstream.records)
            t0 = time.monotonic()
            shed = httpx.post(f"{gw.url}/v1/images/edits", content=body,
                              headers={"content-type": ctype})
            assert time.monotonic() - t0 < 0.5
            assert shed.status_code == 503 and shed.json()["error"]["code"] == "overloaded"
            assert shed.headers["retry-after"] == "1"
            assert slow.result().status_code == 200
    upstream.behaviour.delay_headers = 0
    assert httpx.post(f"{gw.url}/v1/images/edits", content=body,
                      headers={"content-type": ctype}).status_code == 200
    metrics = httpx.get(f"{gw.url}/metrics").text
    assert 'gateway_rejections_total{reason="overloaded"} 1.0' in metrics
    assert len(upstream.completed) == 2
