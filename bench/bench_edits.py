"""Benchmark POST /v1/images/edits: the gateway against a bare streaming proxy and the upstream.

Servers on 127.0.0.1, each its own process (uvicorn, uvloop + httptools): a lean fake upstream
(bench/upstream.py), a pass-through proxy baseline (bench/passthrough.py; a second copy with
--chunked joins the throughput run, re-framing the body as the gateway must) and the gateway
(`python -m gateway.cli serve`). The same multipart bodies (model, prompt, then image, in
the OpenAI Python SDK's order) go to all three, so "added" numbers are what each hop costs:

  * latency at concurrency 1 for a small edit, interleaved in rounds (fair on a noisy machine);
  * requests/s for 1 MB edits at concurrency 8, interleaved in segments;
  * peak RSS of the proxy with 4 x 25 MB uploads in flight (sent in 256 KiB chunks).

The client (one process, uvloop) is by default a raw HTTP/1.1 client on asyncio streams:
httpx.AsyncClient (`--client httpx`) costs about as much CPU per request as the proxies do, and
on 2 cores that CPU is taken from the servers, which flatters the slower proxy's throughput.
Run: `python bench/bench_edits.py` (about 40 s on 2 cores); exit status 1 if a target fails.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from common import (
    HEADERS,
    PATH,
    REQUEST_TIMEOUT,
    UPLOAD_CHUNK,
    EditClient,
    Latency,
    RawClient,
    RssSampler,
    Server,
    Throughput,
    build_bodies,
    check_answer,
    command_line,
    gateway_env,
    gateway_server,
    latency,
    machine,
    pct,
    rss_mb,
    run_logged,
    script_server,
    status_kb,
    stopping,
    table,
    throughput,
    upload_chunks,
    upstream_stats,
    verdict,
)

# Targets printed beside the numbers.
TARGET_ADDED_P50_MS = 2.0
TARGET_THROUGHPUT_RATIO = 0.80
TARGET_RSS_GROWTH_MB = 40.0


# ------------------------------------------------------------------------------ processes
@contextlib.contextmanager
def servers(logdir: Path, client: str = "httpx-aiohttp") -> Iterator[dict[str, Server]]:
    """The upstream, the pass-through and the gateway, stopped whatever happens."""
    with stopping() as started:
        upstream = script_server("upstream", "upstream.py", logdir)
        started.append(upstream)
        upstream.wait_ready()
        passthrough = script_server("passthrough", "passthrough.py", logdir,
                                    "--upstream", upstream.origin, "--client", client)
        started.append(passthrough)
        chunked = script_server("chunked", "passthrough.py", logdir,
                                "--upstream", upstream.origin, "--chunked", "--client", client)
        started.append(chunked)
        gateway = gateway_server("gateway", gateway_env(upstream), logdir)
        started.append(gateway)
        passthrough.wait_ready()
        chunked.wait_ready()
        gateway.wait_ready()
        yield {"direct": upstream, "passthrough": passthrough, "gateway": gateway,
               "chunked": chunked}


# ------------------------------------------------------------------------------- clients
class HttpxClient(EditClient):
    """httpx.AsyncClient, as an OpenAI SDK user would run: realistic, but its CPU per request
    is close to a proxy's, and on 2 cores that CPU is taken from the servers."""

    def __init__(self, origin: str, connections: int) -> None:
        self.origin = origin
        self.client = httpx.AsyncClient(
            base_url=origin, timeout=httpx.Timeout(REQUEST_TIMEOUT), trust_env=False,
            limits=httpx.Limits(max_connections=connections, max_keepalive_connections=connections))

    async def post(self, body: bytes) -> None:
        response = await self.client.post(PATH, content=body, headers=HEADERS)
        check_answer(self.origin, response.status_code, response.content)

    async def post_chunked(self, body: bytes) -> None:
        async def chunks() -> AsyncIterator[bytes]:
            for chunk in upload_chunks(body):
                yield chunk
                await asyncio.sleep(0)

        headers = HEADERS | {"content-length": str(len(body))}
        response = await self.client.post(PATH, content=chunks(), headers=headers)
        check_answer(self.origin, response.status_code, response.content)

    async def aclose(self) -> None:
        await self.client.aclose()


CLIENTS: dict[str, type[EditClient]] = {"raw": RawClient, "httpx": HttpxClient}
CLIENT_NAMES = {"raw": "raw HTTP/1.1 on asyncio streams", "httpx": "httpx.AsyncClient"}


# -------------------------------------------------------------------------------- memory
@dataclass
class MemResult:
    baseline_mb: float
    peak_mb: float
    samples: int
    seconds: float
    hwm_reset: bool
    growth_mb: float = field(init=False)

    def __post_init__(self) -> None:
        self.growth_mb = self.peak_mb - self.baseline_mb


async def memory(server: Server, upstream: Server, make: type[EditClient], body: bytes,
                 uploads: int, rounds: int) -> MemResult:
    """Peak RSS while `uploads` big bodies are in flight at once, `rounds` times."""
    client = make(server.origin, uploads)
    try:
        await asyncio.sleep(0.5)
        baseline = status_kb(server.pid, "VmRSS")
        before = await upstream_stats(upstream.origin)
        t0 = time.perf_counter()
        with RssSampler(server.pid) as sampler:
            for _ in range(rounds):
                async with asyncio.timeout(120):
                    await asyncio.gather(*(client.post_chunked(body) for _ in range(uploads)))
        seconds = (time.perf_counter() - t0) / rounds
        after = await upstream_stats(upstream.origin)
    finally:
        await client.aclose()
    got = after["bytes"] - before["bytes"]
    if got < rounds * uploads * (len(body) - 4096):
        raise RuntimeError(f"upstream got {got} bytes through {server.name}, expected about "
                           f"{rounds * uploads * len(body)}")
    return MemResult(baseline / 1024, sampler.peak_kb / 1024, sampler.samples, seconds,
                     sampler.hwm_reset)


# --------------------------------------------------------------------------------- report
def report(results: Results, args: argparse.Namespace) -> tuple[str, bool]:
    lat, tput, mem = results.lat, results.tput, results.mem
    p50 = {n: statistics.median(v.ms) for n, v in lat.items()}
    p99 = {n: pct(v.ms, 99) for n, v in lat.items()}
    add50 = {n: p50[n] - p50["direct"] for n in ("passthrough", "gateway")}
    add99 = {n: p99[n] - p99["direct"] for n in ("passthrough", "gateway")}
    ratio = add50["gateway"] / add50["passthrough"] if add50["passthrough"] > 0 else float("inf")
    rps = {n: t.rps for n, t in tput.items()}
    share = rps["gateway"] / rps["passthrough"]
    share_chunked = rps["gateway"] / rps["chunked"]
    three = ("direct", "passthrough", "gateway")
    paired = [g / p for g, p in zip(tput["gateway"].round_rps, tput["passthrough"].round_rps,
                                    strict=True) if p]
    gw_mem, pt_mem = mem["gateway"], mem["passthrough"]
    ok_lat = add50["gateway"] < TARGET_ADDED_P50_MS
    ok_rps = share >= TARGET_THROUGHPUT_RATIO
    ok_mem = gw_mem.growth_mb < TARGET_RSS_GROWTH_MB
    n = args.requests
    rows = [
        ["metric", "direct", "passthrough", "gateway", "target", "result"],
        [f"small edit c=1 p50 ms (n={n} each)", f"{p50['direct']:.3f}", f"{p50['passthrough']:.3f}",
         f"{p50['gateway']:.3f}", "", ""],
        ["small edit c=1 p99 ms", f"{p99['direct']:.3f}", f"{p99['passthrough']:.3f}",
         f"{p99['gateway']:.3f}", "", ""],
        ["  added p50 ms (target - direct)", "-", f"{add50['passthrough']:.3f}",
         f"{add50['gateway']:.3f}", f"< {TARGET_ADDED_P50_MS:g} ms", verdict(ok_lat)],
        ["  added p99 ms (target - direct)", "-", f"{add99['passthrough']:.3f}",
         f"{add99['gateway']:.3f}", "", ""],
        ["  gateway/passthrough added p50", "", "", f"{ratio:.2f}x", "", ""],
        ["  target process CPU ms/request", *(f"{lat[n].cpu_ms:.3f}" for n in lat), "", ""],
        [f"1 MB edits c={args.concurrency} req/s ({args.duration:g} s each)", f"{rps['direct']:.1f}",
         f"{rps['passthrough']:.1f}", f"{rps['gateway']:.1f}", "", ""],
        ["  gateway % of passthrough", "", "", f"{share:.1%}",
         f">= {TARGET_THROUGHPUT_RATIO:.0%}", verdict(ok_rps)],
        ["  same, range over paired rounds", "", "", f"{min(paired):.0%}-{max(paired):.0%}", "", ""],
        ["  pass-through sending chunked: req/s", "", f"{rps['chunked']:.1f}", "", "", ""],
        ["  gateway % of chunked pass-through", "", "", f"{share_chunked:.1%}", "", ""],
        ["  target process CPU ms/request", *(f"{tput[n].proxy_cpu_ms:.3f}" for n in three), "", ""],
        ["  gateway/passthrough CPU per request", "", "",
         f"{tput['gateway'].proxy_cpu_ms / tput['passthrough'].proxy_cpu_ms:.2f}x", "", ""],
        ["  chunked pass-through CPU ms/request", "", f"{tput['chunked'].proxy_cpu_ms:.3f}", "",
         "", ""],
        ["  upstream process CPU ms/request", *(f"{tput[n].upstream_cpu_ms:.3f}" for n in three),
         "", ""],
        ["  client process CPU ms/request", *(f"{tput[n].client_cpu_ms:.3f}" for n in three), "", ""],
        ["RSS MB at start (before any request)",
         *(f"{results.start_rss_mb[n]:.1f}" for n in three), "", ""],
        [f"{args.uploads} x 25 MB in flight: RSS before MB", "-", f"{pt_mem.baseline_mb:.1f}",
         f"{gw_mem.baseline_mb:.1f}", "", ""],
        ["  peak RSS MB", "-", f"{pt_mem.peak_mb:.1f}", f"{gw_mem.peak_mb:.1f}", "", ""],
        ["  RSS growth MB", "-", f"{pt_mem.growth_mb:.1f}", f"{gw_mem.growth_mb:.1f}",
         f"< {TARGET_RSS_GROWTH_MB:g} MB", verdict(ok_mem)],
        ["  s per round / RSS samples", "-", f"{pt_mem.seconds:.2f} / {pt_mem.samples}",
         f"{gw_mem.seconds:.2f} / {gw_mem.samples}", "", ""],
    ]
    return table(rows), ok_lat and ok_rps and ok_mem


# ----------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Benchmark the gateway's /v1/images/edits.")
    parser.add_argument("--requests", type=int, default=2000,
                        help="latency: small edits per target (default 2000)")
    parser.add_argument("--warmup", type=int, default=200,
                        help="latency: unmeasured small edits per target first (default 200)")
    parser.add_argument("--duration", type=float, default=8.0,
                        help="throughput: measured seconds per target (default 8)")
    parser.add_argument("--concurrency", type=int, default=8, help="throughput (default 8)")
    parser.add_argument("--uploads", type=int, default=4,
                        help="memory: 25 MB uploads in flight at once (default 4)")
    parser.add_argument("--rounds", type=int, default=2, help="memory: rounds (default 2)")
    parser.add_argument("--client", choices=sorted(CLIENTS), default="raw",
                        help="raw asyncio streams (default: least client CPU) or httpx.AsyncClient")
    parser.add_argument("--passthrough-client", choices=("httpx-aiohttp", "httpx", "aiohttp"),
                        default="httpx-aiohttp",
                        help="the pass-through proxies' client library (default: the gateway's "
                             "own, httpx on its aiohttp transport)")
    return parser.parse_args(argv)


@dataclass
class Results:
    start_rss_mb: dict[str, float]  # each server's RSS before any traffic
    lat: dict[str, Latency]
    tput: dict[str, Throughput]
    mem: dict[str, MemResult]


async def verify(targets: dict[str, Server], make: type[EditClient], body: bytes) -> None:
    """One 1 MB edit through each target must put the whole image on the upstream."""
    for name, server in targets.items():
        client = make(server.origin, 1)
        try:
            before = await upstream_stats(targets["direct"].origin)
            await client.post(body)
            after = await upstream_stats(targets["direct"].origin)
        finally:
            await client.aclose()
        got = after["bytes"] - before["bytes"]
        if not len(body) - 1024 <= got <= len(body) + 1024:
            raise RuntimeError(f"{name}: the upstream got {got} bytes for a {len(body)}-byte body")


async def run(targets: dict[str, Server], bodies: dict[str, bytes],
              args: argparse.Namespace) -> Results:
    start_rss = {n: rss_mb(s.pid) for n, s in targets.items()}
    make = CLIENTS[args.client]
    await verify(targets, make, bodies["1mb"])
    # The chunked pass-through only joins the throughput run, as a second, same-framing baseline.
    print(f"latency: {args.requests} small edits per target, interleaved ...", flush=True)
    main = {n: s for n, s in targets.items() if n != "chunked"}
    lat = await latency(main, make, bodies["small"], args.requests, args.warmup)
    print(f"throughput: 1 MB edits, concurrency {args.concurrency} ...", flush=True)
    tput = await throughput(targets, make, bodies["1mb"], args.concurrency, args.duration)
    print(f"memory: {args.uploads} x 25 MB uploads in flight ...", flush=True)
    mem = {}
    for name in ("passthrough", "gateway"):
        mem[name] = await memory(targets[name], targets["direct"], make, bodies["25mb"],
                                 args.uploads, args.rounds)
    return Results(start_rss, lat, tput, mem)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so the `finally` blocks stop the servers.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    command = command_line(__file__, argv)
    facts = machine(f"httpx {httpx.__version__}")
    print(facts, flush=True)
    bodies = build_bodies("small", "1mb", "25mb")
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bench-edits-") as tmp, \
            servers(Path(tmp), args.passthrough_client) as targets:
        results = run_logged(targets.values(), run(targets, bodies, args))
    text, ok = report(results, args)
    sizes = ", ".join(f"{k}={len(v):,} B" for k, v in bodies.items())
    print()
    print(f"command: {command}")
    print(facts)
    kind = CLIENT_NAMES[args.client]
    print(f"client: {kind} on uvloop, one process, same body bytes to every target; servers: "
          "uvicorn + uvloop + httptools, one process each, all on 127.0.0.1; pass-through client: "
          f"{args.passthrough_client}")
    print(f"bodies (model, prompt, image): {sizes}")
    resettable = all(m.hwm_reset for m in results.mem.values())
    hwm = "+ VmHWM reset before" if resettable else "(VmHWM not resettable)"
    print(f"memory: peak of VmRSS sampled every 10 ms {hwm}; uploads sent in "
          f"{UPLOAD_CHUNK // 1024} KiB chunks, {args.rounds} round(s)")
    print()
    print(text)
    print()
    print(f"overall: {verdict(ok)} in {time.monotonic() - started:.0f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
