"""The admission step between reading the fields and opening the upstream request.

The route calls `authenticate` before reading the body and `admit` once the fields are valid;
`Ticket.finish` is called exactly once, however the request ends. This issue ships the open
gateway (`OpenAdmission`); keys and quotas plug in here without reshaping the route.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from gateway.catalog import ModelSpec


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
    usage: dict[str, int] = field(default_factory=dict)
    images: int = 0


class Principal:
    """Who is calling; the open gateway has one anonymous caller."""

    id = "anonymous"


class Ticket:
    """An admitted request's reservation; the open gateway reserves nothing."""

    headers: dict[str, str] = {}

    async def finish(self, outcome: Outcome) -> None:
        return None


class Admission:
    """Base admission: anyone, any model, no limits."""

    async def authenticate(self, authorization: str | None) -> Principal:
        return _ANONYMOUS

    async def admit(self, principal: Principal, edit: EditRequest) -> Ticket:
        return _OPEN_TICKET

    async def aclose(self) -> None:
        return None


OpenAdmission = Admission
_ANONYMOUS = Principal()
_OPEN_TICKET = Ticket()
