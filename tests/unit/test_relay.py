"""gateway.images.relay on a fake answer stream and a fake client `send`: what the client
receives, what is metered, and how a broken stream ends. No server."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import pytest

from gateway.asgi import Message
from gateway.errors import (
    GatewayError,
    UpstreamError,
    UpstreamRejectedKey,
    UpstreamResponseTooLarge,
    UpstreamTimeout,
)
from gateway.images.client import Client
from gateway.images.relay import Relayed, relay
from tests.support.helpers import shipped_settings

USAGE = {"input_tokens": 5, "output_tokens": 7, "total_tokens": 12}


class FakeAnswer:
    """What gateway.upstream.Answer offers the relay, from a list of chunks; `fail` is raised
    after them, as the upstream boundary raises a broken stream."""

    def __init__(self, status: int, chunks: list[bytes], *, content_type: str,
                 fail: GatewayError | None = None, extra: dict[str, str] | None = None) -> None:
        self.status = status
        self.headers = {"content-type": content_type, "x-request-id": "up-1", **(extra or {})}
        self.raw_headers = [(k.encode(), v.encode()) for k, v in self.headers.items()]
        self.upstream = "default"
        self._chunks = chunks
        self._fail = fail

    async def chunks(self) -> AsyncIterator[bytes]:
        for chunk in self._chunks:
            yield chunk
        if self._fail is not None:
            raise self._fail


async def _relay(answer: FakeAnswer, **settings: object) -> tuple[list[Message], Relayed]:
    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    async def receive() -> Message:
        raise AssertionError("the relay never reads the client")

    s = shipped_settings(**settings)
    client = Client(receive, send, s, 1 << 20, "req-1", expects_continue=False)
    result = Relayed()
    await relay(answer, client, [(b"x-request-id", b"req-1")], result)  # type: ignore[arg-type]
    return sent, result


def _body(sent: list[Message]) -> bytes:
    return b"".join(m.get("body", b"") for m in sent[1:])


def _event(kind: str, data: dict[str, object]) -> bytes:
    return f"event: {kind}\ndata: {json.dumps(data)}\n\n".encode()


async def test_json_passes_through_and_is_metered() -> None:
    answer = json.dumps({"created": 1, "data": [{"b64_json": "AA"}, {"b64_json": "BB"}],
                         "usage": USAGE}).encode()
    sent, result = await _relay(FakeAnswer(200, [answer[:10], answer[10:]],
                                           content_type="application/json"))
    start = sent[0]
    assert start["status"] == 200
    assert (b"x-upstream-request-id", b"up-1") in start["headers"]
    assert (b"x-request-id", b"req-1") in start["headers"]
    assert _body(sent) == answer
    assert (result.images, result.usage["total_tokens"], result.failure) == (2, 12, "")


async def test_sse_goes_in_whole_events_and_ends_with_an_error_event_when_broken() -> None:
    done = _event("image_edit.completed", {"type": "image_edit.completed", "b64_json": "AA",
                                           "usage": USAGE})
    half = _event("image_edit.partial_image", {"type": "image_edit.partial_image"})[:20]
    answer = FakeAnswer(200, [done[:15], done[15:] + half], content_type="text/event-stream",
                        fail=UpstreamTimeout("The upstream 'default' did not answer in time."))
    sent, result = await _relay(answer)
    body = _body(sent)
    assert body.startswith(done) and half not in body  # the half event is dropped
    error = json.loads(body[len(done):].split(b"data: ", 1)[1])
    assert error["type"] == "error" and error["error"]["code"] == "upstream_timeout"
    assert (result.images, result.failure) == (1, "timeout")  # what it delivered counts


async def test_a_json_answer_broken_off_is_cut_not_completed() -> None:
    answer = FakeAnswer(200, [b'{"created": 1, "da'], content_type="application/json",
                        fail=UpstreamTimeout("silent"))
    with pytest.raises(UpstreamTimeout):
        await _relay(answer)


async def test_answers_over_the_bound_are_refused_or_cut() -> None:
    big = FakeAnswer(200, [b"x" * 10], content_type="application/json",
                     extra={"content-length": "5000"})
    with pytest.raises(UpstreamResponseTooLarge):
        await _relay(big, max_response_bytes=4096)
    event = _event("image_edit.completed", {"type": "image_edit.completed", "pad": "x" * 3000})
    sent, result = await _relay(FakeAnswer(200, [event, event], content_type="text/event-stream"),
                                max_response_bytes=4096)
    assert result.failure == "too_large" and _body(sent).startswith(event)
    assert b"upstream_response_too_large" in _body(sent)


async def test_upstream_errors_become_gateway_errors_before_anything_is_sent() -> None:
    with pytest.raises(UpstreamRejectedKey):
        await _relay(FakeAnswer(401, [b'{"error": {"message": "bad key sk-abc"}}'],
                                content_type="application/json"))
    with pytest.raises(UpstreamError) as caught:
        await _relay(FakeAnswer(429, [b'{"error": {"message": "slow down", "type": "x"}}'],
                                content_type="application/json",
                                extra={"retry-after": "3"}))
    assert caught.value.status == 429 and caught.value.headers.get("retry-after") == "3"
