"""The streaming multipart reader and writer, over every way a body can be cut into chunks."""

from __future__ import annotations

import contextlib
import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.errors import InvalidRequest
from gateway.multipart import PART_DATA, PART_END, PART_START, MultipartReader, MultipartWriter


def parse(body: bytes, boundary: bytes, cuts: list[int]) -> list[tuple[str, str | None, bytes]]:
    reader = MultipartReader(boundary, max_parts=100, max_header_bytes=4096)
    parts: list[tuple[str, str | None, bytes]] = []
    data = bytearray()
    edges = [0, *sorted(set(cuts)), len(body)]
    for start, end in itertools.pairwise(edges):
        for kind, payload in reader.feed(body[start:end]):
            if kind == PART_START:
                current = payload
                data = bytearray()
            elif kind == PART_DATA:
                data += payload
            elif kind == PART_END:
                parts.append((current.name, current.filename, bytes(data)))
    reader.close()
    return parts


def encode(fields: list[tuple[str, str]], files: list[tuple[str, bytes]]) -> tuple[bytes, bytes]:
    w = MultipartWriter()
    body = b"".join(w.field(n, v) for n, v in fields)
    for i, (name, data) in enumerate(files):
        body += w.file_head(name, f"f{i}.png", "image/png") + data + w.file_tail
    return body + w.close(), w.boundary


text = st.text(st.characters(blacklist_categories=["Cs"]), max_size=50)


@settings(max_examples=200, deadline=None)
@given(fields=st.lists(st.tuples(st.sampled_from(["prompt", "n", 'we"ird\nname']), text), max_size=4),
       files=st.lists(st.tuples(st.sampled_from(["image", "image[]", "mask"]),
                                st.binary(max_size=3000)), max_size=4),
       cuts=st.lists(st.integers(min_value=0, max_value=20000), max_size=30))
def test_writer_and_reader_round_trip_under_any_chunking(
        fields: list[tuple[str, str]], files: list[tuple[str, bytes]], cuts: list[int]) -> None:
    body, boundary = encode(fields, files)
    parts = parse(body, boundary, [c for c in cuts if c < len(body)])
    quoted = [(n.replace('"', "%22").replace("\n", "%0A"), v) for n, v in fields]
    assert [(n, v) for n, _f, v in parts[: len(fields)]] == [(n, v.encode()) for n, v in quoted]
    assert [(n, d) for n, _f, d in parts[len(fields):]] == files
    assert all(f is None for _n, f, _d in parts[: len(fields)])


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2000), st.lists(st.integers(min_value=0, max_value=2000), max_size=10))
def test_garbage_only_ever_raises_invalid_request(garbage: bytes, cuts: list[int]) -> None:
    body, boundary = encode([("prompt", "x")], [("image", b"\x89PNG")])
    for candidate in (garbage, body[: len(body) // 2] + garbage, garbage + body):
        with contextlib.suppress(InvalidRequest):
            parse(candidate, boundary, [c for c in cuts if c < len(candidate)])


def test_part_count_is_bounded() -> None:
    body, boundary = encode([("f", "v")] * 5, [])
    reader = MultipartReader(boundary, max_parts=4, max_header_bytes=4096)
    try:
        reader.feed(body)
    except InvalidRequest as exc:
        assert exc.code == "too_many_parts"
    else:
        raise AssertionError("a fifth part was accepted")
