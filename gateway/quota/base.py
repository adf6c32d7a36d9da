"""The quota-store interface: keys, and atomic admission and settlement against their limits.

Two implementations pass the same contract tests: `redis_store.RedisStore` (several gateway
instances, exact across all of them: every check-and-reserve is one Lua script) and
`memory.MemoryStore` (one process, nothing to install). Times are the store's own clock.
"""

from __future__ import annotations

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

DAY_MS = 86_400_000


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


class QuotaStore(ABC):
    """Keys and their counters. Every method may raise StoreUnavailable."""

    # ------------------------------------------------------------------ keys
    @abstractmethod
    async def put_key(self, record: KeyRecord) -> None:
        """Create or replace a key record."""

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
    async def usage(self, key_id: str) -> Usage | None: ...

    @abstractmethod
    async def ping(self) -> None: ...

    async def aclose(self) -> None:
        return None
