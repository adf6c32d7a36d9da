"""What an answer reports, read as it streams past: final images and token usage, for quotas.

Answers are parsed, not searched for key names, so valid answers that differ from OpenAI's bytes
(CRLF or CR event streams, `"url": null` beside `b64_json`, usage before data, pretty printing,
escapes) count the same. Memory stays bounded however large the answer: string contents (the
base64 images) are jumped over with bytes.find (memchr), never kept; only small values (keys, a
`usage` object, an event's type) are held, each with a size cap.
Speed, GB/s (64 KiB chunks): 25 MB b64 JSON ~25 (old 1.3), 100-event SSE ~7 (old 2.6), 300k-item data 0.06.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re

log = logging.getLogger(__name__)

COMPLETED = frozenset({"image_edit.completed", "image_generation.completed"})
_SMALL = 256  # a key, type or event name longer than this is none the meter looks for
_USAGE_LIMIT = 64 * 1024  # a `usage` object larger than this is not read
_MAX_COUNT = 2**53  # exact as a double, as quota.lua counts
# A JSON answer no longer than this (the usual one: images as URLs, or small ones) is kept and
# read whole by json.loads at its end, in C; a longer one is scanned as it streams.
_WHOLE = 64 * 1024

# Outside strings: one structural byte, or a run of scalar bytes (a number, true, false, null).
# Whitespace between them is skipped inside the regex engine.
_TOKEN = re.compile(rb'[{}\[\],:"]|[^\s{}\[\],:"]+')
# Up to the next bracket, or a string with an escape (or not ending in this piece).
_DEEP = re.compile(rb'(?:[^"{}\[\]]++|"[^"\\]*+")*+')
_QUOTE, _BACKSLASH, _LBRACE, _LBRACKET, _RBRACE, _RBRACKET, _COMMA, _COLON, _CR, _LF = b'"\\{[}],:\r\n'
_OPEN, _CLOSE = (_LBRACE, _LBRACKET), (_RBRACE, _RBRACKET)
_BOM = b"\xef\xbb\xbf"
_KEY, _TYPE = 1, 2  # what a kept string is
_FIELD, _DATA, _EVENT, _IGNORE = range(4)  # where an SSE line is: its name, or a field's value


def _flatten(usage: object, prefix: str = "") -> dict[str, int]:
    """A `usage` object as flat token counts (bools are no counts): its own counts, and the
    input and output details' text and image tokens (`input_text_tokens`, ...). An SVG's usage
    (`svg_usage`, the tokens of the model that wrote the SVG) comes prefixed `svg_`."""
    if not isinstance(usage, dict):
        return {}
    out = {prefix + k: n for k, v in usage.items() if (n := _count(v)) is not None}
    for side in ("input", "output"):
        details = usage.get(f"{side}_tokens_details")
        if isinstance(details, dict):
            for k in ("text_tokens", "image_tokens"):
                if (n := _count(details.get(k))) is not None:
                    out[f"{prefix}{side}_{k}"] = n
    return out


def _count(value: object) -> int | None:
    """A token count as the quotas take it: a whole number (1500.0 too), never negative (no
    answer refunds a budget) and within what the store keeps exactly (2**53)."""
    if type(value) is float and value.is_integer():
        value = int(value)
    if type(value) is not int:
        return None
    return min(max(value, 0), _MAX_COUNT)


def charged_tokens(usage: dict[str, int]) -> int:
    """The tokens a key's tokens_per_month counts: what the operator pays for, the image model's
    tokens and the SVG author's."""
    return usage.get("total_tokens", 0) + usage.get("svg_total_tokens", 0)


def _add(into: dict[str, int], counts: dict[str, int]) -> None:
    for key, value in counts.items():
        into[key] = into.get(key, 0) + value


def _decode(raw: bytearray | None) -> str | None:
    """A kept string's value (None if it was too long or is not valid JSON text)."""
    if raw is None:
        return None
    try:
        return json.loads(b'"' + raw + b'"') if b"\\" in raw else raw.decode()
    except ValueError:
        return None


class _JsonScan:
    """An incremental scan of one JSON value, fed in pieces cut anywhere.

    Counts the elements of the top-level object's "data" array and keeps its "usage" and
    "svg_usage" objects and "type" string; nothing nested deeper is looked at, only stepped
    over. A repeated key counts once, its last value, as json.loads would. Malformed input never
    raises: what was found counts.
    """

    __slots__ = ("_capture", "_capturing", "_done", "_escape", "_purpose", "_string", "_text",
                 "depth", "in_data", "items", "key", "svg", "top_object", "type", "usage",
                 "value_of", "want_item", "want_key")

    def __init__(self) -> None:
        self.depth = 0
        self.top_object = False
        self.want_key = False  # the next string in the top-level object is a key
        self.key: str | None = None  # the top-level key just read
        self.value_of: str | None = None  # the top-level key whose value comes next
        self.in_data = False  # inside the top-level "data" array
        self.want_item = False  # the next value in it is a new element
        self.items = 0
        self.usage: dict[str, int] | None = None
        self.svg: dict[str, int] | None = None  # svg_usage, its counts prefixed svg_
        self.type: str | None = None
        self._string = False
        self._escape = False  # a piece ended in a backslash: the next byte is escaped
        self._purpose = 0  # what the current string is kept for: _KEY, _TYPE, or nothing
        self._text: bytearray | None = None
        self._capture: bytearray | None = None  # the "usage" object's bytes so far
        self._capturing = ""  # ... or the "svg_usage" object's
        self._done = False  # the top-level value has ended

    def feed(self, buf: bytes, i: int, n: int) -> None:
        """Scan buf[i:n] (indices, not a slice: no copy of a large chunk)."""
        cap = i  # where the bytes of a "usage" object not yet kept start
        while i < n and not self._done:
            if self._string:
                i = self._skip_string(buf, i, n)
                continue
            if self.depth > 2 or (self.depth == 2 and not self.in_data):
                # Inside a value nothing is read from: only its brackets count, so everything
                # else (plain strings, scalars, commas) is skipped in one regex step.
                i = _DEEP.match(buf, i, n).end()  # type: ignore[union-attr]  # always matches
            m = _TOKEN.search(buf, i, n)
            if m is None:
                break
            at, i = m.span()
            t, depth = buf[at], self.depth
            if t == _QUOTE:
                self._string = True
                if depth == 1:
                    if self.want_key:
                        self.want_key = False
                        self._purpose, self._text = _KEY, bytearray()
                    elif self.value_of == "type":
                        self._purpose, self._text = _TYPE, bytearray()
                    self.value_of = None
                elif depth == 2 and self.want_item:
                    self.items += 1
                    self.want_item = False
            elif t in _OPEN:
                if depth == 0:
                    self.top_object = self.want_key = t == _LBRACE
                elif depth == 1:
                    if self.value_of == "data" and t == _LBRACKET:
                        self.in_data = self.want_item = True
                        self.items = 0
                    elif self.value_of in ("usage", "svg_usage") and t == _LBRACE:
                        self._capture, cap = bytearray(), at
                        self._capturing = self.value_of
                    self.value_of = None
                elif depth == 2 and self.want_item:
                    self.items += 1
                    self.want_item = False
                self.depth = depth + 1
            elif t in _CLOSE:
                if depth == 0:
                    continue
                self.depth = depth = depth - 1
                if depth == 1:  # a top-level value ended
                    self.in_data = self.want_item = False
                    if self._keep(buf, cap, i) and self._capture is not None:
                        value, self._capture = self._capture, None
                        with contextlib.suppress(ValueError, RecursionError):  # malformed: unread
                            if self._capturing == "usage":
                                self.usage = _flatten(json.loads(value))
                            else:
                                self.svg = _flatten(json.loads(value), "svg_")
                elif depth == 0:
                    self._done = True
            elif t == _COMMA:
                if depth == 1:
                    self.want_key = self.top_object
                elif depth == 2:
                    self.want_item = self.in_data
            elif t == _COLON:
                if depth == 1:
                    self.value_of, self.key = self.key, None
            elif depth == 1:  # a scalar value
                self.value_of = None
            elif depth == 2 and self.want_item:
                self.items += 1
                self.want_item = False
        self._keep(buf, cap, n)

    def _keep(self, buf: bytes, start: int, end: int) -> bool:
        """Add buf[start:end] to the "usage" object being read; past the cap it is given up."""
        if self._capture is None:
            return False
        if len(self._capture) + end - start > _USAGE_LIMIT:
            self._capture = None
            return False
        self._capture += buf[start:end]
        return True

    def _skip_string(self, buf: bytes, i: int, n: int) -> int:
        """Step over string contents from i: where the string ends (after its quote), or n."""
        start = i
        if self._escape:
            self._escape = False
            i += 1
        while True:  # a quote or a piece's end after an odd run of backslashes is escaped
            q = buf.find(b'"', i, n)
            end = j = n if q < 0 else q
            while j > i and buf[j - 1] == _BACKSLASH:
                j -= 1
            if (end - j) % 2 == 0:
                break
            if q < 0:
                self._escape = True
                break
            i = q + 1
        if self._text is not None:
            if len(self._text) + end - start > _SMALL:
                self._text = None
            else:
                self._text += buf[start:end]
        if q < 0:
            return n
        self._string = False
        if self._purpose == _KEY:
            self.key = _decode(self._text)
        elif self._purpose == _TYPE:
            self.type = _decode(self._text)
        self._purpose, self._text = 0, None
        return q + 1


class UsageMeter:
    """Counts an answer's final images and adds up its token usage as it streams past.

    JSON (`sse=False`): the elements of the top-level "data" array, and the top-level "usage".
    SSE: completed events (`image_edit.completed`, `image_generation.completed`; partial images
    are not final), each event's type being its `event:` field, else its data's "type", and the
    sum of their "usage". Chunks may be cut anywhere, in either mode.
    """

    def __init__(self, *, sse: bool) -> None:
        self.sse = sse
        self.images = 0
        self.usage: dict[str, int] = {}
        self._json = None if sse else _JsonScan()
        self._whole: bytearray | None = None if sse else bytearray()  # a small answer so far
        self._failed = False
        # SSE parsing state, carried across chunks (all of it bounded).
        self._mode = _FIELD
        self._field: bytearray | None = bytearray()  # the line's field name (None: not ours)
        self._cr = False  # the last chunk ended in CR: an LF first in this one ends no line
        self._bom = 0  # bytes of a leading byte order mark seen (3: past it)
        self._name: bytearray | None = None  # the event's `event:` field
        self._data: _JsonScan | None = None  # the event's data, as scanned so far

    def feed(self, chunk: bytes) -> None:
        """The answer's next bytes, cut anywhere (SSE chunks need not hold whole events)."""
        if self._failed:
            return
        try:
            if self._json is None:
                self._feed_events(chunk)
            elif self._whole is not None and len(self._whole) + len(chunk) <= _WHOLE:
                self._whole += chunk
            else:
                if self._whole:
                    self._scan(bytes(self._whole))
                self._whole = None
                self._scan(chunk)
        except Exception:  # a bug here must not break the answer being relayed
            self._failed = True
            log.exception("The usage meter gave up on an answer; what it counted so far stands.")

    def _scan(self, chunk: bytes) -> None:
        assert self._json is not None
        self._json.feed(chunk, 0, len(chunk))
        self.images, self.usage = self._json.items, {**(self._json.usage or {}),
                                                     **(self._json.svg or {})}

    def close(self) -> None:
        """Call at the end of the answer. An event the stream did not end with a blank line is
        not counted: the SSE spec (and the OpenAI SDKs) never dispatch it."""
        if self._whole is None or self._failed:
            return
        whole, self._whole = bytes(self._whole), None
        try:
            doc = json.loads(whole)
        except (ValueError, RecursionError):
            doc = None
        if not isinstance(doc, dict):  # cut, malformed or odd: count what the scanner finds
            self.feed(whole)
            return
        data = doc.get("data")
        self.images = len(data) if isinstance(data, list) else 0
        self.usage = _flatten(doc.get("usage")) | _flatten(doc.get("svg_usage"), "svg_")

    # ------------------------------------------------------------------------- SSE
    def _feed_events(self, chunk: bytes) -> None:
        i, n = 0, len(chunk)
        while self._bom < 3 and i < n:  # the spec drops a byte order mark
            if chunk[i] != _BOM[self._bom]:
                if self._bom:
                    self._field = None  # half a mark: the first line names no field
                self._bom = 3
                break
            self._bom += 1
            i += 1
        if self._cr and i < n:
            self._cr = False
            i += chunk[i] == _LF  # CRLF split across chunks: one line end
        lf = cr = -2  # the next LF and CR at or after i (-1: none left)
        while i < n:
            if -1 != lf < i:
                lf = chunk.find(b"\n", i)
            if -1 != cr < i:
                cr = chunk.find(b"\r", i)
            end = n if lf < 0 and cr < 0 else lf if cr < 0 else cr if lf < 0 else min(lf, cr)
            if end > i:
                self._line_part(chunk, i, end)
            if end == n:
                break
            self._end_line()
            i = end + 1
            if cr == end:
                if i == n:
                    self._cr = True
                elif chunk[i] == _LF:
                    i += 1

    def _line_part(self, chunk: bytes, s: int, e: int) -> None:
        """chunk[s:e], part of one line."""
        if self._mode == _FIELD:
            colon = chunk.find(b":", s, e)
            self._add_to_field(chunk, s, e if colon < 0 else colon)
            if colon < 0:
                return
            self._start_value()
            s = colon + 1
        if self._mode == _DATA:
            assert self._data is not None
            self._data.feed(chunk, s, e)
        elif self._mode == _EVENT and self._name is not None:
            self._name += chunk[s:min(e, s + _SMALL + 1 - len(self._name))]

    def _add_to_field(self, chunk: bytes, s: int, e: int) -> None:
        if self._field is not None:
            if len(self._field) + e - s > 5:  # longer than "event": no field the meter reads
                self._field = None
            else:
                self._field += chunk[s:e]

    def _start_value(self) -> None:
        if self._field == b"data":
            if self._data is None:
                self._data = _JsonScan()
            else:
                self._data.feed(b"\n", 0, 1)  # data lines are joined with LF
            self._mode = _DATA
        elif self._field == b"event":
            self._name = bytearray()  # a second `event:` line replaces the first
            self._mode = _EVENT
        else:
            self._mode = _IGNORE  # a comment (no name), id, retry, or a field unknown to the spec

    def _end_line(self) -> None:
        if self._mode == _FIELD:
            if self._field == b"":
                self._dispatch()  # a blank line ends the event
                return
            self._start_value()  # a line without a colon: a field with an empty value
        self._mode = _FIELD
        self._field = bytearray()

    def _dispatch(self) -> None:
        data, name = self._data, self._name
        self._data = self._name = None
        if data is None:  # an event with no data is never dispatched
            return
        if name and name[0] == 0x20:
            del name[0]  # one space after the colon is not part of the value
        kind = name.decode(errors="replace") if name else data.type
        if kind in COMPLETED:
            self.images += 1
            _add(self.usage, data.usage or {})
            _add(self.usage, data.svg or {})
