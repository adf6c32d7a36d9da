"""Small helpers several test files share: multipart bodies, keys put straight into Redis."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from pathlib import Path
from typing import Any

import httpx
import openai
from prometheus_client.parser import text_string_to_metric_families
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource

from gateway.keys import KeyRecord, Limits
from gateway.quota.redis_store import RedisStore
from gateway.settings import Settings
from tests.support.images import png

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]
Part = tuple[str, bytes | str, str | None]  # (name, value, filename) — filename None for text


TEST_CATALOG = Path(__file__).parent / "catalog.toml"


class ExplicitSettings(Settings):
    """Settings from the arguments alone: no GATEWAY_* variable or config file leaks in."""

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings,)


def shipped_settings(**values: Any) -> Settings:
    """The shipped defaults and `values`, whatever GATEWAY_* variables this process has (for
    tests that build parts in memory, without a server)."""
    return ExplicitSettings(**values)


def suite_settings(**values: Any) -> Settings:
    """As `shipped_settings`, on the test catalog (every model served, gpt-image-1 the default)
    unless `values` names another."""
    return ExplicitSettings(**{"catalog_file": TEST_CATALOG, "default_model": "gpt-image-1",
                               **values})


def multipart(parts: list[Part], boundary: str = "XyZ-boundary") -> tuple[bytes, str]:
    """A multipart/form-data body and its Content-Type; files declared octet-stream."""
    out = bytearray()
    for name, value, filename in parts:
        out += f"--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"".encode()
        if filename is not None:
            out += f'; filename="{filename}"\r\nContent-Type: application/octet-stream'.encode()
        out += b"\r\n\r\n" + (value.encode() if isinstance(value, str) else value) + b"\r\n"
    out += f"--{boundary}--\r\n".encode()
    return bytes(out), f"multipart/form-data; boundary={boundary}"


def _store(url: str) -> RedisStore:
    return RedisStore(url, timeout=1, lease_ttl_ms=1000)


def make_key(url: str, models: tuple[str, ...] = (), name: str = "test",
             **limits: int) -> tuple[KeyRecord, str]:
    """A key put straight into the Redis at `url`: its record and its secret."""
    record, secret = KeyRecord.new(name, Limits(**limits), models=models)
    put_key(url, record)
    return record, secret


def put_key(url: str, record: KeyRecord) -> None:
    async def put() -> None:
        store = _store(url)
        await store.put_key(record)
        await store.aclose()

    asyncio.run(put())


def flush(url: str) -> None:
    """Empty a Redis the tests started themselves (never the machine's own)."""
    async def run() -> None:
        store = _store(url)
        await store.redis.flushdb()
        await store.aclose()

    asyncio.run(run())


def edit(client: openai.OpenAI, **kwargs: object) -> object:
    return client.images.edit(**{"model": "gpt-image-1", "image": png(), "prompt": "x", **kwargs})


def open_files_in(pid: int, directory: Path) -> list[tuple[str, int]]:
    """(path, mode) of the files a process holds open in directory: unnamed ones included."""
    found = []
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith(str(directory)):
                found.append((target, os.stat(fd).st_mode & 0o777))
    return found


def raw_exchange(port: int, data: bytes, *, timeout: float = 10) -> bytes:
    """Send raw bytes to a server on loopback and read its answer up to the end of a JSON body
    (or until it closes): for requests an HTTP client would not send, or would finish."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
            chunk = s.recv(65536)
            if not chunk:
                break
            answer += chunk
    return answer


def scrape(url: str) -> Samples:
    """Every sample of a /metrics page, parsed by prometheus-client's own parser."""
    text = httpx.get(url).text
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sum over every series of `name` whose labels include `labels`."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)


def usage_of(url: str, secret: str) -> dict[str, Any]:
    """GET /v1/usage as the key `secret` sees it."""
    answer = httpx.get(f"{url}/v1/usage", headers={"authorization": f"Bearer {secret}"})
    assert answer.status_code == 200, answer.text
    return answer.json()


def edit_head(body: bytes, ctype: str, secret: str | None = None) -> bytes:
    """The request line and headers of a raw POST /v1/images/edits carrying `body`."""
    auth = f"Authorization: Bearer {secret}\r\n" if secret else ""
    return (f"POST /v1/images/edits HTTP/1.1\r\nHost: x\r\nContent-Type: {ctype}\r\n{auth}"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
