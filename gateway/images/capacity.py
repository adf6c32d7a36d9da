"""What this instance lets requests hold: image-request slots and bytes waiting in spools.

A slot is taken when the head is read, after the key is accepted and before any body: a key's
trickling or spooling requests can fill only its own share, never the instance. The store
still enforces the key's concurrency across instances at admission.
"""

from __future__ import annotations

from gateway.admission import Principal
from gateway.errors import RateLimited, ServiceUnavailable
from gateway.settings import Settings


def _count(counts: dict[str, int], key: str | None, delta: int) -> None:
    """Add to a key's count (no key: nothing), dropping it at zero so idle keys cost nothing."""
    if key is None:
        return
    left = counts.get(key, 0) + delta
    if left:
        counts[key] = left
    else:
        del counts[key]


class Slot:
    """One request's place here; given back once, when the answer's last byte goes (so a
    client sending its next request at once finds its key's slot free)."""

    __slots__ = ("_capacity", "held", "key")

    def __init__(self, capacity: Capacity, key: str | None) -> None:
        self._capacity = capacity
        self.key = key
        self.held = True

    def release(self) -> None:
        if self.held:
            self.held = False
            self._capacity.give(self.key)


class Capacity:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.in_flight = 0
        self.by_key: dict[str, int] = {}  # slots each key holds here
        self.spooled = 0  # bytes waiting in spools, all requests
        self.spooled_by_key: dict[str, int] = {}

    def take(self, principal: Principal) -> Slot:
        """A slot, at most the key's own concurrency of them; 429 or 503 (both retryable)."""
        settings, key = self.settings, principal.key_id
        if key is not None:
            limit = principal.max_concurrent or settings.max_in_flight_per_key or \
                settings.max_in_flight
            if self.by_key.get(key, 0) >= limit:
                raise RateLimited(
                    "Rate limit reached for concurrent requests on this API key. Try again in 1s.",
                    headers={"retry-after": "1", "retry-after-ms": "1000"})
        if self.in_flight >= settings.max_in_flight:
            raise ServiceUnavailable("The gateway is at capacity; retry shortly.",
                                     code="overloaded", headers={"retry-after": "1"})
        self.in_flight += 1
        _count(self.by_key, key, 1)
        return Slot(self, key)

    def give(self, key: str | None) -> None:
        self.in_flight -= 1
        _count(self.by_key, key, -1)

    def spool_take(self, key: str | None, size: int) -> None:
        """Account `size` more spooled bytes, or refuse (retryable) past either cap."""
        settings = self.settings
        if self.spooled + size > settings.max_spool_bytes or (
                key is not None
                and self.spooled_by_key.get(key, 0) + size > settings.max_spool_bytes_per_key):
            raise ServiceUnavailable(
                "The gateway holds too many uploads waiting for their text fields; retry "
                "shortly, or send the text fields before the files.", code="spool_full",
                headers={"retry-after": "1"})
        self.spooled += size
        _count(self.spooled_by_key, key, size)

    def spool_give(self, key: str | None, size: int) -> None:
        self.spooled -= size
        _count(self.spooled_by_key, key, -size)
