"""Many edits in flight on one gateway process (the scale the gateway is built for, in small).

1,000 edits arrive at once, one connection each, on a key with 700 images a day, while the
upstream takes a second per answer: exactly 700 are served and 300 refused with 429, and not one
is refused because the gateway itself was busy (before the store pipelined and its deadline knew
"busy" from "away", a burst like this turned into fail-closed 503s). bench/bench_scale.py measures
the same at 3,000 against bare proxies.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable

import httpx

from tests.conftest import GatewayProcess
from tests.support.fake_upstream import FakeUpstream
from tests.support.helpers import make_key, scrape, value
from tests.support.images import png

BOUNDARY = "scale-0123456789"


def edit_body() -> bytes:
    b = BOUNDARY.encode()
    out = b""
    for name, text in (("model", "gpt-image-1"), ("prompt", "a kite")):
        out += b"--" + b + b'\r\nContent-Disposition: form-data; name="%s"\r\n\r\n%s\r\n' % (
            name.encode(), text.encode())
    return out + (b"--" + b + b'\r\nContent-Disposition: form-data; name="image"; '
                  b'filename="a.png"\r\nContent-Type: image/png\r\n\r\n' + png() + b"\r\n--" + b
                  + b"--\r\n")


async def burst(port: int, secret: str, count: int) -> list[int]:
    body = edit_body()
    head = (f"POST /v1/images/edits HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Authorization: Bearer {secret}\r\nConnection: close\r\n"
            f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()

    async def one() -> int:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(head + body)
            answer = await asyncio.wait_for(reader.read(), 60)  # Connection: close
            return int(answer.split(b" ", 2)[1])
        finally:
            writer.close()

    return await asyncio.gather(*(one() for _ in range(count)))


def test_a_burst_in_flight_is_admitted_exactly_and_never_refused_for_being_busy(
        keyed: Callable[..., GatewayProcess], redis_url: str, upstream: FakeUpstream) -> None:
    upstream.behaviour.delay_headers = 1.0  # every answer a second away: all 700 in flight at once
    record, secret = make_key(redis_url, images_per_day=700)
    gw = keyed()  # its default redis_timeout (0.25 s): a loop busy with the burst is not Redis away
    statuses = asyncio.run(burst(int(gw.url.rsplit(":", 1)[1]), secret, 1000))
    assert Counter(statuses) == {200: 700, 429: 300}
    assert len(upstream.completed) == 700
    usage = httpx.get(f"{gw.url}/v1/usage", headers={"authorization": f"Bearer {secret}"}).json()
    assert usage["key"]["id"] == record.id and usage["limits"]["images"]["used"] == 700
    metrics = scrape(f"{gw.url}/metrics")
    assert value(metrics, "gateway_quota_store_errors_total") == 0
    assert value(metrics, "gateway_requests_total", endpoint="/v1/images/edits",
                 status="503") == 0
