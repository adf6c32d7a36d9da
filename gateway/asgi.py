"""ASGI types and the few request helpers shared by the raw edit route and the app."""

from __future__ import annotations

import re
import uuid
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

_REQUEST_ID = re.compile(r"[\x21-\x7e]{1,128}")


def headers_of(scope: Scope) -> dict[str, str]:
    return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}


def request_id(headers: dict[str, str]) -> str:
    """The client's x-request-id when it is a sane token, else a new one."""
    rid = headers.get("x-request-id", "")
    return rid if _REQUEST_ID.fullmatch(rid) else f"req_{uuid.uuid4().hex}"
