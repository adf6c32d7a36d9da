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
import ctypes
import os
import platform
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import uvloop

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
MB = 1024 * 1024
BOUNDARY = "bench-0123456789abcdef"
PROMPT = "Make the sky a deep sunset orange and add a small red kite."
UPLOAD_CHUNK = 256 * 1024
REQUEST_TIMEOUT = httpx.Timeout(60.0)

# Targets printed beside the numbers.
TARGET_ADDED_P50_MS = 2.0
TARGET_THROUGHPUT_RATIO = 0.80
TARGET_RSS_GROWTH_MB = 40.0


# ------------------------------------------------------------------------------ processes
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """Runs in the child before exec: SIGTERM it if the benchmark dies, even by SIGKILL."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class Server:
    """One server process; `stop` always ends it (terminate, then kill)."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], port: int,
                 logdir: Path) -> None:
        self.name = name
        self.port = port
        self.origin = f"http://127.0.0.1:{port}"
        self.log_path = logdir / f"{name}.log"
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(args, env=env, cwd=ROOT, stdout=self._log,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     preexec_fn=_die_with_parent)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_ready(self, timeout: float = 20.0) -> None:
        """Until the port accepts connections; a dead process fails at once, with its log."""
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.log_tail()}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), 0.2):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} did not start in {timeout}s:\n{self.log_tail()}")
            time.sleep(0.05)

    def log_tail(self, lines: int = 30) -> str:
        self._log.flush()
        text = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()


def _base_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


@contextlib.contextmanager
def servers(logdir: Path, client: str = "httpx-aiohttp") -> Iterator[dict[str, Server]]:
    """The upstream, the pass-through and the gateway, stopped whatever happens."""
    started: list[Server] = []
    try:
        up_port, pt_port, gw_port, ch_port = _free_port(), _free_port(), _free_port(), _free_port()
        upstream = Server("upstream", [sys.executable, str(BENCH / "upstream.py"), "--port",
                                       str(up_port)], _base_env(), up_port, logdir)
        started.append(upstream)
        upstream.wait_ready()
        passthrough = Server("passthrough", [sys.executable, str(BENCH / "passthrough.py"),
                                             "--port", str(pt_port), "--upstream", upstream.origin,
                                             "--client", client], _base_env(), pt_port, logdir)
        started.append(passthrough)
        chunked = Server("chunked", [sys.executable, str(BENCH / "passthrough.py"), "--port",
                                     str(ch_port), "--upstream", upstream.origin, "--chunked",
                                     "--client", client],
                         _base_env(), ch_port, logdir)
        started.append(chunked)
        gw_env = _base_env() | {
            "GATEWAY_UPSTREAM_BASE_URL": f"{upstream.origin}/v1",
            "GATEWAY_UPSTREAM_API_KEY": "sk-bench-upstream",
            "GATEWAY_LOG_LEVEL": "warning",
        }
        gateway = Server("gateway", [sys.executable, "-m", "gateway.cli", "serve", "--port",
                                     str(gw_port)], gw_env, gw_port, logdir)
        started.append(gateway)
        passthrough.wait_ready()
        chunked.wait_ready()
        gateway.wait_ready()
        yield {"direct": upstream, "passthrough": passthrough, "gateway": gateway,
               "chunked": chunked}
    finally:
        for server in reversed(started):
            server.stop()


# ------------------------------------------------------------------------------ bodies
def multipart(image: bytes) -> bytes:
    """model, prompt, then image: the order the OpenAI Python SDK sends them in."""
    b = BOUNDARY.encode()
    out = b""
    for name, value in (("model", "gpt-image-1"), ("prompt", PROMPT)):
        out += (b"--" + b + b'\r\nContent-Disposition: form-data; name="' + name.encode()
                + b'"\r\n\r\n' + value.encode() + b"\r\n")
    out += (b"--" + b + b'\r\nContent-Disposition: form-data; name="image"; filename="image.png"'
            b"\r\nContent-Type: image/png\r\n\r\n" + image + b"\r\n--" + b + b"--\r\n")
    return out


def build_bodies() -> dict[str, bytes]:
    """Valid PNGs from the test suite's builder (header real, the rest random)."""
    sys.path.insert(0, str(ROOT))
    from tests.support.images import png

    return {
        "small": multipart(png(64, 64)),
        "1mb": multipart(png(1024, 1024, size=1_000_000)),
        "25mb": multipart(png(2048, 2048, size=25 * MB)),
    }


HEADERS = {"content-type": f"multipart/form-data; boundary={BOUNDARY}",
           "authorization": "Bearer sk-bench-client"}
PATH = "/v1/images/edits"


def _check(origin: str, status: int, body: bytes) -> None:
    """Anything but a 200 with an image stops the benchmark: a fast error is not a result."""
    if status != 200 or b"b64_json" not in body:
        raise RuntimeError(f"{origin} answered {status}: {body[:300]!r}")


def _chunks(body: bytes) -> Iterator[bytes]:
    for i in range(0, len(body), UPLOAD_CHUNK):
        yield body[i:i + UPLOAD_CHUNK]


class EditClient:
    """What the phases need from a client; one instance per target, pooled connections."""

    origin: str

    async def post(self, body: bytes) -> None:
        raise NotImplementedError

    async def post_chunked(self, body: bytes) -> None:
        """Send the body in UPLOAD_CHUNK writes (with Content-Length, as the SDK sets one)."""
        raise NotImplementedError

    async def aclose(self) -> None:
        raise NotImplementedError


class HttpxClient(EditClient):
    """httpx.AsyncClient, as an OpenAI SDK user would run: realistic, but its CPU per request
    is close to a proxy's, and on 2 cores that CPU is taken from the servers."""

    def __init__(self, origin: str, connections: int) -> None:
        self.origin = origin
        self.client = httpx.AsyncClient(
            base_url=origin, timeout=REQUEST_TIMEOUT, trust_env=False,
            limits=httpx.Limits(max_connections=connections, max_keepalive_connections=connections))

    async def post(self, body: bytes) -> None:
        response = await self.client.post(PATH, content=body, headers=HEADERS)
        _check(self.origin, response.status_code, response.content)

    async def post_chunked(self, body: bytes) -> None:
        async def chunks() -> AsyncIterator[bytes]:
            for chunk in _chunks(body):
                yield chunk
                await asyncio.sleep(0)

        headers = HEADERS | {"content-length": str(len(body))}
        response = await self.client.post(PATH, content=chunks(), headers=headers)
        _check(self.origin, response.status_code, response.content)

    async def aclose(self) -> None:
        await self.client.aclose()


Conn = tuple[asyncio.StreamReader, asyncio.StreamWriter]


class RawClient(EditClient):
    """HTTP/1.1 keep-alive over asyncio streams with a prebuilt request head: a few tens of
    microseconds of client CPU per request, so the servers get the cores."""

    def __init__(self, origin: str, connections: int) -> None:
        self.origin = origin
        host, port = origin.removeprefix("http://").split(":")
        self.host, self.port = host, int(port)
        self._idle: list[Conn] = []
        self._open: set[asyncio.StreamWriter] = set()
        self._heads: dict[int, bytes] = {}

    def _head(self, length: int) -> bytes:
        head = self._heads.get(length)
        if head is None:
            lines = [f"POST {PATH} HTTP/1.1", f"Host: {self.host}:{self.port}",
                     *(f"{k}: {v}" for k, v in HEADERS.items()), f"Content-Length: {length}"]
            head = self._heads[length] = ("\r\n".join(lines) + "\r\n\r\n").encode()
        return head

    async def _connection(self) -> tuple[Conn, bool]:
        """An idle connection the server has not closed (uvicorn drops them after 5 s), else a
        new one; and whether it was reused."""
        while self._idle:
            reader, writer = self._idle.pop()
            if not reader.at_eof() and not writer.is_closing():
                return (reader, writer), True
            self._open.discard(writer)
            writer.close()
        reader, writer = await asyncio.open_connection(self.host, self.port)
        self._open.add(writer)
        return (reader, writer), False

    async def _exchange(self, body: bytes, parts: Callable[[], Iterator[bytes]]) -> None:
        status, answer = await self.send(body, parts)
        _check(self.origin, status, answer)

    async def send(self, body: bytes, parts: Callable[[], Iterator[bytes]]) -> tuple[int, bytes]:
        """One request on a kept-alive connection: (status, answer body), whatever the status."""
        for attempt in range(2):
            (reader, writer), reused = await self._connection()
            try:
                async with asyncio.timeout(REQUEST_TIMEOUT.read or 60):
                    writer.write(self._head(len(body)))
                    for part in parts():
                        writer.write(part)
                        await writer.drain()
                    status, answer, keep = await _read_response(reader)
            except (ConnectionError, asyncio.IncompleteReadError):
                self._open.discard(writer)
                writer.close()
                if reused and attempt == 0:
                    continue  # closed by the server while idle: retry once, as httpx does
                raise
            except BaseException:
                self._open.discard(writer)
                writer.close()
                raise
            break
        if keep:
            self._idle.append((reader, writer))
        else:
            self._open.discard(writer)
            writer.close()
        return status, answer

    async def post(self, body: bytes) -> None:
        await self._exchange(body, lambda: iter((body,)))

    async def post_chunked(self, body: bytes) -> None:
        await self._exchange(body, lambda: _chunks(body))

    async def aclose(self) -> None:
        for writer in self._open:
            writer.close()
        self._open.clear()
        self._idle.clear()


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bytes, bool]:
    """(status, body, keep-alive) of one HTTP/1.1 response: Content-Length, chunked or close."""
    status, headers = await read_head(reader)
    body, keep = await read_body(reader, headers)
    return status, body, keep


async def read_head(reader: asyncio.StreamReader) -> tuple[int, dict[bytes, bytes]]:
    """A response's status and headers (names and values lower-cased)."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        if line:
            key, _, value = line.partition(b":")
            headers[key.strip().lower()] = value.strip().lower()
    return status, headers


async def read_body(reader: asyncio.StreamReader, headers: dict[bytes, bytes]) -> tuple[bytes, bool]:
    """The body after `read_head`, and whether the connection may be kept alive."""
    keep = headers.get(b"connection") != b"close"
    if b"content-length" in headers:
        return await reader.readexactly(int(headers[b"content-length"])), keep
    if headers.get(b"transfer-encoding") == b"chunked":
        body = bytearray()
        while size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16):
            body += (await reader.readexactly(size + 2))[:-2]
        await reader.readuntil(b"\r\n")  # no trailers are sent here
        return bytes(body), keep
    return await reader.read(), False


CLIENTS: dict[str, type[EditClient]] = {"raw": RawClient, "httpx": HttpxClient}
CLIENT_NAMES = {"raw": "raw HTTP/1.1 on asyncio streams", "httpx": "httpx.AsyncClient"}


async def upstream_stats(origin: str) -> dict[str, int]:
    """The fake upstream's counters, to check that the bodies really went through."""
    async with httpx.AsyncClient(base_url=origin, trust_env=False) as client:
        return (await client.get("/_stats")).json()


# ------------------------------------------------------------------------------ latency
def cpu_seconds(pid: int) -> float:
    """CPU time of a process: schedstat's nanoseconds summed over its threads (/proc/PID/stat
    counts in 10 ms ticks, too coarse for short blocks)."""
    try:
        total = 0
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/schedstat") as f:
                total += int(f.read().split()[0])
        return total / 1e9
    except (OSError, ValueError):
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pct(values: list[float], p: float) -> float:
    """Nearest-rank percentile: p99 of 2000 samples is the 1980th, no interpolation."""
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, round(p / 100 * len(ordered)) - 1))]


@dataclass
class Latency:
    ms: list[float]  # one per request, client-side wall time
    cpu_ms: float  # CPU of the target process per request (the upstream itself for "direct")


async def latency(targets: dict[str, Server], make: type[EditClient], body: bytes, requests: int,
                  warmup: int, block: int = 20) -> dict[str, Latency]:
    """Concurrency 1, targets interleaved in blocks whose order rotates every round."""
    names = list(targets)
    clients = {n: make(targets[n].origin, 1) for n in names}
    samples: dict[str, list[float]] = {n: [] for n in names}
    cpu = dict.fromkeys(names, 0.0)
    try:
        for name in names:
            for _ in range(warmup):
                await clients[name].post(body)
        rounds = -(-requests // block)
        for r in range(rounds):
            order = names[r % len(names):] + names[:r % len(names)]
            for name in order:
                client, out, pid = clients[name], samples[name], targets[name].pid
                cpu0 = cpu_seconds(pid)
                for _ in range(block):
                    t0 = time.perf_counter()
                    await client.post(body)
                    out.append((time.perf_counter() - t0) * 1000)
                cpu[name] += cpu_seconds(pid) - cpu0
    finally:
        for client in clients.values():
            await client.aclose()
    return {n: Latency(s[:requests], 1000 * cpu[n] / len(s)) for n, s in samples.items()}


# ---------------------------------------------------------------------------- throughput
async def _run_segment(client: EditClient, body: bytes, concurrency: int, warm: float,
                       duration: float) -> tuple[int, int]:
    """(requests completed in [warm, warm + duration) after the start, all completed)."""
    start = time.perf_counter()
    t_begin, t_end = start + warm, start + warm + duration
    counted = total = 0

    async def worker() -> None:
        nonlocal counted, total
        while time.perf_counter() < t_end:
            await client.post(body)
            total += 1
            if t_begin <= time.perf_counter() < t_end:
                counted += 1

    async with asyncio.timeout(warm + duration + 60):
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return counted, total


@dataclass
class Throughput:
    rps: float
    proxy_cpu_ms: float  # per request, the target process (the upstream itself for "direct")
    upstream_cpu_ms: float
    client_cpu_ms: float
    round_rps: list[float]  # one per round, for pairing rounds between targets


async def throughput(targets: dict[str, Server], make: type[EditClient], body: bytes,
                     concurrency: int, duration: float, segment: float = 1.0,
                     warm: float = 0.25) -> dict[str, Throughput]:
    """Requests/s per target, in rounds of `segment` seconds per target whose order rotates,
    so that a slow minute of a shared machine hits every target alike.

    CPU per request is also kept: on 2 cores the client, the proxy and the upstream compete,
    and CPU time is the steadier measure of what the proxy costs.
    """
    names = list(targets)
    upstream = targets["direct"].pid
    clients = {n: make(targets[n].origin, concurrency) for n in names}
    rounds = max(1, round(duration / segment))
    counts: dict[str, list[int]] = {n: [] for n in names}
    totals = dict.fromkeys(names, 0)
    cpu = {n: [0.0, 0.0, 0.0] for n in names}
    try:
        for r in range(rounds):
            for name in names[r % len(names):] + names[:r % len(names)]:
                pid = targets[name].pid
                before = (cpu_seconds(pid), cpu_seconds(upstream), time.process_time())
                counted, total = await _run_segment(clients[name], body, concurrency, warm,
                                                    duration / rounds)
                after = (cpu_seconds(pid), cpu_seconds(upstream), time.process_time())
                counts[name].append(counted)
                totals[name] += total
                for i in range(3):
                    cpu[name][i] += after[i] - before[i]
    finally:
        for client in clients.values():
            await client.aclose()
    return {n: Throughput(sum(counts[n]) / duration,
                          *(1000 * c / totals[n] for c in cpu[n]),
                          [c * rounds / duration for c in counts[n]])
            for n in names}


# -------------------------------------------------------------------------------- memory
def _status_kb(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


class RssSampler:
    """Samples VmRSS every ~10 ms in a thread, and resets/reads VmHWM where the kernel lets it."""

    def __init__(self, pid: int, interval: float = 0.01) -> None:
        self.pid = pid
        self.interval = interval
        self.peak_kb = 0
        self.samples = 0
        self.hwm_reset = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> RssSampler:
        try:
            with open(f"/proc/{self.pid}/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS
            self.hwm_reset = True
        except OSError:
            pass
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(2)
        if self.hwm_reset:
            self.peak_kb = max(self.peak_kb, _status_kb(self.pid, "VmHWM"))

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_kb = max(self.peak_kb, _status_kb(self.pid, "VmRSS"))
            self.samples += 1
            self._stop.wait(self.interval)


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
        baseline = _status_kb(server.pid, "VmRSS")
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
def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def table(rows: list[list[str]]) -> str:
    """Plain aligned text: first column left, the rest right-aligned, verdict left."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for n, row in enumerate(rows):
        cells = [row[0].ljust(widths[0])]
        cells += [c.rjust(w) for c, w in zip(row[1:-1], widths[1:-1], strict=True)]
        cells.append(row[-1].ljust(widths[-1]))
        lines.append("  ".join(cells).rstrip())
        if n == 0:
            lines.append("-" * len(lines[0]))
    return "\n".join(lines)


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
    start_rss = {n: _status_kb(s.pid, "VmRSS") / 1024 for n, s in targets.items()}
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
    command = shlex.join(["python", *(sys.argv if argv is None else [__file__, *argv])])
    facts = (f"machine: nproc={os.cpu_count()}, {platform.python_implementation()} "
             f"{platform.python_version()}, {platform.system()} {platform.release()}, "
             f"httpx {httpx.__version__}")
    print(facts, flush=True)
    bodies = build_bodies()
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bench-edits-") as tmp, \
            servers(Path(tmp), args.passthrough_client) as targets:
        try:
            with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
                results = runner.run(run(targets, bodies, args))
        except Exception:
            for server in targets.values():
                print(f"--- {server.name} log ---\n{server.log_tail()}", file=sys.stderr)
            raise
        for server in targets.values():
            if server.proc.poll() is not None:
                raise RuntimeError(f"{server.name} died:\n{server.log_tail()}")
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
