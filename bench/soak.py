"""Soak test: one quota gateway under steady mixed traffic for minutes; memory trend and accounting.

It starts its own redis-server (free loopback port), bench/upstream.py and ONE gateway
(`python -m gateway.cli serve`, GATEWAY_REDIS_URL set, log level warning), creates a key with
images_per_day 10**9 and no other limit, then keeps `--concurrency` requests in flight for
`--minutes`: mostly small edits, some 1 MB, a few 25 MB uploads (256 KiB chunks), some with a bad
`size` field (400) and some with a wrong key (401). The gateway's VmRSS is sampled every second.

At the end, the key's images used today (RedisStore.usage) and the upstream's request count
(GET /_stats) must both equal the number of successful edits.

Run: `python bench/soak.py --minutes 2 --concurrency 8`; exit status 1 on a mismatch.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import shlex
import signal
import statistics
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import uvloop
from bench_edits import (
    BOUNDARY,
    MB,
    ROOT,
    RawClient,
    Server,
    _chunks,
    _free_port,
    multipart,
    pct,
    table,
    upstream_stats,
    verdict,
)
from bench_quota import keyed_client, make_store, start_redis_and_upstream

LIMITS = {"rpm": 0, "images_per_day": 10**9, "tokens_per_month": 0, "max_concurrent": 0}
# kind: (weight, sent in 256 KiB chunks); the bodies are built in main().
MIX = {"small": (80, False), "1mb": (10, False), "25mb": (0.2, True), "bad-size": (5, False),
       "wrong-key": (4, False)}


@dataclass
class Stack:
    redis: Server
    upstream: Server
    gateway: Server
    url: str


@contextlib.contextmanager
def stack(logdir: Path) -> Iterator[Stack]:
    """Our redis-server, the lean upstream and one quota gateway, stopped whatever happens."""
    started: list[Server] = []
    try:
        _, _, url, env = start_redis_and_upstream(logdir, started)
        gw_port = _free_port()
        started.append(Server("gateway", [sys.executable, "-m", "gateway.cli", "serve", "--port",
                                          str(gw_port)], env | {"GATEWAY_REDIS_URL": url},
                              gw_port, logdir))
        started[2].wait_ready()
        yield Stack(*started, url)
    finally:
        for server in reversed(started):
            server.stop()


async def create_key(url: str) -> tuple[str, str]:
    """(secret, key id) of a new key: images_per_day 10**9, no other limit."""
    from gateway.keys import KeyRecord, Limits

    record, secret = KeyRecord.new("soak", Limits(**LIMITS))
    store = make_store(url)
    try:
        await store.put_key(record)
    finally:
        await store.aclose()
    return secret, record.id


def status_client(base: type[RawClient]) -> type[RawClient]:
    """bench_edits' raw client, but answering the status instead of failing on a non-200."""

    class StatusClient(base):  # type: ignore[misc, valid-type]
        async def send_status(self, body: bytes, chunked: bool) -> int:
            parts: Callable[[], Iterator[bytes]] = (
                (lambda: _chunks(body)) if chunked else (lambda: iter((body,))))
            status, _ = await self.send(body, parts)
            return status

    return StatusClient


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


async def soak(s: Stack, bodies: dict[str, bytes], args: argparse.Namespace) -> tuple[str, bool]:
    secret, key_id = await create_key(s.url)
    good = status_client(keyed_client(secret))(s.gateway.origin, args.concurrency)
    bad = status_client(keyed_client("sk-wrong-" + secret[-8:]))(s.gateway.origin, args.concurrency)
    rng = random.Random(args.seed)
    kinds, weights = list(MIX), [w for w, _ in MIX.values()]
    results: Counter[tuple[str, str]] = Counter()
    lat: dict[str, list[float]] = defaultdict(list)
    rss: list[tuple[float, float]] = []
    sent_bytes = 0
    t0 = time.monotonic()
    deadline = t0 + args.minutes * 60

    async def sampler() -> None:
        while True:
            rss.append((time.monotonic() - t0, rss_mb(s.gateway.pid)))
            await asyncio.sleep(1)

    async def worker() -> None:
        nonlocal sent_bytes
        while time.monotonic() < deadline:
            kind = rng.choices(kinds, weights)[0]
            client = bad if kind == "wrong-key" else good
            start = time.perf_counter()
            try:
                status = await client.send_status(bodies[kind], MIX[kind][1])
                outcome = "ok" if status == 200 else str(status)
            except (OSError, asyncio.IncompleteReadError, TimeoutError) as exc:
                outcome = f"client:{type(exc).__name__}"
            lat[kind].append((time.perf_counter() - start) * 1000)
            results[kind, outcome] += 1
            sent_bytes += len(bodies[kind])

    sampling = asyncio.create_task(sampler())
    try:
        async with asyncio.timeout(args.minutes * 60 + 120):
            await asyncio.gather(*(worker() for _ in range(args.concurrency)))
    finally:
        elapsed = time.monotonic() - t0
        sampling.cancel()
        await good.aclose()
        await bad.aclose()
    rss.append((time.monotonic() - t0, rss_mb(s.gateway.pid)))
    await asyncio.sleep(1.0)  # settlement runs after the answer's last byte
    store = make_store(s.url)
    try:
        usage = await store.usage(key_id)
    finally:
        await store.aclose()
    used = usage.windows["images"].used if usage else -1
    upstream = (await upstream_stats(s.upstream.origin))["requests"]

    # ---------------------------------------------------------------------------- report
    total = sum(results.values())
    ok = sum(n for (_, o), n in results.items() if o == "ok")
    by_outcome: Counter[str] = Counter()
    for (_, outcome), n in results.items():
        by_outcome[outcome if outcome == "ok" or outcome.startswith("client")
                   else ("5xx" if outcome.startswith("5") else outcome)] += n
    expected = {"bad-size": "400", "wrong-key": "401"}
    rows = [["kind", "requests", "p50 ms", "p99 ms", "outcomes"]]
    for kind in MIX:
        outs = {o: n for (k, o), n in sorted(results.items()) if k == kind}
        rows.append([kind, str(sum(outs.values())),
                     f"{statistics.median(lat[kind]):.2f}" if lat[kind] else "-",
                     f"{pct(lat[kind], 99):.2f}" if lat[kind] else "-",
                     ", ".join(f"{o}={n}" for o, n in outs.items())])
    unexpected = sum(n for (k, o), n in results.items() if o != expected.get(k, "ok"))
    times, values = [t / 60 for t, _ in rss], [v for _, v in rss]
    slope = statistics.linear_regression(times, values).slope if len(rss) > 2 else float("nan")
    ok_redis, ok_upstream = used == ok, upstream == ok
    lines = [
        table(rows), "",
        f"requests: {total} in {elapsed:.1f} s = {total / elapsed:.1f} req/s, "
        f"{sent_bytes / MB / elapsed:.1f} MiB/s uploaded; successful edits: {ok}",
        "by outcome: " + ", ".join(f"{o}={n}" for o, n in sorted(by_outcome.items())),
        f"unexpected outcomes (not 200, or not the 400/401 a rejection should get): {unexpected}",
        f"gateway RSS MB: start {values[0]:.1f}, end {values[-1]:.1f}, max {max(values):.1f}, "
        f"trend {slope:+.2f} MB/min over {len(rss)} samples",
        f"redis images used today = {used}, successful edits = {ok}: {verdict(ok_redis)}",
        f"upstream /_stats requests = {upstream}, successful edits = {ok}: {verdict(ok_upstream)}",
    ]
    return "\n".join(lines), ok_redis and ok_upstream


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=2.0, help="duration (default 2)")
    parser.add_argument("--concurrency", type=int, default=8, help="requests in flight (default 8)")
    parser.add_argument("--seed", type=int, default=1, help="seed of the traffic mix (default 1)")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwinds, so servers stop
    command = shlex.join(["python", *(sys.argv if argv is None else [__file__, *argv])])
    sys.path.insert(0, str(ROOT))
    from tests.images import png

    small = multipart(png(64, 64))
    bad_size = (f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="size"\r\n\r\n'
                "banana\r\n").encode() + small
    bodies = {"small": small, "1mb": multipart(png(1024, 1024, size=1_000_000)),
              "25mb": multipart(png(2048, 2048, size=25 * MB)), "bad-size": bad_size,
              "wrong-key": small}
    print(f"soak: {args.minutes:g} min at concurrency {args.concurrency} ...", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-soak-") as tmp, stack(Path(tmp)) as s:
        try:
            with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
                text, ok = runner.run(soak(s, bodies, args))
        except Exception:
            for server in (s.redis, s.upstream, s.gateway):
                print(f"--- {server.name} log ---\n{server.log_tail()}", file=sys.stderr)
            raise
        for server in (s.redis, s.upstream, s.gateway):
            if server.proc.poll() is not None:
                raise RuntimeError(f"{server.name} died:\n{server.log_tail()}")
    print(f"\ncommand: {command}")
    print(f"key limits: {LIMITS}; mix weights: "
          + ", ".join(f"{k}={w:g}" for k, (w, _) in MIX.items()) + "\n")
    print(text)
    print(f"\noverall: {verdict(ok)}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
