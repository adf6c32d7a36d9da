"""Every setting in one place (as envoyproxy/ratelimit does): TOML file, overridden by GATEWAY_* env.

Precedence: environment > TOML file (`--config` or GATEWAY_CONFIG) > defaults. A mistake stops
start-up with one line naming the setting (see `load_settings`), never a traceback.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from gateway.errors import SettingsError
from gateway.keys import LIMIT_NAMES

ENV_PREFIX = "GATEWAY_"


class UpstreamSettings(BaseModel):
    """A named upstream in `[upstreams.NAME]`; unset timeouts inherit the top-level ones."""

    model_config = ConfigDict(extra="forbid")

    base_url: str
    api_key: SecretStr | None = None
    api_key_env: str | None = Field(None, description="environment variable holding the key")
    connect_timeout: float | None = Field(None, gt=0)
    read_timeout: float | None = Field(None, gt=0)
    write_timeout: float | None = Field(None, gt=0)
    max_connections: int | None = Field(None, ge=1)

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, v: str) -> str:
        return _check_base_url(v)


class _KeyEntryHead(BaseModel):
    model_config = ConfigDict(extra="forbid")

    hash: str = Field(pattern=r"^[0-9a-f]{64}$")
    name: str = ""
    created: int = 0


# One field per limit of `Limits`, in its order.
_KeyEntryLimits = create_model("_KeyEntryLimits", __base__=_KeyEntryHead, __module__=__name__,
                               **{name: (int, Field(0, ge=0)) for name in LIMIT_NAMES})


class KeyEntry(_KeyEntryLimits):  # type: ignore[misc,valid-type]
    """A key of the in-process store, as `gateway keys create` prints it for the config file."""

    models: list[str] = []
    metadata: dict[str, Any] = {}


def _check_base_url(v: str) -> str:
    if not v.startswith(("http://", "https://")):
        raise ValueError("must start with http:// or https://")
    return v.rstrip("/")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid", case_sensitive=False)

    # Server
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    workers: int = Field(1, ge=1)
    # Connections the kernel may queue before the server accepts them; a burst of thousands at
    # once overflows a shorter queue into SYN retries (1 s, 3 s...). Capped by net.core.somaxconn.
    backlog: int = Field(4096, ge=1)
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"
    log_format: Literal["json", "text"] = "json"
    log_prompts: bool = False  # put the prompt in the request's log line

    # Behind a load balancer: X-Forwarded-For / X-Forwarded-Proto are believed only from these
    # peers (comma-separated addresses or networks, or "*"); unset, they are ignored.
    forwarded_allow_ips: str | None = None

    # Observability and shutdown.
    metrics_port: int | None = Field(None, ge=0, le=65535)  # /metrics here, not on `port`
    metrics_key_labels: bool = True  # key_id labels; off for deployments with very many keys
    drain_seconds: float = Field(5.0, ge=0)  # after SIGTERM: not ready, but still serving
    shutdown_timeout: float = Field(30.0, ge=0)  # then in-flight requests may take this long

    # The default upstream, named "default" in the catalog.
    upstream_base_url: str = "https://api.openai.com/v1"
    upstream_api_key: SecretStr | None = None
    upstream_connect_timeout: float = Field(10.0, gt=0)
    # The longest silence allowed between upstream bytes: image generations take minutes.
    upstream_read_timeout: float = Field(600.0, gt=0)
    # The longest an upstream may leave a body write pending (it stopped reading).
    upstream_write_timeout: float = Field(60.0, gt=0)
    # Connections per upstream; default: max_in_flight (one per request in flight).
    upstream_max_connections: int | None = Field(None, ge=1)
    # How long an idle pooled connection is reused. Below the upstream's own idle timeout
    # (uvicorn's and Node's are 5 s), or a request sent just as the upstream closes the
    # connection fails (a 502): with thousands in flight, hundreds of times a minute.
    upstream_keepalive_seconds: float = Field(3.0, gt=0)
    upstreams: dict[str, UpstreamSettings] = {}

    # Keys and quotas. Without redis_url the store is in-process (one process), with the keys
    # listed under [keys.ID]; with neither, the gateway admits everyone (and says so at start).
    redis_url: str | None = None
    # Every Redis call (a free connection, then the round trip): Redis silent this long while
    # the gateway's loop is free is Redis away. While the loop is busy (a burst), or Redis is
    # answering other calls, a call may wait up to 40 times this before it is given up.
    redis_timeout: float = Field(0.25, gt=0)
    # Redis connections per process (per node of a cluster). Calls made in the same loop turn
    # go as one pipeline on one connection, so a burst of thousands needs only a few.
    redis_max_connections: int = Field(16, ge=1)
    redis_failure: Literal["closed", "open"] = "closed"  # closed: 503 while Redis is away
    admin_key: SecretStr | None = None
    keys: dict[str, KeyEntry] = {}
    key_cache_seconds: float = Field(1.0, ge=0, le=1)  # how stale a key record may be
    # With redis_failure = "open": the oldest cached key record still believed while Redis is
    # away (a key revoked before the outage stops working after this long at the most).
    key_stale_seconds: float = Field(300.0, ge=0)
    # Leases are renewed while their request runs, so this only bounds how long a dead
    # instance's reservations and concurrency slots linger.
    lease_ttl_seconds: float = Field(60.0, ge=3)
    # An answered request whose settle fails (Redis away) is retried this long, so usage served
    # through an outage is still counted; settles are idempotent (quota.lua keeps expired leases
    # a day, hence the cap).
    settle_retry_seconds: float = Field(600.0, ge=0, le=3600)

    # Catalog: the shipped one, replaced by `catalog_file` and amended by `[models.NAME]` tables.
    catalog_file: Path | None = None
    models: dict[str, dict[str, Any]] = {}
    # `gateway serve --demo`: every upstream is the built-in stand-in provider (gateway/demo.py).
    demo: bool = False
    # A name clients send -> the catalog model that serves it (judged by its rules, sent upstream
    # by its name): keeps clients of a shut-down model working, e.g. gpt-image-1 -> gpt-image-2.
    aliases: dict[str, str] = {}
    default_model: str = "gpt-image-2"
    unknown_models: Literal["reject", "pass"] = "reject"
    unknown_fields: Literal["reject", "pass"] = "reject"

    # Request bounds. max_body_bytes defaults to the largest request the catalog allows.
    max_body_bytes: int | None = Field(None, ge=1)
    # A JSON body that carries no images (generations), read whole before it is judged.
    max_json_body_bytes: int = Field(1024 * 1024, ge=1024)
    max_parts: int = Field(64, ge=2)
    max_field_bytes: int = Field(256 * 1024, ge=1)
    max_part_header_bytes: int = Field(4096, ge=64)
    max_filename_chars: int = Field(1024, ge=1)
    max_header_bytes: int = Field(64 * 1024, ge=1024)  # the HTTP request line and headers

    # Bounds on what an upstream sends back: an answer longer than max_response_bytes is cut
    # off (a 502 before it starts, an error event or a cut connection after), and an SSE event
    # is held back whole while framing (see edits.EventFramer), so one is at most max_event_bytes.
    max_response_bytes: int = Field(1024 * 1024 * 1024, ge=1024)
    max_event_bytes: int = Field(64 * 1024 * 1024, ge=1024)

    # Load shedding and slow clients: past max_in_flight edits at once, new ones get a fast,
    # retryable 503; a client silent for body_read_timeout seconds mid-body gets a 408.
    max_in_flight: int = Field(4096, ge=1)
    body_read_timeout: float = Field(30.0, gt=0)
    # An edit slot is taken only once the key is accepted, and one key holds at most its own
    # max_concurrent slots of an instance (keys without one: max_in_flight_per_key, by default
    # max_in_flight).
    max_in_flight_per_key: int | None = Field(None, ge=1)
    # A body must arrive at min_body_rate bytes a second on average, once
    # body_rate_grace_seconds have passed, not counting time the gateway itself waits
    # (admission, the upstream): a trickle cannot hold a slot for long.
    min_body_rate: int = Field(16 * 1024, ge=0)
    body_rate_grace_seconds: float = Field(10.0, gt=0)
    # A refused request (401, 400, 429, 503) is answered, then reads at most this much more of
    # its body, for at most refusal_drain_seconds (a client still writing finds the answer),
    # and is closed.
    refusal_drain_bytes: int = Field(1024 * 1024, ge=0)
    refusal_drain_seconds: float = Field(2.0, ge=0)
    # The request line and headers must arrive within this many seconds (slow-loris heads).
    header_read_timeout: float = Field(30.0, gt=0)
    # One write of the answer to the client may wait this long (it stopped reading); then the
    # client counts as gone, and the upstream's answer is still read to meter it.
    client_send_timeout: float = Field(60.0, gt=0)

    # Files that arrive before the text fields wait here (memory first, then an unnamed temp file).
    spool_dir: Path | None = None
    spool_memory_bytes: int = Field(1024 * 1024, ge=0)  # 0: straight to disk
    # Spooled bytes at once, in this process and for one key in it: past either, a retryable 503.
    max_spool_bytes: int = Field(8 * 1024**3, ge=0)
    max_spool_bytes_per_key: int = Field(1024**3, ge=0)
    # All text fields of one request together (each is also bounded by max_field_bytes).
    max_text_bytes: int = Field(512 * 1024, ge=1)

    @field_validator("admin_key")
    @classmethod
    def _long_admin_key(cls, v: SecretStr | None) -> SecretStr | None:
        if v is not None and v.get_secret_value() != v.get_secret_value().strip():
            # A mounted secret usually ends in a newline: no client could ever send it.
            v = SecretStr(v.get_secret_value().strip())
        if v is not None and not v.get_secret_value():
            return None  # GATEWAY_ADMIN_KEY="" (as compose passes an unset one): no admin API
        if v is not None and len(v.get_secret_value()) < 16:
            raise ValueError("must be at least 16 characters")
        return v

    @model_validator(mode="after")
    def _one_key_store(self) -> Settings:
        if self.redis_url and self.keys:
            raise ValueError("[keys] in the config are for the in-process store; with "
                             "GATEWAY_REDIS_URL create keys with `gateway keys create`")
        return self

    @field_validator("keys")
    @classmethod
    def _ids_match_hashes(cls, v: dict[str, KeyEntry]) -> dict[str, KeyEntry]:
        for key_id, entry in v.items():
            if key_id != f"key_{entry.hash[:16]}":
                raise ValueError(f"[keys.{key_id}]: the id must be key_ + the hash's first 16 "
                                 "characters, as `gateway keys create` prints it")
        return v

    @field_validator("upstream_base_url")
    @classmethod
    def _http_url(cls, v: str) -> str:
        return _check_base_url(v)

    @field_validator("spool_dir")
    @classmethod
    def _writable_dir(cls, v: Path | None) -> Path | None:
        if v is not None and not (v.is_dir() and os.access(v, os.W_OK | os.X_OK)):
            raise ValueError(f"{v} is not a writable directory")
        return v

    @field_validator("catalog_file")
    @classmethod
    def _readable_file(cls, v: Path | None) -> Path | None:
        if v is not None and not v.is_file():
            raise ValueError(f"{v} does not exist")
        return v

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # toml_file comes from model_config, set per load by `load_settings`.
        return init_settings, env_settings, TomlConfigSettingsSource(settings_cls)


def load_settings(config_file: str | Path | None = None, **overrides: Any) -> Settings:
    """Settings from `config_file` (else GATEWAY_CONFIG) and the environment; SettingsError if bad."""
    path = config_file or os.environ.get(f"{ENV_PREFIX}CONFIG") or None
    cls = Settings
    try:
        if path is not None:
            # Parse it once ourselves so a missing file or a TOML syntax error is one clear line.
            with Path(path).open("rb") as f:
                tomllib.load(f)
            config = SettingsConfigDict(**{**Settings.model_config, "toml_file": path})
            cls = type("Settings", (Settings,), {"model_config": config})
        return cls(**overrides)
    except FileNotFoundError:
        raise SettingsError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError(f"config file {path} is not valid TOML: {exc}") from None
    except ValidationError as exc:
        raise SettingsError(describe_validation_error(exc, prefix=ENV_PREFIX)) from None


def describe_validation_error(exc: ValidationError, *, prefix: str = "") -> str:
    """One line naming each bad setting, both as its config key and its environment variable."""
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "settings"
        top = str(err["loc"][0]) if err["loc"] else ""
        where = f"{loc} ({prefix}{top.upper()})" if prefix and top else loc
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown setting"
        parts.append(f"{where}: {msg}")
    return "invalid setting " + "; ".join(parts)
