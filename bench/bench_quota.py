"""Benchmark what per-key quotas cost: the gateway with GATEWAY_REDIS_URL against the same gateway open.

It starts its own redis-server on a free loopback port (never the machine's), creates one key with
limits no request reaches, then the lean fake upstream (bench/upstream.py) and two gateways
(`python -m gateway.cli serve`): "quotas on" (GATEWAY_REDIS_URL set: every edit authenticated,
with the key record cached for up to 1 s, admitted by one Lua script call and settled by one more)
and "quotas off" (no keys). Both get the same request bytes, Authorization header included, so
the difference is what admission costs:

  (a) added latency per small edit at concurrency 1, the two gateways interleaved in blocks;
  (b) the floor: store.admit() and store.settle() called directly on Redis with redis.asyncio;
  (c) 1 MB edits/s at concurrency 8, quotas on against off;
  (d) Redis commands per request from INFO commandstats: the round trips the gateway makes.

Run: `python bench/bench_quota.py` (about 40 s on 2 cores); exit status 1 if a target fails.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import redis
import redis.asyncio as aioredis
from common import (
    HEADERS,
    PATH,
    ROOT,
    Latency,
    RawClient,
    Server,
    Throughput,
    build_bodies,
    command_line,
    cpu_seconds,
    create_key,
    gateway_server,
    keyed_client,
    latency,
    machine,
    make_store,
    pct,
    run_logged,
    start_redis_and_upstream,
    stopping,
    table,
    throughput,
    upstream_stats,
    verdict,
)

TARGET_ADDED_P50_MS = 1.0  # one Redis round trip on loopback
ON, OFF = "quotas on", "quotas off"
LIMITS = {"rpm": 10_000_000, "images_per_day": 10_000_000, "tokens_per_month": 0,
          "max_concurrent": 1000}
# Commands the client sends (round trips); the script's own redis.call()s are counted apart.
SCRIPT_CALLS = frozenset(re.findall(r"redis\.call\('(\w+)'", (ROOT / "gateway" / "quota" / "quota.lua")
                                    .read_text().replace('"', "'")))


# ------------------------------------------------------------------------------ processes
@dataclass
class Stack:
    redis: Server
    upstream: Server
    on: Server
    off: Server
    url: str  # redis://... of our own redis-server


@contextlib.contextmanager
def stack(logdir: Path) -> Iterator[Stack]:
    """Our redis-server, the fake upstream and both gateways, stopped whatever happens."""
    with stopping() as started:
        redis_server, upstream, url, env = start_redis_and_upstream(logdir, started)
        gateways = {}
        for name, extra in ((ON, {"GATEWAY_REDIS_URL": url}), (OFF, {})):
            gateways[name] = gateway_server(name.replace(" ", "-"), env | extra, logdir)
            started.append(gateways[name])
        for server in gateways.values():
            server.wait_ready()
        yield Stack(redis_server, upstream, gateways[ON], gateways[OFF], url)


# ------------------------------------------------------------------------------ the check
async def verify(s: Stack, secret: str, body: bytes) -> None:
    """Quotas really on (401 without the key, rate-limit headers with it), really off on the other."""
    headers = {k: v for k, v in HEADERS.items() if k != "authorization"}
    auth = {"authorization": f"Bearer {secret}"}
    async with httpx.AsyncClient(timeout=30, trust_env=False) as client:
        anon = await client.post(s.on.origin + PATH, content=body, headers=headers)
        keyed = await client.post(s.on.origin + PATH, content=body, headers=headers | auth)
        open_ = await client.post(s.off.origin + PATH, content=body, headers=headers)
    if anon.status_code != 401:
        raise RuntimeError(f"{ON}: a request without a key got {anon.status_code}, not 401")
    if keyed.status_code != 200 or "x-ratelimit-remaining-requests" not in keyed.headers:
        raise RuntimeError(f"{ON}: the keyed request got {keyed.status_code} {keyed.headers}")
    if open_.status_code != 200 or "x-ratelimit-remaining-requests" in open_.headers:
        raise RuntimeError(f"{OFF}: got {open_.status_code} {open_.headers}")


# ------------------------------------------------------------------------------ (b) floor
@dataclass
class Floor:
    admit_ms: list[float]
    settle_ms: list[float]
    ping_ms: list[float]
    client_cpu_us: list[float]  # this process's CPU per admit, settle, PING call
    redis_us: dict[str, float]  # Redis's own time per call (commandstats usec / calls)


async def floor(url: str, key_hash: str, key_id: str, calls: int, warmup: int) -> Floor:
    """store.admit() then store.settle(), `calls` times, straight to Redis; then a PING on the
    same client (same pool and timeouts): the round trip with nothing to run."""
    store = make_store(url)
    out = Floor([], [], [], [], {})
    try:
        for i in range(warmup):
            lease = f"bench-warm-{i}"
            await store.admit(key_hash, "gpt-image-2", 1, lease)
            await store.settle(key_id, lease, answered=True, images=1, tokens=0)
            await store.redis.ping()
        before = await command_stats(url)
        cpu = [0.0, 0.0, 0.0]
        for i in range(calls):
            lease = f"bench-floor-{i}"
            c0, t0 = time.process_time(), time.perf_counter()
            decision = await store.admit(key_hash, "gpt-image-2", 1, lease)
            c1, t1 = time.process_time(), time.perf_counter()
            await store.settle(key_id, lease, answered=True, images=1, tokens=0)
            c2, t2 = time.process_time(), time.perf_counter()
            await store.redis.ping()
            c3, t3 = time.process_time(), time.perf_counter()
            if decision.status != "ok":
                raise RuntimeError(f"admit refused: {decision}")
            out.admit_ms.append((t1 - t0) * 1000)
            out.settle_ms.append((t2 - t1) * 1000)
            out.ping_ms.append((t3 - t2) * 1000)
            for j, (a, b) in enumerate(((c0, c1), (c1, c2), (c2, c3))):
                cpu[j] += b - a
        out.client_cpu_us = [1e6 * c / calls for c in cpu]
        after = await command_stats(url)
    finally:
        await store.aclose()
    for name in ("evalsha", "ping"):
        calls_d = after.get(name, {}).get("calls", 0) - before.get(name, {}).get("calls", 0)
        usec_d = after.get(name, {}).get("usec", 0) - before.get(name, {}).get("usec", 0)
        out.redis_us[name] = usec_d / calls_d if calls_d else float("nan")
    return out


# ------------------------------------------------------------------------ (d) commandstats
async def command_stats(url: str) -> dict[str, dict[str, int]]:
    """INFO commandstats as {command: {calls, usec, ...}}, names as Redis prints them."""
    client = aioredis.Redis.from_url(url)
    try:
        raw = await client.info("commandstats")
    finally:
        await client.aclose()
    return {k.removeprefix("cmdstat_"): {f: int(v) for f, v in d.items() if f != "usec_per_call"}
            for k, d in raw.items()}


@dataclass
class Commands:
    requests: int
    seconds: float
    per_request: dict[str, float]  # client-sent commands per request
    in_script: dict[str, float]  # commands the script ran, per request
    usec: dict[str, float]  # Redis time per call
    redis_cpu_us: float  # redis-server CPU per request
    connections: int  # clients connected to Redis at the end (ours excluded)


async def commands(s: Stack, make: type[RawClient], body: bytes, requests: int,
                   concurrency: int) -> Commands:
    """A fixed number of edits through the quota gateway, INFO commandstats before and after."""
    client = make(s.on.origin, concurrency)
    try:
        left = 20 * concurrency  # warm-up: the gateway's Redis pool grows to its steady size

        async def worker() -> None:
            nonlocal left
            while left > 0:
                left -= 1
                await client.post(body)

        async with asyncio.timeout(60):
            await asyncio.gather(*(worker() for _ in range(concurrency)))
        await asyncio.sleep(0.3)  # the warm-up's settlements are done
        up0 = (await upstream_stats(s.upstream.origin))["requests"]
        before, cpu0, t0 = await command_stats(s.url), cpu_seconds(s.redis.pid), time.perf_counter()
        left = requests
        async with asyncio.timeout(120):
            await asyncio.gather(*(worker() for _ in range(concurrency)))
        seconds = time.perf_counter() - t0
        await asyncio.sleep(0.3)  # settlement runs after the answer is sent
        after, cpu1 = await command_stats(s.url), cpu_seconds(s.redis.pid)
        up1 = (await upstream_stats(s.upstream.origin))["requests"]
    finally:
        await client.aclose()
    if up1 - up0 != requests:
        raise RuntimeError(f"the upstream got {up1 - up0} edits, expected {requests}")
    probe = aioredis.Redis.from_url(s.url)
    try:
        connected = int((await probe.info("clients"))["connected_clients"]) - 1
    finally:
        await probe.aclose()
    sent, inside, usec = {}, {}, {}
    for name in sorted(after):
        calls = after[name]["calls"] - before.get(name, {}).get("calls", 0)
        if name == "info" or calls <= 0:
            continue  # our own INFO calls
        (inside if name.upper() in SCRIPT_CALLS else sent)[name] = calls / requests
        usec[name] = (after[name]["usec"] - before.get(name, {}).get("usec", 0)) / calls
    return Commands(requests, seconds, sent, inside, usec, 1e6 * (cpu1 - cpu0) / requests,
                    connected)


# --------------------------------------------------------------------------------- report
@dataclass
class Results:
    floor: Floor
    lat: dict[str, Latency]
    lat_redis_cpu_us: float
    tput: dict[str, Throughput]
    cmds: Commands


def report(r: Results, args: argparse.Namespace) -> tuple[str, bool]:
    lat, tput, fl, cm = r.lat, r.tput, r.floor, r.cmds
    p50 = {n: statistics.median(v.ms) for n, v in lat.items()}
    p99 = {n: pct(v.ms, 99) for n, v in lat.items()}
    added50, added99 = p50[ON] - p50[OFF], p99[ON] - p99[OFF]
    ratio = tput[ON].rps / tput[OFF].rps
    paired = [a / b for a, b in zip(tput[ON].round_rps, tput[OFF].round_rps, strict=True) if b]
    evalsha = cm.per_request.get("evalsha", 0.0)
    others = {k: v for k, v in cm.per_request.items() if k != "evalsha"}
    ok_lat = added50 < TARGET_ADDED_P50_MS
    hgetall = cm.per_request.get("hgetall", 0.0)
    ok_trips = abs(evalsha - 2) < 0.01 and sum(others.values()) < 0.05
    hget_calls = round(hgetall * cm.requests)
    # Cached: about one lookup a second (more when several requests miss at once at expiry).
    ok_cache = hgetall < 0.05
    n, c = args.requests, args.concurrency
    fmt = "{:.3f}".format
    rows = [
        ["metric", OFF, ON, "on - off", "target", "result"],
        [f"(a) small edit c=1 p50 ms (n={n} each)", fmt(p50[OFF]), fmt(p50[ON]), fmt(added50),
         f"< {TARGET_ADDED_P50_MS:g} ms", verdict(ok_lat)],
        ["    p99 ms", fmt(p99[OFF]), fmt(p99[ON]), fmt(added99), "", ""],
        ["    mean ms", fmt(statistics.fmean(lat[OFF].ms)), fmt(statistics.fmean(lat[ON].ms)),
         fmt(statistics.fmean(lat[ON].ms) - statistics.fmean(lat[OFF].ms)), "", ""],
        ["    gateway CPU ms/request", fmt(lat[OFF].cpu_ms), fmt(lat[ON].cpu_ms),
         fmt(lat[ON].cpu_ms - lat[OFF].cpu_ms), "", ""],
        ["    redis-server CPU ms/request", "-", fmt(r.lat_redis_cpu_us / 1000), "", "", ""],
        [f"(b) store.admit() direct, p50 / p99 ms (n={args.calls})", "-",
         f"{fmt(statistics.median(fl.admit_ms))} / {fmt(pct(fl.admit_ms, 99))}", "", "", ""],
        ["    store.settle() direct, p50 / p99 ms", "-",
         f"{fmt(statistics.median(fl.settle_ms))} / {fmt(pct(fl.settle_ms, 99))}", "", "", ""],
        ["    PING (same client), p50 / p99 ms", "-",
         f"{fmt(statistics.median(fl.ping_ms))} / {fmt(pct(fl.ping_ms, 99))}", "", "", ""],
        ["    Redis time per EVALSHA / PING, us", "-",
         f"{fl.redis_us['evalsha']:.1f} / {fl.redis_us['ping']:.1f}", "", "", ""],
        ["    client CPU us per admit / settle / PING", "-",
         " / ".join(f"{c:.0f}" for c in fl.client_cpu_us), "", "", ""],
        [f"(c) 1 MB edits c={c} req/s ({args.duration:g} s each)", f"{tput[OFF].rps:.1f}",
         f"{tput[ON].rps:.1f}", f"{ratio:.1%}", "", ""],
        ["    range over paired rounds", "", "", f"{min(paired):.0%}-{max(paired):.0%}", "", ""],
        ["    gateway CPU ms/request", fmt(tput[OFF].proxy_cpu_ms), fmt(tput[ON].proxy_cpu_ms),
         fmt(tput[ON].proxy_cpu_ms - tput[OFF].proxy_cpu_ms), "", ""],
        [f"(d) Redis commands per request (n={cm.requests}, c={c} small, {cm.seconds:.1f} s)",
         "-", "", "", "", ""],
        ["    evalsha (admit + settle)", "-", f"{evalsha:.3f}", "", "= 2", verdict(ok_trips)],
        *(["    " + k + (" (a new connection's handshake)" if k == "hello" else ""), "-", f"{v:.3f}",
           "", "", ""] for k, v in others.items() if k != "hgetall"),
        ["    hgetall (key record, cached <= 1 s)", "-", f"{hgetall:.3f}", "", "< 0.05",
         verdict(ok_cache)],
        ["    round trips per request", "-", f"{sum(cm.per_request.values()):.3f}", "", "", ""],
        ["    Redis us per evalsha call", "-", f"{cm.usec.get('evalsha', 0):.1f}", "", "", ""],
        ["    redis-server CPU us/request", "-", f"{cm.redis_cpu_us:.1f}", "", "", ""],
        ["    gateway connections to Redis", "-", str(cm.connections), "", "", ""],
    ]
    notes = [f"(c) direct, the upstream alone: {tput['direct'].rps:.1f} req/s",
             f"(d) hgetall: {hget_calls} call(s) in {cm.seconds:.1f} s at concurrency {c} "
             "(the cache refreshes once a second; requests that miss together each look up)",
             "(d) commands the script ran (no round trips), per request: "
             + ", ".join(f"{k} {v:.2f}" for k, v in cm.in_script.items())]
    return table(rows) + "\n\n" + "\n".join(notes), ok_lat and ok_trips and ok_cache


# ----------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Benchmark what the gateway's quotas cost.")
    parser.add_argument("--requests", type=int, default=2000,
                        help="(a) small edits per gateway (default 2000)")
    parser.add_argument("--warmup", type=int, default=200,
                        help="(a) unmeasured small edits per gateway first (default 200)")
    parser.add_argument("--calls", type=int, default=2000,
                        help="(b) admit+settle pairs straight to Redis (default 2000)")
    parser.add_argument("--duration", type=float, default=8.0,
                        help="(c) measured seconds per target (default 8)")
    parser.add_argument("--concurrency", type=int, default=8, help="(c) and (d) (default 8)")
    parser.add_argument("--count", type=int, default=2000,
                        help="(d) edits between the two INFO commandstats (default 2000)")
    return parser.parse_args(argv)


async def run(s: Stack, bodies: dict[str, bytes], args: argparse.Namespace) -> Results:
    secret, key_id, key_hash = await create_key(s.url, "bench", LIMITS)
    make = keyed_client(secret)
    await verify(s, secret, bodies["small"])
    print(f"(b) floor: {args.calls} admit + settle pairs straight to Redis ...", flush=True)
    fl = await floor(s.url, key_hash, key_id, args.calls, 200)
    print(f"(a) latency: {args.requests} small edits per gateway, interleaved ...", flush=True)
    gateways = {OFF: s.off, ON: s.on}
    cpu0 = cpu_seconds(s.redis.pid)
    lat = await latency(gateways, make, bodies["small"], args.requests, args.warmup)
    on_requests = -(-args.requests // 20) * 20 + args.warmup  # latency() runs whole blocks
    lat_redis_us = 1e6 * (cpu_seconds(s.redis.pid) - cpu0) / on_requests
    print(f"(c) throughput: 1 MB edits, concurrency {args.concurrency} ...", flush=True)
    tput = await throughput({"direct": s.upstream, **gateways}, make, bodies["1mb"],
                            args.concurrency, args.duration)
    print(f"(d) commandstats: {args.count} small edits, concurrency {args.concurrency} ...",
          flush=True)
    cmds = await commands(s, make, bodies["small"], args.count, args.concurrency)
    return Results(fl, lat, lat_redis_us, tput, cmds)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwinds, so servers stop
    command = command_line(__file__, argv)
    binary = shutil.which("redis-server")
    version = subprocess.run([binary, "--version"], capture_output=True, text=True,
                             check=False).stdout.split() if binary else []
    facts = machine(f"redis-py {redis.__version__}",
                    " ".join(version[:3]) if version else "no redis")
    print(facts, flush=True)
    bodies = build_bodies("small", "1mb")
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bench-quota-") as tmp, stack(Path(tmp)) as s:
        results = run_logged((s.redis, s.upstream, s.on, s.off), run(s, bodies, args))
    text, ok = report(results, args)
    print()
    print(f"command: {command}")
    print(facts)
    print("client: bench/common.py's raw HTTP/1.1 client on uvloop, the same bytes (Authorization "
          "included) to both gateways; servers: one process each on 127.0.0.1; redis-server "
          "started here (no persistence)")
    print(f"key limits: {LIMITS} (nothing is refused); bodies: "
          + ", ".join(f"{k}={len(v):,} B" for k, v in bodies.items()))
    print()
    print(text)
    print()
    print(f"overall: {verdict(ok)} in {time.monotonic() - started:.0f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
