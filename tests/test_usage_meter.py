"""Reading usage from answers as they stream past, however they are cut into chunks."""

from __future__ import annotations

import itertools
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.edits import EventFramer
from gateway.errors import UpstreamResponseTooLarge
from gateway.usage import UsageMeter

ANSWER = json.dumps({
    "created": 1, "data": [{"b64_json": "A" * 5000}, {"b64_json": "B" * 300}],
    "usage": {"input_tokens": 50, "output_tokens": 200, "total_tokens": 250,
              "input_tokens_details": {"text_tokens": 10, "image_tokens": 40}}}).encode()
EVENTS = b"".join(
    f"event: {kind}\ndata: {json.dumps(data)}\n\n".encode() for kind, data in [
        ("image_edit.partial_image", {"b64_json": "p" * 900, "partial_image_index": 0}),
        ("image_edit.completed", {"b64_json": "c" * 900, "usage": {"total_tokens": 120}}),
        ("image_edit.completed", {"b64_json": "d" * 900, "usage": {"total_tokens": 130}})])


def cut(data: bytes, points: list[int]) -> list[bytes]:
    edges = [0, *sorted({p % len(data) for p in points}), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(edges) if b > a]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=10**6), max_size=60))
def test_json_answers_under_any_chunking(points: list[int]) -> None:
    meter = UsageMeter(sse=False)
    for chunk in cut(ANSWER, points):
        meter.feed(chunk)
    meter.close()
    assert meter.images == 2
    assert meter.usage["total_tokens"] == 250 and meter.usage["input_image_tokens"] == 40


def test_tiny_chunks_still_count_every_image() -> None:
    meter = UsageMeter(sse=False)
    for i in range(0, len(ANSWER), 3):
        meter.feed(ANSWER[i:i + 3])
    meter.close()
    assert meter.images == 2


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=10**6), max_size=60))
def test_streams_count_completed_events_only(points: list[int]) -> None:
    framer, meter, relayed = EventFramer(len(EVENTS)), UsageMeter(sse=True), b""
    for chunk in cut(EVENTS, points):
        if whole := framer.feed(chunk):
            meter.feed(whole)
            relayed += whole
    assert relayed == EVENTS and framer.pending == b""
    assert meter.images == 2 and meter.usage == {"total_tokens": 250}


def test_an_event_longer_than_the_limit_is_refused() -> None:
    framer = EventFramer(limit=100)
    assert framer.feed(b"data: " + b"a" * 150 + b"\n\n")  # whole events pass, however long
    assert framer.feed(b"data: " + b"a" * 90) == b""
    with pytest.raises(UpstreamResponseTooLarge):
        framer.feed(b"a" * 20)
