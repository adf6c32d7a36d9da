"""The admission interface, complete, and the open gateway's implementation (no keys: anyone,
any model, no limits).

A route calls `authenticate` before reading the body (401), judges the fields (403 for a model
the principal may not use, 400), then `admit` (429), so a bad request never spends quota;
`Ticket.finish` is called exactly once, however the request ends. Callers never ask which
implementation they hold: everything they need is on the interface.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from gateway.catalog import ModelSpec
from gateway.errors import NotFound

if TYPE_CHECKING:
    from gateway.quota.base import QuotaStore, Usage


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: one of the gateway's keys, or the open gateway's anonymous caller."""

    key_id: str | None = None  # None: anonymous
    name: str = ""
    hash: str = field(default="", repr=False)
    models: tuple[str, ...] = ()  # the models it may use; empty: every model
    max_concurrent: int = 0  # its own concurrency limit here; 0: the instance's


@dataclass(slots=True)
class ImageRequest:
    """What admission needs to know about a judged image request."""

    request_id: str
    model: ModelSpec
    n: int
    stream: bool
    allowed_as: str = ""  # the name the key's model list allows it under (an alias's, or model's)


@dataclass(slots=True)
class Outcome:
    """How an admitted request ended: whether the upstream answered, and what it reported."""

    answered: bool
    status: int | None = None
    images: int | None = None  # final images the answer carried, when the gateway counted them
    usage: dict[str, int] = field(default_factory=dict)


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
    """The open gateway: anyone, any model, no limits."""

    store: QuotaStore | None = None  # where keys live (the admin API's); None: no keys

    async def authenticate(self, authorization: str | None) -> Principal:
        return ANONYMOUS

    async def admit(self, principal: Principal, request: ImageRequest) -> Ticket:
        return OPEN_TICKET

    async def headers_for(self, principal: Principal) -> dict[str, str]:
        """x-ratelimit-* headers for an answer that did not go through `admit`."""
        return {}

    async def usage(self, principal: Principal) -> Usage | None:
        raise NotFound("This gateway has no API keys, so no usage to show.")

    async def ready(self) -> tuple[bool, str]:
        """(ready, status): 'ok', 'degraded' (store away, failing open) or 'unavailable'."""
        return True, "ok"

    async def start(self) -> None:
        """At lifespan startup, before the first request."""
        return None

    async def aclose(self) -> None:
        return None


ANONYMOUS = Principal()
OPEN_TICKET = Ticket()  # shared: its headers are never changed
