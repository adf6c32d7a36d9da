"""Running the server: uvicorn with the gateway's protocol (gateway.protocol), the collector
tuned for thousands of requests in flight, and the metrics directory and port that several
workers share."""

from __future__ import annotations

import atexit
import gc
import logging
import os
import shutil
import tempfile
import threading

import uvicorn

from gateway.metrics import MULTIPROC_ENV
from gateway.settings import Settings

log = logging.getLogger("gateway.server")

# Young collections every 50,000 allocations instead of 700: see tune_gc.
GC_THRESHOLDS = (50_000, 20, 10)


def tune_gc() -> None:
    """Keep the cycle collector from growing with the requests in flight.

    Thousands of requests in flight keep hundreds of thousands of container objects alive, and
    CPython's default thresholds (700, 10, 10) re-scan them so often that collection took a
    fifth of the gateway's CPU with 3,000 in flight (bench/bench_scale.py; README, "Scale").
    What exists once the app is built (modules, settings, the catalog) lives as long as the
    process: frozen, no collection scans it again. Request objects are freed by reference
    counting as they end; the collector is only for cycles, so it may run less often.
    Called at lifespan startup, in each worker.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def serve(settings: Settings) -> None:
    """Run `gateway.app:create_app` with the settings' host, port, workers and metrics port."""
    if settings.workers > 1:
        # A directory private to this server instance, fresh at each start, so two instances on
        # one host never mix their numbers; set before any worker imports prometheus-client.
        directory = tempfile.mkdtemp(prefix="gateway-metrics-")
        atexit.register(shutil.rmtree, directory, True)
        os.environ[MULTIPROC_ENV] = directory
    if settings.metrics_port is not None:
        _serve_metrics(settings.host, settings.metrics_port)
    uvicorn.run(
        "gateway.app:create_app",
        factory=True,
        host=settings.host,
        port=settings.port,
        workers=settings.workers,
        backlog=settings.backlog,
        loop="uvloop",
        http="gateway.protocol:BoundedHttpTools",
        h11_max_incomplete_event_size=settings.max_header_bytes,  # read by BoundedHttpTools
        log_level=settings.log_level,
        server_header=False,
        # uvicorn rewrites the client address and scheme from X-Forwarded-* only when the
        # peer is one of forwarded_allow_ips; without that setting nothing is trusted.
        proxy_headers=settings.forwarded_allow_ips is not None,
        forwarded_allow_ips=settings.forwarded_allow_ips or "",
        access_log=False,  # the gateway writes its own line per request
        timeout_graceful_shutdown=settings.shutdown_timeout,
    )


def _serve_metrics(host: str, port: int) -> None:
    """/metrics on its own port, from this (the parent) process, for every worker."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from gateway.metrics import exposition

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path.split("?")[0] != "/metrics":
                self.send_error(404)
                return
            body, content_type = exposition()
            self.send_response(200)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            return None

    server = ThreadingHTTPServer((host, port), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
