"""The gateway's OpenAPI document (/openapi.json), checked by schemathesis against the gateway.

Every documented operation is generated from the served document (its examples, the coverage
phase's boundary, negative and wrong-method cases, then random fuzzing) and sent to a real
`gateway serve` against the fake upstream, on an open gateway and on one with keys. Every answer
must be no 5xx and must match the document: status, content type, headers and body (SSE events
one by one). Random bytes as images give 400s; schemathesis's own tiny PNG, JPEG and WebP samples
get through to the upstream and give 200s.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from email.parser import BytesParser
from email.policy import HTTP
from typing import Any

import httpx
import jsonschema_rs
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import CheckContext, CheckFunction

from gateway.keys import KeyRecord, Limits
from tests.conftest import GatewayProcess
from tests.support.images import png

EXAMPLES = 25  # per operation and gateway in the fuzzing phase; the other phases add their own


def negative_data_rejection(ctx: CheckContext, response: schemathesis.Response,
                            case: schemathesis.Case) -> bool | None:
    """schemathesis's check, judged on the multipart body as it went out.

    Multipart carries only text: a boolean generated for a text field (`user=true`) arrives as
    the valid text "true". schemathesis allows for that, but not in a body that has files too
    (it compares its generated file objects with `type: string`), so it would call a correct
    acceptance a failure.
    """
    if case.media_type == "multipart/form-data" and _valid_as_sent(case, response):
        return None
    return schemathesis.checks.negative_data_rejection(ctx, response, case)


def _valid_as_sent(case: schemathesis.Case, response: schemathesis.Response) -> bool:
    """Whether the body the gateway received satisfies the document: each text part read as text
    or as the JSON scalar it spells ("3", "true"), each file part as a file."""
    request = response.request
    body = request.body if isinstance(request.body, bytes) else str(request.body or "").encode()
    head = f"Content-Type: {request.headers.get('Content-Type', '')}\r\n\r\n".encode()
    schema = case.operation.schema.raw_schema["components"]["schemas"]["ImageEditRequest"]
    fields = schema["properties"]
    sent: dict[str, list[Any]] = {}
    for part in BytesParser(policy=HTTP).parsebytes(head + body).iter_parts():
        payload = part.get_payload(decode=True)
        text = payload.decode(errors="replace") if isinstance(payload, bytes) else ""
        value: Any = "" if part.get_filename() is not None else text  # a file: binary string
        name = str(part.get_param("name", header="content-disposition"))
        rule = fields.get(name, {})
        if part.get_filename() is None and rule.get("type") != "array":
            try:
                readings = [text, json.loads(text)]
            except ValueError:
                readings = [text]
            value = next((r for r in readings if jsonschema_rs.is_valid(rule, r)), text)
        sent.setdefault(name, []).append(value)
    whole = {name: values if fields.get(name, {}).get("type") == "array" or len(values) > 1
             else values[0] for name, values in sent.items()}
    return jsonschema_rs.is_valid(schema, whole)


# positive_data_acceptance is left out: whether a request is valid depends on the model (its
# catalog entry) and on the image bytes, which a JSON Schema cannot say, so "valid by the
# document" does not mean "accepted" (a random size or a mask without alpha is a 400 by design).
CHECKS: list[CheckFunction] = [
    *(getattr(schemathesis.checks, name) for name in (
        "not_a_server_error", "status_code_conformance", "content_type_conformance",
        "response_headers_conformance", "response_schema_conformance", "missing_required_header",
        "unsupported_method", "allow_header_conformance", "ignored_auth")),
    negative_data_rejection,
]


class Target:
    """A gateway under test and the Authorization header its operations need."""

    def __init__(self, gateway: GatewayProcess, headers: dict[str, str]) -> None:
        self.gateway = gateway
        self.headers = headers


@pytest.fixture(scope="module", params=["open", "keyed"])
def target(request: pytest.FixtureRequest, start_gateway: Callable[..., GatewayProcess]) -> Target:
    if request.param == "open":
        return Target(start_gateway(), {})
    record, secret = KeyRecord.new("openapi", Limits())
    gateway = start_gateway(config=f'[keys.{record.id}]\nhash = "{record.hash}"\n')
    return Target(gateway, {"Authorization": f"Bearer {secret}"})


@pytest.fixture
def api_schema(request: pytest.FixtureRequest, target: Target) -> schemathesis.BaseSchema:
    request.node._nodeid = request.node.nodeid  # schemathesis 4.32 sets the pre-9.2 pytest name
    config = schemathesis.Config.from_dict({"generation": {"max-examples": EXAMPLES}})
    return schemathesis.openapi.from_url(f"{target.gateway.url}/openapi.json", config=config)


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=EXAMPLES, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
def test_gateway_conforms_to_its_openapi_document(case: schemathesis.Case, target: Target) -> None:
    case.call_and_validate(headers=target.headers, checks=CHECKS, timeout=10)


def test_known_good_edits_conform(target: Target) -> None:
    """A JSON and an SSE answer for sure, whatever the fuzzing happened to reach."""
    loaded = schemathesis.openapi.from_url(f"{target.gateway.url}/openapi.json")
    operation = loaded["/v1/images/edits"]["POST"]
    for fields in ({}, {"stream": True, "partial_images": 2, "n": 2}, {"model": "dall-e-2"}):
        body = {"image": [png()], "prompt": "a hat", "model": "gpt-image-1", **fields}
        case = operation.Case(body=body, media_type="multipart/form-data")
        response = case.call_and_validate(headers=target.headers, checks=CHECKS, timeout=10)
        assert response.status_code == 200, (fields, response.text)
        media_type = "text/event-stream" if "stream" in fields else "application/json"
        assert response.headers["content-type"][0].startswith(media_type)


def test_document_describes_the_edit_route(target: Target) -> None:
    doc = httpx.get(f"{target.gateway.url}/openapi.json").json()
    edit = doc["paths"]["/v1/images/edits"]["post"]
    form = edit["requestBody"]["content"]["multipart/form-data"]["schema"]
    fields = doc["components"]["schemas"][form["$ref"].rsplit("/", 1)[1]]
    assert fields["required"] == ["prompt"]
    assert sorted(fields["properties"]) == sorted([
        "image", "image[]", "prompt", "mask", "model", "n", "size", "quality", "background",
        "moderation", "output_format", "output_compression", "input_fidelity", "partial_images",
        "stream", "response_format", "user", "safety_identifier", "complexity", "frame_count",
        "frame_duration_ms"])
    types = {name: rule["type"] for name, rule in fields["properties"].items()}
    assert types["image"] == types["image[]"] == "array"
    assert fields["properties"]["image"]["items"] == {"type": "string", "format": "binary"}
    assert types["mask"] == types["prompt"] == types["size"] == "string"
    assert types["n"] == types["output_compression"] == types["partial_images"] == "integer"
    assert types["stream"] == "boolean"
    assert set(edit["responses"]) == {"200", "400", "401", "403", "408", "413", "429", "502",
                                      "503", "504", "4XX", "5XX"}
    assert set(edit["responses"]["200"]["content"]) == {"application/json", "text/event-stream"}
    error = {"$ref": "#/components/schemas/Error"}
    assert all(answer["content"]["application/json"]["schema"] == error
               for status, answer in edit["responses"].items() if status != "200")
    detail = doc["components"]["schemas"]["ErrorDetail"]
    assert detail["required"] == ["message", "type", "param", "code"]
    assert {"401", "503"} <= set(doc["paths"]["/v1/models"]["get"]["responses"])
    assert {"401", "404", "503"} <= set(doc["paths"]["/v1/usage"]["get"]["responses"])
    assert "503" in doc["paths"]["/readyz"]["get"]["responses"]
    assert not any(path.startswith("/admin") for path in doc["paths"])
    # A key is required where the gateway has keys; an open gateway takes any.
    assert doc.get("security") == ([{"ApiKeyAuth": []}] if target.headers else None)
    assert doc["paths"]["/healthz"]["get"]["security"] == []
