"""A finished request's record -> its metrics and its one access log line, for every route.

The line holds ids, sizes, times and outcomes only (a prompt only when `log_prompts` is set),
never a key's secret or hash.
"""

from __future__ import annotations

import time
from typing import Any

from gateway import logs, metrics
from gateway.metrics import RequestRecord


def api_request(rec: RequestRecord, method: str) -> None:
    """A request to the API's other routes (models, usage)."""
    total = _total(rec)
    metrics.record(rec, total, key_labels=False)
    logs.access({"request_id": rec.request_id, "endpoint": rec.endpoint, "method": method,
                 "status": rec.status, "total_ms": round(total * 1000, 3),
                 "rejection": rec.rejection})


def image_request(rec: RequestRecord, *, model: str, prompt: str | None, key_labels: bool
                  ) -> None:
    """An image request; `model` as the client named it (`rec.model` is the metrics label)."""
    total = _total(rec)
    metrics.record(rec, total, key_labels=key_labels)
    fields: dict[str, Any] = {
        "request_id": rec.request_id, "upstream_request_id": rec.upstream_request_id,
        "trace_id": rec.trace_id, "client": rec.client, "key_id": rec.key_id,
        "model": model, "requested_model": rec.requested_model, "n": rec.n,
        "status": rec.status or 499, "bytes_in": rec.bytes_in, "bytes_out": rec.bytes_out,
        "upstream_ms": round(rec.upstream_seconds * 1000, 3),
        "total_ms": round(total * 1000, 3), "rejection": rec.rejection,
        "upstream_error": rec.upstream_error, "images": rec.images,
        "input_tokens": rec.usage.get("input_tokens", 0),
        "output_tokens": rec.usage.get("output_tokens", 0),
        "svg_tokens": rec.usage.get("svg_total_tokens", 0)}
    if prompt is not None:
        fields["prompt"] = prompt
    logs.access(fields)


def _total(rec: RequestRecord) -> float:
    """As the client sees it: up to the last byte sent (settling the quota comes after)."""
    return (rec.end or time.perf_counter()) - rec.start
