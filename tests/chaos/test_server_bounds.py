"""The request head is bounded in time (gateway.protocol.BoundedHttpTools): a head trickled a line at
a time, or never sent, cannot hold a connection past `header_read_timeout`, while keep-alive
connections, heads that arrive in time and slow bodies are left alone. Real `gateway serve`
processes, raw sockets as the client (no HTTP client would send a head this slowly)."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable

import pytest

from tests.conftest import GatewayProcess
from tests.support.fake_upstream import FakeUpstream
from tests.support.helpers import edit_head, multipart, scrape, value
from tests.support.images import png

HEAD_TIMEOUT = 1.0
PING = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"


@pytest.fixture(scope="module")
def gw(start_gateway: Callable[..., GatewayProcess]) -> GatewayProcess:
    return start_gateway(header_read_timeout=HEAD_TIMEOUT)


def connect(gw: GatewayProcess) -> socket.socket:
    return socket.create_connection(("127.0.0.1", gw.port), timeout=10)


def read_response(s: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One response (status, headers, body) read by its Content-Length."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(65536)
        assert chunk, f"closed before an answer: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    while len(body) < int(headers["content-length"]):
        chunk = s.recv(65536)
        assert chunk, "closed mid-body"
        body += chunk
    return int(status_line.split()[1]), headers, body


def send_slowly(s: socket.socket, lines: list[bytes], gap: float) -> None:
    for line in lines:
        s.sendall(line)
        time.sleep(gap)


def trickle_until_closed(s: socket.socket, lines: list[bytes], gap: float) -> tuple[bytes, float]:
    """Send `lines` one per `gap` seconds, reading meanwhile, then wait up to 5 s more; return
    what came back and the seconds from the first byte to the close (inf if it stayed open)."""
    start = time.monotonic()
    answer = b""
    s.settimeout(gap)
    try:
        for line in lines:
            s.sendall(line)
            try:
                while chunk := s.recv(65536):
                    answer += chunk
                return answer, time.monotonic() - start  # closed
            except TimeoutError:
                continue
        s.settimeout(5)
        while chunk := s.recv(65536):
            answer += chunk
    except TimeoutError:
        return answer, float("inf")
    except OSError:  # reset, or a broken pipe: the gateway hung up
        pass
    return answer, time.monotonic() - start


def timeouts_counted(gw: GatewayProcess) -> float:
    return value(scrape(f"{gw.url}/metrics"), "gateway_rejections_total", reason="timeout")


@pytest.mark.parametrize("workers", [1, 2])
def test_a_trickled_head_gets_a_408_and_a_closed_connection(
        start_gateway: Callable[..., GatewayProcess], workers: int) -> None:
    # With --workers 2 the setting must reach the spawned worker processes, not only the parent.
    gw = start_gateway(header_read_timeout=HEAD_TIMEOUT, workers=workers)
    lines = [b"GET /healthz HTTP/1.1\r\n", b"Host: x\r\n"] + [b"X-Slow-%d: y\r\n" % i for i in range(12)]
    with connect(gw) as s:
        answer, closed_after = trickle_until_closed(s, lines, 0.5)
    assert HEAD_TIMEOUT * 0.9 < closed_after < HEAD_TIMEOUT + 1.0, (closed_after, answer)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408 "), answer
    assert b"\r\nconnection: close" in head.lower()
    assert json.loads(body) == {"error": {
        "message": "The request's headers did not arrive within 1 seconds.",
        "type": "invalid_request_error", "param": None, "code": "request_timeout"}}
    assert timeouts_counted(gw) == 1


def test_a_head_never_finished_or_never_begun_is_closed(gw: GatewayProcess) -> None:
    before = timeouts_counted(gw)
    with connect(gw) as s:  # part of a head, then silence
        answer, closed_after = trickle_until_closed(s, [b"GET /healthz HTTP/1.1\r\nHost: x\r\n"], 0.1)
    assert answer.startswith(b"HTTP/1.1 408 ") and closed_after < HEAD_TIMEOUT + 1.0, answer
    # Blank lines between requests start no request (httptools skips them): they are part of
    # the next head's time, not a way to keep a connection forever.
    with connect(gw) as s:
        s.sendall(PING)
        assert read_response(s)[0] == 200
        answer, closed_after = trickle_until_closed(s, [b"\r\n"] * 8, 0.4)
    assert answer.startswith(b"HTTP/1.1 408 ") and closed_after < HEAD_TIMEOUT + 1.0, answer
    # Not one byte: closed without an answer nobody asked for (as an idle keep-alive connection).
    with connect(gw) as s:
        s.settimeout(HEAD_TIMEOUT + 2)
        t0 = time.monotonic()
        assert s.recv(100) == b""
        assert HEAD_TIMEOUT * 0.9 < time.monotonic() - t0 < HEAD_TIMEOUT + 1.0
    assert timeouts_counted(gw) - before == 2


def test_heads_in_time_and_idle_keep_alive_connections_are_served(gw: GatewayProcess) -> None:
    with connect(gw) as s:
        # A head trickled within the bound: served.
        send_slowly(s, [b"GET /healthz HTTP/1.1\r\n", b"Host: x\r\n", b"X-A: 1\r\n", b"\r\n"], 0.2)
        status, _, answer = read_response(s)
        assert (status, answer) == (200, b'{"status":"ok"}')
        # Idle between requests for longer than the head timeout (uvicorn's keep-alive timeout,
        # 5 s, governs that): the connection is still there, and the next head's time starts with
        # its own first byte, not with the previous answer.
        time.sleep(HEAD_TIMEOUT * 2.5)
        send_slowly(s, [b"GET /healthz HTTP/1.1\r\n", b"Host: x\r\n", b"\r\n"], 0.3)
        assert read_response(s)[0] == 200
        # Every keep-alive request's head is timed, not only a connection's first one.
        lines = [b"GET /healthz HTTP/1.1\r\n"] + [b"X: y\r\n"] * 8
        answer, closed_after = trickle_until_closed(s, lines, 0.4)
        assert answer.startswith(b"HTTP/1.1 408 ") and closed_after < HEAD_TIMEOUT + 1.0, answer


def test_the_timer_stops_at_the_end_of_the_head(gw: GatewayProcess, upstream: FakeUpstream) -> None:
    body, ctype = multipart([("model", "gpt-image-1", None), ("prompt", "x", None),
                             ("image", png(size=200_000), "a.png")])
    with connect(gw) as s:
        # A body slower than the head timeout (body_read_timeout governs it): served.
        s.sendall(edit_head(body, ctype))
        for i in range(0, len(body), len(body) // 4 + 1):
            time.sleep(0.4)
            s.sendall(body[i:i + len(body) // 4 + 1])
        status, _, answer = read_response(s)
        assert status == 200, answer
        # A pipelined request's partial head while the one before it is answered slowly (the
        # upstream waits 1.5 s): its time starts after that answer, which arrives whole.
        upstream.behaviour.delay_headers = HEAD_TIMEOUT * 1.5
        s.sendall(edit_head(body, ctype) + body + b"GET /healthz HTTP/1.1\r\n")
        status, _, answer = read_response(s)
        assert status == 200 and json.loads(answer)["data"], answer
        s.sendall(b"Host: x\r\n\r\n")
        assert read_response(s)[0] == 200
