"""Real image files built by hand (no Pillow): valid headers, then as many bytes as a test wants.

The gateway reads only headers, so a "25 MB PNG" is a real PNG header followed by a large IDAT
chunk of random bytes; the upstream's record proves the bytes arrived intact by hash.
"""

from __future__ import annotations

import hashlib
import os
import struct
import zlib


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png(width: int = 64, height: int = 64, *, alpha: bool = False, size: int = 0) -> bytes:
    """A PNG (RGB or RGBA) of about `size` bytes (at least its minimal encoding)."""
    color_type, channels = (6, 4) if alpha else (2, 3)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0)
    raw = zlib.compress(b"".join(b"\0" + b"\x80" * (width * channels) for _ in range(min(height, 4))))
    body = b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", raw)
    pad = max(0, size - len(body) - 12 - 12)
    if pad:
        body += _chunk(b"IDAT", os.urandom(pad))
    return body + _chunk(b"IEND", b"")


def jpeg(width: int = 64, height: int = 48, *, size: int = 0) -> bytes:
    app0 = b"\xff\xe0" + struct.pack(">H", 16) + b"JFIF\0\x01\x01\0\0\x01\0\x01\0\0"
    sof = b"\xff\xc0" + struct.pack(">HBHHB", 17, 8, height, width, 3) + b"\x01\x22\0\x02\x11\x01\x03\x11\x01"
    body = b"\xff\xd8" + app0 + sof
    body += os.urandom(max(0, size - len(body) - 2))
    return body + b"\xff\xd9"


def webp(width: int = 64, height: int = 64, *, size: int = 0) -> bytes:
    vp8 = b"\x10\x02\x00" + b"\x9d\x01\x2a" + struct.pack("<HH", width, height)
    vp8 += os.urandom(max(0, size - 20 - len(vp8)))
    payload = b"WEBP" + b"VP8 " + struct.pack("<I", len(vp8)) + vp8
    return b"RIFF" + struct.pack("<I", len(payload)) + payload


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
