"""The client's side of one request: its body as it arrives, its deadlines, its disconnect, and
the answer written back to it (uvicorn's RequestResponseCycle is the model: one object owns the
request's `receive` and `send`, apart from what the request means).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from gateway.asgi import Message, Receive, Send
from gateway.errors import RequestTooLarge
from gateway.settings import Settings

log = logging.getLogger("gateway.edits")  # the name operators filter on


class ClientGone(Exception):
    """The client disconnected; there is nobody left to answer."""


class Client:
    __slots__ = ("_last_body", "_paused", "_paused_since", "_receive", "_send", "_started", "_task",
                 "_watchdog", "answered_at", "body_done", "bytes_out", "expects_continue", "gone",
                 "left", "max_body", "received", "receiving", "request_id", "response_started",
                 "settings", "status", "timed_out", "waited")

    def __init__(self, receive: Receive, send: Send, settings: Settings, max_body: int,
                 request_id: str, *, expects_continue: bool) -> None:
        self._receive = receive
        self._send = send
        self.settings = settings
        self.max_body = max_body
        self.request_id = request_id
        self.expects_continue = expects_continue
        self.received = 0
        self.body_done = asyncio.Event()  # the last body message has been received
        self.receiving = False  # receive() was called: uvicorn has sent any `100 Continue`
        self.response_started = False
        self.status = 0  # of the answer, once begun
        self.gone = False  # left while its request could still be called off
        self.left = False  # left (or stopped reading) later: the answer is read without it
        self.bytes_out = 0
        self.waited = 0.0  # seconds the gateway waited on the client (not its own time)
        self.answered_at = 0.0  # perf_counter() when the answer's last byte went
        # While the gateway itself waits (admission, the upstream connecting or reading slowly),
        # the body-read clocks stop: that time is not the client's silence.
        self._paused_since: float | None = None
        self._paused = 0.0
        self.timed_out = ""  # why the body watchdog cancelled the request
        self._started = self._last_body = 0.0
        self._watchdog: asyncio.TimerHandle | None = None
        self._task: asyncio.Task[Any] | None = None

    # ------------------------------------------------------------------------------ the body
    async def read(self, *, clocked: bool) -> tuple[bytes, bool]:
        """The next body message: its bytes and whether more follow. `clocked`: the wait is the
        client's (before the upstream opens), so it counts in `waited`."""
        self.receiving = True
        if clocked:
            waited = time.perf_counter()
            message = await self._receive()
            self.waited += time.perf_counter() - waited
        else:
            message = await self._receive()
        self._last_body = asyncio.get_running_loop().time()
        if message["type"] == "http.disconnect":
            raise ClientGone
        chunk = message.get("body", b"")
        self.received += len(chunk)
        if self.received > self.max_body:
            raise RequestTooLarge(f"Request body is larger than {self.max_body} bytes.")
        more = message.get("more_body", False)
        if not more:
            self.body_done.set()
        return chunk, more

    def arm_watchdog(self) -> None:
        """One timer per request (not one per chunk): cancels the request when the client has
        sent no body bytes for body_read_timeout while its body is unfinished (slow loris), or
        when its body arrives slower than min_body_rate on average (the gateway's own waits
        aside)."""
        loop = asyncio.get_running_loop()
        self._task = asyncio.current_task()
        self._started = self._last_body = loop.time()
        self._watchdog = loop.call_later(self._next_check(self._started), self._check_body)

    def pause(self) -> None:
        """The gateway waits from now on (see `arm_watchdog`)."""
        self._paused_since = asyncio.get_running_loop().time()

    def resume(self) -> None:
        if self._paused_since is not None:
            now = asyncio.get_running_loop().time()
            self._paused += now - self._paused_since
            self._paused_since = None
            self._last_body = now

    def _next_check(self, now: float) -> float:
        """Seconds until the body watchdog must look again; sets `timed_out` if it is over."""
        settings = self.settings
        if self._paused_since is not None:
            return 1.0  # the clocks stand still; look again soon after the gateway resumes
        wait = self._last_body + settings.body_read_timeout - now
        if wait <= 0:
            self.timed_out = f"No request body bytes for {settings.body_read_timeout:g} seconds."
        rate = settings.min_body_rate
        if rate and not self.timed_out:
            due = self._started + settings.body_rate_grace_seconds + self._paused + \
                self.received / rate
            if due <= now:
                self.timed_out = f"The request body arrived slower than {rate} bytes a second."
            wait = min(wait, due - now)
        return wait

    def _check_body(self) -> None:
        # A method, not a closure that re-arms itself: no reference cycle keeps the request.
        task = self._task
        if self.body_done.is_set() or task is None or task.done():
            return
        loop = asyncio.get_running_loop()
        wait = self._next_check(loop.time())
        if self.timed_out:
            task.cancel()
        else:
            self._watchdog = loop.call_later(wait, self._check_body)

    # --------------------------------------------------------------------------- disconnect
    async def race_disconnect(self, work: Awaitable[None], cancellable: Callable[[], bool]
                              ) -> None:
        """Run work here, cancelled if the client leaves after its body was read while
        `cancellable()`; leaving later only sets `left` (the answer is still read, unsent).

        One extra task per request: the work stays in the request's own task, and only a
        cancellation the watcher asked for becomes ClientGone (a server shutdown stays one).
        """
        main = asyncio.current_task()
        assert main is not None
        watcher = asyncio.ensure_future(self._watch_disconnect(main, cancellable))
        try:
            await work
        except asyncio.CancelledError:
            if self.gone and main.uncancel() == 0:
                raise ClientGone from None
            raise
        finally:
            watcher.cancel()

    async def _watch_disconnect(self, main: asyncio.Task[Any],
                                cancellable: Callable[[], bool]) -> None:
        await self.body_done.wait()
        while (await self._receive())["type"] != "http.disconnect":
            pass
        if cancellable():
            self.gone = True
            main.cancel()
        else:
            self.left = True

    # ---------------------------------------------------------------------------- answering
    async def send(self, message: Message) -> None:
        """Send part of the answer, unless the client left; a client that stops reading for
        client_send_timeout counts as gone, and the rest of the answer is read without it (its
        slot and the upstream connection are not held hostage)."""
        start = message["type"] == "http.response.start"
        self.response_started = self.response_started or start
        if not self.left:
            try:
                async with asyncio.timeout(self.settings.client_send_timeout):
                    await self._send(message)
                self.bytes_out += len(message.get("body", b""))
            except TimeoutError:
                log.info("request %s: the client stopped reading the answer", self.request_id)
                self.left = True
        if start:
            self.status = message["status"]
        if message["type"] == "http.response.body" and not message.get("more_body", False):
            self.answered_at = time.perf_counter()

    async def send_error(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes
                         ) -> None:
        """An error answer (the answer has not begun: errors after that are cuts).

        A body not read to its end is read a little further after the answer is written (a
        client that writes its whole body before reading still finds the error waiting), and
        then the connection is closed."""
        self.cancel_watchdog()  # the drain below bounds its own waits
        drain = False
        if not self.body_done.is_set():
            headers.insert(1, (b"connection", b"close"))
            # Reading would make uvicorn send `100 Continue`, inviting the very upload refused.
            unasked = self.expects_continue and not self.receiving
            drain = not (unasked or self.timed_out or status == 413)
        self.response_started, self.status = True, status
        await self._send({"type": "http.response.start", "status": status, "headers": headers})
        await self._send({"type": "http.response.body", "body": body, "more_body": drain})
        self.bytes_out = len(body)
        self.answered_at = time.perf_counter()
        if drain:  # the whole answer is written (its Content-Length says so): now linger
            waited = time.perf_counter()
            await self._drain()
            self.waited += time.perf_counter() - waited
            await self._send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _drain(self) -> None:
        """Read and drop a little more of a refused body (refusal_drain_bytes, for at most
        refusal_drain_seconds), so that a client that sends a small body whole before reading
        sees the error instead of a reset; a large or slow one is cut off."""
        limit = self.received + self.settings.refusal_drain_bytes
        self.receiving = True
        try:
            async with asyncio.timeout(self.settings.refusal_drain_seconds):
                while self.received <= limit:
                    message = await self._receive()
                    if message["type"] == "http.disconnect":
                        return
                    self.received += len(message.get("body", b""))
                    if not message.get("more_body", False):
                        self.body_done.set()
                        return
        except TimeoutError:  # a slow client gets its error regardless
            return

    def cancel_watchdog(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()

    def close(self) -> None:
        self._task = None
        self.cancel_watchdog()
