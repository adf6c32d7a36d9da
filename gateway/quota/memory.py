"""The in-process quota store: quota.lua's rules for a single gateway process.

Every method runs without awaiting in between, so each admission is atomic on the event loop.
It follows quota.lua step for step; the contract tests hold the two to the same behaviour.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
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
    Snapshot,
    Usage,
    burst_interval,
)


def periods(now_ms: int) -> tuple[int, int, int, int]:
    """(day number, ms until the next UTC day, month number, ms until the next UTC month)."""
    day = now_ms // 86_400_000
    moment = datetime.fromtimestamp(now_ms / 1000, UTC)
    month = moment.year * 12 + moment.month - 1
    next_month = datetime(moment.year + moment.month // 12, moment.month % 12 + 1, 1, tzinfo=UTC)
    return (day, (day + 1) * 86_400_000 - now_ms, month,
            int(next_month.timestamp() * 1000) - now_ms)


_EXPIRED_KEEP_MS = 86_400_000  # as quota.lua's expired_keep_ms


@dataclass
class _Counters:
    tat: int = 0
    day: int = -1
    images: int = 0
    month: int = -1
    tokens: int = 0
    leases: dict[str, tuple[int, int, int]] = field(default_factory=dict)  # lease: expiry, day, n
    expired: dict[str, int] = field(default_factory=dict)  # lease: when it expired


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

    async def update_key(self, key_id: str, record: KeyRecord, *, status_only: bool = False
                         ) -> None:
        current = self._keys.get(key_id)
        if current is None:
            return
        if status_only:
            self._keys[key_id] = replace(current, status=record.status)
        else:
            self._keys[key_id] = replace(record, status=current.status, hash=current.hash,
                                         created=current.created)

    async def get_key(self, key_id: str) -> KeyRecord | None:
        return self._keys.get(key_id)

    async def list_keys(self) -> list[KeyRecord]:
        return sorted(self._keys.values(), key=lambda r: r.created)

    def _open(self, key_id: str, now: int) -> _Counters:
        """The key's counters on today's day and month, expired leases given back."""
        c = self._counters.setdefault(key_id, _Counters())
        day, _, month, _ = periods(now)
        if c.day != day:
            c.day, c.images = day, 0
        if c.month != month:
            c.month, c.tokens = month, 0
        swept = False
        for lease, (expiry, lease_day, n) in list(c.leases.items()):
            if expiry <= now:  # never settled: the instance died or lost Redis
                del c.leases[lease]
                if lease_day == day:
                    c.images -= n
                c.expired[lease] = now
                swept = True
        if swept:
            for lease, when in list(c.expired.items()):
                if when < now - _EXPIRED_KEEP_MS:
                    del c.expired[lease]
        return c

    def _snapshot(self, record: KeyRecord | None, c: _Counters, now: int) -> Snapshot:
        limits = record.limits if record else None
        rpm = limits.rpm if limits else 0
        remaining = reset = 0
        if rpm:
            interval, tau = burst_interval(rpm, self.rpm_burst_seconds)
            base = max(c.tat, now)
            remaining = max(0, math.floor((now + tau - base) / interval) + 1)
            reset = max(0, base - now)
        _, day_reset, _, month_reset = periods(now)
        return Snapshot(rpm, remaining, reset, limits.images_per_day if limits else 0, c.images,
                        day_reset, limits.tokens_per_month if limits else 0, c.tokens,
                        month_reset, len(c.leases))

    async def admit(self, key_hash: str, model: str, n: int, lease: str) -> Decision:
        key_id = id_for_hash(key_hash)
        record = self._keys.get(key_id)
        now = self._now()
        c = self._open(key_id, now)

        def answer(status: str, retry: int = 0) -> Decision:
            return Decision(status, retry, self._snapshot(record, c, now).windows())

        if record is None or record.status != "active" or record.hash != key_hash:
            return answer(UNKNOWN_KEY)
        if record.models and model not in record.models:
            return answer(MODEL)
        limits = record.limits
        if limits.max_concurrent and len(c.leases) >= limits.max_concurrent:
            return answer(CONCURRENCY, 1000)
        if limits.rpm:
            interval, tau = burst_interval(limits.rpm, self.rpm_burst_seconds)
            allow_at = max(c.tat, now) - tau
            if now < allow_at:
                return answer(RPM, math.ceil(allow_at - now))
        if limits.images_per_day and c.images + n > limits.images_per_day:
            return answer(IMAGES, periods(now)[1])
        if limits.tokens_per_month and c.tokens >= limits.tokens_per_month:
            return answer(TOKENS, periods(now)[3])
        if limits.rpm:
            c.tat = math.ceil(max(c.tat, now) + interval)
        c.images += n
        c.leases[lease] = (now + self.lease_ttl_ms, c.day, n)
        return answer(OK)

    async def settle(self, key_id: str, lease: str, *, answered: bool, images: int,
                     tokens: int) -> None:
        now = self._now()
        c = self._open(key_id, now)
        held = c.leases.pop(lease, None)
        today = held is None or held[1] == c.day
        if held is not None and today:
            c.images -= held[2]
        expired = c.expired.pop(lease, None) is not None
        if answered and (held is not None or expired):  # else settled already: a retry
            if expired or today:  # a reservation from an earlier day was charged to that day
                c.images += images
            c.tokens += tokens

    async def renew(self, key_id: str, lease: str) -> None:
        c = self._counters.get(key_id)
        if c is not None and lease in c.leases:
            _, day, n = c.leases[lease]
            c.leases[lease] = (self._now() + self.lease_ttl_ms, day, n)

    async def usage(self, key_id: str) -> Usage | None:
        record = self._keys.get(key_id)
        if record is None:
            return None
        now = self._now()
        snap = self._snapshot(record, self._open(key_id, now), now)
        return Usage(snap.windows(), snap.in_flight)

    async def ping(self) -> None:
        return None
