"""The in-process quota store: quota.lua's rules for a single gateway process.

Every method runs without awaiting in between, so each admission is atomic on the event loop.
It follows quota.lua step for step; the contract tests hold the two to the same behaviour.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime

from gateway.keys import KeyRecord, id_for_hash
from gateway.quota.base import (
    CONCURRENCY,
    IMAGES,
    MODEL,
    OK,
    RPM,
    RPM_WINDOW_MS,
    TOKENS,
    UNKNOWN_KEY,
    Decision,
    QuotaStore,
    Snapshot,
    Usage,
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
    day: int = -1
    images: int = 0
    month: int = -1
    tokens: int = 0
    leases: dict[str, tuple[int, int, int]] = field(default_factory=dict)  # lease: expiry, day, n
    expired: dict[str, int] = field(default_factory=dict)  # lease: when it expired
    requests: list[tuple[int, str]] = field(default_factory=list)  # (admitted at, lease), sorted


class MemoryStore(QuotaStore):
    def __init__(self, *, lease_ttl_ms: int) -> None:
        self.lease_ttl_ms = lease_ttl_ms
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

    @staticmethod
    def _requests(c: _Counters, rpm: int, now: int) -> tuple[int, int]:
        """(admissions in the last 60 s, ms until remaining next grows), as quota.lua's
        requests(): the window is trimmed first, and only while the key has an rpm."""
        if not rpm:
            return 0, 0
        del c.requests[:bisect.bisect_right(c.requests, now - RPM_WINDOW_MS, key=lambda r: r[0])]
        used = len(c.requests)
        if not used:
            return 0, 0
        return used, c.requests[max(0, used - rpm)][0] + RPM_WINDOW_MS - now

    def _snapshot(self, record: KeyRecord | None, c: _Counters, now: int) -> Snapshot:
        limits = record.limits if record else None
        rpm = limits.rpm if limits else 0
        used, reset = self._requests(c, rpm, now)
        _, day_reset, _, month_reset = periods(now)
        return Snapshot(rpm, used, reset, limits.images_per_day if limits else 0, c.images,
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
            used, reset = self._requests(c, limits.rpm, now)
            if used >= limits.rpm:
                return answer(RPM, reset)
        if limits.images_per_day and c.images + n > limits.images_per_day:
            return answer(IMAGES, periods(now)[1])
        if limits.tokens_per_month and c.tokens >= limits.tokens_per_month:
            return answer(TOKENS, periods(now)[3])
        c.images += n
        if limits.rpm:
            bisect.insort(c.requests, (now, lease))
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

    async def extend(self, key_id: str, lease: str, extra: int) -> Decision:
        if extra < 0:
            raise ValueError("extend adds images: extra >= 0")
        record = self._keys.get(key_id)
        now = self._now()
        c = self._open(key_id, now)

        def answer(status: str, retry: int = 0) -> Decision:
            return Decision(status, retry, self._snapshot(record, c, now).windows())

        held = c.leases.get(lease)
        if held is None:
            return answer(UNKNOWN_KEY)
        expiry, lease_day, n = held
        if lease_day == c.day:
            ipd = record.limits.images_per_day if record else 0
            if ipd and c.images + extra > ipd:
                return answer(IMAGES, periods(now)[1])
            c.images += extra
        # else reserved on a day now over: its count is gone, nothing to check or charge
        c.leases[lease] = (expiry, lease_day, n + extra)
        return answer(OK)

    async def renew(self, key_id: str, leases: Sequence[str]) -> None:
        c = self._counters.get(key_id)
        if c is None:
            return
        expiry = self._now() + self.lease_ttl_ms
        for lease in leases:
            if lease in c.leases:
                _, day, n = c.leases[lease]
                c.leases[lease] = (expiry, day, n)

    async def usage(self, key_id: str) -> Usage | None:
        record = self._keys.get(key_id)
        if record is None:
            return None
        now = self._now()
        snap = self._snapshot(record, self._open(key_id, now), now)
        return Usage(snap.windows(), snap.in_flight)

    async def ping(self) -> None:
        return None
