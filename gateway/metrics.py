"""Prometheus metrics (prometheus-client): the families operators scrape, and one call that
records a finished request.

With several workers the numbers are summed across them through prometheus-client's
multiprocess mode: `gateway serve` points PROMETHEUS_MULTIPROC_DIR at a directory private to
that server instance, emptied at its start, before any worker imports this module.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
_LIVE_GAUGE_FILE = re.compile(r"gauge_live[a-z]+_(\d+)\.db")
# Image work: from a few ms (rejections) to many minutes (high-quality generations).
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 45, 60,
                    90, 120, 180, 300, 600)
# The gateway's own time: fine below a millisecond.
OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.00075, 0.001, 0.0015, 0.002, 0.003, 0.005,
                    0.0075, 0.01, 0.025, 0.05, 0.1, 0.25, 1)

REQUESTS = Counter("gateway_requests_total", "API requests under /v1/ by endpoint, model and "
                   "status", ["endpoint", "model", "status"])
KEY_REQUESTS = Counter("gateway_key_requests_total", "API requests by key, model and status",
                       ["key_id", "model", "status"])
DURATION = Histogram("gateway_request_duration_seconds", "Total time as the client sees it",
                     ["endpoint", "model"], buckets=DURATION_BUCKETS)
UPSTREAM_DURATION = Histogram("gateway_upstream_duration_seconds", "Time spent on the upstream: "
                              "from opening its request to the end of its answer", ["model"],
                              buckets=DURATION_BUCKETS)
OVERHEAD = Histogram("gateway_overhead_seconds", "The gateway's own time: total minus upstream "
                     "time and minus waiting for the client's body before the upstream opened",
                     ["endpoint"], buckets=OVERHEAD_BUCKETS)
UPLOAD_BYTES = Counter("gateway_upload_bytes_total", "Request body bytes received", ["model"])
IN_FLIGHT = Gauge("gateway_in_flight_requests", "API requests being handled",
                  multiprocess_mode="livesum")
IMAGES = Counter("gateway_images_total", "Final images returned (data entries or completed "
                 "events, not partial images)", ["model", "key_id"])
TOKENS = Counter("gateway_tokens_total", "Tokens the upstream reported",
                 ["model", "key_id", "type"])
ALIASES = Counter("gateway_model_alias_requests_total", "Requests that named an alias, by the "
                  "alias and the model that served them", ["alias", "model"])
REJECTIONS = Counter("gateway_rejections_total", "Requests the gateway refused itself",
                     ["reason"])
UPSTREAM_ERRORS = Counter("gateway_upstream_errors_total", "Upstream failures by kind "
                          "(status, timeout, connect, reset, too_large)", ["model", "kind"])
STORE_ERRORS = Counter("gateway_quota_store_errors_total", "Quota store calls that failed")
LOOP_LAG = Gauge("gateway_event_loop_lag_seconds", "How late the event loop ran a timer due "
                 "every 50 ms, at its last tick: the instance is short of CPU when this is often "
                 "above a few ms", multiprocess_mode="livemax")
STORE_UP = Gauge("gateway_quota_store_up", "1 when the quota store answered its last call",
                 multiprocess_mode="livemin")

REJECTION_REASONS = {400: "validation", 401: "auth", 403: "auth", 404: "validation",
                     405: "validation", 408: "timeout", 413: "too_large", 503: "unavailable"}
# Token counts of an answer's usage (gateway.usage) -> the `type` label; svg: the SVG author's.
_TOKEN_TYPES = {"input_tokens": "input", "output_tokens": "output",
                "input_text_tokens": "input_text", "input_image_tokens": "input_image",
                "output_text_tokens": "output_text", "output_image_tokens": "output_image",
                "svg_total_tokens": "svg"}


@dataclass(slots=True)
class RequestRecord:
    """What one API request did, filled in as it goes; recorded once at its end."""

    endpoint: str
    start: float
    request_id: str = ""
    model: str = ""  # the metrics label (pass-through models share one)
    requested_model: str = ""  # the alias the client named, when one
    key_id: str = ""
    n: int = 0
    status: int = 0
    rejection: str = ""
    bytes_in: int = 0
    bytes_out: int = 0
    upstream_seconds: float = 0.0
    client_seconds: float = 0.0  # waiting for the client's body before the upstream opened
    end: float = 0.0  # when the answer's last byte was sent
    upstream_error: str = ""
    upstream_request_id: str = ""
    images: int = 0
    usage: dict[str, int] = field(default_factory=dict)
    trace_id: str = ""
    client: str = ""  # host:port


def rejection_reason(status: int, code: str | None) -> str:
    if code == "overloaded":
        return "overloaded"
    if status == 429:
        return "quota" if code == "insufficient_quota" else "rate_limit"
    return REJECTION_REASONS.get(status) or ("validation" if status < 500 else "internal")


def record(rec: RequestRecord, total_seconds: float, *, key_labels: bool) -> None:
    model = rec.model or "unknown"
    status = str(rec.status or 499)  # 499: the client left before an answer began
    REQUESTS.labels(rec.endpoint, model, status).inc()
    DURATION.labels(rec.endpoint, model).observe(total_seconds)
    own = total_seconds - rec.upstream_seconds - rec.client_seconds
    OVERHEAD.labels(rec.endpoint).observe(max(0.0, own))
    if rec.bytes_in:
        UPLOAD_BYTES.labels(model).inc(rec.bytes_in)
    if rec.upstream_seconds:
        UPSTREAM_DURATION.labels(model).observe(rec.upstream_seconds)
    if rec.rejection:
        REJECTIONS.labels(rec.rejection).inc()
    if rec.requested_model:
        ALIASES.labels(rec.requested_model, model).inc()
    if rec.upstream_error:
        UPSTREAM_ERRORS.labels(model, rec.upstream_error).inc()
    key = rec.key_id if key_labels else ""
    if key_labels and rec.key_id:
        KEY_REQUESTS.labels(rec.key_id, model, status).inc()
    if rec.images:
        IMAGES.labels(model, key).inc(rec.images)
    for name, kind in _TOKEN_TYPES.items():
        if rec.usage.get(name):
            TOKENS.labels(model, key, kind).inc(rec.usage[name])


def store_result(ok: bool) -> None:
    """The quota store answered (or did not): the reachability gauge and the error counter."""
    STORE_UP.set(1 if ok else 0)
    if not ok:
        STORE_ERRORS.inc()


def exposition() -> tuple[bytes, str]:
    """The text format: summed over every worker in multiprocess mode."""
    directory = os.environ.get(MULTIPROC_ENV)
    if directory:
        _forget_dead_workers(directory)
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(), CONTENT_TYPE_LATEST


def _forget_dead_workers(directory: str) -> None:
    """A worker killed mid-request leaves its live gauges (in-flight, store up) behind: drop
    the files of workers that are gone, as their own shutdown would have."""
    for name in os.listdir(directory):
        match = _LIVE_GAUGE_FILE.fullmatch(name)
        if match and not _alive(int(match[1])):
            multiprocess.mark_process_dead(int(match[1]), directory)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def worker_exit() -> None:
    """At a worker's shutdown: its live gauges stop counting."""
    directory = os.environ.get(MULTIPROC_ENV)
    if directory:
        multiprocess.mark_process_dead(os.getpid(), directory)
