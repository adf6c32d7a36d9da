"""How busy this process's event loop is, from a timer that notes how late it runs.

A loop busy with a burst of thousands of requests runs every callback late, and every timeout
with it. Timeouts that judge something outside the process (is Redis away?) ask here first
whether a late answer may be the loop's own fault (see quota.redis_store.Deadline). The lag is
also a metric: a loop that is often late is an instance short of CPU, whatever else it shows.
"""

from __future__ import annotations

import asyncio

from gateway import metrics

PERIOD = 0.05  # seconds between ticks: 20 timer callbacks a second, a few microseconds each
LATE = 0.02  # a tick this late means the loop was busy


class LoopWatch:
    def __init__(self) -> None:
        self.busy_at = float("-inf")  # loop time of the last tick that ran LATE or later
        self._loop: asyncio.AbstractEventLoop | None = None
        self._handle: asyncio.TimerHandle | None = None
        self._due = 0.0

    def start(self) -> None:
        """Start ticking on the running loop (again, if the loop changed; else nothing)."""
        loop = asyncio.get_running_loop()
        if self._loop is loop and self._handle is not None:
            return
        self._loop = loop
        self._due = loop.time() + PERIOD
        self._handle = loop.call_at(self._due, self._tick)

    def _tick(self) -> None:
        assert self._loop is not None
        now = self._loop.time()
        lag = max(0.0, now - self._due)  # a timer never runs early; float noise aside
        if lag > LATE:
            self.busy_at = now
        metrics.LOOP_LAG.set(lag)
        self._due = now + PERIOD
        self._handle = self._loop.call_at(self._due, self._tick)

    def busy_within(self, seconds: float) -> bool:
        """Whether the loop ran late at any time in the last `seconds`."""
        return self._loop is not None and self._loop.time() - self.busy_at < seconds

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None


WATCH = LoopWatch()  # one per process (each worker has its own)
