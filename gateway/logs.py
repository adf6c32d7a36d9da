"""Logging: the gateway's loggers at the configured level and format, and the one structured
line written per API request (never a secret or an image; the prompt only when asked)."""

from __future__ import annotations

import json
import logging
import re
import secrets
import time
from typing import Any

ACCESS = logging.getLogger("gateway.access")
_TRACEPARENT = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")


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


def configure(level: str, fmt: str) -> None:
    """The gateway's loggers print beside uvicorn's, at `level`, as JSON lines or text."""
    logger = logging.getLogger("gateway")
    logger.setLevel(level.upper())
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else
                         logging.Formatter("%(levelname)s:%(name)s: %(message)s"))
    logger.addHandler(handler)
    logger.propagate = False


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
