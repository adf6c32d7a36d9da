"""Per-key limits through a QuotaStore: the keyed implementation of the admission interface,
and its tickets (a lease in the store, renewed while the request runs, settled once).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid

from gateway import logs, metrics
from gateway.admission.base import OPEN_TICKET, Admission, ImageRequest, Outcome, Principal, Ticket
from gateway.admission.headers import duration, rate_limit_headers
from gateway.admission.renewer import Renewer
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
)
from gateway.tasks import background
from gateway.usage import charged_tokens

log = logging.getLogger("gateway.admission")


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
        tokens = charged_tokens(outcome.usage) if answered else 0
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
            background(self._settle_later(images, tokens))

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
        return Principal(key_id=record.id, name=record.name, hash=key_hash,
                         models=record.models, max_concurrent=record.limits.max_concurrent)

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

    async def admit(self, principal: Principal, request: ImageRequest) -> Ticket:
        assert principal.key_id is not None  # authenticate() gives every caller here a key
        lease = uuid.uuid4().hex
        try:
            decision = await self.store.admit(
                principal.hash, request.allowed_as or request.model.name, request.n, lease)
        except StoreUnavailable as exc:
            # The script may have run before the reply was lost: give its lease back if so.
            release = self.store.settle(principal.key_id, lease, answered=False, images=0, tokens=0)
            background(release)
            self._unavailable(exc)
            return OPEN_TICKET  # fail open: admitted without a reservation
        headers = rate_limit_headers(decision.windows)
        if decision.status == OK:
            return QuotaTicket(self, principal.key_id, lease, request.n, headers)
        if decision.status == UNKNOWN_KEY:
            raise Unauthorized("Incorrect API key provided.")
        if decision.status == MODEL:
            name = request.allowed_as or request.model.name
            raise Forbidden(f"This API key may not use model '{name}'.", param="model",
                            code="model_not_allowed")
        raise _refusal(decision, headers)

    async def headers_for(self, principal: Principal) -> dict[str, str]:
        assert principal.key_id is not None
        try:
            found = await self.store.usage(principal.key_id)
        except StoreUnavailable:
            return {}  # best effort: the answer itself matters more
        return rate_limit_headers(found.windows) if found else {}

    async def usage(self, principal: Principal) -> Usage | None:
        assert principal.key_id is not None
        try:
            return await self.store.usage(principal.key_id)
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
