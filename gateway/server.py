"""Running the server: uvicorn with a drain before its graceful shutdown, and the metrics
directory and port that several workers share."""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import signal
import tempfile
import threading
from types import FrameType

import uvicorn

from gateway import health
from gateway.metrics import MULTIPROC_ENV
from gateway.settings import Settings

log = logging.getLogger("gateway.server")


def install_drain(drain_seconds: float) -> None:
    """Make SIGTERM drain first: readiness turns 503 at once, requests are still served for
    `drain_seconds` (the load balancer notices meanwhile), then uvicorn's graceful shutdown lets
    in-flight requests finish, and the process exits 0.

    Called at lifespan startup, when uvicorn (in this process, or in this worker) has installed
    its own handler: that handler is a bound method of the running Server, which is how the
    drain reaches the server without patching uvicorn.
    """
    current = signal.getsignal(signal.SIGTERM)
    running = getattr(current, "__self__", None)
    if threading.current_thread() is not threading.main_thread() or \
            not isinstance(running, uvicorn.Server):
        log.warning("SIGTERM drain not installed: the server is not uvicorn's, or its signal "
                    "handling changed; SIGTERM stops the gateway without a drain")
        return
    server = running

    def on_sigterm(sig: int, frame: FrameType | None) -> None:
        if drain_seconds <= 0:
            _stop(server)
        elif not health.draining:
            health.draining = True
            timer = threading.Timer(drain_seconds, _stop, (server,))
            timer.daemon = True
            timer.start()
        # A repeated SIGTERM (a whole process group signalled, then the supervisor forwarding
        # it) changes nothing; Ctrl-C still stops at once through uvicorn's own handler.

    signal.signal(signal.SIGTERM, on_sigterm)


def _stop(server: uvicorn.Server) -> None:
    health.draining = True
    # Not uvicorn's handle_exit: that would re-raise SIGTERM after the shutdown (exit 143).
    server.should_exit = True


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
        loop="uvloop",
        http="httptools",
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
