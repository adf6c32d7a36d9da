"""The OpenAPI document at /openapi.json: FastAPI's own, plus what FastAPI cannot see.

POST /v1/images/edits is raw ASGI, dispatched before FastAPI, so FastAPI does not know it exists.
The other routes return plain dicts and raise OpenAI-shaped errors, so FastAPI does not know
their answers either. This module holds both as data and merges them into the generated
document once. The suite checks the result with schemathesis (tests/e2e/test_openapi.py).

Field values that depend on the model (sizes, qualities, formats) are described, not enumerated:
the catalog is config, and the gateway also accepts what it normalizes ("PNG", " auto"), so an
enum would be narrower than what it accepts. Bounds (image count, prompt length, integer ranges)
come from the catalog the gateway runs with.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI

from gateway.catalog import Catalog
from gateway.images import EDITS_PATH, GENERATIONS_PATH
from gateway.images.rules import Bounds

Doc = dict[str, Any]


def _ref(name: str) -> Doc:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: str, description: str, headers: Doc | None = None) -> Doc:
    return {"description": description, "headers": headers or _REQUEST_ID,
            "content": {"application/json": {"schema": _ref(schema)}}}


def _error(description: str, headers: Doc | None = None) -> Doc:
    return _json("Error", description, headers)


_REQUEST_ID: Doc = {"x-request-id": {"$ref": "#/components/headers/RequestId"}}
_RETRY: Doc = {**_REQUEST_ID, "retry-after": {"$ref": "#/components/headers/RetryAfter"}}

_STRING: Doc = {"type": "string"}
_NULLABLE_STRING: Doc = {"type": ["string", "null"]}
_INTEGER: Doc = {"type": "integer"}
_BINARY: Doc = {"type": "string", "format": "binary"}
_IMAGES: Doc = {"type": "array", "items": _BINARY, "minItems": 1}  # maxItems: the catalog's

SCHEMAS: Doc = {
    "Error": {
        "type": "object", "required": ["error"],
        "description": "OpenAI's error shape; the SDKs read `param`, `code` and `type` from it.",
        "properties": {"error": _ref("ErrorDetail")},
    },
    "ErrorDetail": {
        "type": "object", "required": ["message", "type", "param", "code"],
        "properties": {"message": _STRING, "type": _STRING, "param": _NULLABLE_STRING,
                       "code": _NULLABLE_STRING},
    },
    "Image": {
        "type": "object",
        "properties": {"b64_json": _STRING, "url": _STRING, "revised_prompt": _STRING},
    },
    "ImagesUsage": {
        "type": "object",
        "properties": {
            "input_tokens": _INTEGER, "output_tokens": _INTEGER, "total_tokens": _INTEGER,
            "input_tokens_details": {"type": "object", "properties": {
                "text_tokens": _INTEGER, "image_tokens": _INTEGER}}},
    },
    "ImagesResponse": {
        "type": "object", "required": ["created"],
        "description": "The upstream's answer as it came; dall-e-2 reports no usage.",
        "properties": {
            "created": _INTEGER, "data": {"type": "array", "items": _ref("Image")},
            "background": _STRING, "output_format": _STRING, "size": _STRING, "quality": _STRING,
            "usage": _ref("ImagesUsage")},
    },
    "ImageEditEvent": {
        "type": "object", "required": ["type"],
        "description": "The JSON of one event: partial images, a completed image (with usage), "
                       "or `error` when the upstream broke off.",
        "properties": {
            "type": {"type": "string", "examples": [
                "image_edit.partial_image", "image_edit.completed",
                "image_generation.partial_image", "image_generation.completed", "error"]},
            "b64_json": _STRING, "created_at": _INTEGER, "partial_image_index": _INTEGER,
            "background": _STRING, "output_format": _STRING, "size": _STRING, "quality": _STRING,
            "usage": _ref("ImagesUsage"), "error": _ref("ErrorDetail")},
    },
    # Before OpenAPI 3.2's itemSchema, an event stream's `schema` describes each event.
    "ImageEditStreamEvent": {
        "type": "object", "required": ["data"],
        "properties": {
            "event": _STRING,
            "data": {"type": "string", "contentMediaType": "application/json",
                     "contentSchema": _ref("ImageEditEvent")}},
    },
    "Model": {
        "type": "object", "required": ["id", "object", "created", "owned_by"],
        "properties": {"id": _STRING, "object": {"const": "model"}, "created": _INTEGER,
                       "owned_by": _STRING,
                       "shutdown_date": {"type": ["string", "null"], "format": "date",
                                         "description": "The provider's announced shutdown "
                                                        "(YYYY-MM-DD), or null."}},
    },
    "ModelList": {
        "type": "object", "required": ["object", "data"],
        "properties": {"object": {"const": "list"}, "data": {"type": "array", "items": _ref("Model")}},
    },
    "KeyUsage": {
        "type": "object", "required": ["object", "key"],
        "properties": {
            "object": {"const": "usage"},
            "key": {"type": "object", "required": ["id", "name"],
                    "properties": {"id": _STRING, "name": _STRING}},
            "in_flight": _INTEGER,
            "limits": {"type": "object", "description": "`images` and `tokens` (limit 0: "
                       "unlimited), and `requests` when the key has a requests/minute limit.",
                       "additionalProperties": {"type": "object", "properties": {
                           "limit": _INTEGER, "used": _INTEGER, "remaining": _INTEGER,
                           "reset_seconds": {"type": "number"}}}}},
    },
    "Health": {
        "type": "object", "required": ["status"],
        "properties": {"status": _STRING, "reason": _STRING},
    },
}

HEADERS: Doc = {
    "RequestId": {"required": True, "schema": _STRING,
                  "description": "The client's x-request-id when it sent a sane one, else a new id."},
    "RetryAfter": {"schema": _STRING, "description": "Seconds to wait before retrying."},
}

# The multipart fields real clients send (see the wire contract); the catalog decides per model
# which of them a model takes and which values it accepts.
EDIT_FORM: Doc = {
    "type": "object",
    "required": ["prompt"],
    "anyOf": [{"required": ["image"]}, {"required": ["image[]"]}],
    "properties": {
        # An array in multipart is the part repeated: one `image` part is an array of one.
        "image": {**_IMAGES, "description": "Required, here or as `image[]`: one file, or several "
                  "(before the text fields, as curl sends them). PNG, JPEG or WebP, told from "
                  "their bytes"},  # + the catalog's count
        "image[]": {**_IMAGES, "description": "Several images, as the SDKs send a list."},
        "prompt": {"type": "string", "minLength": 1,
                   "description": "Not blank"},  # + the catalog's lengths
        "mask": {**_BINARY, "description": "PNG with alpha, the size of the first image."},
        "model": {"type": "string", "description": "A catalog model.",
                  "examples": ["gpt-image-2", "gpt-image-2.6-flare", "gpt-image-2.6-sunburst"]},
        "n": {"type": "integer"},
        "size": {"type": "string", "description": "Per model: `auto`, `1024x1024`, ...; "
                 "gpt-image-2 takes any WxH in multiples of 16.",
                 "examples": ["auto", "1024x1024", "1536x1024", "1024x1536", "512x512"]},
        "quality": {"type": "string", "examples": ["auto", "low", "medium", "high", "xhigh", "max"]},
        "complexity": {"type": "string", "examples": ["low", "medium", "high"],
                       "description": "gpt-image-2.6: how much the model plans before it renders."},
        "background": {"type": "string", "examples": ["auto", "opaque", "transparent"]},
        "moderation": {"type": "string", "examples": ["auto", "low"]},
        "output_format": {"type": "string", "examples": ["png", "jpeg", "webp", "gif", "svg"],
                          "description": "gif and svg on gpt-image-2.6: a GIF cannot stream, have "
                                         "partial images, a mask or output_compression; an SVG "
                                         "is one image."},
        "frame_count": {"type": "integer", "description": "GIF frames; their pixels together "
                        "within the model's budget."},
        "frame_duration_ms": {"type": "integer", "description": "Each GIF frame's delay."},
        "output_compression": {"type": "integer",
                               "description": "With output_format jpeg or webp."},
        "input_fidelity": {"type": "string", "examples": ["high", "low"]},
        "partial_images": {"type": "integer", "description": "With stream=true."},
        "stream": {"type": "boolean", "description": "true: the answer is Server-Sent Events."},
        "response_format": {"type": "string", "examples": ["b64_json", "url"]},
        "user": {"type": "string"},
        "safety_identifier": {"type": "string"},
    },
}

EDIT_ERRORS: Doc = {
    "400": _error("A bad value, size, count, format or mask; a field the model does not take; a "
                  "malformed body. `param` names the field (`image[1]` for the second image)."),
    "401": _error("A missing, unknown or revoked API key (`invalid_api_key`)."),
    "403": _error("The key may not use this model (`model_not_allowed`)."),
    "408": _error("The client sent no body bytes for `body_read_timeout` (`request_timeout`)."),
    "413": _error("The body is above `max_body_bytes` (`request_too_large`)."),
    "429": _error("`rate_limit_exceeded` (retry after `retry-after`) or `insufficient_quota` "
                  "(`x-should-retry: false`).", _RETRY),
    "502": _error("The upstream is unreachable, broke the connection or refused the gateway's "
                  "key (`upstream_unavailable`)."),
    "503": _error("At `max_in_flight` (`overloaded`), or the quota store is away.", _RETRY),
    "504": _error("The upstream was silent longer than `upstream_read_timeout`."),
    "4XX": _error("The upstream's own error, passed through (wrapped in this shape when the "
                  "upstream's body is not JSON)."),
    "5XX": _error("The upstream's own error, passed through (wrapped when not JSON)."),
}

EDITS: Doc = {"post": {
    "summary": "Edit images",
    "description": "OpenAI's `POST /v1/images/edits`, validated per model from the catalog and "
                   "streamed to the upstream as it arrives.",
    "operationId": "create_image_edit",
    "requestBody": {"required": True,
                    "content": {"multipart/form-data": {"schema": _ref("ImageEditRequest")}}},
    "responses": {
        "200": {"description": "JSON, or with stream=true Server-Sent Events "
                               "(`image_edit.partial_image`, `image_edit.completed`, `error`).",
                "headers": _REQUEST_ID,
                "content": {"application/json": {"schema": _ref("ImagesResponse")},
                            "text/event-stream": {"schema": _ref("ImageEditStreamEvent")}}},
        **EDIT_ERRORS},
}}

GENERATIONS: Doc = {"post": {
    "summary": "Generate images",
    "description": "OpenAI's `POST /v1/images/generations`: a JSON body judged by the same "
                   "catalog rules as an edit's fields, with the same keys and quotas.",
    "operationId": "create_image",
    "requestBody": {"required": True,
                    "content": {"application/json": {"schema": _ref("ImageGenerationRequest")}}},
    "responses": {
        "200": {"description": "JSON, or with stream=true Server-Sent Events "
                               "(`image_generation.partial_image`, `image_generation.completed`, "
                               "`error`).",
                "headers": _REQUEST_ID,
                "content": {"application/json": {"schema": _ref("ImagesResponse")},
                            "text/event-stream": {"schema": _ref("ImageEditStreamEvent")}}},
        **{k: v for k, v in EDIT_ERRORS.items() if k not in ("408",)},
        "400": _error("A bad value, or a field the model (or generations) does not take; a body "
                      "that is not a JSON object. `param` names the field."),
        "408": _error("The client stopped sending its body (`request_timeout`)."),
        "413": _error("The body is above `max_json_body_bytes` (`request_too_large`)."),
    },
}}

_KEY_ERRORS: Doc = {
    "401": _error("A missing, unknown or revoked API key (gateways with keys)."),
    "503": _error("The quota store is away and the key cannot be checked.", _RETRY),
}

# Per operation FastAPI generated: the answers to document. `security: []` marks the operations
# that are open on a gateway with keys too.
OPERATIONS: dict[tuple[str, str], Doc] = {
    ("/v1/models", "get"): {"responses": {
        "200": _json("ModelList", "The models the key may use (every model, without keys)."),
        **_KEY_ERRORS}},
    ("/v1/models/{model}", "get"): {"parameters": [
        {"name": "model", "in": "path", "required": True,
         "schema": {"type": "string", "examples": ["gpt-image-2", "gpt-image-2.6-flare"]}}], "responses": {
        "200": _json("Model", "The model."),
        "404": _error("Not in the catalog, or not among the key's models (`model_not_found`)."),
        **_KEY_ERRORS}},
    ("/v1/usage", "get"): {"responses": {
        "200": _json("KeyUsage", "The calling key's limits, usage and reset times."),
        "404": _error("The gateway has no API keys, or the key is gone."),
        **_KEY_ERRORS}},
    ("/healthz", "get"): {"security": [], "responses": {"200": _json("Health", "Alive.")}},
    ("/readyz", "get"): {"security": [], "responses": {
        "200": _json("Health", "Ready (`ok`), or `degraded`: the quota store is away and the "
                               "gateway admits keys it has seen."),
        "503": _json("Health", "Draining, or the quota store is away and the gateway fails "
                               "closed.")}},
    ("/metrics", "get"): {"security": [], "responses": {"200": {
        "description": "Prometheus text format.",
        "content": {"text/plain": {"schema": _STRING}}}}},
}

SECURITY: Doc = {"ApiKeyAuth": {"type": "http", "scheme": "bearer",
                                "description": "A gateway key, sk-gw-..."}}


def edit_form(catalog: Catalog) -> Doc:
    """The edit form's schema with the catalog's bounds: the most images, the longest prompt,
    and each integer's and text's range over the models that take the field."""
    form = copy.deepcopy(EDIT_FORM)
    props = form["properties"]
    specs = [*catalog.models.values(), *filter(None, [catalog.passthrough])]
    images = Bounds.of(catalog).max_images
    props["image"]["maxItems"] = props["image[]"]["maxItems"] = images
    props["image"]["description"] += f"; up to {images} images in all."
    longest = props["prompt"]["maxLength"] = max(s.prompt_max_chars for s in specs)
    fewer = ", ".join(f"{s.name}: {s.prompt_max_chars:,}" for s in specs
                      if s.prompt_max_chars < longest)
    props["prompt"]["description"] += f"; at most {longest:,} characters" + \
        (f" ({fewer})." if fewer else ".")
    props["model"]["description"] = f"A catalog model; default `{catalog.default_model}`."
    for name, prop in props.items():
        found = [s.fields[name] for s in specs if name in s.fields]
        ints = [r for r in found if r.kind == "int"]
        if ints and all(r.min is not None for r in ints):
            prop["minimum"] = min(r.min for r in ints if r.min is not None)
        if ints and all(r.max is not None for r in ints):
            prop["maximum"] = max(r.max for r in ints if r.max is not None)
        texts = [r for r in found if r.kind == "text"]
        if texts and all(r.max_chars is not None for r in texts):
            prop["maxLength"] = max(r.max_chars for r in texts if r.max_chars is not None)
    return form


def generation_body(catalog: Catalog) -> Doc:
    """The generation's JSON body: the edit form's fields (and their catalog bounds) without the
    images and the edit-only fields."""
    body = edit_form(catalog)
    body.pop("anyOf", None)
    for name in ("image", "image[]", "mask", "input_fidelity"):
        body["properties"].pop(name)
    return body


def document(generated: Doc, catalog: Catalog, *, keys: bool) -> Doc:
    """FastAPI's generated document with the edit route, the answers and (with keys) the bearer
    scheme merged in. Operations FastAPI did not generate (/metrics on its own port) stay out."""
    doc = copy.deepcopy(generated)
    paths = doc.setdefault("paths", {})
    for path_item in paths.values():
        for operation in path_item.values():
            operation.get("responses", {}).pop("422", None)  # the gateway answers 400 instead
    for (path, method), extra in OPERATIONS.items():
        operation = paths.get(path, {}).get(method)
        if operation is not None:
            operation["responses"].update(copy.deepcopy(extra["responses"]))
            operation.update({k: copy.deepcopy(v) for k, v in extra.items() if k != "responses"})
    doc["paths"] = {EDITS_PATH: copy.deepcopy(EDITS),
                    GENERATIONS_PATH: copy.deepcopy(GENERATIONS), **paths}
    components = doc.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    for unused in ("HTTPValidationError", "ValidationError"):
        schemas.pop(unused, None)
    schemas.update(copy.deepcopy(SCHEMAS) | {"ImageEditRequest": edit_form(catalog),
                                             "ImageGenerationRequest": generation_body(catalog)})
    components["headers"] = copy.deepcopy(HEADERS)
    if keys:
        components["securitySchemes"] = copy.deepcopy(SECURITY)
        doc["security"] = [{"ApiKeyAuth": []}]
    return doc


def install(app: FastAPI, catalog: Catalog, *, keys: bool) -> None:
    """Serve `document()` at /openapi.json, built on first request and cached like FastAPI's."""
    generate: Callable[[], Doc] = app.openapi

    def openapi() -> Doc:
        if app.openapi_schema is None:
            app.openapi_schema = document(generate(), catalog, keys=keys)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
