"""Real Redis topologies for the store tests: a three-master Redis Cluster and a Sentinel-watched
primary, each started on free loopback ports in a temp dir and stopped afterwards."""

from __future__ import annotations

import contextlib
import random
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import redis

from tests.support.fake_upstream import _free_port


def _start(stack: contextlib.ExitStack, port: int, cwd: Path, *args: str) -> None:
    """A redis-server on `port` (no persistence), stopped when `stack` closes; `args` follow
    the defaults, or replace them when they start with a config file (Sentinel)."""
    defaults = ["--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    command = ["redis-server", *(args if args and args[0].endswith(".conf") else
                                 [*defaults, *args])]
    proc = subprocess.Popen(command, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    stack.callback(lambda: (proc.kill(), proc.wait()))
    deadline = time.monotonic() + 10
    while True:
        with contextlib.suppress(redis.ConnectionError):
            if redis.Redis(port=port, socket_timeout=0.5).ping():
                return
        if time.monotonic() > deadline or proc.poll() is not None:
            raise RuntimeError(f"redis-server {command[1:]} did not start")
        time.sleep(0.05)


def _cluster_port() -> int:
    """A free port whose cluster bus port (+10000) is free too: at most 55535."""
    for _ in range(200):
        port = random.randint(20000, 55535)
        with contextlib.ExitStack() as stack:
            try:
                for candidate in (port, port + 10000):
                    sock = stack.enter_context(socket.socket())
                    sock.bind(("127.0.0.1", candidate))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port pair for a cluster node")


@contextlib.contextmanager
def cluster(workdir: Path) -> Iterator[str]:
    """Three masters, slots spread by `redis-cli --cluster create`; yields one node's URL."""
    ports = [_cluster_port() for _ in range(3)]
    with contextlib.ExitStack() as stack:
        for port in ports:
            node = workdir / str(port)
            node.mkdir()
            _start(stack, port, node, "--cluster-enabled", "yes",
                   "--cluster-config-file", "nodes.conf")
        subprocess.run(["redis-cli", "--cluster", "create",
                        *(f"127.0.0.1:{p}" for p in ports), "--cluster-replicas", "0",
                        "--cluster-yes"], check=True, capture_output=True, timeout=30)
        deadline = time.monotonic() + 15
        while redis.Redis(port=ports[0]).cluster("info").get("cluster_state") != "ok":
            if time.monotonic() > deadline:
                raise RuntimeError("the cluster did not come up")
            time.sleep(0.1)
        yield f"redis://127.0.0.1:{ports[0]}/0"


@contextlib.contextmanager
def sentinel(workdir: Path) -> Iterator[str]:
    """A primary watched by one Sentinel as service `gw`; yields the redis+sentinel:// URL."""
    primary, watcher = _free_port(), _free_port()
    with contextlib.ExitStack() as stack:
        _start(stack, primary, workdir)
        conf = workdir / "sentinel.conf"
        conf.write_text(f"port {watcher}\nbind 127.0.0.1\n"
                        f"sentinel monitor gw 127.0.0.1 {primary} 1\n")
        _start(stack, watcher, workdir, str(conf), "--sentinel")
        yield f"redis+sentinel://127.0.0.1:{watcher}/gw/0"


@contextlib.contextmanager
def single(workdir: Path, *extra: str) -> Iterator[str]:
    """One redis-server with extra arguments (e.g. DEBUG allowed, to slow it on purpose)."""
    port = _free_port()
    with contextlib.ExitStack() as stack:
        _start(stack, port, workdir, *extra)
        yield f"redis://127.0.0.1:{port}/0"


class Restartable:
    """One redis-server that a test can kill and start again on the same port with its data
    kept (append-only file, fsync on every write), as a production Redis with AOF restarts."""

    def __init__(self, workdir: Path) -> None:
        self.port = _free_port()
        self.workdir = workdir
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._stack = contextlib.ExitStack()

    def start(self) -> None:
        _start(self._stack, self.port, self.workdir, "--appendonly", "yes",
               "--appendfsync", "always")

    def kill(self) -> None:
        self._stack.close()  # SIGKILL: nothing flushed on the way out
