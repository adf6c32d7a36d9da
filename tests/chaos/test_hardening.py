"""Hardening (issue 10): what a client without a key, a slow or silent client, a hostile body or an
upstream's own words can no longer do to the gateway, its slots and its keys' quotas.

Real servers on loopback: `gateway serve` processes, a redis-server started by pytest-redis, the
fake upstream; the clients are raw sockets (for what an HTTP client would not do: trickle, flood,
stop reading, hang up) and the openai SDK.
"""

from __future__ import annotations

import json
import select
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import GatewayProcess
from tests.support.fake_upstream import FakeUpstream
from tests.support.helpers import edit, make_key, multipart, raw_exchange, scrape, usage_of, value
from tests.support.images import png, sha256

WRONG_KEY = "sk-gw-" + "x" * 43  # looks like one of ours, is nobody's
BOUNDARY_LINE = b"--XyZ-boundary\r\n"  # what tests.support.helpers.multipart writes before each part


def sdk(gw: GatewayProcess, secret: str, **kwargs: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gw.url}/v1", api_key=secret, max_retries=0, **kwargs)


def head(length: int, secret: str | None = None, ctype: str = "multipart/form-data; boundary=XyZ-"
         "boundary", *, extra: str = "") -> bytes:
    """The request line and headers of a raw edit announcing `length` body bytes."""
    auth = f"Authorization: Bearer {secret}\r\n" if secret else ""
    return (f"POST /v1/images/edits HTTP/1.1\r\nHost: x\r\nContent-Type: {ctype}\r\n{auth}{extra}"
            f"Content-Length: {length}\r\n\r\n").encode()


def parse(data: bytes) -> tuple[int, dict[str, str], bytes] | None:
    """The final answer in `data` (interim 1xx answers skipped) once it is whole, else None."""
    while True:
        end = data.find(b"\r\n\r\n")
        if end < 0:
            return None
        lines = data[:end].decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {}
        for line in lines[1:]:
            name, _, val = line.partition(":")
            headers[name.strip().lower()] = val.strip()
        rest = data[end + 4:]
        if 100 <= status < 200:
            data = rest
            continue
        if headers.get("transfer-encoding") == "chunked":
            body, at = b"", 0
            while True:
                eol = rest.find(b"\r\n", at)
                if eol < 0:
                    return None
                size = int(rest[at:eol].split(b";")[0], 16)
                if len(rest) < eol + 2 + size + 2:
                    return None
                if size == 0:
                    return status, headers, body
                body += rest[eol + 2:eol + 2 + size]
                at = eol + 2 + size + 2
        length = int(headers.get("content-length", "0"))
        return (status, headers, rest[:length]) if len(rest) >= length else None


def openai_error(data: bytes) -> dict[str, Any]:
    """The `error` object of a whole raw answer, checked to be in OpenAI's shape."""
    found = parse(data)
    assert found is not None, f"no whole answer: {data[:300]!r}"
    error = json.loads(found[2])["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"], error
    return error


def status_of(data: bytes) -> int | None:
    found = parse(data)
    return found[0] if found else None


class RawClient:
    """One raw connection to the gateway: sends and reads at the same time (never blocking on
    either), and notes when the answer's first byte came and when the gateway closed."""

    def __init__(self, port: int, rcvbuf: int | None = None) -> None:
        self.sock = socket.socket()
        if rcvbuf is not None:  # before connecting, so the window starts small
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.connect(("127.0.0.1", port))
        self.sock.setblocking(False)
        self.opened = time.monotonic()
        self.data = b""
        self.answered_at: float | None = None
        self.closed_at: float | None = None
        self.sent = 0  # body and head bytes the kernel accepted

    @property
    def closed(self) -> bool:
        return self.closed_at is not None

    def answer(self) -> tuple[int, dict[str, str], bytes] | None:
        return parse(self.data)

    def _close_seen(self) -> None:
        if self.closed_at is None:
            self.closed_at = time.monotonic()

    def _recv(self) -> bool:
        """Read what is there; False when nothing more is (yet) to be read."""
        try:
            chunk = self.sock.recv(1 << 16)
        except BlockingIOError:
            return False
        except OSError:  # reset: what arrived before it was read already
            self._close_seen()
            return False
        if not chunk:
            self._close_seen()
            return False
        if self.answered_at is None:
            self.answered_at = time.monotonic()
        self.data += chunk
        return True

    def _send(self, data: bytes | memoryview) -> int:
        try:
            n = self.sock.send(data)
        except BlockingIOError:
            return 0
        except OSError:  # EPIPE or reset: the gateway closed; read what it said before
            while self._recv():
                pass
            self._close_seen()
            return 0
        self.sent += n
        return n

    def send(self, data: bytes, seconds: float = 10) -> int:
        """Send `data` as fast as the gateway takes it, reading meanwhile; stops when all is
        sent, the gateway closes, or `seconds` pass. Returns how much was accepted."""
        view, done = memoryview(data), 0
        deadline = time.monotonic() + seconds
        while done < len(data) and not self.closed and time.monotonic() < deadline:
            readable, writable, _ = select.select([self.sock], [self.sock], [], 0.2)
            if readable:
                self._recv()
            if writable and not self.closed:
                done += self._send(view[done:done + (1 << 16)])
        return done

    def flood(self, total: int, seconds: float = 15) -> int:
        """Send `total` zero bytes as fast as the gateway takes them (see `send`)."""
        chunk, done = bytes(1 << 16), 0
        deadline = time.monotonic() + seconds
        while done < total and not self.closed and time.monotonic() < deadline:
            readable, writable, _ = select.select([self.sock], [self.sock], [], 0.2)
            if readable:
                self._recv()
            if writable and not self.closed:
                done += self._send(chunk[:total - done])
        return done

    def trickle(self, data: bytes, every: float, seconds: float, *,
                until_answer: bool = False) -> None:
        """Send one byte of `data` every `every` seconds, reading meanwhile, until the gateway
        closes (or, with until_answer, answers) or `seconds` pass."""
        deadline = time.monotonic() + seconds
        at, next_byte = 0, time.monotonic()
        while not self.closed and time.monotonic() < deadline:
            if until_answer and self.answer() is not None:
                return
            wait = max(0.0, min(next_byte, deadline) - time.monotonic())
            readable, _, _ = select.select([self.sock], [], [], wait)
            if readable:
                self._recv()
                continue
            if at < len(data) and time.monotonic() >= next_byte:
                at += self._send(data[at:at + 1])
                next_byte += every

    def read(self, seconds: float, until: Callable[[bytes], bool] | None = None) -> bytes:
        """Read until `until(data)` (default: a whole final answer), a close, or `seconds`."""
        until = until or (lambda d: parse(d) is not None)
        deadline = time.monotonic() + seconds
        while not until(self.data) and not self.closed and time.monotonic() < deadline:
            readable, _, _ = select.select([self.sock], [], [], 0.1)
            if readable:
                self._recv()
        return self.data

    def wait_closed(self, seconds: float) -> bool:
        deadline = time.monotonic() + seconds
        while not self.closed and time.monotonic() < deadline:
            readable, _, _ = select.select([self.sock], [], [], 0.1)
            if readable:
                while self._recv():
                    pass
        return self.closed

    def close(self) -> None:
        self.sock.close()


def answer_to(port: int, data: bytes, seconds: float, *, send_seconds: float = 10) -> bytes:
    """Send `data` on a fresh connection (a body may stop short: the request stays open) and
    return what the gateway answered within `seconds`."""
    client = RawClient(port)
    try:
        client.send(data, seconds=send_seconds)
        return client.read(seconds)
    finally:
        client.close()


def in_flight(gw: GatewayProcess) -> float:
    return value(scrape(f"{gw.url}/metrics"), "gateway_in_flight_requests")


def keyed_edits(gw: GatewayProcess, secret: str, times: int = 3, pause: float = 0.1
                ) -> list[tuple[int, float]]:
    """`times` edits with the SDK on `secret`, one after the other: (status, seconds) each."""
    client = sdk(gw, secret, timeout=10)
    results = []
    for _ in range(times):
        t0 = time.monotonic()
        try:
            edit(client)
            status = 200
        except openai.APIStatusError as exc:
            status = exc.status_code
        results.append((status, round(time.monotonic() - t0, 2)))
        time.sleep(pause)
    return results


def eventually(get: Callable[[], object], want: object, seconds: float, what: str) -> None:
    """Poll `get()` until it equals `want`; on timeout, fail naming `what` and the last value."""
    deadline = time.monotonic() + seconds
    while (last := get()) != want:
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: {last!r} after {seconds} s, want {want!r}")
        time.sleep(0.05)


def slot_and_images(gw: GatewayProcess, secret: str) -> tuple[int, int]:
    """The key's (requests in flight, images used today), as /v1/usage shows them."""
    usage = usage_of(gw.url, secret)
    return usage["in_flight"], usage["limits"]["images"]["used"]


# ============================================================ A. no slot without a key (item 2)
def test_keyless_trickles_hold_no_slot_and_are_closed(keyed, redis_url: str,
                                                      upstream: FakeUpstream) -> None:
    gw = keyed(max_in_flight=4, refusal_drain_seconds=1)
    _, secret = make_key(redis_url)
    tricklers = [RawClient(gw.port) for _ in range(4)]
    for client, key in zip(tricklers, (None, None, "sk-client", WRONG_KEY), strict=True):
        client.send(head(10_000_000, key))
    threads = [threading.Thread(target=c.trickle, args=(bytes(100), 1.0, 6.0)) for c in tricklers]
    for t in threads:
        t.start()
    time.sleep(0.3)  # every head has arrived
    edits = keyed_edits(gw, secret, pause=0.3)  # while they trickle
    for t in threads:
        t.join()
    for c in tricklers:
        c.close()

    assert edits == [(200, s) for _, s in edits] and max(s for _, s in edits) < 3, \
        f"a keyed edit was not served while keyless requests trickled: {edits}"
    for i, c in enumerate(tricklers):
        # Promptly: at the latest once its refusal drain (1 s) is over.
        assert c.answered_at is not None and c.answered_at - c.opened < 2, \
            f"keyless request {i} got no prompt answer: {c.data[:200]!r}"
        assert status_of(c.data) == 401, c.data[:300]
        assert openai_error(c.data)["code"] == "invalid_api_key"
        assert c.closed_at is not None and c.closed_at - c.answered_at < 1 + 1.5, \
            f"keyless request {i} was not closed within refusal_drain_seconds"
    assert len(upstream.completed) == 3
    eventually(lambda: in_flight(gw), 0, 3, "gateway_in_flight_requests")


def test_a_key_beyond_its_concurrency_is_refused_at_its_head(keyed, redis_url: str,
                                                             upstream: FakeUpstream) -> None:
    gw = keyed(max_in_flight=4, min_body_rate=1000, body_rate_grace_seconds=1,
               body_read_timeout=30, refusal_drain_seconds=1)
    _, busy = make_key(redis_url, max_concurrent=1, rpm=0)
    _, other = make_key(redis_url)
    # Files first, as curl sends them: nothing of the key's first request is admitted yet.
    body, ctype = multipart([("image", png(size=100_000), "a.png"), ("prompt", "x", None)])
    tricklers = []
    threads = []
    for _ in range(4):
        client = RawClient(gw.port)
        client.send(head(len(body), busy, ctype))  # the head alone, then a byte every 0.25 s
        thread = threading.Thread(target=client.trickle, args=(body, 0.25, 8.0),
                                  kwargs={"until_answer": True})
        thread.start()
        tricklers.append(client)
        threads.append(thread)
        time.sleep(0.1)
    edits = keyed_edits(gw, other, pause=0.05)  # another key, while the first one trickles
    for t in threads:
        t.join()
    for c in tricklers:
        c.close()

    for i, c in enumerate(tricklers[1:], start=2):
        # At once: within the refusal drain (1 s) of its head, long before any body came.
        assert c.answered_at is not None and c.answered_at - c.opened < 2, \
            f"request {i} of a max_concurrent=1 key was not refused at once: {c.data[:200]!r}"
        assert status_of(c.data) == 429, c.data[:300]
        assert openai_error(c.data)["code"] == "rate_limit_exceeded"
    assert edits == [(200, s) for _, s in edits] and max(s for _, s in edits) < 3, \
        f"another key's edits were not served: {edits}"
    first = tricklers[0]
    assert first.answered_at is not None, f"the trickling first request got no answer: " \
        f"{first.data[:200]!r}"
    assert status_of(first.data) == 408, first.data[:300]
    openai_error(first.data)
    assert 0.9 < first.answered_at - first.opened < 5, "408 not about the grace after the head"
    assert len(upstream.records) == 3 == len(upstream.completed)  # the other key's edits only


def test_a_refused_body_is_read_no_further_than_the_drain_bound(keyed, redis_url: str) -> None:
    gw = keyed(refusal_drain_bytes=64 * 1024, refusal_drain_seconds=1)
    make_key(redis_url)  # the gateway has keys; this request has none of them
    client = RawClient(gw.port)
    client.send(head(50_000_000, WRONG_KEY))
    accepted = client.flood(50_000_000)
    client.read(3)
    closed = client.wait_closed(3)
    client.close()
    assert accepted < 8_000_000, f"the gateway took {accepted} bytes of a refused body"
    assert status_of(client.data) == 401, client.data[:300]
    assert openai_error(client.data)["code"] == "invalid_api_key"
    assert closed, "the refused connection was not closed"


def test_expect_100_continue_with_a_wrong_key_is_answered_401_directly(
        keyed, redis_url: str, upstream: FakeUpstream) -> None:
    gw = keyed()
    _, secret = make_key(redis_url)
    body, ctype = multipart([("model", "gpt-image-1", None), ("prompt", "x", None),
                             ("image", png(), "a.png")])
    expect = "Expect: 100-continue\r\n"
    data = answer_to(gw.port, head(len(body), WRONG_KEY, ctype, extra=expect), 3)
    assert not data.startswith(b"HTTP/1.1 100"), f"invited a keyless body: {data[:200]!r}"
    assert status_of(data) == 401, data[:300]
    assert openai_error(data)["code"] == "invalid_api_key"

    # A good key is still invited to send its body (curl waits a second for that otherwise).
    invited = RawClient(gw.port)
    invited.send(head(len(body), secret, ctype, extra=expect))
    data = invited.read(3, until=lambda d: b"\r\n\r\n" in d)
    assert data.startswith(b"HTTP/1.1 100 Continue"), data[:200]
    invited.send(body)
    data = invited.read(10)
    invited.close()
    assert status_of(data) == 200, data[:300]
    assert len(upstream.completed) == 1


# =============================================================== B. bounds before admission
@pytest.mark.parametrize("bound", ["max_spool_bytes_per_key", "max_spool_bytes"])
def test_spool_bounds_refuse_the_upload_going_over(bound: str, keyed, redis_url: str,
                                                  upstream: FakeUpstream) -> None:
    gw = keyed(**{bound: 3_000_000})
    _, first_key = make_key(redis_url, max_concurrent=2)
    # One key for both uploads, or (the process's bound) two keys.
    second_key = first_key if bound == "max_spool_bytes_per_key" else make_key(redis_url)[1]
    image = png(size=2_000_000)
    body, ctype = multipart([("image", image, "a.png"), ("model", "gpt-image-1", None),
                             ("prompt", "x", None)])
    fields_at = body.index(BOUNDARY_LINE + b'Content-Disposition: form-data; name="model"')

    holding = RawClient(gw.port)  # its image spooled, its text fields not sent yet
    assert holding.send(head(len(body), first_key, ctype) + body[:fields_at]) > fields_at
    time.sleep(0.3)
    data = answer_to(gw.port, head(len(body), second_key, ctype) + body[:fields_at], 5)
    assert status_of(data) == 503, f"the upload going over {bound} was not refused: {data[:300]!r}"
    found = parse(data)
    assert found is not None and found[1].get("retry-after"), found
    assert openai_error(data)["code"] == "spool_full"

    holding.send(body[fields_at:])
    data = holding.read(10)
    holding.close()
    assert status_of(data) == 200, data[:300]
    assert len(upstream.completed) == 1 and upstream.last().files[0].sha256 == sha256(image)
    # Both spools are given back: the same upload again is served.
    r = httpx.post(f"{gw.url}/v1/images/edits", content=body, timeout=10,
                   headers={"content-type": ctype, "authorization": f"Bearer {second_key}"})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("before", [[], [("model", "gpt-image-1", None), ("prompt", "x", None)]],
                         ids=["first-part", "after-model-and-prompt"])
def test_unknown_fields_are_refused_as_they_arrive(before: list, start_gateway,
                                                   upstream: FakeUpstream) -> None:
    gw = start_gateway(body_read_timeout=10)
    body, ctype = multipart([*before, ("foo", "bar", None), ("image", png(size=100_000), "a.png")])
    # `foo` whole (the next part's delimiter ends it); the rest of the body never comes.
    cut = body.index(b'Content-Disposition: form-data; name="image"')
    data = answer_to(gw.port, head(len(body), None, ctype) + body[:cut], 3)
    assert status_of(data) == 400, f"no answer while the body was open: {data[:300]!r}"
    error = openai_error(data)
    assert (error["code"], error["param"]) == ("unknown_parameter", "foo"), error
    assert upstream.records == []


TEXT_CONFIG = """
[models."gpt-image-1"]
prompt_max_chars = 200000
fields.user = { max_chars = 100000 }
fields.safety_identifier = { max_chars = 100000 }
"""


def test_text_fields_together_are_bounded(start_gateway, upstream: FakeUpstream) -> None:
    # Each field's own bound is lifted, so only max_text_bytes can refuse them.
    gw = start_gateway(TEXT_CONFIG, max_text_bytes=100 * 1024)

    def post(size: int, files_first: bool) -> httpx.Response:
        text = [("prompt", "p" * size, None), ("user", "u" * size, None),
                ("safety_identifier", "s" * size, None)]
        image = [("image", png(), "a.png")]
        parts = [*image, *text, ("model", "gpt-image-1", None)] if files_first else \
            [("model", "gpt-image-1", None), *text, *image]
        body, ctype = multipart(parts)
        return httpx.post(f"{gw.url}/v1/images/edits", content=body, timeout=10,
                          headers={"content-type": ctype})

    for files_first in (False, True):
        r = post(30 * 1024, files_first)  # 90 KiB in all: within the bound
        assert r.status_code == 200, r.text[:300]
        assert upstream.last().field("safety_identifier") == "s" * 30 * 1024
    upstream.reset()
    for files_first in (False, True):
        r = post(40 * 1024, files_first)  # 120 KiB: the third field crosses 100 KiB
        assert r.status_code == 400, (files_first, r.status_code, r.text[:300])
        error = r.json()["error"]
        assert (error["code"], error["param"]) == ("text_too_large", "safety_identifier"), error
    assert upstream.completed == []


# ============================================================================ C. timeouts
def test_a_client_that_stops_reading_frees_its_slot_and_is_charged(
        keyed, redis_url: str, upstream: FakeUpstream) -> None:
    gw = keyed(client_send_timeout=1)
    _, secret = make_key(redis_url, max_concurrent=1, images_per_day=100)
    upstream.behaviour.huge_answer = 50_000_000  # one enormous image, as JSON
    body, ctype = multipart([("model", "gpt-image-1", None), ("prompt", "x", None),
                             ("image", png(), "a.png")])
    client = RawClient(gw.port, rcvbuf=64 * 1024)
    client.send(head(len(body), secret, ctype) + body)
    data = client.read(10, until=lambda d: b"\r\n\r\n" in d)  # the head; then it reads no more
    assert data.startswith(b"HTTP/1.1 200"), data[:300]
    try:
        eventually(lambda: slot_and_images(gw, secret), (0, 1), 8,
                   "the slot freed and the answer's image charged: (in_flight, images used)")
        assert in_flight(gw) == 0
        upstream.behaviour.huge_answer = 0
        assert edit(sdk(gw, secret, timeout=10)).data  # the key's one slot serves again
    finally:
        client.close()
    assert usage_of(gw.url, secret)["limits"]["images"]["used"] == 2


def test_upstream_backpressure_is_not_client_silence(start_gateway,
                                                     upstream: FakeUpstream) -> None:
    gw = start_gateway(body_read_timeout=1)
    upstream.behaviour.read_pause_at = 200_000
    upstream.behaviour.read_pause_seconds = 3
    image = png(size=5_000_000)
    body, ctype = multipart([("model", "gpt-image-1", None), ("prompt", "x", None),
                             ("image", image, "a.png")])
    data = answer_to(gw.port, head(len(body), None, ctype) + body, 15, send_seconds=15)  # full speed
    assert status_of(data) == 200, data[:300]
    record = upstream.last()
    assert 0 < record.paused_at < len(body)  # the upstream did stop reading mid-body
    assert record.files[0].sha256 == sha256(image)


# ========================================================================= D. quota leaks
def test_a_client_gone_after_its_upload_is_charged_the_answer(
        keyed, redis_url: str, upstream: FakeUpstream) -> None:
    gw = keyed()
    _, secret = make_key(redis_url, max_concurrent=1, images_per_day=100)
    upstream.behaviour.delay_headers = 2  # generating
    body, ctype = multipart([("model", "gpt-image-1", None), ("prompt", "x", None),
                             ("n", "2", None), ("image", png(), "a.png")])
    with socket.create_connection(("127.0.0.1", gw.port), timeout=5) as s:
        s.sendall(head(len(body), secret, ctype) + body)
        upstream.wait_for(lambda: upstream.completed)  # the upload is complete upstream
        time.sleep(0.2)
    # Hung up; the upstream answers two images about 2 s later.
    eventually(lambda: slot_and_images(gw, secret), (0, 2), 6,
               "the answer's 2 images charged and the slot freed: (in_flight, images used)")
    record = upstream.last()
    assert record.completed and not record.aborted, "the gateway hung up on the upstream"
    upstream.reset()
    assert edit(sdk(gw, secret, timeout=10)).data


# Surrounding white space is trimmed, as for every catalog field (" 3" goes upstream as "3").
@pytest.mark.parametrize("n", ["+3", "3.0", "\u0663", "3_0", "9" * 5000],
                         ids=["plus", "decimal", "arabic-indic", "underscore", "5000-digits"])
def test_pass_through_n_must_be_a_plain_integer(n: str, keyed, redis_url: str,
                                                upstream: FakeUpstream) -> None:
    gw = keyed(unknown_models="pass")
    _, secret = make_key(redis_url, images_per_day=100)
    _, one_image = make_key(redis_url, images_per_day=1)

    def post(n: str, key: str) -> httpx.Response:
        body, ctype = multipart([("model", "some-model", None), ("prompt", "x", None),
                                 ("n", n, None), ("image", png(), "a.png")])
        return httpx.post(f"{gw.url}/v1/images/edits", content=body, timeout=10,
                          headers={"content-type": ctype, "authorization": f"Bearer {key}"})

    r = post(n, secret)
    assert r.status_code == 400, (r.status_code, r.text[:300])
    assert r.json()["error"]["param"] == "n"
    assert upstream.records == []

    r = post("3", one_image)  # three images reserved: over a one-image day
    assert r.status_code == 429 and r.json()["error"]["code"] == "insufficient_quota", r.text
    r = post("2", secret)
    assert r.status_code == 200, r.text[:300]
    assert upstream.last().field("n") == "2" and len(r.json()["data"]) == 2
    assert r.headers["x-ratelimit-remaining-images"] == "98"  # reserved as 2
    assert usage_of(gw.url, secret)["limits"]["images"]["used"] == 2


def test_a_disabled_model_is_not_passed_through(start_gateway, upstream: FakeUpstream) -> None:
    gw = start_gateway('[models."gpt-image-1-all"]\nenabled = false\n', unknown_models="pass")

    def post(model: str, files_first: bool) -> httpx.Response:
        fields = [("model", model, None), ("prompt", "x", None)]
        image = [("image", png(), "a.png")]
        body, ctype = multipart([*image, *fields] if files_first else [*fields, *image])
        return httpx.post(f"{gw.url}/v1/images/edits", content=body, timeout=10,
                          headers={"content-type": ctype})

    for files_first in (False, True):
        r = post("gpt-image-1-all", files_first)
        assert r.status_code == 404, (files_first, r.status_code, r.text[:300])
        assert r.json()["error"]["code"] == "model_not_found"
    assert upstream.records == []
    assert post("some-model", False).status_code == 200  # pass-through itself is on
    assert upstream.last().field("model") == "some-model"


# ================================================================================ E. also
IDENTIFIERS = ("org-AbCdEf123456", "AbCdEf123456", "proj_AbC123", "sk-proj", "abc...wxyz")
UPSTREAM_ERRORS = {
    "400": (400, {"message": "Invalid value for 'size' (organization org-AbCdEf123456, project "
                             "proj_AbC123, API key sk-proj-abc...wxyz): use 1024x1024.",
                  "type": "invalid_request_error", "param": "size", "code": "invalid_value"}),
    "429": (429, {"message": "Rate limit reached for gpt-image-1 in organization "
                             "org-AbCdEf123456 on images per minute. Limit 5, used 5. Project "
                             "proj_AbC123, key sk-proj-abc...wxyz.",
                  "type": "requests", "param": None, "code": "rate_limit_exceeded"}),
}


@pytest.mark.parametrize("case", UPSTREAM_ERRORS.values(), ids=UPSTREAM_ERRORS.keys())
def test_upstream_error_bodies_are_scrubbed(case: tuple[int, dict[str, Any]],
                                            gateway: GatewayProcess,
                                            upstream: FakeUpstream) -> None:
    status, error = case
    upstream.behaviour.status = status
    upstream.behaviour.error = error
    body, ctype = multipart([("model", "gpt-image-1", None), ("prompt", "x", None),
                             ("image", png(), "a.png")])
    r = httpx.post(f"{gateway.url}/v1/images/edits", content=body, timeout=10,
                   headers={"content-type": ctype})
    assert r.status_code == status, r.text
    got = r.json()["error"]
    assert {k: got[k] for k in ("type", "param", "code")} == \
        {k: error[k] for k in ("type", "param", "code")}
    assert got["message"], got
    leaked = [ident for ident in IDENTIFIERS if ident in r.text]
    assert not leaked, f"the answer names {leaked}: {got['message']!r}"


def test_repeated_authorization_headers_are_refused(keyed, redis_url: str,
                                                    upstream: FakeUpstream) -> None:
    gw = keyed()
    _, secret = make_key(redis_url)
    _, other = make_key(redis_url)
    body, ctype = multipart([("model", "gpt-image-1", None), ("prompt", "x", None),
                             ("image", png(), "a.png")])

    def requests(auth: str) -> dict[str, bytes]:
        return {
            "edits": (f"POST /v1/images/edits HTTP/1.1\r\nHost: x\r\nContent-Type: {ctype}\r\n"
                      f"{auth}Content-Length: {len(body)}\r\n\r\n").encode() + body,
            "models": f"GET /v1/models HTTP/1.1\r\nHost: x\r\n{auth}\r\n".encode(),
            "usage": f"GET /v1/usage HTTP/1.1\r\nHost: x\r\n{auth}\r\n".encode(),
        }

    # One valid header alone: each endpoint serves it (the requests are well formed).
    for name, raw in requests(f"Authorization: Bearer {secret}\r\n").items():
        assert status_of(raw_exchange(gw.port, raw)) == 200, name
    upstream.reset()

    pairs = {"valid-then-wrong": (secret, WRONG_KEY), "wrong-then-valid": (WRONG_KEY, secret),
             "two-valid-keys": (secret, other)}
    not_refused = []
    for pair, (first, second) in pairs.items():
        auth = f"Authorization: Bearer {first}\r\nauthorization: Bearer {second}\r\n"
        for name, raw in requests(auth).items():
            answer = raw_exchange(gw.port, raw)
            if status_of(answer) != 400 or openai_error(answer)["type"] != "invalid_request_error":
                not_refused.append((pair, name, answer[:12].decode("latin-1")))
    assert not_refused == [], f"not refused with a 400: {not_refused}"
    assert upstream.records == []


def test_a_trickle_after_admission_is_cut_off_too(keyed, redis_url: str,
                                                  upstream: FakeUpstream) -> None:
    """The SDKs send model and prompt first, so admission comes at the first file byte: the body
    rate still holds after it (less the time the gateway waited on the upstream)."""
    gw = keyed(min_body_rate=20_000, body_rate_grace_seconds=1, body_read_timeout=30)
    _, secret = make_key(redis_url, max_concurrent=1)
    body, ctype = multipart([("model", "gpt-image-1", None), ("prompt", "x", None),
                             ("image", png(size=2_000_000), "a.png")])
    start = body.index(b'name="image"') + 200
    client = RawClient(gw.port)
    client.send(head(len(body), secret, ctype) + body[:start])
    t0 = time.monotonic()
    client.trickle(body[start:], every=0.1, seconds=6, until_answer=True)  # far below 20 kB/s
    data = client.read(2)
    client.close()
    assert status_of(data) == 408, data[:300]
    assert time.monotonic() - t0 < 4
    # The fake upstream notices the hang-up on its own thread, a moment after the 408.
    upstream.wait_for(lambda: upstream.records and upstream.records[-1].aborted, timeout=3)
    assert not upstream.records[-1].completed
    eventually(lambda: usage_of(gw.url, secret)["in_flight"], 0, 3, "the key's slot comes back")


def test_a_refused_upload_still_reads_its_answer(keyed) -> None:
    """The SDK writes its whole 8 MB body before reading: the 401 is written before the short
    drain and the close, so it finds the answer, not a reset connection."""
    gw = keyed(refusal_drain_bytes=64 * 1024, refusal_drain_seconds=1)
    client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=WRONG_KEY, max_retries=0, timeout=10)
    for _ in range(3):
        with pytest.raises(openai.AuthenticationError):
            client.images.edit(model="gpt-image-1", image=png(size=8_000_000), prompt="x")
