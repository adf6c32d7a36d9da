"""Static checks of the deployment files (no Docker engine here): docker-compose.yml, the
Dockerfile, .dockerignore and the nginx config, which the real nginx binary checks with `nginx -t`.

`local_nginx_conf` and `nginx_binary` are shared with tests/ops/test_topology.py, which runs the same
nginx config in front of real gateway processes."""

from __future__ import annotations

import difflib
import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
NGINX_CONF = ROOT / "config" / "nginx" / "nginx.conf"

# The lines of the shipped nginx config a local run replaces: the compose service names, which
# resolve only on the compose network (nginx resolves upstream names when it loads its config,
# so even `nginx -t` fails without them), and the port nginx listens on.
_SERVER = re.compile(r"^(\s*server\s+)gateway-([12]):8080(\b.*)$")
_LISTEN = re.compile(r"^(\s*listen\s+)8080(\s*;.*)$")
# Temp paths default to the distribution's compiled-in directories (/var/lib/nginx/... on
# Debian), which an unprivileged user cannot create; a local run keeps them in its own prefix.
_TEMP_PATHS = ("client_body_temp_path", "proxy_temp_path", "fastcgi_temp_path",
               "uwsgi_temp_path", "scgi_temp_path")


def nginx_binary() -> str:
    """The nginx executable; a missing one fails (never skips) the tests that need it."""
    found = shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if Path(p).exists()), None)
    if found is None:
        pytest.fail("nginx is not installed: `apt-get install -y nginx` (scripts/test.sh does it)",
                    pytrace=False)
    return found


def local_nginx_conf(prefix: Path, gateway_ports: tuple[int, int], listen_port: int) -> str:
    """The shipped config with the gateways at 127.0.0.1 ports, the listener on a loopback port
    and temp paths under `prefix`; nothing else differs (checked here, so that the tests really
    run the shipped config)."""
    shipped = NGINX_CONF.read_text().splitlines()
    out: list[str] = []
    replaced = {"server": 0, "listen": 0}
    for line in shipped:
        if m := _SERVER.match(line):
            out.append(f"{m[1]}127.0.0.1:{gateway_ports[int(m[2]) - 1]}{m[3]}")
            replaced["server"] += 1
        elif m := _LISTEN.match(line):
            out.append(f"{m[1]}127.0.0.1:{listen_port}{m[2]}")
            replaced["listen"] += 1
        else:
            out.append(line)
        if line.strip() == "http {":
            out += [f"    {name} {prefix / name};" for name in _TEMP_PATHS]
    assert replaced == {"server": 2, "listen": 1}, f"unexpected nginx.conf layout: {replaced}"

    # Exactly those lines differ from the shipped file.
    diff = [d for d in difflib.ndiff(shipped, out) if d[:2] in ("- ", "+ ")]
    removed = [d[2:] for d in diff if d.startswith("- ")]
    added = [d[2:] for d in diff if d.startswith("+ ")]
    assert sorted(removed) == sorted(line for line in shipped
                                     if _SERVER.match(line) or _LISTEN.match(line)), diff
    assert len(added) == 3 + len(_TEMP_PATHS), diff
    assert all(re.search(r"127\.0\.0\.1:\d+|_temp_path ", line) for line in added), diff
    return "\n".join(out) + "\n"


def nginx_args(prefix: Path, conf: Path) -> list[str]:
    """Run unprivileged from `prefix`: pid file and start-up error log there, in the foreground."""
    return [nginx_binary(), "-p", str(prefix), "-c", str(conf), "-e", str(prefix / "error.log"),
            "-g", f"daemon off; pid {prefix / 'nginx.pid'};"]


# --------------------------------------------------------------------------- docker-compose.yml
@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def test_compose_services_and_healthchecks(compose: dict) -> None:
    services = compose["services"]
    gateways = [name for name in services if name.startswith("gateway")]
    assert {"redis", "nginx", "prometheus", "grafana"} <= set(services)
    assert gateways == ["gateway-1", "gateway-2"] or \
        any(services[g].get("deploy", {}).get("replicas", 1) >= 2 for g in gateways)
    for name, service in services.items():
        check = service.get("healthcheck")
        assert check and check.get("test") and not check.get("disable"), f"{name}: no healthcheck"


def test_compose_mounts_exist(compose: dict) -> None:
    local = []
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            source = volume["source"] if isinstance(volume, dict) else volume.split(":")[0]
            if source.startswith(("./", "../")):
                local.append(source)
                assert (ROOT / source).exists(), f"{name} mounts {source}, which does not exist"
    assert "./config/nginx/nginx.conf" in local


def test_compose_redis_persists(compose: dict) -> None:
    redis = compose["services"]["redis"]
    command = redis["command"]
    command = command if isinstance(command, list) else shlex.split(command)
    assert command[command.index("--appendonly") + 1] == "yes"
    assert command[command.index("--maxmemory-policy") + 1] == "noeviction"
    assert any(str(v).endswith(":/data") for v in redis.get("volumes", []))


def _seconds(value: str | int) -> float:
    if isinstance(value, int | float):
        return float(value)
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", value)
    assert parts and "".join(n + u for n, u in parts) == value, value
    return sum(float(n) * units[u] for n, u in parts)


def test_compose_gateways(compose: dict) -> None:
    for name in ("gateway-1", "gateway-2"):
        gateway = compose["services"][name]
        env = gateway["environment"]
        env = env if isinstance(env, dict) else dict(e.split("=", 1) for e in env)
        assert env["GATEWAY_REDIS_URL"].startswith("redis://redis:")
        # drain_seconds (5) + shutdown_timeout (30) before the engine's SIGKILL.
        assert _seconds(gateway["stop_grace_period"]) >= 35
        assert gateway["depends_on"]["redis"]["condition"] == "service_healthy"
    nginx = compose["services"]["nginx"]
    assert {"gateway-1", "gateway-2"} <= set(nginx["depends_on"])
    assert "/nginx-health" in " ".join(nginx["healthcheck"]["test"])


# ----------------------------------------------------------------------------------- Dockerfile
def _instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())  # join continuation lines
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_dockerfile() -> None:
    instructions = _instructions()
    froms = [i for i, (word, _) in enumerate(instructions) if word == "FROM"]
    assert len(froms) >= 2, "not a multi-stage build"
    final = instructions[froms[-1]:]
    users = [rest for word, rest in final if word == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), users
    [health] = [rest for word, rest in final if word == "HEALTHCHECK"]
    assert "/healthz" in health and "CMD" in health
    entry = [rest for word, rest in final if word == "ENTRYPOINT"]
    cmd = [rest for word, rest in final if word == "CMD"]
    assert all(v.startswith("[") for v in entry + cmd), "ENTRYPOINT/CMD not in exec form"
    argv = (json.loads(entry[-1]) if entry else []) + (json.loads(cmd[-1]) if cmd else [])
    assert argv[:2] == ["gateway", "serve"], argv


def _final_stage() -> list[tuple[str, str]]:
    instructions = _instructions()
    return instructions[max(i for i, (word, _) in enumerate(instructions) if word == "FROM"):]


def image_env() -> dict[str, str]:
    """The environment the final stage's ENV instructions set (KEY=value form)."""
    env: dict[str, str] = {}
    for word, rest in _final_stage():
        if word == "ENV":
            pairs = shlex.split(rest)
            assert all("=" in pair for pair in pairs), f"ENV not in KEY=value form: {rest}"
            env.update(pair.split("=", 1) for pair in pairs)
    return env


def image_ports() -> tuple[int, int]:
    """(API port, metrics port) of the container image."""
    env = image_env()
    return int(env["GATEWAY_PORT"]), int(env["GATEWAY_METRICS_PORT"])


def test_dockerfile_serves_metrics_apart_from_the_api() -> None:
    # /metrics carries every key's id and usage: by default the container serves it on its own
    # port, which the load balancer does not proxy and only Prometheus scrapes.
    api, metrics = image_ports()
    assert metrics != api
    final = _final_stage()
    exposed = {int(port.split("/")[0]) for word, rest in final if word == "EXPOSE"
               for port in rest.split()}
    assert {api, metrics} <= exposed, exposed
    [health] = [rest for word, rest in final if word == "HEALTHCHECK"]
    assert f"127.0.0.1:{api}/healthz" in health


def test_compose_keeps_metrics_off_the_public_ports(compose: dict) -> None:
    api, metrics = image_ports()
    for name in ("gateway-1", "gateway-2"):
        gateway = compose["services"][name]
        env = gateway["environment"]
        env = env if isinstance(env, dict) else dict(e.split("=", 1) for e in env)
        assert str(env.get("GATEWAY_METRICS_PORT", metrics)) == str(metrics), name
        assert not gateway.get("ports"), f"{name} publishes ports: only nginx should"
    published = [str(port) for service in compose["services"].values()
                 for port in service.get("ports", [])]
    assert not any(port.split(":")[-1].split("/")[0] == str(metrics) for port in published)
    # nginx proxies the API port of each gateway, never the metrics port.
    upstreams = re.findall(r"^\s*server\s+(gateway-\d+):(\d+)", NGINX_CONF.read_text(), re.M)
    assert sorted(upstreams) == [("gateway-1", str(api)), ("gateway-2", str(api))], upstreams


def test_dockerignore() -> None:
    ignored = {line.strip().rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    assert {"tests", ".git", ".env"} <= ignored, ignored


# ---------------------------------------------------------------------------------- nginx.conf
def test_nginx_conf_streams_both_ways() -> None:
    directives = {re.sub(r"\s+", " ", line.split("#")[0].strip())
                  for line in NGINX_CONF.read_text().splitlines()}
    for expected in ("proxy_request_buffering off;", "proxy_buffering off;",
                     "proxy_http_version 1.1;", 'proxy_set_header Connection "";',
                     "proxy_next_upstream error timeout;", "client_max_body_size 900m;"):
        assert expected in directives, expected
    assert not any("non_idempotent" in d for d in directives)  # a sent POST is never repeated


def test_nginx_conf_passes_nginx_t(tmp_path: Path) -> None:
    # nginx resolves upstream host names while loading the config, so `nginx -t` on the shipped
    # file needs gateway-1/gateway-2 in DNS: they are replaced by loopback ports (nothing needs
    # to listen there for -t), and the run is kept inside tmp_path (see local_nginx_conf).
    conf = tmp_path / "nginx.conf"
    conf.write_text(local_nginx_conf(tmp_path, (18081, 18082), 18080))
    args = nginx_args(tmp_path, conf)
    result = subprocess.run([args[0], "-t", *args[1:]], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert "test is successful" in result.stderr
