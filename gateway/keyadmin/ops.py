"""Key operations shared by the `gateway keys` CLI and the admin HTTP API, so both accept
exactly the same names, limits, models and metadata, and show usage in one shape."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator

from gateway.keys import LIMIT_NAMES, KeyRecord, Limits
from gateway.quota.base import QuotaStore, Usage

MAX_LIMIT = 10**15  # stays exact as a Lua number (a double) in the Redis scripts
MAX_METADATA_BYTES = 16 * 1024
KEY_ID = re.compile(r"key_[0-9a-f]{16}")  # what `id_for_hash` makes and [keys.ID] must be
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class _KeyName(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field("", min_length=1, max_length=200)

    @field_validator("name")
    @classmethod
    def _printable_name(cls, v: str) -> str:
        if _CONTROL.search(v):
            raise ValueError("must not contain control characters")
        return v


# One field per limit of `Limits`, in its order, after the name.
_KeyLimits = create_model(
    "_KeyLimits", __base__=_KeyName, __module__=__name__,
    **{name: (int, Field(0, ge=0, le=MAX_LIMIT, strict=True)) for name in LIMIT_NAMES})


class KeyChanges(_KeyLimits):  # type: ignore[misc,valid-type]
    """What an operator may set on a key; a PATCH applies only the fields it names. Strict, so a
    limit is a JSON integer (never "5", 5.0 or true) and a typo is an unknown field, not ignored."""

    models: list[str] = Field(default_factory=list, max_length=1000)  # empty: every model
    metadata: dict[str, Any] = Field(default_factory=dict)

    @field_validator("models")
    @classmethod
    def _model_names(cls, v: list[str]) -> list[str]:
        # The Redis store keeps the list comma-separated, so a comma cannot be part of a name.
        for name in v:
            if not name or name != name.strip() or "," in name or _CONTROL.search(name):
                raise ValueError(f"{name!r} is not a model name (no commas, no surrounding "
                                 "spaces, not empty)")
            if len(name) > 200:
                raise ValueError("a model name has at most 200 characters")
        return list(dict.fromkeys(v))

    @field_validator("metadata")
    @classmethod
    def _small_json(cls, v: dict[str, Any]) -> dict[str, Any]:
        try:
            size = len(json.dumps(v, allow_nan=False, ensure_ascii=False).encode())
        except (ValueError, UnicodeEncodeError):
            raise ValueError("must be plain JSON (no NaN or Infinity, valid text)") from None
        if size > MAX_METADATA_BYTES:
            raise ValueError(f"is {size} bytes as JSON; at most {MAX_METADATA_BYTES}")
        return v


class KeyCreate(KeyChanges):
    """A new key: a name is required; a limit left out is no limit of that kind."""

    name: str = Field(min_length=1, max_length=200)


def describe_error(exc: ValidationError) -> tuple[str, str | None, str]:
    """The first problem of a body as (message, param, code), in OpenAI's terms."""
    err = exc.errors(include_url=False)[0]
    param = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err["loc"]).lstrip(".")
    if err["type"] == "extra_forbidden":
        return f"Unknown parameter: '{param}'.", param, "unknown_parameter"
    if err["type"] == "missing":
        return f"Missing required parameter: '{param}'.", param, "missing_required_parameter"
    if not param:
        return f"The body must be a JSON object: {err['msg']}.", None, "invalid_value"
    msg = err["msg"].removeprefix("Value error, ")
    return f"Invalid value for '{param}': {msg}.", param, "invalid_value"


def new_record(spec: KeyCreate) -> tuple[KeyRecord, str]:
    """A record for `spec` and its secret (shown once, never stored)."""
    limits = Limits(**{name: getattr(spec, name) for name in LIMIT_NAMES})
    return KeyRecord.new(spec.name, limits, tuple(spec.models), dict(spec.metadata))


def changed(record: KeyRecord, changes: KeyChanges) -> KeyRecord:
    """`record` with the fields `changes` names; the others (status, hash, created) untouched."""
    given = changes.model_fields_set
    limits = replace(record.limits, **{n: getattr(changes, n) for n in LIMIT_NAMES if n in given})
    return replace(
        record, limits=limits,
        name=changes.name if "name" in given else record.name,
        models=tuple(changes.models) if "models" in given else record.models,
        metadata=dict(changes.metadata) if "metadata" in given else record.metadata)


async def find_key(store: QuotaStore, key_id: str) -> KeyRecord | None:
    """The record, or None; ids that cannot be ours never reach the store."""
    return await store.get_key(key_id) if KEY_ID.fullmatch(key_id) else None


async def update_key(store: QuotaStore, key_id: str, changes: KeyChanges) -> KeyRecord | None:
    record = await find_key(store, key_id)
    if record is None:
        return None
    # Written without its status: an update racing a revocation cannot bring the key back.
    await store.update_key(record.id, changed(record, changes))
    return await store.get_key(record.id)


async def revoke_key(store: QuotaStore, key_id: str) -> KeyRecord | None:
    """Mark the key revoked; the record stays, for its history and metadata."""
    record = await find_key(store, key_id)
    if record is None:
        return None
    if record.status != "revoked":
        record = replace(record, status="revoked")
        await store.update_key(record.id, record, status_only=True)
    return record


def usage_view(usage: Usage | None) -> dict[str, Any] | None:
    """Usage in the shape GET /v1/usage answers (limit 0: unlimited), the same numbers the
    x-ratelimit-* headers carry: for requests, used is the admissions of the last 60 s and reset
    when remaining next grows, so remaining is what the next requests get."""
    if usage is None:
        return None
    return {"in_flight": usage.in_flight,
            "limits": {name: {"limit": w.limit, "used": w.used, "remaining": w.remaining,
                              "reset_seconds": round(w.reset_ms / 1000, 3)}
                       for name, w in usage.windows.items()}}
