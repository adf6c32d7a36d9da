"""The quota-store interface: keys, and atomic admission and settlement against their limits.

Two implementations pass the same contract tests: `redis_store.RedisStore` (several gateway
instances, exact across all of them: every check-and-reserve is one Lua script) and
`memory.MemoryStore` (one process, nothing to install). Times are the store's own clock.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
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
    requests: int  # admissions in the last 60 s
    req_reset_ms: int  # until the requests' remaining next grows (0: nothing in the window)
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
            out["requests"] = Window(self.rpm, self.requests, max(0, self.rpm - self.requests),
                                     self.req_reset_ms)
        out["images"] = Window(self.images_per_day, self.images,
                               max(0, self.images_per_day - self.images), self.day_reset_ms)
        out["tokens"] = Window(self.tokens_per_month, self.tokens,
                               max(0, self.tokens_per_month - self.tokens), self.month_reset_ms)
        return out


RPM_WINDOW_MS = 60_000  # requests per minute: admissions in any sliding 60 s, as quota.lua


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
        the lease expires. Also re-checks the key (status, hash) and the model, atomically.

        Requests per minute is an exact sliding window: at most `rpm` admissions in any 60 s;
        an admission refused for it (RPM) retries once the window makes room."""

    @abstractmethod
    async def extend(self, key_id: str, lease: str, extra: int) -> Decision:
        """Add `extra` (>= 0) images to a live lease's reservation and to the day's count, if
        images_per_day allows: OK; else IMAGES (retry at the day's reset) and nothing changes;
        UNKNOWN_KEY when the lease no longer exists (settled or expired). For an `n` learnt
        after admission (the field came after the upload started), so the reservation that
        settle releases is the whole request's."""

    @abstractmethod
    async def settle(self, key_id: str, lease: str, *, answered: bool, images: int,
                     tokens: int) -> None:
        """Release the lease and its reservation. If the upstream answered, count the `images`
        and `tokens` it reported instead (also when the lease had expired meanwhile)."""

    @abstractmethod
    async def renew(self, key_id: str, leases: Sequence[str]) -> None:
        """Push live leases' expiry a full TTL ahead (long requests renew while they run); a
        key's leases on an instance go together (one script call per 1,000 of them)."""

    @abstractmethod
    async def usage(self, key_id: str) -> Usage | None: ...

    @abstractmethod
    async def ping(self) -> None: ...

    async def warm(self) -> None:
        """Get ready for a burst (connections open) before the first request; may raise
        StoreUnavailable, which only means the first requests will do it."""
        return None

    async def aclose(self) -> None:
        return None
