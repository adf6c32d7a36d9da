"""A request's fields and images judged against its model's spec: pure functions on plain values.

No I/O and no request state: the form reader calls these as parts arrive, and a unit test calls
them with a spec and a few values. Every refusal is an InvalidRequest (or Forbidden) naming the
field, so the client's SDK can point at it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from gateway.catalog import Catalog, ModelSpec
from gateway.errors import Forbidden, InvalidRequest
from gateway.images import EDITS
from gateway.sniff import ImageInfo

IMAGE, MASK = "image", "mask"


@dataclass(slots=True)
class Judged:
    """The text fields, judged: the model's spec, the values as they go upstream, and the
    optional fields the client sent (in its order)."""

    spec: ModelSpec
    values: dict[str, str]
    sent: list[str] = field(default_factory=list)
    requested: str = ""  # the name the client sent, when an alias of spec.name
    allowed_as: str = ""  # the name the key's model list allows (the store checks it again)


@dataclass(frozen=True, slots=True)
class Bounds:
    """What any model of a catalog accepts: the limits before the model is known."""

    max_images: int
    max_file_bytes: int
    max_request_bytes: int

    @classmethod
    def of(cls, catalog: Catalog) -> Bounds:
        specs = [*catalog.models.values(), *filter(None, [catalog.passthrough])]
        return cls(
            max_images=max(m.max_images for m in specs),
            max_file_bytes=max(
                max(m.max_image_bytes, m.mask.max_bytes if m.mask else 0) for m in specs),
            max_request_bytes=catalog.max_request_bytes)


def allowed_model(models: tuple[str, ...], name: str, target: str | None = None) -> str:
    """A key limited to some models may use only those (checked before any other field, so a
    key learns nothing about models it may not use); an alias is allowed under its own name or
    its target's. The name it is allowed as."""
    if not models:
        return target or name
    for candidate in (name, target):
        if candidate in models:
            return candidate
    raise Forbidden(f"This API key may not use model '{name}'.", param="model",
                    code="model_not_allowed")


def judge_prompt(spec: ModelSpec, prompt: str | None) -> str:
    if prompt is None or not prompt.strip():
        raise InvalidRequest("Missing required parameter: 'prompt'.", param="prompt",
                             code="missing_required_parameter")
    if len(prompt) > spec.prompt_max_chars:
        raise InvalidRequest(
            f"'prompt' is longer than {spec.prompt_max_chars} characters for {spec.name}.",
            param="prompt", code="string_above_max_length")
    return prompt


def judge_model(catalog: Catalog, allowed_models: tuple[str, ...], fields: Mapping[str, str]
                ) -> tuple[ModelSpec, str, str]:
    """The spec that serves the request's `model` (the default when it names none); the alias
    the client used ("" if none) and the name the key's list allows it under. A key's model list
    is checked before the catalog is asked, so a key learns nothing about other models."""
    model = fields.get("model")
    name = catalog.default_model if model is None else model.strip()
    allowed_as = allowed_model(allowed_models, name, catalog.aliases.get(name))
    spec = catalog.resolve(name)
    return spec, name if name != spec.name else "", allowed_as


def judge_fields(catalog: Catalog, spec: ModelSpec, fields: Mapping[str, str], *,
                 final: bool = True, route: str = EDITS, prompt: str | None = None
                 ) -> Judged | None:
    """Every field as sent so far; None when not `final` and the fields' combination is not
    valid yet (a later field may still fix it). `prompt`: the prompt a caller already judged
    (it keeps it for the access log even when a later field fails)."""
    if prompt is None:
        prompt = judge_prompt(spec, fields.get("prompt"))
    judged = Judged(spec, {"model": spec.upstream_model or spec.name, "prompt": prompt})
    for name, raw in fields.items():
        if name not in judged.values:
            judged.values[name] = normalize(catalog, spec, name, raw, route)
            judged.sent.append(name)
    try:
        spec.check_combination(with_defaults(spec, judged.values), judged.sent)
    except InvalidRequest:
        if final:
            raise
        return None
    return judged


def judge_late_field(catalog: Catalog, judged: Judged, name: str, raw: str) -> None:
    """A field that came after the upload began streaming (any order is valid, as at OpenAI):
    judged alone now, in combination by `final_values`."""
    if name in ("prompt", "model"):  # streaming begins only once both are known
        raise InvalidRequest(f"Duplicate parameter: '{name}'.", param=name,
                             code="duplicate_parameter")
    judged.values[name] = normalize(catalog, judged.spec, name, raw)
    judged.sent.append(name)


def final_values(judged: Judged, *, mask: bool = False) -> dict[str, str]:
    """The values with the model's defaults, once every field is known; the combination checked
    (with the mask file, for rules that forbid one)."""
    values = with_defaults(judged.spec, judged.values)
    judged.spec.check_combination(values | {"mask": "true"} if mask else values, judged.sent)
    return values


def normalize(catalog: Catalog, spec: ModelSpec, name: str, raw: str, route: str = EDITS
              ) -> str:
    rule = spec.fields.get(name)
    if rule is not None and rule.only and route not in rule.only:
        raise InvalidRequest(f"'{name}' is not supported on {route}.", param=name,
                             code="unsupported_parameter")
    if rule is not None:
        return rule.normalize(name, raw)
    if spec.open_fields:
        return raw
    if name in catalog.known_fields:
        raise InvalidRequest(f"'{name}' is not supported by model '{spec.name}'.", param=name,
                             code="unsupported_parameter")
    raise InvalidRequest(f"Unknown parameter: '{name}'.", param=name, code="unknown_parameter")


def with_defaults(spec: ModelSpec, values: Mapping[str, str]) -> dict[str, str]:
    out = dict(values)
    for name, rule in spec.fields.items():
        if rule.default is not None and name not in out:
            out[name] = rule.default
    return out


def requested_n(spec: ModelSpec, values: Mapping[str, str]) -> int:
    """The images a request asks for, as sent upstream (its catalog default included): the
    value sent is the value reserved."""
    rule = spec.fields.get("n")
    return int(values.get("n") or (rule.default if rule and rule.default else "1"))


def wants_stream(values: Mapping[str, str]) -> bool:
    return values.get("stream") == "true"


# --------------------------------------------------------------------------------- images
def size_limit(spec: ModelSpec | None, kind: str, bounds: Bounds) -> int:
    if spec is None:
        return bounds.max_file_bytes
    if kind == MASK:
        return spec.mask.max_bytes if spec.mask else 0
    return spec.max_image_bytes


def judge_size(spec: ModelSpec | None, kind: str, param: str, size: int, bounds: Bounds) -> None:
    limit = size_limit(spec, kind, bounds)
    if size > limit:
        raise InvalidRequest(f"'{param}' is larger than {limit} bytes.", param=param,
                             code="image_too_large")


def judge_count(spec: ModelSpec | None, index: int, param: str, bounds: Bounds) -> None:
    """The image at `index` (0-based) is one too many?"""
    limit = spec.max_images if spec else bounds.max_images
    if index >= limit:
        raise InvalidRequest(f"Too many images: at most {limit} are accepted.", param=param,
                             code="too_many_images")


def judge_total(spec: ModelSpec, images: int) -> None:
    """Images read before the model was known, against the model's own count."""
    if images > spec.max_images:
        raise InvalidRequest(f"Too many images: {spec.name} takes at most {spec.max_images}.",
                             param=f"image[{spec.max_images}]", code="too_many_images")


def mask_supported(spec: ModelSpec) -> None:
    if spec.mask is None:
        raise InvalidRequest(f"'mask' is not supported by model '{spec.name}'.", param="mask",
                             code="unsupported_parameter")


def judge_image(spec: ModelSpec, kind: str, param: str, info: ImageInfo) -> None:
    """One image (or the mask) as its bytes turned out: format, dimensions, alpha."""
    if kind == MASK:
        mask_supported(spec)
        assert spec.mask is not None
        formats = spec.mask.formats
    else:
        formats = spec.image_formats
    if info.format not in formats:
        raise InvalidRequest(
            f"Invalid '{param}': {info.format} is not accepted by {spec.name}; use "
            + " or ".join(formats) + ".", param=param, code="invalid_image_format")
    if max(info.width, info.height) > spec.max_image_side:
        raise InvalidRequest(
            f"Invalid '{param}': {info.width}x{info.height} exceeds "
            f"{spec.max_image_side} pixels a side.", param=param,
            code="invalid_image_dimensions")
    if kind == IMAGE and spec.square_images and info.width != info.height:
        raise InvalidRequest(f"Invalid '{param}': {spec.name} needs a square image.",
                             param=param, code="invalid_image_dimensions")
    if kind == MASK and spec.mask is not None and spec.mask.require_alpha and not info.has_alpha:
        raise InvalidRequest("Invalid 'mask': it must have an alpha channel.", param="mask",
                             code="invalid_image_format")


def judge_mask(spec: ModelSpec, mask: ImageInfo | None, first: ImageInfo | None) -> None:
    """The mask must match the first image, once both are known."""
    if mask is None or first is None or spec.mask is None or not spec.mask.match_first_image:
        return
    if (mask.width, mask.height) != (first.width, first.height):
        raise InvalidRequest(
            f"Invalid 'mask': its size {mask.width}x{mask.height} differs from the "
            f"first image's {first.width}x{first.height}.", param="mask",
            code="invalid_image_dimensions")
