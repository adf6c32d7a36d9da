"""Streaming multipart/form-data: read a client's body part by part, write the upstream's.

Reading wraps python-multipart's push parser (no `request.form()`: that would spool the whole
upload before we see a byte). `feed()` turns each received chunk into a short list of events
so the route can act on part boundaries without callbacks of its own.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

from python_multipart.multipart import MultipartParseError, MultipartParser, parse_options_header

from gateway.errors import InvalidRequest

# Event kinds returned by MultipartReader.feed: (PART_START, Part), (PART_DATA, bytes), (PART_END, None)
PART_START, PART_DATA, PART_END = 0, 1, 2


@dataclass(slots=True)
class Part:
    name: str
    filename: str | None
    content_type: str | None

    @property
    def is_file(self) -> bool:
        return self.filename is not None


def boundary_of(content_type: str | None) -> bytes:
    """The boundary of a multipart/form-data Content-Type, or InvalidRequest."""
    kind, params = parse_options_header(content_type or "")
    boundary = params.get(b"boundary")
    if kind != b"multipart/form-data" or not boundary or len(boundary) > 200:
        raise InvalidRequest(
            "Content-Type must be multipart/form-data with a boundary.", code="invalid_content_type")
    return boundary


def _text(raw: bytes) -> str:
    try:
        return raw.decode()
    except UnicodeDecodeError:
        return raw.decode("latin-1")


class MultipartReader:
    """Push-style multipart reader with bounds on parts and header sizes."""

    def __init__(self, boundary: bytes, *, max_parts: int, max_header_bytes: int) -> None:
        self._events: list[tuple[int, object]] = []
        self._max_parts = max_parts
        self._parts = 0
        self._header_name = bytearray()
        self._header_value = bytearray()
        self._headers: dict[bytes, bytes] = {}
        self.finished = False
        self._parser = MultipartParser(
            boundary,
            {
                "on_part_begin": self._on_part_begin,
                "on_header_field": self._on_header_field,
                "on_header_value": self._on_header_value,
                "on_header_end": self._on_header_end,
                "on_headers_finished": self._on_headers_finished,
                "on_part_data": self._on_part_data,
                "on_part_end": self._on_part_end,
                "on_end": self._on_end,
            },
            max_header_size=max_header_bytes,
        )

    def feed(self, chunk: bytes) -> list[tuple[int, object]]:
        try:
            self._parser.write(chunk)
        except MultipartParseError as exc:
            raise InvalidRequest(f"Malformed multipart body: {exc}.", code="invalid_multipart") from None
        events, self._events = self._events, []
        return events

    def close(self) -> None:
        """Call at the end of the body: a body without its closing boundary is malformed."""
        if not self.finished:
            raise InvalidRequest(
                "Malformed multipart body: it ended before the closing boundary.",
                code="invalid_multipart")

    # python-multipart callbacks
    def _on_part_begin(self) -> None:
        self._parts += 1
        if self._parts > self._max_parts:
            raise InvalidRequest(f"Too many parts: at most {self._max_parts} are accepted.",
                                 code="too_many_parts")
        self._headers = {}

    def _on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def _on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def _on_header_end(self) -> None:
        self._headers[bytes(self._header_name).strip().lower()] = bytes(self._header_value).strip()
        self._header_name.clear()
        self._header_value.clear()

    def _on_headers_finished(self) -> None:
        disposition, params = parse_options_header(self._headers.get(b"content-disposition"))
        name = params.get(b"name")
        if disposition != b"form-data" or name is None:
            raise InvalidRequest("Malformed multipart body: a part has no form-data name.",
                                 code="invalid_multipart")
        filename = params.get(b"filename")
        content_type = self._headers.get(b"content-type")
        self._events.append((PART_START, Part(
            _text(name),
            None if filename is None else _text(filename),
            None if content_type is None else _text(content_type),
        )))

    def _on_part_data(self, data: bytes, start: int, end: int) -> None:
        # The parser hands us the caller's chunk: pass it on uncopied when it is all data.
        self._events.append((PART_DATA, data if start == 0 and end == len(data) else data[start:end]))

    def _on_part_end(self) -> None:
        self._events.append((PART_END, None))

    def _on_end(self) -> None:
        self.finished = True


class MultipartWriter:
    """Encodes the upstream body piece by piece, so file bytes can be yielded as they arrive."""

    def __init__(self) -> None:
        self.boundary = f"gateway-{secrets.token_hex(16)}".encode()
        self.content_type = f"multipart/form-data; boundary={self.boundary.decode()}"

    def field(self, name: str, value: str) -> bytes:
        return self._head(name) + b"\r\n\r\n" + value.encode() + b"\r\n"

    def file_head(self, name: str, filename: str, content_type: str) -> bytes:
        return (self._head(name) + b'; filename="' + _quote(filename) + b'"\r\nContent-Type: '
                + content_type.encode() + b"\r\n\r\n")

    file_tail = b"\r\n"

    def close(self) -> bytes:
        return b"--" + self.boundary + b"--\r\n"

    def _head(self, name: str) -> bytes:
        return b"--" + self.boundary + b'\r\nContent-Disposition: form-data; name="' + _quote(name) + b'"'


def _quote(value: str) -> bytes:
    # The WHATWG form encoding: names pass through except ", CR and LF, which are %-escaped.
    return value.replace('"', "%22").replace("\r", "%0D").replace("\n", "%0A").encode()
