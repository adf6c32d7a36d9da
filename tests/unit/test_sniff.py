"""Tests for gateway.sniff against hand-built PNG, JPEG and WebP bytes."""

from __future__ import annotations

import random
import struct
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.sniff import SNIFF_LIMIT, ImageError, ImageInfo, sniff

PNG_SIG = b"\x89PNG\r\n\x1a\n"
CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}


def chunk(ctype: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + ctype + data + struct.pack(">I", zlib.crc32(ctype + data))


def ihdr(w: int, h: int, colour: int, depth: int = 8, interlace: int = 0) -> bytes:
    return chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, depth, colour, 0, 0, interlace))


def png(w: int, h: int, colour: int, before_idat: bytes = b"", pixels: bool = True) -> bytes:
    """A complete PNG; returns bytes whose header ends at the first IDAT (or IHDR for alpha)."""
    rows = b"".join(b"\x00" + bytes(w * CHANNELS[colour]) for _ in range(h)) if pixels else b""
    idat = chunk(b"IDAT", zlib.compress(rows))
    return PNG_SIG + ihdr(w, h, colour) + before_idat + idat + chunk(b"IEND", b"")


def jpeg_segment(code: int, payload: bytes) -> bytes:
    return bytes([0xFF, code]) + struct.pack(">H", len(payload) + 2) + payload


def sof0(w: int, h: int, components: int = 3) -> bytes:
    comps = b"".join(bytes([i + 1, 0x11, 0]) for i in range(components))
    return jpeg_segment(0xC0, struct.pack(">BHHB", 8, h, w, components) + comps)


def app_padding(total: int) -> bytes:
    """APP1 segments totalling exactly `total` bytes (markers included)."""
    out = []
    while total:
        size = min(total, 65537)
        if 0 < total - size < 4:
            size -= 4
        out.append(jpeg_segment(0xE1, bytes(size - 4)))
        total -= size
    return b"".join(out)


JFIF = jpeg_segment(0xE0, b"JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00")
DQT = jpeg_segment(0xDB, b"\x00" + bytes(range(1, 65)))
SOS_AND_DATA = jpeg_segment(0xDA, b"\x01\x01\x00\x00\x3f\x00") + b"\x12\x34\xff\x00" + b"\xff\xd9"


def jpeg(w: int, h: int, before_sof: bytes) -> bytes:
    return b"\xff\xd8" + before_sof + sof0(w, h) + SOS_AND_DATA


def riff(first_chunk: bytes, payload: bytes = b"") -> bytes:
    body = b"WEBP" + first_chunk + payload
    return b"RIFF" + struct.pack("<I", len(body)) + body


def vp8(w: int, h: int, start: bytes = b"\x9d\x01\x2a", tag: bytes = b"\x50\x02\x00") -> bytes:
    data = tag + start + struct.pack("<HH", w, h) + bytes(8)
    return riff(b"VP8 " + struct.pack("<I", len(data)) + data)


def vp8l(w: int, h: int, alpha: bool, sig: int = 0x2F, version: int = 0) -> bytes:
    bits = (w - 1) | (h - 1) << 14 | int(alpha) << 28 | version << 29
    data = bytes([sig]) + struct.pack("<I", bits) + bytes(3)
    return riff(b"VP8L" + struct.pack("<I", len(data)) + data)


def vp8x(w: int, h: int, flags: int) -> bytes:
    data = bytes([flags, 0, 0, 0]) + (w - 1).to_bytes(3, "little") + (h - 1).to_bytes(3, "little")
    return riff(b"VP8X" + struct.pack("<I", 10) + data, chunk(b"ALPH", b"\x00"))


PLTE = chunk(b"PLTE", bytes(range(12)))
TRNS = chunk(b"tRNS", b"\x00\xff")
BIG_APP1 = jpeg_segment(0xE1, b"Exif\x00\x00" + bytes(60_000))

# (name, data, header_end, expected info)
SAMPLES = [
    ("png-rgb", png(3, 2, 2), 33 + 8, ImageInfo("png", 3, 2, False)),
    ("png-rgba", png(5, 4, 6), 33, ImageInfo("png", 5, 4, True)),
    ("png-grey-alpha", png(1, 9, 4), 33, ImageInfo("png", 1, 9, True)),
    ("png-palette", png(4, 4, 3, PLTE), 33 + len(PLTE) + 8, ImageInfo("png", 4, 4, False)),
    (
        "png-palette-trns",
        png(4, 4, 3, PLTE + TRNS),
        33 + len(PLTE) + 8,
        ImageInfo("png", 4, 4, True),
    ),
    (
        "jpeg",
        jpeg(640, 480, JFIF + BIG_APP1 + DQT + b"\xff" * 150),  # long run of fill bytes
        2 + len(JFIF + BIG_APP1 + DQT) + 150 + 19,
        ImageInfo("jpeg", 640, 480, False),
    ),
    ("webp-vp8", vp8(300 | 0x4000, 200), 30, ImageInfo("webp", 300, 200, False)),
    ("webp-vp8l", vp8l(16383, 16384, False), 25, ImageInfo("webp", 16383, 16384, False)),
    ("webp-vp8l-alpha", vp8l(9, 7, True), 25, ImageInfo("webp", 9, 7, True)),
    ("webp-vp8x-alpha", vp8x(1 << 24, 2, 0x10), 30, ImageInfo("webp", 1 << 24, 2, True)),
    ("webp-vp8x", vp8x(1, 70_000, 0x00), 30, ImageInfo("webp", 1, 70_000, False)),
]
IDS = [s[0] for s in SAMPLES]


@pytest.mark.parametrize(("name", "data", "end", "info"), SAMPLES, ids=IDS)
def test_complete_files(name: str, data: bytes, end: int, info: ImageInfo) -> None:
    for kind in (bytes, bytearray, memoryview):
        assert sniff(kind(data)) == info
        assert sniff(kind(data), final=True) == info
    assert info.content_type == f"image/{info.format}"


@pytest.mark.parametrize(("name", "data", "end", "info"), SAMPLES, ids=IDS)
def test_every_prefix(name: str, data: bytes, end: int, info: ImageInfo) -> None:
    view = memoryview(data)
    for cut in range(end):
        assert sniff(view[:cut]) is None, cut
        with pytest.raises(ImageError):
            sniff(view[:cut], final=True)
    assert sniff(view[:end]) == info
    assert sniff(view[:end], final=True) == info


Sample = tuple[str, bytes, int, ImageInfo]


@given(sample=st.sampled_from(SAMPLES), data=st.data())
def test_incremental_feeding(sample: Sample, data: st.DataObject) -> None:
    _, blob, end, info = sample
    cuts = sorted(data.draw(st.sets(st.integers(1, len(blob)), max_size=12)) | {len(blob)})
    buf = bytearray()  # the gateway grows one bytearray; sniff must not pin it with an export
    prev = 0
    for cut in cuts:
        buf += blob[prev:cut]
        prev = cut
        result = sniff(buf)
        if len(buf) < end:
            assert result is None
        else:
            assert result == info
            return
    pytest.fail("header never completed")


def test_content_types() -> None:
    assert ImageInfo("png", 1, 1, True).content_type == "image/png"
    assert ImageInfo("jpeg", 1, 1, False).content_type == "image/jpeg"
    assert ImageInfo("webp", 1, 1, False).content_type == "image/webp"


def test_huge_dimensions_are_reported_not_rejected() -> None:
    data = png(100_000, 100_000, 6, pixels=False)
    assert sniff(data) == ImageInfo("png", 100_000, 100_000, True)
    assert sniff(jpeg(65535, 65535, b"")) == ImageInfo("jpeg", 65535, 65535, False)


@pytest.mark.parametrize("head", [b"\x89PN", b"\xff", b"\xff\xd8", b"RIFF\0\0", b"RIFF\0\0\0\0WE"])
def test_signature_prefix_waits(head: bytes) -> None:
    assert sniff(head) is None
    with pytest.raises(ImageError):
        sniff(head, final=True)


def test_empty() -> None:
    assert sniff(b"") is None
    with pytest.raises(ImageError, match="empty"):
        sniff(b"", final=True)


def corrupt_crc(data: bytes) -> bytes:
    return data[:29] + bytes([data[29] ^ 1]) + data[30:]


REJECTS = [
    ("random", b"\x00" + random.Random(7).randbytes(4095), "not a PNG, JPEG or WebP"),
    ("text", b"hello, this is not an image\n" * 4, "not a PNG, JPEG or WebP"),
    ("gif", b"GIF89a\x01\x00\x01\x00\x00\x00\x00;", "not a PNG, JPEG or WebP"),
    ("bmp-8-bytes", b"BM\x00\x00\x00\x00\x00\x00", "not a PNG, JPEG or WebP"),
    ("png-bad-sig", b"\x89PNG\r\n\x1a\x00", "not a PNG, JPEG or WebP"),
    ("riff-wave", b"RIFF\x24\x00\x00\x00WAVEfmt ", "not a PNG, JPEG or WebP"),
    ("png-ihdr-crc", corrupt_crc(png(2, 2, 2)), "bad CRC"),
    ("png-not-ihdr", PNG_SIG + chunk(b"PLTE", bytes(3)), "IHDR"),
    ("png-depth", PNG_SIG + ihdr(2, 2, 2, depth=4), "bit depth"),
    ("png-colour", PNG_SIG + ihdr(2, 2, 5), "colour type"),
    ("png-zero-width", PNG_SIG + ihdr(0, 2, 6), "width or height"),
    ("png-2**31-height", PNG_SIG + ihdr(2, 1 << 31, 6), "width or height"),
    ("png-interlace", PNG_SIG + ihdr(2, 2, 6, interlace=2), "interlace"),
    ("png-chunk-len", PNG_SIG + ihdr(2, 2, 2) + b"\x80\x00\x00\x00IDAT", "chunk length"),
    ("png-chunk-type", PNG_SIG + ihdr(2, 2, 2) + b"\x00\x00\x00\x00ID\x00T", "chunk type"),
    ("jpeg-sos-first", b"\xff\xd8" + JFIF + SOS_AND_DATA + sof0(2, 2), "before the frame"),
    ("jpeg-eoi-first", b"\xff\xd8" + JFIF + b"\xff\xd9", "before the frame"),
    ("jpeg-not-marker", b"\xff\xd8" + JFIF + b"\x00" + sof0(2, 2), "expected a marker"),
    ("jpeg-short-length", b"\xff\xd8\xff\xe0\x00\x01", "segment length"),
    ("jpeg-zero-height", jpeg(8, 0, JFIF), "zero"),
    ("jpeg-sof-length", b"\xff\xd8" + jpeg_segment(0xC0, b"\x08\x00\x02\x00\x02\x03"), "frame"),
    ("webp-unknown-chunk", riff(b"ALPH\x04\x00\x00\x00abcd"), "first chunk"),
    ("vp8-start-code", vp8(4, 4, start=b"\x9d\x01\x2b"), "start code"),
    ("vp8-inter-frame", vp8(4, 4, tag=b"\x51\x02\x00"), "key frame"),
    ("vp8-zero", vp8(0x4000, 4), "zero"),
    ("vp8l-signature", vp8l(4, 4, True, sig=0x2E), "signature"),
    ("vp8l-version", vp8l(4, 4, False, version=1), "version"),
    ("vp8x-size", riff(b"VP8X\x0c\x00\x00\x00" + bytes(12)), "size"),
    ("jpeg-over-limit", b"\xff\xd8" + app_padding(SNIFF_LIMIT) + sof0(2, 2), str(SNIFF_LIMIT)),
    ("jpeg-tiny-segments", b"\xff\xd8" + b"\xff\xd0" * 5000 + sof0(2, 2), "too many"),
    ("png-many-chunks", PNG_SIG + ihdr(2, 2, 2) + chunk(b"teXt", b"") * 5000, "too many"),
]


@pytest.mark.parametrize(("name", "data", "message"), REJECTS, ids=[r[0] for r in REJECTS])
def test_rejections(name: str, data: bytes, message: str) -> None:
    for final in (False, True):
        with pytest.raises(ImageError, match=message):
            sniff(data, final=final)


def test_limit_boundary() -> None:
    """A header ending exactly at SNIFF_LIMIT is accepted; one byte later is not."""
    exact = b"\xff\xd8" + app_padding(SNIFF_LIMIT - 2 - 19) + sof0(7, 9)
    assert sniff(exact[:SNIFF_LIMIT]) == ImageInfo("jpeg", 7, 9, False)
    over = b"\xff\xd8" + app_padding(SNIFF_LIMIT - 2 - 18) + sof0(7, 9)
    with pytest.raises(ImageError, match="first 1048576 bytes"):
        sniff(over)


def test_huge_chunk_rejected_before_buffering() -> None:
    head = PNG_SIG + ihdr(2, 2, 2) + struct.pack(">I", 0x7FFFFFFF) + b"iCCP"
    with pytest.raises(ImageError, match="first 1048576 bytes"):
        sniff(head)


def test_truncated_message_names_format() -> None:
    with pytest.raises(ImageError, match="truncated JPEG header"):
        sniff(jpeg(2, 2, JFIF)[:30], final=True)
    with pytest.raises(ImageError, match="truncated PNG header"):
        sniff(png(2, 2, 2)[:20], final=True)


def mutated_samples() -> st.SearchStrategy[bytes]:
    def mutate(blob: bytes, edits: list[tuple[int, int]], cut: int) -> bytes:
        buf = bytearray(blob[:cut])
        for pos, value in edits:
            if buf:
                buf[pos % len(buf)] = value
        return bytes(buf)

    small = [s[1][:200] for s in SAMPLES] + [jpeg(2, 2, JFIF + DQT)]
    return st.builds(
        mutate,
        st.sampled_from(small),
        st.lists(st.tuples(st.integers(0, 199), st.integers(0, 255)), max_size=3),
        st.integers(0, 200),
    )


@settings(max_examples=500)
@given(head=st.one_of(st.binary(max_size=300), mutated_samples()))
def test_only_image_error_escapes(head: bytes) -> None:
    try:
        partial = sniff(head)
    except ImageError:
        partial = "error"
    try:
        done: ImageInfo | str = sniff(head, final=True)
        assert isinstance(done, ImageInfo)
    except ImageError as exc:
        done = "error"
        assert str(exc) and len(str(exc)) < 80
    if isinstance(partial, ImageInfo):
        assert done == partial
    if partial == "error":
        assert done == "error"
