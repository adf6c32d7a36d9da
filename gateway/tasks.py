"""Fire-and-forget work (renewals, late settles, store pipelines) that must not be collected
while it runs and must never log "exception was never retrieved": each such coroutine handles
and logs its own failures."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

_RUNNING: set[asyncio.Task[None]] = set()


def background(coro: Coroutine[Any, Any, None]) -> None:
    task = asyncio.ensure_future(coro)
    _RUNNING.add(task)
    task.add_done_callback(_RUNNING.discard)
    task.add_done_callback(lambda t: t.cancelled() or t.exception())  # retrieve, never raise
