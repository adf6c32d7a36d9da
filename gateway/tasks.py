"""Fire-and-forget work (renewals, late settles, store pipelines): kept referenced until it ends,
and its failure logged here, never as asyncio's "exception was never retrieved"."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

log = logging.getLogger("gateway.tasks")
_RUNNING: set[asyncio.Task[None]] = set()


def background(coro: Coroutine[Any, Any, None]) -> None:
    task = asyncio.ensure_future(coro)
    _RUNNING.add(task)
    task.add_done_callback(_done)


def _done(task: asyncio.Task[None]) -> None:
    _RUNNING.discard(task)
    if not task.cancelled() and (exc := task.exception()) is not None:
        # The coroutines handle what they expect; anything else is a bug worth a trace.
        log.error("background task %s failed", task.get_coro(), exc_info=exc)
