"""`gateway keys ...` as an operator runs it: a subprocess, against a redis-server this suite
starts (never the machine's own Redis), or against the config file without Redis."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis
from pytest_redis import factories

from gateway.keyadmin.cli import main as keys_main
from gateway.keys import hash_secret, id_for_hash
from gateway.quota import build_store
from gateway.quota.base import OK, UNKNOWN_KEY
from gateway.quota.memory import MemoryStore
from gateway.quota.redis_store import RedisStore
from gateway.settings import load_settings

ROOT = Path(__file__).resolve().parents[2]
redis_server = factories.redis_proc(port=None)


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`python -m gateway.cli keys ARGS` with no GATEWAY_* setting but those given."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "gateway.cli", "keys", *args], env=full_env,
                          cwd=ROOT, capture_output=True, text=True, timeout=30)


def ok(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    return proc.stdout


def one_line_error(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("gateway keys: "), proc.stderr
    return lines[0]


@pytest.fixture
def redis_url(redis_server: object) -> Iterator[str]:
    url = f"redis://{redis_server.host}:{redis_server.port}/0"  # type: ignore[attr-defined]
    yield url
    redis.Redis.from_url(url).flushdb()  # our own redis-server, started for this suite


@pytest.fixture
async def store(redis_url: str) -> AsyncIterator[RedisStore]:
    s = RedisStore(redis_url, timeout=1.0, lease_ttl_ms=60_000)
    yield s
    await s.aclose()


async def test_create_show_list_update_revoke_in_redis(redis_url: str, store: RedisStore) -> None:
    env = {"GATEWAY_REDIS_URL": redis_url}
    out = ok(run("create", "--name", "alice", "--rpm", "60", "--images-per-day", "100",
                 "--models", "gpt-image-1, dall-e-2", "--metadata", '{"team": "a"}', "--json",
                 env=env))
    created = json.loads(out)  # exactly one JSON object on stdout
    secret, key_id = created["key"], created["id"]
    assert secret.startswith("sk-gw-") and key_id == id_for_hash(hash_secret(secret))
    assert created["name"] == "alice" and created["status"] == "active"
    assert created["limits"] == {"rpm": 60, "images_per_day": 100, "tokens_per_month": 0,
                                 "max_concurrent": 0}
    assert created["models"] == ["gpt-image-1", "dall-e-2"]
    assert created["metadata"] == {"team": "a"} and "hash" not in created

    record = await store.get_key(key_id)
    assert record is not None and record.hash == hash_secret(secret)
    assert record.limits.rpm == 60 and record.limits.images_per_day == 100
    assert record.models == ("gpt-image-1", "dall-e-2")
    # Usage the servers made is what `show` reports.
    assert (await store.admit(record.hash, "gpt-image-1", 2, "lease-1")).status == OK

    shown = json.loads(ok(run("show", key_id, "--json", env=env)))
    assert shown["id"] == key_id and "key" not in shown and "hash" not in shown
    assert shown["usage"]["in_flight"] == 1
    images = shown["usage"]["limits"]["images"]
    assert (images["limit"], images["used"], images["remaining"]) == (100, 2, 98)
    assert images["reset_seconds"] > 0
    requests = shown["usage"]["limits"]["requests"]  # the admission above, in the last 60 s
    assert (requests["limit"], requests["used"], requests["remaining"]) == (60, 1, 59)
    assert 59 < requests["reset_seconds"] <= 60  # when it leaves the window

    text = ok(run("show", key_id, env=env))
    assert "alice" in text and "1 in flight" in text and "2 used" in text
    assert re.search(r"requests  1 used, limit 60, 59 remaining, resets in (1m 0s|5\ds)\n", text)

    listed = json.loads(ok(run("list", "--json", env=env)))
    assert [k["id"] for k in listed["data"]] == [key_id]
    assert key_id in ok(run("list", env=env))

    updated = json.loads(ok(run("update", key_id, "--rpm", "0", "--images-per-day", "5",
                                "--models", "", "--name", "alice2", "--json", env=env)))
    assert updated["limits"] == {"rpm": 0, "images_per_day": 5, "tokens_per_month": 0,
                                 "max_concurrent": 0}
    record = await store.get_key(key_id)
    assert record is not None and record.name == "alice2" and record.models == ()
    assert record.metadata == {"team": "a"} and record.hash == hash_secret(secret)  # untouched

    assert "Revoked" in ok(run("revoke", key_id, env=env))
    record = await store.get_key(key_id)
    assert record is not None and record.status == "revoked"  # kept, not deleted
    assert (await store.admit(record.hash, "gpt-image-1", 1, "lease-2")).status == UNKNOWN_KEY
    assert json.loads(ok(run("show", key_id, "--json", env=env)))["status"] == "revoked"
    assert "Already revoked" in ok(run("revoke", key_id, env=env))


def test_secret_is_printed_once_and_hashes_never(redis_url: str) -> None:
    env = {"GATEWAY_REDIS_URL": redis_url}
    out = ok(run("create", "--name", "bob", env=env))
    secret = out.strip().splitlines()[-1]
    assert secret.startswith("sk-gw-") and out.count(secret) == 1
    key_id = id_for_hash(hash_secret(secret))
    others = ok(run("list", env=env)) + ok(run("show", key_id, "--json", env=env))
    assert secret not in others and hash_secret(secret) not in others and key_id in others


def test_errors_are_one_line_with_exit_2(redis_url: str, unused_tcp_port: int) -> None:
    env = {"GATEWAY_REDIS_URL": redis_url}
    assert "key_0123456789abcdef" in one_line_error(run("show", "key_0123456789abcdef", env=env))
    one_line_error(run("update", "key_0123456789abcdef", "--rpm", "1", env=env))
    one_line_error(run("revoke", "nonsense", env=env))
    down = {"GATEWAY_REDIS_URL": f"redis://127.0.0.1:{unused_tcp_port}/0"}
    assert "unavailable" in one_line_error(run("list", env=down))
    assert "rpm" in one_line_error(run("create", "--name", "x", "--rpm", "-1", env=env))


@pytest.mark.parametrize("argv", [
    ["create"],  # --name is required
    ["create", "--name", "x", "--rpm", "ten"],
    ["create", "--name", "x", "--metadata", "[1]"],
    ["create", "--name", "x", "--metadata", "{nope"],
    ["create", "--name", "x", "--models", "m" * 201],
    ["create", "--name", "bad\nname"],
    ["create", "--name", "x", "--bogus"],
    ["update", "key_0123456789abcdef"],  # nothing to update
    ["frobnicate"],
    [],
])
def test_bad_flags(argv: list[str], capsys: pytest.CaptureFixture[str],
                   monkeypatch: pytest.MonkeyPatch, redis_url: str) -> None:
    monkeypatch.setenv("GATEWAY_REDIS_URL", redis_url)
    assert keys_main(argv) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.splitlines()) == 1 and err.startswith("gateway keys: ")


async def test_in_process_create_prints_config_lines_that_work(tmp_path: Path) -> None:
    metadata = {"team": "ops", "odd key": 'quote " and \\ \u00e9', "nested": {"n": [1, 2.5, True]}}
    out = ok(run("create", "--name", 'Ops "team"', "--rpm", "60", "--max-concurrent", "2",
                 "--models", "gpt-image-1,dall-e-2", "--metadata", json.dumps(metadata)))
    lines = out.splitlines()
    secret = lines[1]
    assert secret.startswith("sk-gw-") and out.count(secret) == 1
    toml_text = "\n".join(lines[lines.index(next(x for x in lines if x.startswith("[keys."))):])
    assert "images_per_day" not in toml_text  # only the limits that are set
    config = tmp_path / "gateway.toml"
    config.write_text('log_level = "info"\n\n' + toml_text + "\n")

    settings = load_settings(config)
    store = build_store(settings)
    assert isinstance(store, MemoryStore)
    key_id = id_for_hash(hash_secret(secret))
    record = await store.get_key(key_id)
    assert record is not None and record.hash == hash_secret(secret)
    assert record.name == 'Ops "team"' and record.metadata == metadata
    assert (record.limits.rpm, record.limits.max_concurrent, record.limits.images_per_day) == (
        60, 2, 0)
    assert record.models == ("gpt-image-1", "dall-e-2")
    assert (await store.admit(hash_secret(secret), "gpt-image-1", 1, "l")).status == OK

    # The config's keys are what list/show read without Redis; usage is not visible there.
    listed = run("list", "--config", str(config))
    assert key_id in ok(listed) and "not visible" in listed.stdout
    shown = run("show", key_id, "--json", env={"GATEWAY_CONFIG": str(config)})
    data = json.loads(ok(shown))
    assert data["id"] == key_id and data["usage"] is None and "not visible" in shown.stderr
    assert secret not in listed.stdout + shown.stdout
    assert hash_secret(secret) not in listed.stdout + shown.stdout

    as_json = json.loads(ok(run("create", "--name", "j", "--json")))
    assert as_json["config"].startswith(f"[keys.{as_json['id']}]\n")
    assert id_for_hash(hash_secret(as_json["key"])) == as_json["id"]

    for action in ("update", "revoke"):
        line = one_line_error(run(action, key_id, "--config", str(config)))
        assert "config file" in line
    assert "config file" in one_line_error(run("show", "key_0123456789abcdef",
                                               "--config", str(config)))
