"""The in-process quota store: the Redis store's semantics for a single gateway process.

Every method runs without awaiting in between, so each admission is atomic on the event loop.
The Lua scripts in redis_store/ are the reference; this file mirrors them line for line.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime

from gateway.keys import KeyRecord, id_for_hash
from gateway.quota.base import (
    CONCURRENCY,
    IMAGES,
    MODEL,
    OK,
    RPM,
    TOKENS,
    UNKNOWN_KEY,
    Decision,
    QuotaStore,
    Usage,
    Window,
)


def periods(now_ms: int) -> tuple[int, int, int, int]:
    """(day number, ms until the next UTC day, month number, ms until the next UTC month)."""
    day = now_ms // 86_400_000
    moment = datetime.fromtimestamp(now_ms / 1000, UTC)
    month = moment.year * 12 + moment.month - 1
    next_month = datetime(moment.year + moment.month // 12, moment.month % 12 + 1, 1, tzinfo=UTC)
    return (day, (day + 1) * 86_400_000 - now_ms, month,
            int(next_month.timestamp() * 1000) - now_ms)


def _gcra_params(rpm: int, burst_seconds: float) -> tuple[float, float]:
    interval = 60_000 / rpm
    burst = max(1, round(rpm * burst_seconds / 60))
    return interval, (burst - 1) * interval


def gcra(tat: int, now: int, rpm: int, burst_seconds: float) -> tuple[bool, int, int]:
    """(allowed, new TAT, retry-after ms) for one request under a GCRA of `rpm` a minute that
    lets `burst_seconds` worth of requests through at once."""
    interval, tau = _gcra_params(rpm, burst_seconds)
    tat = max(tat, now)
    allow_at = tat - tau
    if now < allow_at:
        return False, tat, math.ceil(allow_at - now)
    return True, math.ceil(tat + interval), 0


def gcra_remaining(tat: int, now: int, rpm: int, burst_seconds: float) -> int:
    """How many requests would pass right now."""
    interval, tau = _gcra_params(rpm, burst_seconds)
    return max(0, math.floor((now + tau - max(tat, now)) / interval) + 1)


@dataclass
class _Counters:
    tat: int = 0
    day: int = -1
    images: int = 0
    month: int = -1
    tokens: int = 0
    leases: dict[str, tuple[int, int, int]] = field(default_factory=dict)  # lease: expiry, day, n


class MemoryStore(QuotaStore):
    def __init__(self, *, lease_ttl_ms: int, rpm_burst_seconds: float) -> None:
        self.lease_ttl_ms = lease_ttl_ms
        self.rpm_burst_seconds = rpm_burst_seconds
        self._keys: dict[str, KeyRecord] = {}
        self._counters: dict[str, _Counters] = {}

    @staticmethod
    def _now() -> int:
        return int(time.time() * 1000)

    def seed(self, record: KeyRecord) -> None:
        self._keys[record.id] = record

    async def put_key(self, record: KeyRecord) -> None:
        self.seed(record)

    async def get_key(self, key_id: str) -> KeyRecord | None:
        return self._keys.get(key_id)

    async def list_keys(self) -> list[KeyRecord]:
        return sorted(self._keys.values(), key=lambda r: r.created)

    def _roll(self, c: _Counters, now: int) -> tuple[int, int, int, int]:
        day, day_reset, month, month_reset = periods(now)
        if c.day != day:
            c.day, c.images = day, 0
        if c.month != month:
            c.month, c.tokens = month, 0
        for lease, (expiry, lease_day, n) in list(c.leases.items()):
            if expiry <= now:  # never settled: the instance died or lost Redis; give it back
                del c.leases[lease]
                if lease_day == c.day:
                    c.images -= n
        return day, day_reset, month, month_reset

    async def admit(self, key_hash: str, model: str, n: int, lease: str) -> Decision:
        record = self._keys.get(id_for_hash(key_hash))
        if record is None or record.status != "active" or record.hash != key_hash:
            return Decision(UNKNOWN_KEY)
        if record.models and model not in record.models:
            return Decision(MODEL)
        limits = record.limits
        c = self._counters.setdefault(record.id, _Counters())
        now = self._now()
        day, day_reset, _, month_reset = self._roll(c, now)
        windows: dict[str, Window] = {}
        if limits.max_concurrent and len(c.leases) >= limits.max_concurrent:
            return Decision(CONCURRENCY, 1000)
        new_tat = c.tat
        if limits.rpm:
            allowed, new_tat, retry = gcra(c.tat, now, limits.rpm, self.rpm_burst_seconds)
            if not allowed:
                return Decision(RPM, retry, {"requests": Window(limits.rpm, 0, 0, retry)})
            remaining = gcra_remaining(new_tat, now, limits.rpm, self.rpm_burst_seconds)
            windows["requests"] = Window(limits.rpm, 0, remaining, max(0, new_tat - now))
        if limits.images_per_day and c.images + n > limits.images_per_day:
            return Decision(IMAGES, day_reset, {"images": Window(
                limits.images_per_day, c.images, limits.images_per_day - c.images, day_reset)})
        if limits.tokens_per_month and c.tokens >= limits.tokens_per_month:
            return Decision(TOKENS, month_reset, {"tokens": Window(
                limits.tokens_per_month, c.tokens, 0, month_reset)})
        c.tat = new_tat
        c.images += n
        c.leases[lease] = (now + self.lease_ttl_ms, day, n)
        if limits.images_per_day:
            windows["images"] = Window(limits.images_per_day, c.images,
                                       limits.images_per_day - c.images, day_reset)
        if limits.tokens_per_month:
            windows["tokens"] = Window(limits.tokens_per_month, c.tokens,
                                       limits.tokens_per_month - c.tokens, month_reset)
        return Decision(OK, 0, windows)

    async def settle(self, key_id: str, lease: str, *, answered: bool, images: int,
                     tokens: int) -> None:
        c = self._counters.setdefault(key_id, _Counters())
        now = self._now()
        self._roll(c, now)
        held = c.leases.pop(lease, None)
        reserved = held[2] if held is not None and held[1] == c.day else 0
        c.images += (images if answered else 0) - reserved
        if answered:
            c.tokens += tokens

    async def usage(self, key_id: str) -> Usage | None:
        record = self._keys.get(key_id)
        if record is None:
            return None
        c = self._counters.setdefault(key_id, _Counters())
        now = self._now()
        _, day_reset, _, month_reset = self._roll(c, now)
        limits = record.limits
        windows = {}
        if limits.rpm:
            remaining = gcra_remaining(c.tat, now, limits.rpm, self.rpm_burst_seconds)
            windows["requests"] = Window(limits.rpm, 0, remaining, max(0, c.tat - now))
        windows["images"] = Window(limits.images_per_day, c.images,
                                   max(0, limits.images_per_day - c.images), day_reset)
        windows["tokens"] = Window(limits.tokens_per_month, c.tokens,
                                   max(0, limits.tokens_per_month - c.tokens), month_reset)
        return Usage(windows, len(c.leases))

    async def ping(self) -> None:
        return None
