"""Logging: the gateway's loggers at the configured level and format, and the one structured
line written per API request (never a secret or an image; the prompt only when asked)."""

from __future__ import annotations

import atexit
import json
import logging
import queue
import re
import secrets
import time
from logging.handlers import QueueHandler, QueueListener
from typing import Any

ACCESS = logging.getLogger("gateway.access")
_TRACEPARENT = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")


class Throttled:
    """A warning that may recur once per request, written at most once a `period` with the
    count of those left out: a store outage under thousands of requests in flight is one line a
    second, not thousands (each a cost while the gateway is already in trouble)."""

    def __init__(self, logger: logging.Logger, period: float = 1.0) -> None:
        self.logger = logger
        self.period = period
        self._last = float("-inf")
        self._skipped = 0

    def warning(self, message: str, *args: object) -> None:
        now = time.monotonic()
        if now - self._last < self.period:
            self._skipped += 1
            return
        if self._skipped:
            message += f" (and {self._skipped} more since the last such line)"
        self._last, self._skipped = now, 0
        self.logger.warning(message, *args)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and a record's `fields`."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(), "logger": record.name,
            "message": record.getMessage()}
        out.update(getattr(record, "fields", {}))
        if record.exc_info:
            out["error"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False, default=str)


class TextFormatter(logging.Formatter):
    """`LEVEL:logger: message` and then a record's `fields` as key=value pairs, the same fields
    the JSON line carries (a text log is read by people and grepped, and needs the request id
    and outcome as much as a JSON one).

    A value is written as JSON writes it (numbers, true/false/null), a string bare (`key=` when
    empty) unless it holds a space, quote, backslash, `=` or control character, then as a JSON
    string: a prompt with newlines or a client's `"` can never break the line or forge a field.
    """

    _PLAIN = re.compile(r'[^\s"=\\\x00-\x1f\x7f]*')

    def __init__(self) -> None:
        super().__init__("%(levelname)s:%(name)s: %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:
        line = super().formatMessage(record)
        fields = getattr(record, "fields", None)
        if not fields:
            return line
        return line + " " + " ".join(f"{key}={self._value(value)}" for key, value in fields.items())

    @classmethod
    def _value(cls, value: Any) -> str:
        if isinstance(value, str):
            return value if cls._PLAIN.fullmatch(value) else json.dumps(value, ensure_ascii=False)
        return json.dumps(value, ensure_ascii=False, default=str)


class _DroppingQueueHandler(QueueHandler):
    """Hands records to a writer thread; when the writer cannot keep up (a full pipe, a slow
    disk), lines are dropped rather than stalling requests on the event loop."""

    dropped = 0

    def enqueue(self, record: logging.LogRecord) -> None:
        try:
            self.queue.put_nowait(record)
        except queue.Full:
            _DroppingQueueHandler.dropped += 1


_listener: QueueListener | None = None


def _not_a_deliberate_cut(record: logging.LogRecord) -> bool:
    """uvicorn logs an ERROR when an app ends a response unfinished; the edit route does that
    on purpose when an upstream breaks a JSON answer off (the client must see it broken), and
    logs its own line for it."""
    return record.msg != "ASGI callable returned without completing response."


def configure(level: str, fmt: str) -> None:
    """The gateway's loggers print beside uvicorn's, at `level`, as JSON lines or text, written
    by a thread so that logging never blocks the event loop."""
    global _listener
    logger = logging.getLogger("gateway")
    logger.setLevel(level.upper())
    for old in list(logger.handlers):
        logger.removeHandler(old)
    if _listener is not None:
        _listener.stop()
    stream = logging.StreamHandler()
    stream.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    records: queue.Queue[logging.LogRecord] = queue.Queue(maxsize=10_000)
    _listener = QueueListener(records, stream)
    _listener.start()
    atexit.register(_listener.stop)
    logger.addHandler(_DroppingQueueHandler(records))
    logger.propagate = False
    logging.getLogger("uvicorn.error").addFilter(_not_a_deliberate_cut)


def trace_context(traceparent: str | None) -> tuple[str, str]:
    """(trace id, the traceparent to send upstream): the client's trace continued with a span
    of the gateway's own, or a new trace when the client sent none (W3C Trace Context)."""
    match = _TRACEPARENT.fullmatch((traceparent or "").strip().lower())
    if match and match[1] != "0" * 32 and match[2] != "0" * 16:
        trace_id, flags = match[1], match[3]
    else:
        trace_id, flags = secrets.token_hex(16), "01"
    return trace_id, f"00-{trace_id}-{secrets.token_hex(8)}-{flags}"


def access(fields: dict[str, Any]) -> None:
    """The request's line; `fields` holds only ids, sizes, times and outcomes."""
    if ACCESS.isEnabledFor(logging.INFO):
        ACCESS.info("request", extra={"fields": fields})
