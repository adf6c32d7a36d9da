"""The gateway's own API keys: how a secret is made, hashed and named, and what a key record holds.

Only the SHA-256 of a secret is ever stored (the secret's 256 random bits make a pepper
unnecessary). A key's id is derived from that hash, so a request's secret leads straight to its
record and counters, which share one Redis Cluster hash tag: admission is one round trip.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from dataclasses import dataclass, field, fields
from typing import Any

SECRET_PREFIX = "sk-gw-"
UNLIMITED = 0  # a limit of 0 means "no limit of this kind"


def new_secret() -> str:
    """`sk-gw-` and 43 URL-safe characters (256 random bits)."""
    return SECRET_PREFIX + secrets.token_urlsafe(32)


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def id_for_hash(key_hash: str) -> str:
    """The public id: 64 bits of the hash, useless for finding the secret."""
    return f"key_{key_hash[:16]}"


def bearer_secret(authorization: str | None) -> str | None:
    """The secret of an `Authorization: Bearer sk-gw-...` header, if it looks like one of ours."""
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token.startswith(SECRET_PREFIX) or len(token) > 200:
        return None
    return token


def _limit(unit: str, meaning: str) -> Any:
    return field(default=UNLIMITED, metadata={"unit": unit, "meaning": meaning})


@dataclass
class Limits:
    """Per-key limits; 0 is unlimited. The one place limit names are written: the CLI's options,
    the admin API's body, the config's [keys.ID] tables and the stores' records are made from
    these fields (`LIMIT_NAMES`, `LIMIT_UNITS`)."""

    rpm: int = _limit("requests/min", "requests per minute")
    images_per_day: int = _limit("images/day", "images per UTC day")
    tokens_per_month: int = _limit("tokens/month", "tokens per UTC month")
    max_concurrent: int = _limit("concurrent", "requests at once")

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in LIMIT_NAMES}


LIMIT_NAMES = tuple(f.name for f in fields(Limits))
LIMIT_UNITS = {f.name: f.metadata["unit"] for f in fields(Limits)}
LIMIT_MEANINGS = {f.name: f.metadata["meaning"] for f in fields(Limits)}


@dataclass
class KeyRecord:
    id: str
    hash: str
    name: str
    created: int = field(default_factory=lambda: int(time.time()))
    status: str = "active"  # active | revoked
    limits: Limits = field(default_factory=Limits)
    models: tuple[str, ...] = ()  # empty: every model
    metadata: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def new(cls, name: str, limits: Limits | None = None, models: tuple[str, ...] = (),
            metadata: dict[str, Any] | None = None) -> tuple[KeyRecord, str]:
        """A new record and its secret (shown once, never stored)."""
        secret = new_secret()
        key_hash = hash_secret(secret)
        record = cls(id_for_hash(key_hash), key_hash, name, limits=limits or Limits(),
                     models=models, metadata=metadata or {})
        return record, secret

    def public(self) -> dict[str, Any]:
        """The record as the CLI and the admin API show it: no hash, no secret."""
        return {"id": self.id, "name": self.name, "created": self.created, "status": self.status,
                "limits": self.limits.as_dict(), "models": list(self.models),
                "metadata": self.metadata}
