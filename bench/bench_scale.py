"""Thousands of edits in flight: the gateway beside bare proxies and the upstream called directly.

An image edit spends 10-120 s upstream, so an instance holds thousands of requests that are all
waiting. This benchmark starts its own redis-server, `bench/upstream.py --delay 5` (every answer
waits 5 s after the body, as a provider at work), bare pass-through proxies and one quota gateway
(Redis, one key, the gateway's default settings), then for each N sends N small edits at once,
one connection each, from a raw asyncio client, to each target in turn:

  * wall time from the first connect to the last answer, and the statuses (all must be 200);
  * peak RSS of the target process (VmHWM, reset just before) and its RSS before the burst, so
    (peak - before) / N is the memory one in-flight request costs;
  * CPU seconds the target spent on the burst.

Targets: `direct` (the upstream), `aiohttp` (bench/passthrough.py on aiohttp.ClientSession, the
floor for a Python proxy), `httpx` (the same on httpx's default transport, httpcore),
`httpx-aiohttp` (httpx on the gateway's own aiohttp transport: the gateway's client library), and
`gateway`. Pools are unbounded in the bare proxies.

Run: `python bench/bench_scale.py` (about 2 minutes on 2 cores); exit 1 if a target fails.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import shlex
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import uvloop
from common import (
    HEADERS,
    Server,
    TreeRss,
    build_bodies,
    create_key,
    gateway_server,
    pct,
    read_body,
    read_head,
    request_head,
    script_server,
    start_redis_and_upstream,
    stopping,
    table,
    tree_cpu,
    tree_rss_mb,
    verdict,
)

DELAY = 5.0
TARGET_WALL_RATIO = 1.3  # gateway wall / the bare proxy's on the same client library
TARGET_RSS_MB = 300.0  # gateway peak RSS with 3,000 in flight
PROXIES = ("aiohttp", "httpx", "httpx-aiohttp")
LIMITS = {"rpm": 10_000_000, "images_per_day": 10_000_000, "tokens_per_month": 0,
          "max_concurrent": 0}


@dataclass
class Burst:
    wall: float
    statuses: Counter[str]
    latencies: list[float]
    before_mb: float
    peak_mb: float
    cpu: float
    errors: Counter[str] = field(default_factory=Counter)

    @property
    def ok(self) -> int:
        return self.statuses.get("200", 0)


@contextlib.contextmanager
def stack(logdir: Path, delay: float, backlog: int, workers: int, log_level: str
          ) -> Iterator[tuple[dict[str, Server], str]]:
    """Redis, the slow upstream, the bare proxies and the gateway; stopped whatever happens."""
    with stopping() as started:
        _, upstream, url, env = start_redis_and_upstream(
            logdir, started, upstream_args=["--delay", str(delay), "--backlog", str(backlog)])
        targets = {"direct": upstream}
        for kind in PROXIES:
            targets[kind] = script_server(kind, "passthrough.py", logdir, "--upstream",
                                          upstream.origin, "--client", kind, "--pool", "0",
                                          "--backlog", str(backlog))
            started.append(targets[kind])
        targets["gateway"] = gateway_server(
            "gateway", env | {"GATEWAY_REDIS_URL": url, "GATEWAY_LOG_LEVEL": log_level}, logdir,
            "--workers", str(workers))
        started.append(targets["gateway"])
        for server in targets.values():
            server.wait_ready()
        yield targets, url


async def one(host: str, port: int, head: bytes, body: bytes, out: Burst) -> None:
    """One edit on its own connection; its status (or error) and latency go into `out`."""
    start = time.perf_counter()
    writer = None
    try:
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(head + body)
        status, headers = await read_head(reader)
        answer, _ = await read_body(reader, headers)
        key = str(status)
        if status != 200:
            out.errors[f"{status} {answer[:120]!r}"] += 1
        elif b"b64_json" not in answer:
            key = "200 without an image"
        out.statuses[key] += 1
    except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
        out.statuses[type(exc).__name__] += 1
        out.errors[f"{type(exc).__name__}: {exc}"] += 1
    finally:
        if writer is not None:
            writer.close()
    out.latencies.append(time.perf_counter() - start)


async def burst(server: Server, secret: str, body: bytes, n: int) -> Burst:
    """N edits at once, one connection each, to one target."""
    headers = HEADERS | {"authorization": f"Bearer {secret}", "connection": "close"}
    head = request_head("127.0.0.1", server.port, headers, len(body))
    out = Burst(0.0, Counter(), [], tree_rss_mb(server.pid), 0.0, 0.0)
    cpu = tree_cpu(server.pid)
    with TreeRss(server.pid) as rss:
        start = time.perf_counter()
        await asyncio.gather(*(one("127.0.0.1", server.port, head, body, out) for _ in range(n)))
        out.wall = time.perf_counter() - start
    out.cpu = tree_cpu(server.pid) - cpu
    out.peak_mb = rss.peak_mb
    return out


async def run(targets: dict[str, Server], url: str, body: bytes, counts: list[int],
              settle: float) -> dict[int, dict[str, Burst]]:
    secret, _, _ = await create_key(url, "scale", LIMITS)
    results: dict[int, dict[str, Burst]] = {}
    for n in counts:
        results[n] = {}
        for name, server in targets.items():
            results[n][name] = b = await burst(server, secret, body, n)
            print(f"  {n:>5} {name:<14} {b.wall:6.2f} s  {dict(b.statuses)}  "
                  f"peak {b.peak_mb:.0f} MB  cpu {b.cpu:.2f} s", file=sys.stderr, flush=True)
            await asyncio.sleep(settle)  # let closed connections and settles finish
    return results


def report(results: dict[int, dict[str, Burst]], args: argparse.Namespace) -> tuple[str, bool]:
    """The table, and whether the gateway met its targets (the RSS one is for one process: with
    --workers it is shown, summed over the processes, not judged)."""
    ok = True
    rows = [["N in flight / target", "wall s", "x direct", "x aiohttp", "x same lib", "200s",
             "other", "p99 s", "RSS before MB", "peak MB", "KB per request", "CPU s", ""]]
    for n, by in results.items():
        direct, floor, same = by["direct"].wall, by["aiohttp"].wall, by["httpx-aiohttp"].wall
        for name, b in by.items():
            other = sum(v for k, v in b.statuses.items() if k != "200")
            check = ""
            if name == "gateway":
                good = (b.ok == n and b.wall <= TARGET_WALL_RATIO * same
                        and (n < 3000 or args.workers > 1 or b.peak_mb < TARGET_RSS_MB))
                ok &= good
                check = verdict(good)
            rows.append([f"{n} {name}", f"{b.wall:.2f}", f"{b.wall / direct:.2f}",
                         f"{b.wall / floor:.2f}", f"{b.wall / same:.2f}", str(b.ok), str(other),
                         f"{pct(b.latencies, 99):.2f}", f"{b.before_mb:.0f}", f"{b.peak_mb:.0f}",
                         f"{(b.peak_mb - b.before_mb) * 1024 / n:.1f}", f"{b.cpu:.2f}", check])
    text = table(rows)
    errors = [f"  {n} {name}: {count} x {err}" for n, by in results.items()
              for name, b in by.items() for err, count in b.errors.most_common(3)]
    if errors:
        text += "\n\nerrors (most common per target):\n" + "\n".join(errors)
    text += (f"\n\nupstream delay {args.delay:g} s; gateway: {args.workers} worker(s), log level "
             f"{args.log_level}, default settings otherwise; targets: gateway 200 for all, wall <= "
             f"{TARGET_WALL_RATIO}x the httpx-aiohttp bare proxy's, peak RSS < {TARGET_RSS_MB:g} MB "
             "at 3000")
    return text, ok


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--counts", default="1000,3000", help="requests in flight per burst")
    parser.add_argument("--delay", type=float, default=DELAY, help="upstream seconds per answer")
    parser.add_argument("--settle", type=float, default=3.0, help="seconds between bursts")
    parser.add_argument("--backlog", type=int, default=4096, help="listen backlog of the proxies")
    parser.add_argument("--only", default="", help="comma-separated targets (default: all)")
    parser.add_argument("--workers", type=int, default=1, help="gateway worker processes")
    parser.add_argument("--log-level", default="info",
                        help="the gateway's (default info: a JSON line per request, to a file)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    counts = [int(c) for c in args.counts.split(",")]
    body = build_bodies("small")["small"]
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp, \
            stack(Path(tmp), args.delay, args.backlog, args.workers, args.log_level) \
            as (targets, url):
        if args.only:
            keep = {"direct", *args.only.split(",")}
            targets = {k: v for k, v in targets.items() if k in keep}
        results = uvloop.run(run(targets, url, body, counts, args.settle))
        text, ok = report(results, args) if "gateway" in targets and all(
            t in targets for t in ("aiohttp", "httpx-aiohttp")) else ("", True)
        if not text:
            return 0
        print(f"bench_scale: {platform.node()}, {os.cpu_count()} CPUs, python "
              f"{platform.python_version()}; command: python bench/bench_scale.py "
              f"{shlex.join(argv if argv is not None else sys.argv[1:])}\n")
        print(text)
        if not ok:
            print("\ngateway log tail:\n" + targets["gateway"].log_tail(15))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
