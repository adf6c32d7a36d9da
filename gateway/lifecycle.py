"""The process's lifecycle: the draining state (/readyz turns 503) and the SIGTERM drain."""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType

import uvicorn

log = logging.getLogger("gateway.server")

draining = False  # set when SIGTERM starts a graceful drain


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
        elif not draining:
            _drain()
            timer = threading.Timer(drain_seconds, _stop, (server,))
            timer.daemon = True
            timer.start()
        # A repeated SIGTERM (a whole process group signalled, then the supervisor forwarding
        # it) changes nothing; Ctrl-C still stops at once through uvicorn's own handler.

    signal.signal(signal.SIGTERM, on_sigterm)


def _stop(server: uvicorn.Server) -> None:
    _drain()
    # Not uvicorn's handle_exit: that would re-raise SIGTERM after the shutdown (exit 143).
    server.should_exit = True


def _drain() -> None:
    global draining
    draining = True
