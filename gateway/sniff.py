"""Identify an uploaded image from its first bytes so the gateway can stream it.

The gateway forwards file parts upstream without holding them in memory, so it
must learn the real format, size and alpha of an image from the head of the
stream alone: filenames and declared content types are client-controlled and
cannot be trusted. ``sniff`` is called on a growing buffer and is therefore
stateless and cheap: it re-walks only chunk/segment headers, never copies the
buffer, and rejects as early as the bytes allow.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

SNIFF_LIMIT: int = 1 << 20  # most bytes buffered to find a header; past this the file is rejected

_CONTENT_TYPES: dict[str, str] = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}

_NOT_IMAGE = "image is not a PNG, JPEG or WebP file"
_LIMIT_MSG = f"image header not found in the first {SNIFF_LIMIT} bytes"

_PNG_SIG = b"\x89PNG\r\n\x1a\n"
_PNG_DEPTHS: dict[int, frozenset[int]] = {
    0: frozenset({1, 2, 4, 8, 16}),
    2: frozenset({8, 16}),
    3: frozenset({1, 2, 4, 8}),
    4: frozenset({8, 16}),
    6: frozenset({8, 16}),
}
_PNG_MAX_DIM = 0x7FFFFFFF

# Real files carry a few dozen chunks/segments before the header we need; capping the walk bounds
# the work an adversarial stream of tiny segments can cost on every re-sniff of the growing buffer.
_MAX_SEGMENTS = 1024

# SOFn frame headers; C4 (DHT), C8 (JPG) and CC (DAC) share the range but are not frames.
_JPEG_SOF = frozenset({*range(0xC0, 0xD0)} - {0xC4, 0xC8, 0xCC})
_JPEG_STANDALONE = frozenset({0x01, *range(0xD0, 0xD8)})
_JPEG_FILL_BLOCK = b"\xff" * 64

_Buffer = bytes | bytearray | memoryview


@dataclass(frozen=True, slots=True)
class ImageInfo:
    """What the gateway needs to validate and label an upload before streaming it."""

    format: str
    width: int
    height: int
    has_alpha: bool

    @property
    def content_type(self) -> str:
        """Derived from the sniffed format so the upstream never sees the client's claim."""
        return _CONTENT_TYPES[self.format]


class ImageError(ValueError):
    """Bytes that are not a well-formed PNG, JPEG or WebP header.

    str(exc) is a short client-facing sentence.
    """


class _Short(Exception):
    """Internal signal that the header continues past the bytes buffered so far."""


def _need(buf: _Buffer, end: int) -> None:
    """Reject a header that cannot end within SNIFF_LIMIT now, rather than buffering up to it."""
    if end > SNIFF_LIMIT:
        raise ImageError(_LIMIT_MSG)
    if len(buf) < end:
        raise _Short


def _match(buf: _Buffer, off: int, magic: bytes) -> None:
    """Compare whatever part of a magic is present, so a mismatch fails before it is complete."""
    n = len(buf)
    if n <= off:
        raise _Short
    avail = min(n, off + len(magic))
    if buf[off:avail] != magic[: avail - off]:
        raise ImageError(_NOT_IMAGE)
    if avail < off + len(magic):
        raise _Short


def _png(buf: _Buffer) -> ImageInfo:
    """Validate IHDR fully; without an alpha channel, alpha hinges on a later tRNS chunk."""
    _need(buf, 16)
    length, ctype = struct.unpack_from(">I4s", buf, 8)
    if ctype != b"IHDR" or length != 13:
        raise ImageError("PNG does not start with an IHDR chunk")
    _need(buf, 33)
    (crc,) = struct.unpack_from(">I", buf, 29)
    if zlib.crc32(buf[12:29]) != crc:
        raise ImageError("PNG IHDR chunk has a bad CRC")
    width, height, depth, colour, compression, filtering, interlace = struct.unpack_from(
        ">IIBBBBB", buf, 16
    )
    if not (1 <= width <= _PNG_MAX_DIM and 1 <= height <= _PNG_MAX_DIM):
        raise ImageError("PNG width or height is out of range")
    if depth not in _PNG_DEPTHS.get(colour, ()):
        raise ImageError("PNG has an invalid bit depth or colour type")
    if compression != 0 or filtering != 0 or interlace not in (0, 1):
        raise ImageError("PNG has an invalid compression, filter or interlace method")
    if colour in (4, 6):
        return ImageInfo("png", width, height, True)
    pos = 33
    for _ in range(_MAX_SEGMENTS):
        _need(buf, pos + 8)
        length, ctype = struct.unpack_from(">I4s", buf, pos)
        if length > 0x7FFFFFFF:
            raise ImageError("PNG chunk length is out of range")
        if not ctype.isalpha():
            raise ImageError("PNG chunk type is invalid")
        if ctype == b"tRNS":
            return ImageInfo("png", width, height, True)
        if ctype in (b"IDAT", b"IEND"):
            return ImageInfo("png", width, height, False)
        pos += 12 + length
    raise ImageError("PNG has too many chunks before the image data")


def _jpeg(buf: _Buffer) -> ImageInfo:
    """Skip segments by their lengths up to the first frame header, which alone carries the size."""
    n = len(buf)
    pos = 2
    for _ in range(_MAX_SEGMENTS):
        _need(buf, pos + 1)
        if buf[pos] != 0xFF:
            raise ImageError("malformed JPEG header: expected a marker")
        pos += 1
        # Fill bytes may legally run on; step over long runs a block at a time.
        while pos + 64 <= n and buf[pos : pos + 64] == _JPEG_FILL_BLOCK:
            pos += 64
        while True:
            _need(buf, pos + 1)
            code = buf[pos]
            pos += 1
            if code != 0xFF:
                break
        if code in _JPEG_STANDALONE:
            continue
        if code in (0xD9, 0xDA):
            raise ImageError("JPEG image data starts before the frame header")
        if code in (0x00, 0xD8):
            raise ImageError("malformed JPEG header: unexpected marker")
        _need(buf, pos + 2)
        (length,) = struct.unpack_from(">H", buf, pos)
        if length < 2:
            raise ImageError("malformed JPEG header: bad segment length")
        if code in _JPEG_SOF:
            _need(buf, pos + 8)
            height, width, components = struct.unpack_from(">xxxHHB", buf, pos)
            if components == 0 or length != 8 + 3 * components:
                raise ImageError("JPEG frame header is malformed")
            if width == 0 or height == 0:
                raise ImageError("JPEG width or height is zero")
            _need(buf, pos + length)
            return ImageInfo("jpeg", width, height, False)
        pos += length
    raise ImageError("JPEG has too many segments before the frame header")


def _webp(buf: _Buffer) -> ImageInfo:
    """Only the first chunk matters: it is where every WebP flavour declares its dimensions."""
    _need(buf, 16)
    fourcc = bytes(buf[12:16])
    if fourcc not in (b"VP8 ", b"VP8L", b"VP8X"):
        raise ImageError("WebP file has an unsupported first chunk")
    _need(buf, 20)
    (size,) = struct.unpack_from("<I", buf, 16)
    if fourcc == b"VP8 ":
        if size < 10:
            raise ImageError("WebP VP8 chunk is too small")
        _need(buf, 30)
        if buf[20] & 1:
            raise ImageError("WebP VP8 frame is not a key frame")
        if buf[23:26] != b"\x9d\x01\x2a":
            raise ImageError("WebP VP8 header has a bad start code")
        width, height = struct.unpack_from("<HH", buf, 26)
        width &= 0x3FFF
        height &= 0x3FFF
        if width == 0 or height == 0:
            raise ImageError("WebP width or height is zero")
        return ImageInfo("webp", width, height, False)
    if fourcc == b"VP8L":
        if size < 5:
            raise ImageError("WebP VP8L chunk is too small")
        _need(buf, 25)
        if buf[20] != 0x2F:
            raise ImageError("WebP VP8L header has a bad signature")
        (bits,) = struct.unpack_from("<I", buf, 21)
        if bits >> 29:
            raise ImageError("WebP VP8L version is not supported")
        width = (bits & 0x3FFF) + 1
        height = ((bits >> 14) & 0x3FFF) + 1
        return ImageInfo("webp", width, height, bool(bits >> 28 & 1))
    if size != 10:
        raise ImageError("WebP VP8X chunk has a bad size")
    _need(buf, 30)
    flags, w0, w1, h0, h1 = struct.unpack_from("<B3xHBHB", buf, 20)
    return ImageInfo("webp", (w0 | w1 << 16) + 1, (h0 | h1 << 16) + 1, bool(flags & 0x10))


def sniff(head: bytes | bytearray | memoryview, *, final: bool = False) -> ImageInfo | None:
    """ImageInfo once head holds a complete header; None when more bytes are needed.

    Never returns None when final=True. Raises ImageError for bytes that are not a well-formed
    PNG/JPEG/WebP header, for a header incomplete at final=True, and when len(head) >= SNIFF_LIMIT
    without a complete header.

    A header must end within the first SNIFF_LIMIT bytes, so the verdict does not depend on how the
    stream was chunked. No memoryview is taken of bytes/bytearray input, so a caller may keep
    growing its bytearray between calls without hitting BufferError.
    """
    buf: _Buffer = head
    if isinstance(head, memoryview) and (head.format != "B" or head.ndim != 1):
        buf = head.cast("B")
    n = len(buf)
    label = ""
    try:
        if n == 0:
            raise _Short
        first = buf[0]
        if first == 0x89:
            _match(buf, 0, _PNG_SIG)
            label = "PNG"
            return _png(buf)
        if first == 0xFF:
            _match(buf, 0, b"\xff\xd8")
            label = "JPEG"
            return _jpeg(buf)
        if first == 0x52:
            _match(buf, 0, b"RIFF")
            _match(buf, 8, b"WEBP")
            label = "WebP"
            return _webp(buf)
        raise ImageError(_NOT_IMAGE)
    except _Short:
        if not final:
            return None
        if label:
            raise ImageError(f"truncated {label} header") from None
        raise ImageError(_NOT_IMAGE if n else "image file is empty") from None
