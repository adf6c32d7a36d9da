"""What the benchmark scripts share: their servers, the raw HTTP/1.1 client, the bodies, readers
of CPU and memory, the latency and throughput phases, and the report's table.

Imported by bench_edits.py, bench_quota.py, bench_scale.py and soak.py (each is run as
`python bench/NAME.py`, so this directory is on sys.path). upstream.py and passthrough.py are
servers the scripts start as processes, and import nothing from here.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import platform
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Coroutine, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import httpx
import uvloop

if TYPE_CHECKING:
    from gateway.quota.redis_store import RedisStore

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
MB = 1024 * 1024
BOUNDARY = "bench-0123456789abcdef"
PROMPT = "Make the sky a deep sunset orange and add a small red kite."
UPLOAD_CHUNK = 256 * 1024
REQUEST_TIMEOUT = 60.0  # seconds a request may take, start to end

T = TypeVar("T")


def _root_on_path() -> None:
    """The repository's root on sys.path, for `gateway` and `tests` (the scripts run in bench/)."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))


# ------------------------------------------------------------------------------ processes
def free_port() -> int:
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


def base_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


@contextlib.contextmanager
def stopping() -> Iterator[list[Server]]:
    """A list for the servers a stack starts; all are stopped at the end, last first, whatever
    happens."""
    started: list[Server] = []
    try:
        yield started
    finally:
        for server in reversed(started):
            server.stop()


def script_server(name: str, script: str, logdir: Path, *args: str) -> Server:
    """bench/SCRIPT (upstream.py, passthrough.py) on a free port, with `args` after --port."""
    port = free_port()
    return Server(name, [sys.executable, str(BENCH / script), "--port", str(port), *args],
                  base_env(), port, logdir)


def gateway_server(name: str, env: dict[str, str], logdir: Path, *args: str) -> Server:
    """`python -m gateway.cli serve` on a free port, with `args` after --port."""
    port = free_port()
    return Server(name, [sys.executable, "-m", "gateway.cli", "serve", "--port", str(port), *args],
                  env, port, logdir)


def gateway_env(upstream: Server, log_level: str = "warning") -> dict[str, str]:
    """The environment of a gateway in front of the fake upstream."""
    return base_env() | {"GATEWAY_UPSTREAM_BASE_URL": f"{upstream.origin}/v1",
                         "GATEWAY_UPSTREAM_API_KEY": "sk-bench-upstream",
                         "GATEWAY_LOG_LEVEL": log_level}


def _redis_port() -> int:
    """A free loopback port that is not the default Redis port, whatever is on it."""
    for _ in range(20):
        port = free_port()
        if port != 6379:
            return port
    raise RuntimeError("no free port")


def start_redis_and_upstream(logdir: Path, started: list[Server],
                             upstream_args: list[str] | None = None,
                             ) -> tuple[Server, Server, str, dict[str, str]]:
    """Our redis-server and the lean upstream, ready (added to `started`, for the caller to
    stop): them, the Redis URL, and the environment a gateway needs to use the upstream."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server is not on PATH (apt-get install redis-server)")
    r_port = _redis_port()
    redis_server = Server("redis", [binary, "--port", str(r_port), "--bind", "127.0.0.1",
                                    "--save", "", "--appendonly", "no", "--dir", str(logdir)],
                          base_env(), r_port, logdir)
    started.append(redis_server)
    upstream = script_server("upstream", "upstream.py", logdir, *(upstream_args or []))
    started.append(upstream)
    redis_server.wait_ready()
    upstream.wait_ready()
    # BENCH_GATEWAY_LOG_LEVEL=info writes the access lines (the soak counts them by outcome)
    env = gateway_env(upstream, os.environ.get("BENCH_GATEWAY_LOG_LEVEL", "warning"))
    return redis_server, upstream, f"redis://127.0.0.1:{r_port}/0", env


def run_logged(servers: Iterable[Server], main: Coroutine[Any, Any, T]) -> T:
    """`main` on a uvloop event loop. On an error each server's log tail goes to stderr before
    the error does; a server that died meanwhile is an error too."""
    servers = list(servers)
    try:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            result = runner.run(main)
    except Exception:
        for server in servers:
            print(f"--- {server.name} log ---\n{server.log_tail()}", file=sys.stderr)
        raise
    for server in servers:
        if server.proc.poll() is not None:
            raise RuntimeError(f"{server.name} died:\n{server.log_tail()}")
    return result


def machine(*versions: str) -> str:
    """The report's facts line: cores, Python, kernel, then `versions`."""
    return ", ".join([f"machine: nproc={os.cpu_count()}",
                      f"{platform.python_implementation()} {platform.python_version()}",
                      f"{platform.system()} {platform.release()}", *versions])


def command_line(script: str, argv: list[str] | None) -> str:
    """The command as it was run (`python bench/NAME.py ...`), for the report."""
    return shlex.join(["python", *(sys.argv if argv is None else [script, *argv])])


# ------------------------------------------------------------------------------ keys
def make_store(url: str) -> RedisStore:
    """A RedisStore as the gateway builds it (default timeout and lease ttl)."""
    _root_on_path()
    from gateway.quota.redis_store import RedisStore
    from gateway.settings import Settings

    fields = Settings.model_fields  # the defaults, not this shell's GATEWAY_* variables
    return RedisStore(url, timeout=fields["redis_timeout"].default,
                      lease_ttl_ms=int(fields["lease_ttl_seconds"].default * 1000))


async def create_key(url: str, name: str, limits: dict[str, int]) -> tuple[str, str, str]:
    """(secret, key id, key hash) of a new key with these limits, put straight into Redis."""
    _root_on_path()
    from gateway.keys import KeyRecord, Limits

    record, secret = KeyRecord.new(name, Limits(**limits))
    store = make_store(url)
    try:
        await store.put_key(record)
    finally:
        await store.aclose()
    return secret, record.id, record.hash


# ------------------------------------------------------------------------------ bodies
def multipart(image: bytes, prompt: str = PROMPT, fields: Iterable[tuple[str, str]] = ()) -> bytes:
    """model, prompt, `fields`, then image: the order the OpenAI Python SDK sends them in."""
    b = BOUNDARY.encode()
    out = b""
    for name, value in (("model", "gpt-image-2"), ("prompt", prompt), *fields):
        out += (b"--" + b + b'\r\nContent-Disposition: form-data; name="' + name.encode()
                + b'"\r\n\r\n' + value.encode() + b"\r\n")
    out += (b"--" + b + b'\r\nContent-Disposition: form-data; name="image"; filename="image.png"'
            b"\r\nContent-Type: image/png\r\n\r\n" + image + b"\r\n--" + b + b"--\r\n")
    return out


IMAGES = {"small": (64, 64, 0), "1mb": (1024, 1024, 1_000_000), "25mb": (2048, 2048, 25 * MB)}


def images(*names: str) -> dict[str, bytes]:
    """PNGs by name (IMAGES: width, height, bytes) from the test suite's builder (header real,
    the rest random)."""
    _root_on_path()
    from tests.support.images import png

    return {name: png(IMAGES[name][0], IMAGES[name][1], size=IMAGES[name][2]) for name in names}


def build_bodies(*names: str) -> dict[str, bytes]:
    """The edit bodies (`multipart`) of `images(*names)`, by name."""
    return {name: multipart(image) for name, image in images(*names).items()}


# ------------------------------------------------------------------------------ client
HEADERS = {"content-type": f"multipart/form-data; boundary={BOUNDARY}",
           "authorization": "Bearer sk-bench-client"}
PATH = "/v1/images/edits"


def check_answer(origin: str, status: int, body: bytes) -> None:
    """Anything but a 200 with an image stops the benchmark: a fast error is not a result."""
    if status != 200 or b"b64_json" not in body:
        raise RuntimeError(f"{origin} answered {status}: {body[:300]!r}")


def request_head(host: str, port: int, headers: dict[str, str], length: int) -> bytes:
    """The head of a POST to PATH with a body of `length` bytes."""
    lines = [f"POST {PATH} HTTP/1.1", f"Host: {host}:{port}",
             *(f"{k}: {v}" for k, v in headers.items()), f"Content-Length: {length}"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def upload_chunks(body: bytes) -> Iterator[bytes]:
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


Conn = tuple[asyncio.StreamReader, asyncio.StreamWriter]


class RawClient(EditClient):
    """HTTP/1.1 keep-alive over asyncio streams with a prebuilt request head: a few tens of
    microseconds of client CPU per request, so the servers get the cores."""

    headers = HEADERS

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
            head = self._heads[length] = request_head(self.host, self.port, self.headers, length)
        return head

    def _forget(self, writer: asyncio.StreamWriter) -> None:
        self._open.discard(writer)
        writer.close()

    async def _connection(self) -> tuple[Conn, bool]:
        """An idle connection the server has not closed (uvicorn drops them after 5 s), else a
        new one; and whether it was reused."""
        while self._idle:
            reader, writer = self._idle.pop()
            if not reader.at_eof() and not writer.is_closing():
                return (reader, writer), True
            self._forget(writer)
        reader, writer = await asyncio.open_connection(self.host, self.port)
        self._open.add(writer)
        return (reader, writer), False

    async def _exchange(self, body: bytes, parts: Callable[[], Iterator[bytes]]) -> None:
        status, answer = await self.send(body, parts)
        check_answer(self.origin, status, answer)

    async def send(self, body: bytes, parts: Callable[[], Iterator[bytes]]) -> tuple[int, bytes]:
        """One request on a kept-alive connection: (status, answer body), whatever the status."""
        for attempt in range(2):
            (reader, writer), reused = await self._connection()
            try:
                async with asyncio.timeout(REQUEST_TIMEOUT):
                    writer.write(self._head(len(body)))
                    for part in parts():
                        writer.write(part)
                        await writer.drain()
                    status, answer, keep = await read_response(reader)
            except (ConnectionError, asyncio.IncompleteReadError):
                self._forget(writer)
                if reused and attempt == 0:
                    continue  # closed by the server while idle: retry once, as httpx does
                raise
            except BaseException:
                self._forget(writer)
                raise
            break
        if keep:
            self._idle.append((reader, writer))
        else:
            self._forget(writer)
        return status, answer

    async def post(self, body: bytes) -> None:
        await self._exchange(body, lambda: iter((body,)))

    async def post_chunked(self, body: bytes) -> None:
        await self._exchange(body, lambda: upload_chunks(body))

    async def aclose(self) -> None:
        for writer in self._open:
            writer.close()
        self._open.clear()
        self._idle.clear()


def keyed_client(secret: str) -> type[RawClient]:
    """The raw client, sending `Authorization: Bearer <secret>`."""

    class KeyedClient(RawClient):
        headers = HEADERS | {"authorization": f"Bearer {secret}"}

    return KeyedClient


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bytes, bool]:
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


async def upstream_stats(origin: str) -> dict[str, int]:
    """The fake upstream's counters, to check that the bodies really went through."""
    async with httpx.AsyncClient(base_url=origin, trust_env=False) as client:
        return (await client.get("/_stats")).json()


# ------------------------------------------------------------------------------ latency
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


# ------------------------------------------------------------------------ CPU and memory
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


def status_kb(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def rss_mb(pid: int) -> float:
    return status_kb(pid, "VmRSS") / 1024


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
            self.peak_kb = max(self.peak_kb, status_kb(self.pid, "VmHWM"))

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_kb = max(self.peak_kb, status_kb(self.pid, "VmRSS"))
            self.samples += 1
            self._stop.wait(self.interval)


def _tree(pid: int) -> list[int]:
    """A process and its descendants (a gateway with --workers: its worker processes)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        with contextlib.suppress(OSError):
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo += [int(c) for c in f.read().split()]
    return out


def tree_rss_mb(pid: int) -> float:
    total = 0
    for p in _tree(pid):
        with contextlib.suppress(OSError, KeyError):
            total += status_kb(p, "VmRSS")
    return total / 1024


def tree_cpu(pid: int) -> float:
    total = 0.0
    for p in _tree(pid):
        with contextlib.suppress(OSError, ValueError):
            total += cpu_seconds(p)
    return total


class TreeRss:
    """The peak of a process tree's summed VmRSS, sampled every 50 ms in a thread (with one
    process, VmHWM also catches a peak between samples)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak_mb = 0.0
        self._single = RssSampler(pid, interval=0.05)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> TreeRss:
        self._single.__enter__()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(2)
        self._single.__exit__(*exc)
        if len(_tree(self.pid)) == 1:
            self.peak_mb = max(self.peak_mb, self._single.peak_kb / 1024)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_mb = max(self.peak_mb, tree_rss_mb(self.pid))
            self._stop.wait(0.05)


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


