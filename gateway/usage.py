"""What an answer reports, read as it streams past: final images and token usage.

JSON answers carry `usage` at the end, so only a bounded tail is kept; SSE answers carry it in
each `image_edit.completed` event. Partial images are not counted.
"""

from __future__ import annotations

import json

_TAIL = 64 * 1024
_COMPLETED = b"event: image_edit.completed"
_USAGE = b'"usage"'
_IMAGE_KEYS = (b'"b64_json"', b'"url"')
_decoder = json.JSONDecoder()


def _usage_at(text: bytes, start: int, end: int) -> dict[str, int]:
    """The `usage` object after `start` (and before `end`), flattened to token counts."""
    i = text.find(_USAGE, start, end)
    if i < 0:
        return {}
    colon = text.find(b":", i + len(_USAGE), end)
    try:
        value, _ = _decoder.raw_decode(text[colon + 1:end].decode().lstrip())
    except (ValueError, UnicodeDecodeError):
        return {}
    if not isinstance(value, dict):
        return {}
    out = {k: v for k, v in value.items() if isinstance(v, int)}
    details = value.get("input_tokens_details")
    if isinstance(details, dict):
        for k in ("text_tokens", "image_tokens"):
            if isinstance(details.get(k), int):
                out[f"input_{k}"] = details[k]
    return out


class UsageMeter:
    def __init__(self, *, sse: bool) -> None:
        self.sse = sse
        self.images = 0
        self.usage: dict[str, int] = {}
        self._tail = b""
        self._carry = b""

    def feed(self, chunk: bytes) -> None:
        if self.sse:
            self._feed_events(chunk)
            return
        joined = self._carry + chunk  # a key split across chunks is counted once, whole
        self.images += sum(joined.count(k) - self._carry.count(k) for k in _IMAGE_KEYS)
        # Shorter than the longest key, so no whole key is in it and counted twice.
        self._carry = joined[-(len(_IMAGE_KEYS[0]) - 1):]
        if len(chunk) >= _TAIL:
            self._tail = chunk[-_TAIL:]
        else:
            self._tail = self._tail[len(self._tail) + len(chunk) - _TAIL:] + chunk

    def _feed_events(self, chunk: bytes) -> None:
        """`chunk` holds whole events (see edits.EventFramer)."""
        at = chunk.find(_COMPLETED)
        while at >= 0:
            end = chunk.find(b"\n\n", at)
            end = len(chunk) if end < 0 else end
            self.images += 1
            for key, value in _usage_at(chunk, at, end).items():
                self.usage[key] = self.usage.get(key, 0) + value
            at = chunk.find(_COMPLETED, end)

    def close(self) -> None:
        """Call at the end of the answer: a JSON answer's usage is read from its tail."""
        if not self.sse:
            self.usage = _usage_at(self._tail, self._tail.rfind(_USAGE), len(self._tail))
