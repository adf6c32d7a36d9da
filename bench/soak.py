"""Soak test: one quota gateway under steady mixed traffic for minutes; memory trend and accounting.

It starts its own redis-server (free loopback port), bench/upstream.py and ONE gateway
(`python -m gateway.cli serve`, GATEWAY_REDIS_URL set, upstream read timeout `--read-timeout`,
log level warning), creates a key with images_per_day 10**9 and no other limit, then keeps
`--concurrency` requests in flight for `--minutes`: mostly small edits, some 1 MB, a few 25 MB
uploads (256 KiB chunks), SSE streams, rejections (a bad `size`: 400; a wrong key: 401) and
upstream faults asked for through the prompt (see bench/upstream.py): a 500, a 429, a stall past
the read timeout (504), a connection dropped mid-upload (502), SSE streams cut after their first
image or before it (200 ending in an error event) and a JSON answer cut off (a broken 200). The
gateway's VmRSS is sampled every second; its log is summarised by message at the end.

At the end, with every lease settled, it checks exactly:
  * the key's images used today (Redis) = the images the upstream served, plus the reservations
    the gateway charges by its rule for JSON answers it could not read (see `charged`);
  * the key's tokens used this month (Redis) = the tokens the upstream served;
  * the images the clients received = the images the upstream served;
  * each fault the soak asked for was carried out upstream exactly once;
  * every request got the outcome its kind should get.

Run: `python bench/soak.py --minutes 2 --concurrency 8`; exit status 1 if a check fails. With
thousands in flight: `--concurrency 2000 --delay 2 --read-timeout 4` (the upstream takes 2 s per
answer, so 2,000 requests wait on it at once; a stall still outlasts the read timeout).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import random
import re
import signal
import statistics
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from pathlib import Path

from common import (
    MB,
    PROMPT,
    REQUEST_TIMEOUT,
    RawClient,
    Server,
    command_line,
    create_key,
    gateway_server,
    images,
    keyed_client,
    make_store,
    multipart,
    pct,
    read_body,
    read_head,
    rss_mb,
    run_logged,
    start_redis_and_upstream,
    stopping,
    table,
    upload_chunks,
    upstream_stats,
    verdict,
)

LIMITS = {"rpm": 0, "images_per_day": 10**9, "tokens_per_month": 0, "max_concurrent": 0}
STREAM = (("stream", "true"), ("n", "2"), ("partial_images", "1"))
COMPLETED = b"event: image_edit.completed"
_MASK = re.compile(r"\b(?:req|key)_[0-9a-f]+|\d+")


@dataclasses.dataclass(frozen=True)
class Kind:
    """One kind of request in the mix, and the outcome the client should see for it."""

    weight: float
    expect: str  # "ok", a status, "cut-stream" (200 ending in an error event) or "cut-body"
    image: str = "small"  # small | 1mb | 25mb
    fields: tuple[tuple[str, str], ...] = ()  # after model and prompt, before the image
    fault: str = ""  # asked of bench/upstream.py by "[fault:NAME]" in the prompt
    chunked: bool = False  # sent in 256 KiB writes: an upload still arriving
    wrong_key: bool = False

    @property
    def n(self) -> int:
        return int(dict(self.fields).get("n", "1"))


# Faults weigh 9 of 105.2 (8.6 % of requests).
KINDS = {
    "small": Kind(72, "ok"),
    "1mb": Kind(10, "ok", image="1mb"),
    "25mb": Kind(0.2, "ok", image="25mb", chunked=True),
    "stream": Kind(5, "ok", fields=STREAM),
    "bad-size": Kind(5, "400", fields=(("size", "banana"),)),
    "wrong-key": Kind(4, "401", wrong_key=True),
    "fault-500": Kind(2, "500", fault="500"),
    "fault-429": Kind(2, "429", fault="429"),
    "fault-stall": Kind(0.5, "504", fault="stall"),
    "fault-drop": Kind(1, "502", image="1mb", fault="drop", chunked=True),
    "fault-cut": Kind(2, "cut-stream", fields=STREAM, fault="cut"),
    "fault-cut-early": Kind(1, "cut-stream", fields=(("stream", "true"), ("partial_images", "1")),
                            fault="cut-early"),
    "fault-cut-json": Kind(0.5, "cut-body", fault="cut"),
}


def charged(kind: Kind, outcome: str) -> int:
    """Images the gateway charges beyond what the upstream served, by its documented rule.

    The README ("API keys and quotas") and QuotaTicket.finish: a 2xx answer is charged
    the images the gateway read in it, a stream broken off the completed images it delivered
    (none if it broke before the first), and an answer the gateway could not read (a JSON answer
    cut off) the reservation, n; a non-2xx or missing answer nothing. So 500, 429, 504 and 502
    cost 0, as the upstream served 0, and a cut stream costs the completed events the upstream
    sent whole. A cut JSON answer is the one case where Redis cannot equal the upstream's
    record: the upstream served 0 and the gateway charges n, by design ("the upstream did the
    work"). The soak adds exactly that, counted from the clients' `cut-body` outcomes, and
    prints it apart.
    """
    return kind.n if outcome == "cut-body" else 0


def form(kind: Kind, image: bytes) -> bytes:
    """model, prompt, the kind's fields, then the image: the OpenAI Python SDK's order."""
    return multipart(image, f"[fault:{kind.fault}] {PROMPT}" if kind.fault else PROMPT, kind.fields)


@dataclasses.dataclass
class Stack:
    redis: Server
    upstream: Server
    gateway: Server
    url: str


@contextlib.contextmanager
def stack(logdir: Path, read_timeout: float, delay: float = 0.0) -> Iterator[Stack]:
    """Our redis-server, the lean upstream and one quota gateway, stopped whatever happens."""
    with stopping() as started:
        _, _, url, env = start_redis_and_upstream(
            logdir, started, upstream_args=["--delay", str(delay), "--backlog", "4096"])
        env |= {"GATEWAY_REDIS_URL": url, "GATEWAY_UPSTREAM_READ_TIMEOUT": str(read_timeout)}
        started.append(gateway_server("gateway", env, logdir))
        started[2].wait_ready()
        yield Stack(*started, url)


def soak_client(base: type[RawClient]) -> type[RawClient]:
    """The raw client (common.RawClient), answering whatever came back, and telling a broken
    answer apart."""

    class SoakClient(base):  # type: ignore[misc, valid-type]
        async def exchange(self, body: bytes, chunked: bool) -> tuple[int, bytes, bool]:
            """(status, body, cut): cut when the connection broke after the answer's head."""
            for attempt in range(2):
                (reader, writer), reused = await self._connection()
                status = 0
                parts: Iterable[bytes] = upload_chunks(body) if chunked else (body,)
                try:
                    async with asyncio.timeout(REQUEST_TIMEOUT):
                        writer.write(self._head(len(body)))
                        for part in parts:
                            writer.write(part)
                            await writer.drain()
                        status, headers = await read_head(reader)
                        answer, keep = await read_body(reader, headers)
                except (ConnectionError, asyncio.IncompleteReadError):
                    self._forget(writer)
                    if status:
                        return status, b"", True  # the answer began, then broke off
                    if reused and attempt == 0:
                        continue  # closed by the server while idle: the request never arrived
                    raise
                except BaseException:
                    self._forget(writer)
                    raise
                if keep:
                    self._idle.append((reader, writer))
                else:
                    self._forget(writer)
                return status, answer, False
            raise AssertionError("unreachable")

    return SoakClient


def classify(status: int, answer: bytes, cut: bool) -> tuple[str, int]:
    """(outcome, images received): a 200 is `ok`, `cut-stream` or `cut-body`; else its status."""
    if cut:
        return ("cut-body" if status == 200 else f"{status}-cut"), 0
    if status != 200:
        return str(status), 0
    if answer.startswith(b"event:"):
        images = answer.count(COMPLETED)
        return ("cut-stream" if b"\nevent: error\n" in b"\n" + answer else "ok"), images
    return "ok", answer.count(b'"b64_json"')


async def settled_usage(url: str, key_id: str) -> tuple[int, int, int]:
    """(images today, tokens this month, leases in flight), once every lease is settled
    (settlement runs after an answer's last byte), or after 10 s."""
    store = make_store(url)
    try:
        deadline = time.monotonic() + 10
        while True:
            usage = await store.usage(key_id)
            if usage is None:
                raise RuntimeError(f"key {key_id} is gone")
            if usage.in_flight == 0 or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.1)
    finally:
        await store.aclose()
    return usage.windows["images"].used, usage.windows["tokens"].used, usage.in_flight


async def soak(s: Stack, kinds: dict[str, Kind], bodies: dict[str, bytes],
               args: argparse.Namespace) -> tuple[str, bool]:
    secret, key_id, _ = await create_key(s.url, "soak", LIMITS)  # images_per_day 10**9
    good = soak_client(keyed_client(secret))(s.gateway.origin, args.concurrency)
    bad = soak_client(keyed_client("sk-wrong-" + secret[-8:]))(s.gateway.origin, args.concurrency)
    rng = random.Random(args.seed)
    names = [k for k, kind in kinds.items() if kind.weight > 0]
    weights = [kinds[k].weight for k in names]
    results: Counter[tuple[str, str]] = Counter()
    lat: dict[str, list[float]] = defaultdict(list)
    rss: list[tuple[float, float]] = []
    received_images = sent_bytes = 0
    t0 = time.monotonic()
    deadline = t0 + args.minutes * 60

    async def sampler() -> None:
        while True:
            rss.append((time.monotonic() - t0, rss_mb(s.gateway.pid)))
            await asyncio.sleep(1)

    async def worker() -> None:
        nonlocal sent_bytes, received_images
        while time.monotonic() < deadline:
            name = rng.choices(names, weights)[0]
            kind = kinds[name]
            client = bad if kind.wrong_key else good
            start = time.perf_counter()
            try:
                outcome, images = classify(*await client.exchange(bodies[name], kind.chunked))
            except (OSError, asyncio.IncompleteReadError, TimeoutError) as exc:
                outcome, images = f"client:{type(exc).__name__}", 0
            lat[name].append((time.perf_counter() - start) * 1000)
            results[name, outcome] += 1
            received_images += images
            sent_bytes += len(bodies[name])

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
    used_images, used_tokens, in_flight = await settled_usage(s.url, key_id)
    up = await upstream_stats(s.upstream.origin)

    # ---------------------------------------------------------------------------- report
    total = sum(results.values())
    ok = sum(n for (_, o), n in results.items() if o == "ok")
    errors: Counter[str] = Counter()
    for (_, outcome), n in results.items():
        if outcome != "ok":
            errors[outcome] += n
    rows = [["kind", "requests", "p50 ms", "p99 ms", "outcomes"]]
    for name in names:
        outs = {o: n for (k, o), n in sorted(results.items()) if k == name}
        rows.append([name, str(sum(outs.values())),
                     f"{statistics.median(lat[name]):.2f}" if lat[name] else "-",
                     f"{pct(lat[name], 99):.2f}" if lat[name] else "-",
                     ", ".join(f"{o}={n}" for o, n in outs.items())])
    unexpected = sum(n for (k, o), n in results.items() if o != kinds[k].expect)
    reserved = sum(charged(kinds[k], o) * n for (k, o), n in results.items())
    asked: Counter[str] = Counter()
    for (k, _), n in results.items():
        if kinds[k].fault:
            asked[kinds[k].fault] += n
    done = Counter({k.removeprefix("fault:"): v for k, v in up.items() if k.startswith("fault:")})
    times, values = [t / 60 for t, _ in rss], [v for _, v in rss]
    half = len(rss) // 2  # the second half's trend is free of the warm-up's growth

    def slope(start: int) -> float:
        if len(rss) - start < 3:
            return float("nan")
        return statistics.linear_regression(times[start:], values[start:]).slope

    checks = {
        "redis images": used_images == up["images"] + reserved and in_flight == 0,
        "redis tokens": used_tokens == up["tokens"],
        "client images": received_images == up["images"],
        "faults": asked == done,
        "outcomes": unexpected == 0,
    }
    faults = ", ".join(f"{f}={asked[f]}/{done[f]}" for f in sorted(asked | done))
    lines = [
        table(rows), "",
        f"requests: {total} in {elapsed:.1f} s = {total / elapsed:.1f} req/s, "
        f"{sent_bytes / MB / elapsed:.1f} MiB/s uploaded; ok: {ok}",
        "errors by kind: " + (", ".join(f"{o}={n}" for o, n in sorted(errors.items())) or "none"),
        f"gateway RSS MB: start {values[0]:.1f}, end {values[-1]:.1f}, max {max(values):.1f}, "
        f"trend {slope(0):+.2f} MB/min over {len(rss)} samples, {slope(half):+.2f} over the "
        "second half",
        f"upstream served: {up['images']} images, {up['tokens']} tokens "
        f"({up['answered']} whole 200 answers)",
        f"redis images used today = {used_images}, upstream served {up['images']} + {reserved} "
        f"reserved for cut JSON answers = {up['images'] + reserved}"
        + (f" ({in_flight} leases unsettled)" if in_flight else "")
        + f": {verdict(checks['redis images'])}",
        f"redis tokens used this month = {used_tokens}, upstream served {up['tokens']}: "
        f"{verdict(checks['redis tokens'])}",
        f"images the clients received = {received_images}, upstream served {up['images']}: "
        f"{verdict(checks['client images'])}",
        f"faults asked/carried out upstream ({sum(asked.values())} = "
        f"{100 * sum(asked.values()) / max(1, total):.1f} % of requests): {faults or 'none'}: "
        f"{verdict(checks['faults'])}",
        f"unexpected outcomes (not what the kind should get): {unexpected}: "
        f"{verdict(checks['outcomes'])}",
    ]
    return "\n".join(lines), all(checks.values())


def log_summary(path: Path) -> Counter[str]:
    """A server log's lines counted by message, ids and numbers masked: what kinds of thing it
    said, however often (the gateway logs JSON; uvicorn's own lines are plain text)."""
    counts: Counter[str] = Counter()
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
            text = f"{record['level']}: {record['message']}"
            if "status" in record:  # an access line (BENCH_GATEWAY_LOG_LEVEL=info): its outcome
                text += f" {record['status']} {record.get('upstream_error')} {record.get('rejection')}"
        except (ValueError, KeyError, TypeError):
            text = line.strip()
        if text:
            counts[_MASK.sub("#", text)[:160]] += 1
    return counts


def weight(text: str) -> tuple[str, float]:
    name, _, value = text.partition("=")
    if name not in KINDS:
        raise argparse.ArgumentTypeError(f"unknown kind {name!r}; kinds: {', '.join(KINDS)}")
    try:
        return name, float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected KIND=WEIGHT") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=2.0, help="duration (default 2)")
    parser.add_argument("--concurrency", type=int, default=8, help="requests in flight (default 8)")
    parser.add_argument("--seed", type=int, default=1, help="seed of the traffic mix (default 1)")
    parser.add_argument("--read-timeout", type=float, default=1.0,
                        help="the gateway's upstream read timeout, which a stall outlasts (default 1 s)")
    parser.add_argument("--delay", type=float, default=0.0,
                        help="seconds the upstream takes per answer, so that --concurrency requests "
                             "are in flight at once (default 0); keep it under --read-timeout")
    parser.add_argument("--weight", type=weight, action="append", default=[], metavar="KIND=W",
                        help="change a kind's weight, e.g. fault-cut-json=1 (repeatable); kinds: "
                             + ", ".join(KINDS))
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwinds, so servers stop
    command = command_line(__file__, argv)
    kinds = dict(KINDS)
    for name, w in args.weight:
        kinds[name] = dataclasses.replace(kinds[name], weight=w)
    pngs = images("small", "1mb", "25mb")
    bodies = {name: form(kind, pngs[kind.image]) for name, kind in kinds.items()}
    print(f"soak: {args.minutes:g} min at concurrency {args.concurrency} ...", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-soak-") as tmp:
        with stack(Path(tmp), args.read_timeout, args.delay) as s:
            text, ok = run_logged((s.redis, s.upstream, s.gateway), soak(s, kinds, bodies, args))
        logs = {name: log_summary(Path(tmp) / f"{name}.log") for name in ("upstream", "gateway")}
    print(f"\ncommand: {command}")
    print(f"key limits: {LIMITS}; gateway upstream read timeout {args.read_timeout:g} s; upstream "
          f"delay {args.delay:g} s; mix weights: "
          + ", ".join(f"{k}={v.weight:g}" for k, v in kinds.items()) + "\n")
    print(text)
    for name, lines in logs.items():
        print(f"{name} log, lines by message (ids and numbers as #): {sum(lines.values()) or 'none'}")
        for message, n in lines.most_common():
            print(f"  {n:6d}  {message}")
    print(f"\noverall: {verdict(ok)}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
