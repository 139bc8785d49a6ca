"""Real processes for the Redis-mode tests: a redis-server on a free port (AOF in a temp dir), `s2amnet
worker` processes and `s2amnet serve` in Redis mode. No mocks: everything talks over real sockets.

Used by tests/e2e (fault, restart, load, protocol tests) and by tests/app/conftest.py for the API suite's
"redis" mode. Module name is unique on purpose (both test folders have a conftest.py).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import redis

ROOT = Path(__file__).resolve().parents[2]
LAUNCH = ROOT / "tests" / "app" / "_launch.py"  # runs app.cli.main, with optional slow forwards
JOBS = "s2amnet:jobs:{}"
GROUP = "workers"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def require_redis_server() -> str:
    path = shutil.which("redis-server")
    if path is None:
        import pytest

        if os.environ.get("CI"):
            pytest.fail("redis-server is not installed (make system-deps installs it)")
        pytest.skip("redis-server is not installed (make system-deps installs it)")
    return path


def process_env(**env: str) -> dict[str, str]:
    """The test process's environment without S2AMNET_* / multiprocess settings, plus `env`."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("S2AMNET_")}
    base.pop("PROMETHEUS_MULTIPROC_DIR", None)
    base.update({"PYTHONUNBUFFERED": "1", "S2AMNET_LOG_LEVEL": "info", "S2AMNET_TORCH_THREADS": "1"})
    base.update({k: str(v) for k, v in env.items()})
    return base


# ------------------------------------------------------------------------------------------- redis
class RedisServer:
    """redis-server on 127.0.0.1:<free port>, data (AOF) in `workdir`; stop/start keep port and data."""

    def __init__(self, workdir: Path, port: int | None = None):
        self.binary = require_redis_server()
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 15.0) -> RedisServer:
        log = open(self.workdir / "redis.log", "ab")  # noqa: SIM115 - owned by the process
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.workdir),
             "--appendonly", "yes", "--appendfsync", "everysec", "--save", "", "--protected-mode", "no",
             "--daemonize", "no"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        log.close()
        self.starts += 1
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited: {self.log()[-2000:]}")
            with contextlib.suppress(redis.RedisError, OSError):
                with self.client(timeout=1) as r:
                    if r.ping():
                        return self
            time.sleep(0.05)
        raise RuntimeError(f"redis-server not answering after {timeout} s: {self.log()[-2000:]}")

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM: redis-server flushes its AOF and exits (a clean stop, as in an orchestrated restart)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def client(self, timeout: float = 5.0) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=timeout,
                           socket_connect_timeout=timeout)

    def log(self) -> str:
        with contextlib.suppress(OSError):
            return (self.workdir / "redis.log").read_text(errors="replace")
        return ""


# ------------------------------------------------------------------------------------------- processes
@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    log_path: Path
    url: str = ""  # API base URL, or the worker's metrics URL
    extra: dict = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log(self) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")
        return ""

    def send(self, sig: int) -> None:
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                self.popen.send_signal(sig)

    def wait(self, timeout: float) -> int:
        return self.popen.wait(timeout)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        self.send(sig)
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            return self.popen.wait(10)

    def rss_kib(self) -> int:
        """Resident set size of the process, from /proc (KiB)."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise RuntimeError("no VmRSS")


def start_worker(redis_url: str, weights_dir: Path, log_dir: Path, *, name: str | None = None,
                 visibility_s: float = 2.0, max_deliveries: int = 3, metrics_port: int | None = None,
                 **env: str) -> Proc:
    """`s2amnet worker` as a real process (through tests/app/_launch.py, which honours
    S2AMNET_TEST_INFER_DELAY_S). Its metrics are served on a free port (`Proc.url`)."""
    port = metrics_port or free_port()
    log_path = Path(log_dir) / f"worker-{port}.log"
    cmd = [sys.executable, str(LAUNCH), "worker", "--redis-url", redis_url, "--weights-dir", str(weights_dir),
           "--metrics-port", str(port), "--visibility-timeout", str(visibility_s),
           "--max-deliveries", str(max_deliveries)]
    if name:
        cmd += ["--name", name]
    with open(log_path, "wb") as log:
        popen = subprocess.Popen(cmd, cwd=ROOT, env=process_env(**env), stdout=log, stderr=subprocess.STDOUT,
                                 start_new_session=True)
    return Proc(f"worker-{port}", popen, log_path, f"http://127.0.0.1:{port}/metrics")


def live_worker_pids(r: redis.Redis) -> set[int]:
    """PIDs of the workers whose heartbeat key is in Redis."""
    pids = set()
    for key in r.scan_iter("s2amnet:worker:*"):
        with contextlib.suppress(TypeError, ValueError):
            pids.add(int(json.loads(r.get(key) or b"{}")["pid"]))
    return pids


def wait_workers(r: redis.Redis, workers: list[Proc], timeout: float = 180.0) -> None:
    """Until every worker has loaded its models and sends heartbeats."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        for w in workers:
            if not w.alive():
                raise RuntimeError(f"{w.name} exited with {w.popen.returncode}:\n{w.log()[-4000:]}")
        with contextlib.suppress(redis.RedisError):
            if {w.pid for w in workers} <= live_worker_pids(r):
                return
        time.sleep(0.1)
    logs = "\n".join(w.log()[-2000:] for w in workers)
    raise RuntimeError(f"workers not up after {timeout:.0f} s:\n{logs}")


def start_api(redis_url: str, weights_dir: Path, log_dir: Path, *, wait: bool = True, timeout: float = 180.0,
              args: tuple[str, ...] = (), **env: str) -> Proc:
    """`s2amnet serve` in Redis mode on a free port (plus `args`); waits for /readyz (Redis reachable,
    models loaded)."""
    port = free_port()
    log_path = Path(log_dir) / f"api-{port}.log"
    cmd = [sys.executable, str(LAUNCH), "serve", "--host", "127.0.0.1", "--port", str(port),
           "--weights-dir", str(weights_dir), *args]
    with open(log_path, "wb") as log:
        popen = subprocess.Popen(cmd, cwd=ROOT, env=process_env(S2AMNET_REDIS_URL=redis_url, **env),
                                 stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    api = Proc(f"api-{port}", popen, log_path, f"http://127.0.0.1:{port}")
    if wait:
        wait_ready(api, timeout)
    return api


def wait_ready(api: Proc, timeout: float = 180.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if not api.alive():
            raise RuntimeError(f"API exited with {api.popen.returncode}:\n{api.log()[-4000:]}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(api.url + "/readyz", timeout=2).status_code == 200:
                return
        time.sleep(0.1)
    raise RuntimeError(f"API not ready after {timeout} s:\n{api.log()[-4000:]}")


@dataclass
class Stack:
    """redis-server + N workers + one API, all real processes."""

    redis: RedisServer
    api: Proc
    workers: list[Proc]
    log_dir: Path

    def r(self) -> redis.Redis:
        return self.redis.client()

    def stop(self) -> dict[str, int | None]:
        """SIGTERM (once) to the API and the live workers, wait for them, then stop Redis; exit codes."""
        procs = [self.api, *self.workers]
        for p in procs:
            p.send(signal.SIGTERM)
        codes: dict[str, int | None] = {}
        for p in procs:
            try:
                codes[p.name] = p.popen.wait(30)
            except subprocess.TimeoutExpired:
                p.popen.kill()
                codes[p.name] = p.popen.wait(10)
        self.redis.stop()
        return codes

    def logs(self) -> str:
        parts = [f"--- {p.name} (rc={p.popen.poll()})\n{p.log()[-3000:]}" for p in [self.api, *self.workers]]
        return "\n".join(parts)


@contextlib.contextmanager
def redis_stack(tmp: Path, weights_dir: Path, *, workers: int = 2, models: str = "",
                visibility_s: float = 2.0, max_deliveries: int = 3, worker_env: dict | None = None,
                **env: str) -> Iterator[Stack]:
    """Start redis-server, `workers` worker processes and the API (same S2AMNET_* `env` for all)."""
    tmp = Path(tmp)
    log_dir = tmp / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    if models:
        env["S2AMNET_MODELS"] = models
    server = RedisServer(tmp / "redis").start()
    procs: list[Proc] = []
    stack = None
    try:
        for _ in range(workers):
            procs.append(start_worker(server.url, weights_dir, log_dir, visibility_s=visibility_s,
                                      max_deliveries=max_deliveries, **{**env, **(worker_env or {})}))
        api = start_api(server.url, weights_dir, log_dir, wait=False, **env)
        stack = Stack(server, api, procs, log_dir)
        with server.client() as r:
            wait_workers(r, procs)
        wait_ready(api)
        yield stack
    finally:
        if stack is not None:
            stack.stop()
        else:
            for p in procs:
                p.stop(signal.SIGKILL, 10)
            server.stop()


# ------------------------------------------------------------------------------------------- redis state
def group_pending(r: redis.Redis, model: str) -> int:
    return int(r.xpending(JOBS.format(model), GROUP)["pending"])


def key_report(r: redis.Redis) -> dict:
    """Every key with its type, TTL and (for streams) length, plus used memory: what a run left behind."""
    keys = {}
    for key in r.scan_iter("*", count=1000):
        name = key.decode()
        kind = r.type(key).decode()
        ttl = r.ttl(key)
        if kind == "none" or ttl == -2:  # expired between SCAN and now (TTL -2 = no such key)
            continue
        entry = {"type": kind, "ttl": ttl}
        if kind == "stream":
            entry["len"] = r.xlen(key)
        keys[name] = entry
    mem = r.info("memory")
    return {"keys": keys, "dbsize": r.dbsize(), "used_memory": int(mem["used_memory"])}
