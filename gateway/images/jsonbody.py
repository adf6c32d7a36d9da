"""A JSON request body without images (a generation): read whole within its bound, turned into
the plain values the rules judge, and written back for the upstream with each field's JSON type.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

from gateway.catalog import ModelSpec
from gateway.errors import InvalidRequest
from gateway.images.client import Client

_TEXT = frozenset({"model", "prompt"})  # strings in OpenAI's schema, whatever the catalog says


def is_json(content_type: str) -> bool:
    kind = content_type.split(";", 1)[0].strip().lower()
    return kind == "application/json" or (kind.startswith("application/") and
                                          kind.endswith("+json"))


async def read(client: Client) -> dict[str, Any]:
    """The whole body as a JSON object (the client's bound applies as it arrives)."""
    chunks = []
    more = True
    while more:
        chunk, more = await client.read(clocked=True)
        chunks.append(chunk)
    try:
        body = json.loads(b"".join(chunks))
    except (ValueError, UnicodeDecodeError, RecursionError):  # RecursionError: absurd nesting
        raise InvalidRequest("We could not parse the JSON body of your request.",
                             code="invalid_json") from None
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object.", code="invalid_json")
    return body


def fields_of(body: Mapping[str, Any]) -> dict[str, str]:
    """Values as the rules take them (as a form would carry them): strings, numbers and booleans
    written out; null is a field left out."""
    fields = {}
    for name, value in body.items():
        if value is None:
            continue
        if name in _TEXT and not isinstance(value, str):
            raise InvalidRequest(f"Invalid type for '{name}': expected a string.", param=name,
                                 code="invalid_type")
        if isinstance(value, bool):
            fields[name] = "true" if value else "false"
        elif isinstance(value, str):
            fields[name] = value
        elif isinstance(value, int | float) and math.isfinite(value):
            fields[name] = json.dumps(value)
        else:
            raise InvalidRequest(f"Invalid type for '{name}': expected a string, a number or a "
                                 "boolean.", param=name, code="invalid_type")
    return fields


def encode(spec: ModelSpec, values: Mapping[str, str], body: Mapping[str, Any]) -> bytes:
    """The upstream's body: each judged value in its rule's type (int, bool, else string); fields
    the model accepts but never sends (`drop`) left out; an unchecked field of a model whose
    fields pass through as the client sent it."""
    out: dict[str, Any] = {}
    for name, value in values.items():
        rule = spec.fields.get(name)
        if rule is None:
            out[name] = body.get(name, value) if name not in ("model", "prompt") else value
        elif rule.drop:
            continue
        elif rule.kind == "int":
            out[name] = int(value)
        elif rule.kind == "bool":
            out[name] = value == "true"
        else:
            out[name] = value
    # ASCII: a lone surrogate the client escaped stays an escape (valid JSON), never an error.
    return json.dumps(out).encode()
