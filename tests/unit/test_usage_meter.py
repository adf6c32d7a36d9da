"""Reading usage from answers as they stream past, however they are cut into chunks and however a
valid answer is written (the meter parses; it must not depend on OpenAI's exact bytes)."""

from __future__ import annotations

import itertools
import json
import tracemalloc
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway import usage
from gateway.errors import UpstreamResponseTooLarge
from gateway.images.relay import EventFramer
from gateway.usage import UsageMeter

USAGE = {"input_tokens": 50, "output_tokens": 200, "total_tokens": 250,
         "input_tokens_details": {"text_tokens": 10, "image_tokens": 40}}
FLAT = {"input_tokens": 50, "output_tokens": 200, "total_tokens": 250,
        "input_text_tokens": 10, "input_image_tokens": 40}
ANSWER = json.dumps({
    "created": 1, "data": [{"b64_json": "A" * 5000}, {"b64_json": "B" * 300}],
    "usage": USAGE}).encode()
EVENTS = b"".join(
    f"event: {kind}\ndata: {json.dumps(data)}\n\n".encode() for kind, data in [
        ("image_edit.partial_image", {"b64_json": "p" * 900, "partial_image_index": 0}),
        ("image_edit.completed", {"b64_json": "c" * 900, "usage": {"total_tokens": 120}}),
        ("image_edit.completed", {"b64_json": "d" * 900, "usage": {"total_tokens": 130}})])


def cut(data: bytes, points: list[int]) -> list[bytes]:
    edges = [0, *sorted({p % len(data) for p in points}), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(edges) if b > a]


def meter_of(chunks: list[bytes] | bytes, *, sse: bool = False) -> UsageMeter:
    meter = UsageMeter(sse=sse)
    for chunk in [chunks] if isinstance(chunks, bytes) else chunks:
        meter.feed(chunk)
    meter.close()
    assert not meter._failed  # the safety net (a bug caught and logged) was not needed
    return meter


def bytewise(data: bytes) -> list[bytes]:
    return [data[i:i + 1] for i in range(len(data))]


def sse(*events: tuple[str | None, Any], eol: str = "\n") -> bytes:
    """Events as an upstream writes them; kind None: no `event:` field."""
    out = ""
    for kind, data in events:
        out += (f"event: {kind}{eol}" if kind else "") + f"data: {json.dumps(data)}{eol}{eol}"
    return out.encode()


# ------------------------------------------------------------------------------------- JSON
@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=10**6), max_size=60))
def test_json_answers_under_any_chunking(points: list[int]) -> None:
    meter = meter_of(cut(ANSWER, points))
    assert meter.images == 2 and meter.usage == FLAT


def test_every_byte_its_own_chunk() -> None:
    answer = json.dumps({"usage": USAGE, "created": 1, "data": [
        {"url": None, "b64_json": "QUJD\\\"x", "revised_prompt": "a \"lamp\" \\ {[,:"},
        {"b64_json": "RA==", "url": None, "data": [1, 2]}]}, indent=2).encode()
    meter = meter_of(bytewise(answer))
    assert meter.images == 2 and meter.usage == FLAT


def test_url_null_beside_b64_json_counts_each_image_once() -> None:
    """Reported: the old meter counted the two keys, so every image twice."""
    answer = json.dumps({"created": 1, "data": [{"b64_json": "QQ==", "url": None}] * 3,
                         "usage": USAGE}).encode()
    assert meter_of(answer).images == 3


def test_usage_before_data_and_pretty_printing() -> None:
    answer = json.dumps({"usage": USAGE, "background": "opaque",
                         "data": [{"url": "https://x/1.png"}, {"url": "https://x/2.png"}]},
                        indent="\t", separators=(" ,\r\n", " : ")).encode()
    meter = meter_of(answer)
    assert meter.images == 2 and meter.usage == FLAT


def test_only_the_top_level_data_array_counts() -> None:
    answer = json.dumps({
        "meta": {"data": [{"b64_json": "x"}] * 5},
        "data": [{"b64_json": "QQ==", "data": [{"url": "a"}, {"url": "b"}],
                  "extra": {"data": [{}, {}, {}]}}],
        "usage": {**USAGE, "data": [{}, {}], "input_tokens_details": {"image_tokens": 40,
                                                                    "data": [{}]}},
        "list": [{"data": [{}]}]}).encode()
    meter = meter_of(answer)
    assert meter.images == 1
    assert meter.usage["total_tokens"] == 250 and meter.usage["input_image_tokens"] == 40


def test_only_the_top_level_usage_is_read() -> None:
    answer = json.dumps({"data": [{"b64_json": "QQ==", "usage": {"total_tokens": 9}}],
                         "meta": {"usage": {"total_tokens": 7}}}).encode()
    assert meter_of(answer).usage == {}


def test_escapes_in_strings_and_keys() -> None:
    answer = (b'{"created": 1, "note": "a \\"data\\": [1, 2] \\\\", '
              b'"d\\u0061ta": [{"b64_json": "a\\/b\\\\"}, {"b64_json": "\\"}, {"}],'
              b' "usage": {"total_tokens": 5}}')
    assert json.loads(answer)["data"][0]["b64_json"] == "a/b\\"
    for chunks in ([answer], bytewise(answer)):
        meter = meter_of(chunks)
        assert meter.images == 2 and meter.usage == {"total_tokens": 5}


def test_data_elements_of_any_kind_count() -> None:
    """The count is data[]'s length, whatever its elements are, as json.loads would see it."""
    assert meter_of(b'{"data": [{"url": "u"}, "x", 12, null, [1], {}]}').images == 6
    assert meter_of(b'{"data": []}').images == 0
    assert meter_of(b'{"data": {"b64_json": "x"}}').images == 0
    assert meter_of(b'{"data": [1, 2, 3], "x": [], "data": [{}]}').images == 1  # the last, as json.loads


def test_tiny_chunks_still_count_every_image() -> None:
    meter = meter_of([ANSWER[i:i + 3] for i in range(0, len(ANSWER), 3)])
    assert meter.images == 2


# Any JSON, generated, written in any valid way and cut anywhere: the meter agrees with json.loads.
_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(
    alphabet=st.characters(codec="utf-8") | st.sampled_from('"\\/{}[],:\r\n '), max_size=12)
_keys = st.sampled_from(["data", "usage", "b64_json", "url", "type", "created"]) | st.text(max_size=6)
_values = st.recursive(_scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
    _keys, inner, max_size=4), max_leaves=12)
_usages = st.dictionaries(st.sampled_from(
    ["input_tokens", "output_tokens", "total_tokens", "input_tokens_details", "data"]),
    st.integers(0, 10**6) | st.booleans() | st.dictionaries(
        st.sampled_from(["text_tokens", "image_tokens"]), st.integers(0, 99)), max_size=4)
_answers = st.dictionaries(_keys, _values, max_size=5) | st.fixed_dictionaries(
    {"data": st.lists(_values, max_size=5), "usage": _usages},
    optional={"created": st.integers(), "x": _values})


def _tokens(value: Any) -> int | None:
    """A count as the quotas take it (whole, 0 to 2**53; see the test below)."""
    if type(value) is float and value.is_integer():
        value = int(value)
    return min(max(value, 0), 2**53) if type(value) is int else None


def _expected(doc: Any) -> tuple[int, dict[str, int]]:
    """What json.loads makes of the answer: the oracle the streaming scan must agree with."""
    if not isinstance(doc, dict):
        return 0, {}
    data = doc.get("data")
    flat: dict[str, int] = {}
    for key, prefix in (("usage", ""), ("svg_usage", "svg_")):
        part = doc.get(key)
        if not isinstance(part, dict):
            continue
        flat |= {prefix + k: n for k, v in part.items() if (n := _tokens(v)) is not None}
        for side in ("input", "output"):
            details = part.get(f"{side}_tokens_details")
            if isinstance(details, dict):
                flat |= {f"{prefix}{side}_{k}": n for k, v in details.items()
                         if k in ("text_tokens", "image_tokens") and (n := _tokens(v)) is not None}
    return (len(data) if isinstance(data, list) else 0), flat


@settings(max_examples=400, deadline=None)
@given(_answers | _values, st.sampled_from([None, 0, 2, "\t"]), st.booleans(),
       st.lists(st.integers(min_value=0, max_value=10**6), max_size=20))
def test_json_agrees_with_json_loads(doc: Any, indent: Any, ascii_only: bool,
                                     points: list[int]) -> None:
    answer = json.dumps(doc, indent=indent, ensure_ascii=ascii_only).encode()
    meter = meter_of(cut(answer, points))
    assert (meter.images, meter.usage) == _expected(doc)


def metered_in_64k_chunks(answer: bytes, *, sse: bool) -> tuple[UsageMeter, int]:
    """The meter after `answer` in 64 KiB chunks, and the peak memory it traced meanwhile."""
    chunks = [answer[i:i + 65536] for i in range(0, len(answer), 65536)]
    meter = UsageMeter(sse=sse)
    tracemalloc.start()
    try:
        for chunk in chunks:
            meter.feed(chunk)
        meter.close()
        return meter, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_a_large_answer_is_never_held() -> None:
    """Huge strings anywhere (an image, a key, inside usage) are stepped over, not kept."""
    big = "Q" * (8 << 20)
    answer = json.dumps({big: 1, "data": [{"b64_json": big}, {"b64_json": big}],
                         "usage": {**USAGE, "note": big}}).encode()
    meter, peak = metered_in_64k_chunks(answer, sse=False)
    assert peak < 1 << 20 and not meter._failed
    assert meter.images == 2 and meter.usage == {}  # a usage object past 64 KiB is not read


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300) | st.builds(lambda a, k: a[:k], st.just(ANSWER), st.integers(0, 400)),
       st.lists(st.integers(min_value=0, max_value=10**6), max_size=10), st.booleans())
def test_malformed_answers_never_raise(answer: bytes, points: list[int], as_sse: bool) -> None:
    meter = meter_of(cut(answer, points) if answer else [], sse=as_sse)
    assert meter.images >= 0 and all(type(v) is int for v in meter.usage.values())


def test_a_bug_in_the_meter_never_breaks_the_answer(monkeypatch: pytest.MonkeyPatch,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    meter = UsageMeter(sse=False)
    meter.feed(b'{"data": [{"b64_json": "%s"},' % (b"x" * 70_000))  # long: scanned as it comes
    monkeypatch.setattr(usage._JsonScan, "feed", lambda *args: 1 / 0)
    meter.feed(b' {"b64_json": "y"}]}')
    meter.feed(b"more")
    meter.close()
    assert meter.images == 1 and "gave up" in caplog.text


def test_a_small_answer_is_read_whole_and_counts_the_same() -> None:
    """Answers up to 64 KiB are read by json.loads at their end; a cut one falls back to the scan."""
    answer = json.dumps({"created": 1, "data": [{"b64_json": "a", "url": None}] * 3,
                         "usage": {"total_tokens": 750}}).encode()
    for cut in (len(answer), len(answer) - 5):
        meter = UsageMeter(sse=False)
        for i in range(0, cut, 7):
            meter.feed(answer[i:min(i + 7, cut)])
        meter.close()
        assert meter.images == 3
        assert meter.usage == ({"total_tokens": 750} if cut == len(answer) else {})


def test_a_malformed_answer_counts_what_was_found() -> None:
    assert meter_of(ANSWER[:ANSWER.index(b"BBB")]).images == 2  # cut inside the second image
    assert meter_of(b'{"data": [{"b64_json": "x"}, {"b64_json": "y"}], "usage": {"total_tok').usage == {}
    meter = meter_of(b'{"usage": {"total_tokens": 3}, "data": [{"b64_json": "x"} {"b64_json": "y"}')
    assert meter.images == 1 and meter.usage == {"total_tokens": 3}
    assert meter_of(b"[" * 100_000 + b"]" * 100_000).images == 0
    assert meter_of(b'}]{"data": [{}]}').images == 1  # stray closers before the answer
    assert meter_of(b'{"data": [{}]}\n{"data": [{}, {}]}').images == 1  # only the first value
    assert meter_of(b'{"usage": {"a": ' + b"[" * 5000 + b"]" * 5000 + b"}}").usage == {}


# ------------------------------------------------------------------------------------- SSE
@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=10**6), max_size=60))
def test_streams_count_completed_events_only(points: list[int]) -> None:
    framer, meter, relayed = EventFramer(len(EVENTS)), UsageMeter(sse=True), b""
    for chunk in cut(EVENTS, points):
        if whole := framer.feed(chunk):
            meter.feed(whole)
            relayed += whole
    assert relayed == EVENTS and framer.pending == b"" and not meter._failed
    assert meter.images == 2 and meter.usage == {"total_tokens": 250}


@settings(max_examples=100, deadline=None)
@given(st.lists(st.sampled_from(["\n", "\r", "\r\n"]), min_size=1, max_size=4),
       st.lists(st.integers(min_value=0, max_value=10**6), max_size=20))
def test_the_framer_passes_events_whatever_their_line_ends(ends: list[str], points: list[int]) -> None:
    stream = b"".join(sse(("image_edit.completed", {"usage": {"total_tokens": 1}}), eol=eol)
                      for eol in ends)
    framer, meter, relayed = EventFramer(limit=200), UsageMeter(sse=True), b""
    for chunk in cut(stream, points):
        if whole := framer.feed(chunk):
            meter.feed(whole)
            relayed += whole
    assert relayed + framer.pending == stream and framer.pending in (b"", b"\n")
    assert meter.images == len(ends)


def test_crlf_events_in_one_read_each_count() -> None:
    """Reported: three completed events with CRLF line ends in one read counted as one."""
    stream = sse(*[("image_edit.completed", {"b64_json": "QQ==", "usage": USAGE})] * 3, eol="\r\n")
    meter = meter_of(stream, sse=True)
    assert meter.images == 3 and meter.usage == {k: 3 * v for k, v in FLAT.items()}


@pytest.mark.parametrize("eol", ["\n", "\r\n", "\r"])
def test_line_ends_of_every_kind_under_bytewise_chunking(eol: str) -> None:
    stream = sse(("image_edit.partial_image", {"b64_json": "QQ==", "partial_image_index": 0}),
                 ("image_edit.completed", {"b64_json": "QQ==", "usage": {"total_tokens": 4}}),
                 ("image_generation.completed", {"b64_json": "QQ==", "usage": {"total_tokens": 6}}),
                 eol=eol)
    for chunks in ([stream], bytewise(stream)):
        meter = meter_of(chunks, sse=True)
        assert meter.images == 2 and meter.usage == {"total_tokens": 10}


def test_the_type_may_come_only_from_the_data() -> None:
    stream = sse((None, {"type": "image_edit.partial_image", "b64_json": "QQ=="}),
                 (None, {"b64_json": "QQ==", "usage": {"total_tokens": 4},
                         "type": "image_edit.completed"}),
                 (None, {"type": "image_generation.completed", "usage": {"total_tokens": 1}}),
                 (None, {"b64_json": "QQ==", "usage": {"total_tokens": 50}}))  # no type at all
    meter = meter_of(stream, sse=True)
    assert meter.images == 2 and meter.usage == {"total_tokens": 5}


def test_the_event_field_wins_over_the_data_type() -> None:
    stream = sse(("image_edit.partial_image", {"type": "image_edit.completed", "usage": USAGE}),
                 ("image_edit.completed", {"type": "image_edit.partial_image",
                                           "usage": {"total_tokens": 8}}))
    assert meter_of(stream, sse=True).usage == {"total_tokens": 8}


def test_data_split_over_several_lines_with_comments_and_other_fields() -> None:
    data = json.dumps({"type": "image_edit.completed", "b64_json": "QQ==", "usage": USAGE},
                      indent=2)
    lines = "".join(f"data:{line}\r\n" if i % 2 else f"data: {line}\n"
                    for i, line in enumerate(data.split("\n")))
    stream = (f": keep-alive\n\nid: 7\nretry: 100\n{lines}: a comment\n\n"
              f"data\ndata: {{}}\nevent:image_edit.completed\n\r").encode()
    for chunks in ([stream], bytewise(stream)):
        meter = meter_of(chunks, sse=True)
        assert meter.images == 2 and meter.usage == FLAT


def test_events_without_data_or_without_their_blank_line_are_not_counted() -> None:
    """Per the SSE spec (and the SDKs): neither is ever dispatched to the client."""
    stream = b"event: image_edit.completed\n\n" + b"event: image_edit.completed\ndata: {}\n"
    assert meter_of(stream, sse=True).images == 0


def test_a_byte_order_mark_is_dropped() -> None:
    stream = b"\xef\xbb\xbf" + sse(("image_edit.completed", {"usage": {"total_tokens": 1}}))
    assert meter_of(bytewise(stream), sse=True).images == 1
    assert meter_of(b"\xef\xbb" + stream[3:], sse=True).images == 0  # no field "\xef\xbbevent"


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(
    st.sampled_from(["image_edit.completed", "image_generation.completed",
                     "image_edit.partial_image", "response.completed", "error"]),
    st.sampled_from(["field", "data", "both"]), st.integers(0, 1000), st.booleans(),
    st.sampled_from(["\n", "\r", "\r\n"])), max_size=6),
    st.lists(st.integers(min_value=0, max_value=10**6), max_size=20))
def test_streams_agree_with_a_reference(events: list[tuple[str, str, int, bool, str]],
                                        points: list[int]) -> None:
    stream, images, tokens = "", 0, 0
    for kind, where, total, pretty, eol in events:
        data = {"b64_json": "QQ==", "usage": {"total_tokens": total, "data": [1]}}
        if where != "field":
            data["type"] = kind
        text = json.dumps(data, indent=2 if pretty else None)
        stream += f"event: {kind}{eol}" if where != "data" else ""
        stream += "".join(f"data: {line}{eol}" for line in text.split("\n")) + eol
        if kind in ("image_edit.completed", "image_generation.completed"):
            images, tokens = images + 1, tokens + total
    meter = meter_of(cut(stream.encode(), points) if stream else [], sse=True)
    assert meter.images == images and meter.usage == ({"total_tokens": tokens} if images else {})


def test_a_long_event_stream_is_never_held() -> None:
    big = "Q" * (4 << 20)
    stream = sse(("image_edit.partial_image", {"b64_json": big}),
                 ("image_edit.completed", {"b64_json": big, "usage": {"total_tokens": 3}}))
    long_lines = b": %b\n%b\nevent: %b\n\n" % (b"x" * (2 << 20), b"y" * (2 << 20), b"z" * (2 << 20))
    stream = long_lines + stream  # a comment, a field with no colon, an event name
    meter, peak = metered_in_64k_chunks(stream, sse=True)
    assert peak < 1 << 20 and not meter._failed and meter.images == 1 and meter.usage == {"total_tokens": 3}


def test_an_event_longer_than_the_limit_is_refused() -> None:
    framer = EventFramer(limit=100)
    assert framer.feed(b"data: " + b"a" * 150 + b"\n\n")  # whole events pass, however long
    assert framer.feed(b"data: " + b"a" * 90) == b""
    with pytest.raises(UpstreamResponseTooLarge):
        framer.feed(b"a" * 20)


# ------------------------------------------------------------------ today's usage shapes
SVG = {"input_tokens": 30, "model": "gpt-5.5", "output_tokens": 900, "reasoning_tokens": 400,
       "total_tokens": 930}
NEW_USAGE = {**USAGE, "output_tokens_details": {"text_tokens": 8, "image_tokens": 192}}


@pytest.mark.parametrize("pad", [10, 200_000])  # read whole, and scanned as it streams
def test_output_details_and_svg_usage_are_read(pad: int) -> None:
    answer = json.dumps({"created": 1, "data": [{"b64_json": "A" * pad, "generation_id": "g1"}],
                         "usage": NEW_USAGE, "svg_usage": SVG}).encode()
    for chunks in ([answer], cut(answer, [7, 60, len(answer) // 2, len(answer) - 20])):
        meter = meter_of(chunks)
        assert meter.images == 1
        assert meter.usage == {**FLAT, "output_text_tokens": 8, "output_image_tokens": 192,
                               "svg_input_tokens": 30, "svg_output_tokens": 900,
                               "svg_reasoning_tokens": 400, "svg_total_tokens": 930}
        assert usage.charged_tokens(meter.usage) == 250 + 930


def test_svg_usage_in_completed_events_adds_up() -> None:
    events = sse(("image_generation.completed", {"usage": {"total_tokens": 100},
                                                 "svg_usage": SVG}),
                 ("image_generation.completed", {"usage": {"total_tokens": 50}}))
    meter = meter_of(bytewise(events), sse=True)
    assert (meter.images, usage.charged_tokens(meter.usage)) == (2, 100 + 50 + 930)


def test_counts_are_whole_non_negative_and_bounded() -> None:
    answer = json.dumps({"data": [{"b64_json": "A"}], "usage": {
        "total_tokens": -5000, "input_tokens": 1500.0, "output_tokens": 10**30,
        "input_tokens_details": {"text_tokens": True, "image_tokens": 2.5}},
        "svg_usage": {"total_tokens": -1}}).encode()
    meter = meter_of(answer)
    assert meter.usage == {"total_tokens": 0, "input_tokens": 1500, "output_tokens": 2**53,
                           "svg_total_tokens": 0}
    assert usage.charged_tokens(meter.usage) == 0
