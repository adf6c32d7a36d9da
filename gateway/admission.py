"""The admission step between reading the fields and opening the upstream request.

The route calls `authenticate` before reading the body (401), `check_model` once the model is
known (403), validates the fields (400), then `admit` (429), so a bad request never spends
quota; `Ticket.finish` is called exactly once, however the request ends. `Admission` is the
open gateway (no keys configured); `QuotaAdmission` enforces per-key limits through a store.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

from gateway import logs, metrics
from gateway.catalog import ModelSpec
from gateway.errors import (
    Forbidden,
    QuotaExceeded,
    RateLimited,
    ServiceUnavailable,
    Unauthorized,
)
from gateway.keys import KeyRecord, bearer_secret, hash_secret, id_for_hash
from gateway.quota.base import (
    CONCURRENCY,
    IMAGES,
    MODEL,
    OK,
    RPM,
    UNKNOWN_KEY,
    Decision,
    QuotaStore,
    StoreUnavailable,
    Usage,
    Window,
)

log = logging.getLogger("gateway.admission")


@dataclass(slots=True)
class EditRequest:
    """What admission needs to know about a validated edit."""

    request_id: str
    model: ModelSpec
    n: int
    stream: bool


@dataclass(slots=True)
class Outcome:
    """How an admitted request ended: whether the upstream answered, and what it reported."""

    answered: bool
    status: int | None = None
    images: int | None = None  # final images the answer carried, when the gateway counted them
    usage: dict[str, int] = field(default_factory=dict)


class Principal:
    """Who is calling; the open gateway has one anonymous caller."""

    id = "anonymous"


class Ticket:
    """An admitted request's reservation; the open gateway reserves nothing."""

    def __init__(self, headers: dict[str, str] | None = None) -> None:
        self.headers = headers or {}

    async def finish(self, outcome: Outcome) -> None:
        return None

    async def extend(self, extra: int) -> None:
        """Reserve `extra` more images (an `n` that arrived after admission); nothing to do
        without a reservation."""
        return None


class Admission:
    """Base admission: anyone, any model, no limits."""

    async def authenticate(self, authorization: str | None) -> Principal:
        return _ANONYMOUS

    def check_model(self, principal: Principal, model: str) -> None:
        return None

    async def admit(self, principal: Principal, edit: EditRequest) -> Ticket:
        return _OPEN_TICKET

    async def headers_for(self, principal: Principal) -> dict[str, str]:
        """x-ratelimit-* headers for an answer that did not go through `admit`."""
        return {}

    async def start(self) -> None:
        """At lifespan startup, before the first request."""
        return None

    async def aclose(self) -> None:
        return None


_ANONYMOUS = Principal()
_OPEN_TICKET = Ticket()  # shared: its headers are never changed


# ----------------------------------------------------------------------------- keys and quotas
class KeyPrincipal(Principal):
    def __init__(self, record: KeyRecord, key_hash: str) -> None:
        self.record = record
        self.hash = key_hash
        self.id = record.id


class QuotaTicket(Ticket):
    """A lease in the store: renewed while the request runs (by the admission's Renewer),
    settled once when it ends."""

    def __init__(self, admission: QuotaAdmission, key_id: str, lease: str, n: int,
                 headers: dict[str, str]) -> None:
        super().__init__(headers)
        self.admission = admission
        self.key_id = key_id
        self.lease = lease
        self.n = n
        self._done = False
        admission.renewer.add(key_id, lease)

    async def extend(self, extra: int) -> None:
        """Reserve `extra` more images for this request, as admission would have: 429 if the
        day's images do not allow them; the store away follows the policy (503 fail closed,
        allowed fail open). Settle then charges or releases the whole `n`."""
        if extra <= 0 or self._done:
            return
        try:
            decision = await self.admission.store.extend(self.key_id, self.lease, extra)
        except StoreUnavailable as exc:
            self.admission._unavailable(exc)  # raises when failing closed
            self.n += extra  # fail open: no reservation, but an unknown answer counts them all
            return
        if decision.status == OK:
            self.n += extra
            self.headers.clear()
            self.headers.update(rate_limit_headers(decision.windows))
            return
        if decision.status == UNKNOWN_KEY:
            # The lease expired (renewals failed for a whole TTL): nothing holds this request.
            raise ServiceUnavailable("The gateway lost this request's quota reservation; retry.",
                                     headers={"retry-after": "1"})
        raise _refusal(decision, rate_limit_headers(decision.windows))

    async def finish(self, outcome: Outcome) -> None:
        if self._done:
            return
        self._done = True
        self.admission.renewer.discard(self.key_id, self.lease)
        answered = outcome.answered and outcome.status is not None and outcome.status < 300
        # The answer's own count when the gateway could read one, else what was reserved.
        images = (self.n if outcome.images is None else outcome.images) if answered else 0
        tokens = outcome.usage.get("total_tokens", 0) if answered else 0
        try:
            await self.admission.store.settle(self.key_id, self.lease, answered=answered,
                                              images=images, tokens=tokens)
        except Exception as exc:  # any store failure: what the client receives never changes
            if not answered:
                # Nothing to count: the lease expires by itself and gives the reservation back.
                log.warning("key %s: releasing a lease failed (%s); it will expire",
                            self.key_id, exc)
                return
            # The upstream was paid for this answer: keep trying (settling is idempotent, so
            # a first attempt that did run is never counted twice).
            log.warning("key %s: settling a lease failed (%s); retrying", self.key_id, exc)
            _background(self._settle_later(images, tokens))

    async def _settle_later(self, images: int, tokens: int) -> None:
        deadline = time.monotonic() + self.admission.settle_retry_seconds
        delay = 0.25
        while time.monotonic() + delay < deadline:
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)
            try:
                await self.admission.store.settle(self.key_id, self.lease, answered=True,
                                                  images=images, tokens=tokens)
            except Exception:
                continue
            log.info("key %s: lease settled late", self.key_id)
            return
        log.error("key %s: a settle was given up after %gs; its usage (%d images, %d tokens) "
                  "is lost", self.key_id, self.admission.settle_retry_seconds, images, tokens)


class QuotaAdmission(Admission):
    """Per-key limits through a QuotaStore; key records cached for at most `cache_seconds`,
    and believed while the store is away (failing open) for at most `stale_seconds`."""

    def __init__(self, store: QuotaStore, *, fail_open: bool, cache_seconds: float,
                 lease_ttl_seconds: float, settle_retry_seconds: float = 600,
                 stale_seconds: float = 300) -> None:
        self.store = store
        self.fail_open = fail_open
        self.cache_seconds = cache_seconds
        self.stale_seconds = stale_seconds
        self.renewer = Renewer(store, lease_ttl_seconds / 3)
        self.settle_retry_seconds = settle_retry_seconds
        self._cache: dict[str, tuple[float, KeyRecord | None]] = {}  # id: (read at, record)
        self._fetching: dict[str, asyncio.Future[KeyRecord | None]] = {}
        self._store_warning = logs.Throttled(log)
        metrics.store_result(True)  # presumed up until a call says otherwise

    async def authenticate(self, authorization: str | None) -> Principal:
        secret = bearer_secret(authorization)
        if secret is None:
            raise Unauthorized("Missing or malformed API key: send Authorization: Bearer sk-gw-...")
        key_hash = hash_secret(secret)
        record = await self._record(id_for_hash(key_hash))
        if record is None or record.hash != key_hash or record.status != "active":
            raise Unauthorized("Incorrect API key provided.")
        return KeyPrincipal(record, key_hash)

    async def _record(self, key_id: str) -> KeyRecord | None:
        now = time.monotonic()
        cached = self._cache.get(key_id)
        if cached is not None and now - cached[0] < self.cache_seconds:
            return cached[1]
        # One read per key at a time: a burst of a key's requests (thousands at once, or every
        # time its cache entry ages out) shares it instead of each asking the store.
        fetch = self._fetching.get(key_id)
        if fetch is None:
            fetch = self._fetching[key_id] = asyncio.ensure_future(self.store.get_key(key_id))
            fetch.add_done_callback(lambda done: self._fetched(key_id, done))
        try:
            record = await asyncio.shield(fetch)
        except StoreUnavailable as exc:
            self._unavailable(exc)
            # Fail open, but a key never seen (or not for `stale_seconds`: it may have been
            # revoked since) cannot be told from a guess.
            if cached is None or now - cached[0] > self.stale_seconds:
                raise ServiceUnavailable("The gateway cannot check API keys right now; retry "
                                         "shortly.", headers={"retry-after": "1"}) from None
            return cached[1]
        if len(self._cache) > 100_000:
            self._cache.clear()
        self._cache[key_id] = (now, record)
        return record

    def _fetched(self, key_id: str, done: asyncio.Future[KeyRecord | None]) -> None:
        self._fetching.pop(key_id, None)
        if not done.cancelled():
            done.exception()  # retrieved, even if every request waiting on it has gone

    def check_model(self, principal: Principal, model: str) -> None:
        assert isinstance(principal, KeyPrincipal)
        allowed = principal.record.models
        if allowed and model not in allowed:
            raise Forbidden(f"This API key may not use model '{model}'.", param="model",
                            code="model_not_allowed")

    async def admit(self, principal: Principal, edit: EditRequest) -> Ticket:
        assert isinstance(principal, KeyPrincipal)
        lease = uuid.uuid4().hex
        try:
            decision = await self.store.admit(principal.hash, edit.model.name, edit.n, lease)
        except StoreUnavailable as exc:
            # The script may have run before the reply was lost: give its lease back if so.
            release = self.store.settle(principal.id, lease, answered=False, images=0, tokens=0)
            _background(release)
            self._unavailable(exc)
            return _OPEN_TICKET  # fail open: admitted without a reservation
        headers = rate_limit_headers(decision.windows)
        if decision.status == OK:
            return QuotaTicket(self, principal.id, lease, edit.n, headers)
        if decision.status == UNKNOWN_KEY:
            raise Unauthorized("Incorrect API key provided.")
        if decision.status == MODEL:
            raise Forbidden(f"This API key may not use model '{edit.model.name}'.", param="model",
                            code="model_not_allowed")
        raise _refusal(decision, headers)

    async def headers_for(self, principal: Principal) -> dict[str, str]:
        try:
            found = await self.store.usage(principal.id)
        except StoreUnavailable:
            return {}  # best effort: the answer itself matters more
        return rate_limit_headers(found.windows) if found else {}

    async def usage(self, principal: Principal) -> Usage | None:
        try:
            return await self.store.usage(principal.id)
        except StoreUnavailable:
            raise ServiceUnavailable("Usage cannot be read right now; retry shortly.") from None

    async def ready(self) -> tuple[bool, str]:
        """(ready, status): 'ok', 'degraded' (store away, failing open) or 'unavailable'."""
        try:
            await self.store.ping()
        except StoreUnavailable:
            return (True, "degraded") if self.fail_open else (False, "unavailable")
        return True, "ok"

    def _unavailable(self, exc: StoreUnavailable) -> None:
        """Fail closed (503, retryable), or log and go on when failing open."""
        if not self.fail_open:
            self._store_warning.warning("quota store unavailable, refusing (fail closed): %s", exc)
            raise ServiceUnavailable("The gateway cannot check quotas right now; retry shortly.",
                                     headers={"retry-after": "1"})
        self._store_warning.warning("quota store unavailable, admitting (fail open): %s", exc)

    async def start(self) -> None:
        try:
            await self.store.warm()
        except StoreUnavailable as exc:
            log.warning("quota store not reachable at start-up (%s); requests will retry it", exc)

    async def aclose(self) -> None:
        self.renewer.stop()
        await self.store.aclose()


class Renewer:
    """Renews the leases of every request in flight here, every `every` seconds: one store call
    per key, not a timer and a call per request (3,000 requests in flight for a minute each
    would otherwise be 150 store calls a second). A lease is renewed at most `every` seconds
    after it was taken, well inside its TTL (three times `every`)."""

    def __init__(self, store: QuotaStore, every: float) -> None:
        self.store = store
        self.every = every
        self._leases: dict[str, set[str]] = {}  # key id -> leases in flight here
        self._timer: asyncio.TimerHandle | None = None

    def add(self, key_id: str, lease: str) -> None:
        self._leases.setdefault(key_id, set()).add(lease)
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.every, self._tick)

    def discard(self, key_id: str, lease: str) -> None:
        leases = self._leases.get(key_id)
        if leases is not None:
            leases.discard(lease)
            if not leases:
                del self._leases[key_id]

    def _tick(self) -> None:
        self._timer = None
        for key_id, leases in self._leases.items():
            _background(self._renew(key_id, list(leases)))
        if self._leases:
            self._timer = asyncio.get_running_loop().call_later(self.every, self._tick)

    async def _renew(self, key_id: str, leases: list[str]) -> None:
        try:
            await self.store.renew(key_id, leases)
        except Exception as exc:  # the next tick tries again (the TTL is three ticks long)
            log.warning("key %s: renewing %d leases failed (%s)", key_id, len(leases), exc)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


def _refusal(decision: Decision, headers: dict[str, str]) -> RateLimited | QuotaExceeded:
    """The 429 for a limit the store refused: rpm and concurrency are worth retrying after the
    time given, spent images and tokens are not (x-should-retry: false)."""
    retry_ms = max(1, decision.retry_after_ms)
    if decision.status in (RPM, CONCURRENCY):
        what = "requests per minute" if decision.status == RPM else "concurrent requests"
        return RateLimited(f"Rate limit reached for {what} on this API key. "
                           f"Try again in {duration(retry_ms)}.",
                           headers=headers | {"retry-after": str(math.ceil(retry_ms / 1000)),
                                              "retry-after-ms": str(retry_ms)})
    what = "images per day" if decision.status == IMAGES else "tokens per month"
    return QuotaExceeded(
        f"You exceeded this API key's quota of {what}; it resets in {duration(retry_ms)}.",
        headers=headers | {"x-should-retry": "false"})


def _background(coro: Coroutine[Any, Any, None]) -> None:
    """Run best-effort bookkeeping without holding the request (errors are logged)."""
    task = asyncio.ensure_future(coro)
    _PENDING.add(task)
    task.add_done_callback(_PENDING.discard)
    task.add_done_callback(lambda t: t.cancelled() or t.exception())  # retrieve, never raise


_PENDING: set[asyncio.Task[None]] = set()


def rate_limit_headers(windows: dict[str, Window]) -> dict[str, str]:
    """x-ratelimit-{limit,remaining,reset}-{requests,images,tokens} for the limits the key has."""
    headers = {}
    for name, w in windows.items():
        if not w.limit:
            continue
        headers[f"x-ratelimit-limit-{name}"] = str(w.limit)
        headers[f"x-ratelimit-remaining-{name}"] = str(w.remaining)
        headers[f"x-ratelimit-reset-{name}"] = duration(w.reset_ms)
    return headers


def duration(ms: int) -> str:
    """OpenAI's duration format: 20ms, 1s, 6m0s, 1h2m3s."""
    if ms < 1000:
        return f"{ms}ms"
    seconds = ms / 1000
    hours, rest = divmod(int(seconds), 3600)
    minutes = rest // 60
    secs = seconds - hours * 3600 - minutes * 60
    text = f"{secs:.3f}".rstrip("0").rstrip(".") + "s"
    if hours:
        return f"{hours}h{minutes}m{text}"
    return f"{minutes}m{text}" if minutes else text
