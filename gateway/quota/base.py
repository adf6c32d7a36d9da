"""The quota-store interface: keys, and atomic admission and settlement against their limits.

Two implementations pass the same contract tests: `redis_store.RedisStore` (several gateway
instances, exact across all of them: every check-and-reserve is one Lua script) and
`memory.MemoryStore` (one process, nothing to install). Times are the store's own clock.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

from gateway.keys import KeyRecord

# Decision.status values
OK = "ok"
UNKNOWN_KEY = "unknown_key"  # no such key, or revoked
MODEL = "model"  # the key may not use this model
RPM = "rpm"
CONCURRENCY = "concurrency"
IMAGES = "images"  # the day's images are spent
TOKENS = "tokens"  # the month's tokens are spent


class StoreUnavailable(Exception):
    """The store did not answer in time (or at all)."""


@dataclass(slots=True)
class Window:
    """One limit as the x-ratelimit-* headers and /v1/usage show it."""

    limit: int
    used: int
    remaining: int
    reset_ms: int


@dataclass(slots=True)
class Decision:
    status: str
    retry_after_ms: int = 0
    # "requests", "images", "tokens": only the limits the key has
    windows: dict[str, Window] = field(default_factory=dict)


@dataclass(slots=True)
class Usage:
    windows: dict[str, Window]
    in_flight: int


@dataclass(slots=True)
class Snapshot:
    """A key's counters as a store reads them (quota.lua's reply, field for field)."""

    rpm: int
    req_remaining: int
    req_reset_ms: int
    images_per_day: int
    images: int
    day_reset_ms: int
    tokens_per_month: int
    tokens: int
    month_reset_ms: int
    in_flight: int

    def windows(self) -> dict[str, Window]:
        """Images and tokens always (limit 0: none), requests when the key has an rpm."""
        out = {}
        if self.rpm:
            out["requests"] = Window(self.rpm, 0, self.req_remaining, self.req_reset_ms)
        out["images"] = Window(self.images_per_day, self.images,
                               max(0, self.images_per_day - self.images), self.day_reset_ms)
        out["tokens"] = Window(self.tokens_per_month, self.tokens,
                               max(0, self.tokens_per_month - self.tokens), self.month_reset_ms)
        return out


def burst_interval(rpm: int, burst_seconds: float) -> tuple[float, float]:
    """GCRA emission interval and tolerance (ms) for `rpm` a minute with `burst_seconds` worth
    of requests allowed at once; rounded half up, as quota.lua does."""
    interval = 60_000 / rpm
    burst = max(1, math.floor(rpm * burst_seconds / 60 + 0.5))
    return interval, (burst - 1) * interval


class QuotaStore(ABC):
    """Keys and their counters. Every method may raise StoreUnavailable."""

    # ------------------------------------------------------------------ keys
    @abstractmethod
    async def put_key(self, record: KeyRecord) -> None:
        """Create or replace a key record."""

    @abstractmethod
    async def update_key(self, key_id: str, record: KeyRecord, *, status_only: bool = False
                         ) -> None:
        """Write a changed record's fields except its status (or only its status), so an update
        racing a revocation can never bring the key back."""

    @abstractmethod
    async def get_key(self, key_id: str) -> KeyRecord | None: ...

    @abstractmethod
    async def list_keys(self) -> list[KeyRecord]: ...

    # ------------------------------------------------------------- admission
    @abstractmethod
    async def admit(self, key_hash: str, model: str, n: int, lease: str) -> Decision:
        """Check every limit of the key and take all reservations or none: one request slot
        (rpm), one concurrency slot and `n` images, held by `lease` until `settle` or until
        the lease expires. Also re-checks the key (status, hash) and the model, atomically."""

    @abstractmethod
    async def settle(self, key_id: str, lease: str, *, answered: bool, images: int,
                     tokens: int) -> None:
        """Release the lease and its reservation. If the upstream answered, count the `images`
        and `tokens` it reported instead (also when the lease had expired meanwhile)."""

    @abstractmethod
    async def renew(self, key_id: str, lease: str) -> None:
        """Push a live lease's expiry a full TTL ahead (long requests renew while they run)."""

    @abstractmethod
    async def usage(self, key_id: str) -> Usage | None: ...

    @abstractmethod
    async def ping(self) -> None: ...

    async def aclose(self) -> None:
        return None
