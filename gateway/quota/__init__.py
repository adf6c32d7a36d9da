"""Quota stores behind one interface (base.QuotaStore): Redis, and in-process."""

from __future__ import annotations

from gateway.keys import LIMIT_NAMES, KeyRecord, Limits
from gateway.quota.base import QuotaStore
from gateway.settings import Settings


def build_store(settings: Settings) -> QuotaStore | None:
    """The store the settings ask for: Redis; else in-process, holding the config's keys (and
    those the admin API creates); None for an open gateway (no Redis, no keys, no admin key)."""
    lease_ms = int(settings.lease_ttl_seconds * 1000)
    if settings.redis_url:
        from gateway.quota.redis_store import RedisStore

        return RedisStore(settings.redis_url, timeout=settings.redis_timeout, lease_ttl_ms=lease_ms,
                          max_connections=settings.redis_max_connections)
    if not settings.keys and settings.admin_key is None:
        return None
    from gateway.quota.memory import MemoryStore

    store = MemoryStore(lease_ttl_ms=lease_ms)
    for key_id, entry in settings.keys.items():
        store.seed(KeyRecord(
            id=key_id, hash=entry.hash, name=entry.name, created=entry.created,
            limits=Limits(**{name: getattr(entry, name) for name in LIMIT_NAMES}),
            models=tuple(entry.models), metadata=entry.metadata))
    return store
