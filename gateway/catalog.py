"""The model catalog: what each model accepts, as data (gateway/catalog.toml, amended by config).

The route never asks "is this dall-e-2?"; it asks the model's spec. Adding or changing a model is
an edit to `[models.NAME]` in the config file, not to code.
"""

from __future__ import annotations

import datetime as dt
import re
import tomllib
from collections.abc import Callable, Iterable, Mapping
from importlib import resources
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from gateway.errors import InvalidRequest, NotFound, SettingsError
from gateway.settings import Settings, describe_validation_error

IMAGE_FORMATS = ("png", "jpeg", "webp")
_SIZE = re.compile(r"(\d{1,6})x(\d{1,6})")
_INTEGER = re.compile(r"-?[0-9]{1,9}")
PASSTHROUGH_MAX_N = 10  # OpenAI's own bound on n


class CrossRule(BaseModel):
    """A rule between fields: when this field holds one of `when` (any value if empty), the
    `requires` fields must hold one of theirs and the `forbids` fields must not be sent (a bool
    sent as false counts as not sent; "mask" is the mask file)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    when: tuple[str, ...] = ()
    requires: dict[str, tuple[str, ...]] = {}
    forbids: tuple[str, ...] = ()


class FieldRule(BaseModel):
    """How one optional text field is checked and normalized for one model."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["enum", "int", "bool", "text", "size"]
    values: tuple[str, ...] = ()
    min: int | None = None
    max: int | None = None
    max_chars: int | None = Field(None, ge=1)
    # A size rule: any WxH whose sides are multiples of `multiple_of`, within these bounds.
    multiple_of: int | None = Field(None, ge=1)
    max_side: int | None = Field(None, ge=1)
    min_pixels: int | None = Field(None, ge=1)
    max_pixels: int | None = Field(None, ge=1)
    max_aspect: float | None = Field(None, ge=1)
    # Filled in upstream when the client leaves the field out; also used by `requires` checks.
    default: str | None = None
    # Accepted from clients and never sent upstream (response_format for always-base64 models).
    drop: bool = False
    # The routes that take the field ("edits", "generations"); empty: both.
    only: tuple[Literal["edits", "generations"], ...] = ()
    # A rule between fields (see CrossRule), written inline; more of them in `rules`.
    requires: dict[str, tuple[str, ...]] = {}
    forbids: tuple[str, ...] = ()
    when: tuple[str, ...] = ()
    rules: tuple[CrossRule, ...] = ()
    # An int rule (a frame count): its value times the pixels of `size` (when WxH) at most this,
    # whenever its `requires` hold (a GIF), with `budget_count` (the provider's default) when the
    # client did not send it.
    pixel_budget: int | None = Field(None, ge=1)
    budget_count: int | None = Field(None, ge=1)

    @model_validator(mode="before")
    @classmethod
    def _infer_kind(cls, data: Any) -> Any:
        if isinstance(data, dict) and "kind" not in data:
            data = dict(data)
            if any(k in data for k in ("multiple_of", "max_side", "min_pixels", "max_pixels")):
                data["kind"] = "size"
            elif "values" in data:
                data["kind"] = "enum"
            elif "min" in data or "max" in data:
                data["kind"] = "int"
            else:
                data["kind"] = "text"
        if isinstance(data, dict) and data.get("default") is not None:
            data = {**data, "default": str(data["default"]).lower()}
        return data

    def normalize(self, name: str, raw: str) -> str:
        """The value as it goes upstream, or InvalidRequest naming the field."""
        if self.kind == "text":
            if self.max_chars is not None and len(raw) > self.max_chars:
                raise InvalidRequest(f"'{name}' is longer than {self.max_chars} characters.",
                                     param=name, code="string_above_max_length")
            return raw
        value = raw.strip().lower()
        if self.kind == "int":
            return self._integer(name, value)
        if self.kind == "bool":
            if value in ("true", "false"):
                return value
            raise _invalid(name, raw, ("true", "false"))
        if value in self.values:
            return value
        if self.kind == "size" and (m := _SIZE.fullmatch(value)):
            self._check_size(name, raw, int(m[1]), int(m[2]))
            return value
        raise _invalid(name, raw, self.values)

    def _integer(self, name: str, value: str) -> str:
        # ASCII digits only: int() would also take "+3", "3_0" and other scripts' digits.
        try:
            if not _INTEGER.fullmatch(value):
                raise ValueError(value)
            number = int(value, 10)
        except ValueError:
            raise InvalidRequest(f"Invalid type for '{name}': expected an integer, got '{value[:32]}'.",
                                 param=name, code="invalid_type") from None
        if (self.min is not None and number < self.min) or (
            self.max is not None and number > self.max
        ):
            raise InvalidRequest(
                f"Invalid '{name}': {number} is not between {self.min} and {self.max}.",
                param=name, code="integer_out_of_range")
        return str(number)

    def _check_size(self, name: str, raw: str, w: int, h: int) -> None:
        problems = []
        if self.multiple_of and (w % self.multiple_of or h % self.multiple_of):
            problems.append(f"both sides must be multiples of {self.multiple_of}")
        if self.max_side and max(w, h) > self.max_side:
            problems.append(f"the longer side must be at most {self.max_side}")
        if w == 0 or h == 0:
            problems.append("both sides must be positive")
        elif self.max_aspect and max(w, h) / min(w, h) > self.max_aspect:
            problems.append(f"the aspect ratio must be at most {self.max_aspect:g}:1")
        if self.min_pixels and w * h < self.min_pixels:
            problems.append(f"it must have at least {self.min_pixels} pixels")
        if self.max_pixels and w * h > self.max_pixels:
            problems.append(f"it must have at most {self.max_pixels} pixels")
        if problems:
            raise InvalidRequest(f"Invalid size '{raw}': {'; '.join(problems)}.", param=name)


# What `n` must be where a model whose fields pass through declares no rule of its own
# (pass-through models included): it is reserved against quotas, so a plain count.
N_RULE = FieldRule(kind="int", min=1, max=PASSTHROUGH_MAX_N)


def _invalid(name: str, raw: str, allowed: Iterable[str]) -> InvalidRequest:
    choices = ", ".join(f"'{v}'" for v in allowed)
    return InvalidRequest(f"Invalid value: '{raw}'. Supported values are: {choices}.", param=name)


class MaskRule(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    formats: tuple[Literal["png", "jpeg", "webp"], ...] = ("png",)
    max_bytes: int = Field(4 * 1024 * 1024, ge=1)
    require_alpha: bool = True
    match_first_image: bool = True


class ModelSpec(BaseModel):
    """One model's contract; the catalog's values are defaults an operator can change."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    enabled: bool = True
    owned_by: str = "openai"
    created: int = 0
    upstream: str = "default"
    upstream_model: str | None = Field(None, description="name sent upstream, if not `name`")
    prompt_max_chars: int = Field(32000, ge=1)
    max_images: int = Field(16, ge=1)
    max_image_bytes: int = Field(25 * 1024 * 1024, ge=1)
    image_formats: tuple[Literal["png", "jpeg", "webp"], ...] = IMAGE_FORMATS
    max_image_side: int = Field(16384, ge=1)
    square_images: bool = False
    mask: MaskRule | None = MaskRule()
    fields: dict[str, FieldRule] = {}
    # Pass text fields the spec does not name through unchecked (unknown models, or by setting).
    open_fields: bool = False
    # The provider's announced end of the model (not inherited through `extends`): from that day
    # a request for it is refused with its `replacement` named, unless an alias maps the name.
    shutdown_date: dt.date | None = None
    replacement: str | None = None

    def shut_down(self, today: dt.date) -> bool:
        return self.shutdown_date is not None and today >= self.shutdown_date

    @property
    def max_request_bytes(self) -> int:
        mask = self.mask.max_bytes if self.mask else 0
        return self.max_images * self.max_image_bytes + mask

    def check_combination(self, values: Mapping[str, str], sent: Iterable[str]) -> None:
        """Cross-field rules (`requires`, `forbids`) for the fields the client sent, and every
        `pixel_budget` that applies (sent or not: the provider's own count fills in). `values`
        holds the defaults too, and "mask" when a mask file was sent."""
        sent = list(sent)
        for name in sent:
            rule = self.fields.get(name)
            if rule is None:
                continue
            for cross in (rule, *rule.rules):
                if cross.when and values[name] not in cross.when:
                    continue
                for other, allowed in cross.requires.items():
                    if values.get(other) not in allowed:
                        want = " or ".join(allowed)
                        raise InvalidRequest(
                            f"'{name}={values[name]}' requires '{other}' to be {want}.",
                            param=name)
                for other in cross.forbids:
                    if values.get(other, "false") != "false":
                        raise InvalidRequest(
                            f"'{name}={values[name]}' cannot be combined with '{other}'.",
                            param=name)
        for name, rule in self.fields.items():
            if rule.pixel_budget is None or any(
                    values.get(other) not in allowed for other, allowed in rule.requires.items()):
                continue  # no budget here, or it does not apply (not a GIF)
            count = values.get(name) or (str(rule.budget_count) if rule.budget_count else "")
            m = _SIZE.fullmatch(values.get("size", ""))
            if not count or m is None:
                continue  # size auto: the provider sizes the frames to fit
            pixels = int(count) * int(m[1]) * int(m[2])
            if pixels > rule.pixel_budget:
                raise InvalidRequest(
                    f"{count} frames of {m[0]} are {pixels} pixels; at most {rule.pixel_budget} "
                    "together.", param=name if name in sent else "size")


def _today() -> dt.date:
    return dt.datetime.now(dt.UTC).date()


class Catalog:
    """The enabled models by name, plus what the route needs to judge names it does not know.

    `models` holds every enabled model, shut down or not (its rules and replacement stay known);
    `served()` says which ones a request may use today, and `resolve` refuses the others.
    """

    def __init__(self, models: Iterable[ModelSpec], *, default_model: str,
                 passthrough: ModelSpec | None = None, aliases: Mapping[str, str] | None = None,
                 today: Callable[[], dt.date] = _today) -> None:
        models = list(models)
        self.models = {m.name: m for m in models if m.enabled}
        # Disabled names stay refused, even where unknown names pass through.
        self.disabled = frozenset(m.name for m in models if not m.enabled)
        self.default_model = default_model
        self.passthrough = passthrough
        self.aliases = dict(aliases or {})
        self.today = today
        self._folded = {n.casefold(): n for n in (*self.models, *self.disabled, *self.aliases)}
        # Fields some model takes: a field outside this set is "unknown", inside it "unsupported".
        self.known_fields = frozenset(f for m in self.models.values() for f in m.fields)
        self._fields_closed = passthrough is None and not any(
            m.open_fields for m in self.models.values())

    def unknown_field(self, name: str) -> bool:
        """No model could take this field (so it can be refused before the model is known)."""
        return self._fields_closed and name not in self.known_fields and \
            name not in ("model", "prompt")

    def retiring(self) -> list[tuple[str, ModelSpec]]:
        """(role, model) for the default model and alias targets with a shutdown date ahead:
        on that day they stop answering, and a restart fails until the config changes."""
        roles = [("default_model", self.aliases.get(self.default_model, self.default_model)),
                 *((f"aliases.{alias}", target) for alias, target in self.aliases.items())]
        return [(role, spec) for role, name in roles
                if (spec := self.models.get(name)) is not None and spec.shutdown_date]

    def served(self) -> list[ModelSpec]:
        """The models a request may name today."""
        today = self.today()
        return [m for m in self.models.values() if not m.shut_down(today)]

    def resolve(self, name: str | None) -> ModelSpec:
        """The spec that serves `name` (an alias's target); 404 for a disabled or shut-down
        model, 400 for a name the catalog does not know (unless unknown names pass through)."""
        name = self.default_model if name is None else name.strip()
        name = self.aliases.get(name, name)
        spec = self.models.get(name)
        if spec is not None:
            if spec.shut_down(self.today()):
                instead = f" Use '{spec.replacement}' instead." if spec.replacement else ""
                raise NotFound(f"The model '{name}' was shut down on {spec.shutdown_date}."
                               + instead, param="model", code="model_not_found")
            return spec
        if name in self.disabled:
            raise NotFound(f"The model '{name}' does not exist or you do not have access to it.",
                           param="model", code="model_not_found")
        if self.passthrough is not None and name:
            known = self._folded.get(name.casefold())
            if known is not None:  # a catalog model in other letters must not skip its rules
                raise InvalidRequest(f"Invalid value: '{name}'. Did you mean '{known}'?",
                                     param="model")
            return self.passthrough.model_copy(update={"name": name})
        choices = ", ".join(f"'{m.name}'" for m in self.served())
        raise InvalidRequest(f"Invalid value: '{name}'. Supported values are: {choices}.",
                             param="model")

    @property
    def max_request_bytes(self) -> int:
        specs = list(self.models.values()) + ([self.passthrough] if self.passthrough else [])
        return max(m.max_request_bytes for m in specs)

    @classmethod
    def from_settings(cls, settings: Settings) -> Catalog:
        raw = _load_raw(settings)
        upstreams = {"default", *settings.upstreams}
        specs = []
        for name in raw:
            table = _resolve_extends(raw, name, ())
            table.pop("extends", None)
            if table.get("mask") is False:
                table["mask"] = None
            table["fields"] = {k: v for k, v in table.get("fields", {}).items() if v is not False}
            if settings.unknown_fields == "pass":
                table["open_fields"] = True
                # Fields pass through unchecked, but `n` is reserved against quotas: a model
                # without its own rule gets the plain-count one (sent as it was reserved).
                table["fields"].setdefault("n", N_RULE)
            try:
                spec = ModelSpec(name=name, **table)
            except ValidationError as exc:
                raise SettingsError(
                    f"catalog model '{name}': " + describe_validation_error(exc)) from None
            if spec.upstream not in upstreams:
                raise SettingsError(f"catalog model '{name}': upstream '{spec.upstream}' is not "
                                    f"defined (define [upstreams.{spec.upstream}])")
            specs.append(spec)
        passthrough = None
        if settings.unknown_models == "pass":
            biggest = max(specs, key=lambda m: m.max_image_bytes, default=None)
            passthrough = ModelSpec(
                name="*", owned_by="passthrough", open_fields=True,
                # Any field passes, but `n` is reserved against quotas: a plain small integer,
                # sent upstream as it was reserved.
                fields={"n": N_RULE},
                mask=MaskRule(formats=IMAGE_FORMATS, require_alpha=False, match_first_image=False),
                max_image_bytes=biggest.max_image_bytes if biggest else 50 * 1024 * 1024)
        catalog = cls(specs, default_model=settings.default_model, passthrough=passthrough,
                      aliases=settings.aliases)
        served = {m.name for m in catalog.served()}
        for alias, target in settings.aliases.items():
            if target in settings.aliases:
                raise SettingsError(f"invalid setting aliases.{alias}: '{target}' is itself an "
                                    "alias; name the model that serves it")
            if target not in served:
                raise SettingsError(f"invalid setting aliases.{alias}: '{target}' is not a model "
                                    "the catalog serves today")
        for spec in catalog.models.values():
            if spec.replacement is not None and spec.replacement not in catalog.models and \
                    spec.replacement not in catalog.disabled:
                raise SettingsError(f"catalog model '{spec.name}': replacement "
                                    f"'{spec.replacement}' is not a model of the catalog")
        default = catalog.aliases.get(settings.default_model, settings.default_model)
        if default not in served and passthrough is None:
            raise SettingsError(
                f"invalid setting default_model (GATEWAY_DEFAULT_MODEL): '{settings.default_model}'"
                " is not an enabled model of the catalog served today")
        return catalog


def _load_raw(settings: Settings) -> dict[str, dict[str, Any]]:
    """Shipped (or `catalog_file`) models, with the config's `[models.NAME]` tables merged over."""
    try:
        if settings.catalog_file is not None:
            text = settings.catalog_file.read_text()
        else:
            text = resources.files("gateway").joinpath("catalog.toml").read_text()
        base = tomllib.loads(text).get("models", {})
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise SettingsError(f"catalog file cannot be read: {exc}") from None
    for name, table in settings.models.items():
        base[name] = _merge(base.get(name, {}), table)
    return base


def _resolve_extends(raw: Mapping[str, dict[str, Any]], name: str,
                     seen: tuple[str, ...]) -> dict[str, Any]:
    table = raw[name]
    parent = table.get("extends")
    if parent is None:
        return dict(table)
    if parent not in raw:
        raise SettingsError(f"catalog model '{name}': extends unknown model '{parent}'")
    if parent in seen or parent == name:
        raise SettingsError(f"catalog model '{name}': 'extends' forms a cycle")
    inherited = _resolve_extends(raw, parent, (*seen, name))
    for own in ("enabled", "shutdown_date", "replacement"):  # a model's own, never inherited
        inherited.pop(own, None)
    return _merge(inherited, table)


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out
