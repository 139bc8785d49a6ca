"""Real processes for the tests: `s2amnet serve` (embedded or Redis mode), `s2amnet worker`, and a
redis-server on a free port (AOF in a temp dir). No mocks: everything talks over real sockets.

`start_server(mode, ...)` brings up the API in a dispatcher mode (MODES; "redis" adds a redis-server and
worker processes); `redis_stack(...)` gives the Redis-mode tests every process to poke at. Processes run
through launch.py, which honours S2AMNET_TEST_INFER_DELAY_S (slow forwards, for drain and deadline tests).
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import redis

ROOT = Path(__file__).resolve().parents[2]
LAUNCH = Path(__file__).with_name("launch.py")
# Redis key names, spelled out here rather than imported from app.queue: the tests hold the service to them
JOBS = "s2amnet:jobs:{}"
GROUP = "workers"

MODES = ["embedded", "redis"]
REDIS_WORKERS = 2  # worker processes behind a "redis"-mode server (start_server's redis_workers)
API_KEY = "test-key-1"
OTHER_API_KEY = "test-key-2"

# Settings of the shared API server: small limits so that the limit tests send small bodies.
MAIN_SERVER_ENV = {
    "S2AMNET_API_KEYS": f"{API_KEY},{OTHER_API_KEY}",
    "S2AMNET_MAX_BODY_MB": "1",
    "S2AMNET_MAX_PIXELS": "1000000",
    "S2AMNET_MAX_IMAGES": "4",
    "S2AMNET_MAX_DELAY_MS": "20",
    # no batch is larger than one forward: measured, the tiny models' forward batch may be 1 (no batching at all)
    "S2AMNET_FORWARD_BATCH": "4",
    "S2AMNET_RECIPES": str(Path(__file__).with_name("recipes.yaml")),
}


def terminate(proc: subprocess.Popen | None, timeout: float = 15.0) -> None:
    """SIGTERM to a server process still running and wait for it; SIGKILL after ``timeout`` seconds."""
    if proc is not None and proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_records_root: str | None = None


def records_dir() -> str:
    """A fresh folder for one process's inspection records (records are on by default), under one temporary
    folder of this test run that is removed at exit: servers never record into the repository."""
    global _records_root
    if _records_root is None:
        _records_root = tempfile.mkdtemp(prefix="s2amnet-test-records-")
        atexit.register(shutil.rmtree, _records_root, True)
    return tempfile.mkdtemp(prefix="records-", dir=_records_root)


def process_env(**env: str) -> dict[str, str]:
    """The test process's environment without S2AMNET_* / multiprocess settings, plus `env`; records go to a
    temporary folder of its own unless `env` names S2AMNET_RECORDS_DIR."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("S2AMNET_")}
    base.pop("PROMETHEUS_MULTIPROC_DIR", None)
    base.update({"PYTHONUNBUFFERED": "1", "S2AMNET_LOG_LEVEL": "info", "S2AMNET_TORCH_THREADS": "1"})
    if "S2AMNET_RECORDS_DIR" not in env:
        base["S2AMNET_RECORDS_DIR"] = records_dir()
    base.update({k: str(v) for k, v in env.items()})
    return base


def require_redis_server() -> str:
    path = shutil.which("redis-server")
    if path is None:
        import pytest

        if os.environ.get("CI"):
            pytest.fail("redis-server is not installed (make system-deps installs it)")
        pytest.skip("redis-server is not installed (make system-deps installs it)")
    return path


# ------------------------------------------------------------------------------------------- processes
@dataclass
class Proc:
    """A process under test (API or worker), its log, and the processes that go with it."""

    name: str
    popen: subprocess.Popen
    log_path: Path
    url: str = ""  # API base URL, or the worker's metrics URL
    mode: str = ""  # an API's dispatcher mode
    companions: list[subprocess.Popen] = field(default_factory=list)  # stopped with it: redis-server, workers

    @property
    def proc(self) -> subprocess.Popen:
        return self.popen

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log(self) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")
        return ""

    def metrics(self) -> str:
        return httpx.get(self.url + "/metrics", timeout=10).text

    def send(self, sig: int) -> None:
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                self.popen.send_signal(sig)

    def wait(self, timeout: float) -> int:
        return self.popen.wait(timeout)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int | None:
        """``sig`` to it and its companions, wait for all (SIGKILL after ``timeout``); its exit code."""
        procs = [self.popen, *self.companions]
        for p in procs:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    p.send_signal(sig)
        code = None
        for p in procs:
            try:
                c = p.wait(timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                c = p.wait(10)
            code = c if p is self.popen else code
        return code

    def rss_kib(self) -> int:
        """Resident set size of the process, from /proc (KiB)."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise RuntimeError("no VmRSS")


Server = Proc  # an API process


def _spawn(name: str, args: list[str], log_path: Path, env: dict[str, str]) -> subprocess.Popen:
    with open(log_path, "wb") as log:
        return subprocess.Popen([sys.executable, str(LAUNCH), *args], cwd=ROOT, env=process_env(**env),
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def start_api(weights_dir: Path, log_dir: Path, *, wait: bool = True, timeout: float = 180.0,
              args: tuple[str, ...] = (), mode: str = "", companions: list[subprocess.Popen] | None = None,
              **env: str) -> Proc:
    """`s2amnet serve` on a free port with `S2AMNET_*` settings from `env` (Redis mode when it sets
    S2AMNET_REDIS_URL) plus `args`; waits for /readyz unless ``wait`` is false."""
    port = free_port()
    log_path = Path(log_dir) / f"api-{port}.log"
    popen = _spawn("api", ["serve", "--host", "127.0.0.1", "--port", str(port), "--weights-dir", str(weights_dir),
                           *args], log_path, env)
    api = Proc(f"api-{port}", popen, log_path, f"http://127.0.0.1:{port}", mode, companions or [])
    if wait:
        wait_ready(api, timeout)
    return api


def wait_ready(api: Proc, timeout: float = 180.0) -> None:
    """Until the API answers /readyz with 200; RuntimeError (and the API killed) if it exits or times out."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if not api.alive():
            raise RuntimeError(f"API exited with {api.popen.returncode}:\n{api.log()[-4000:]}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(api.url + "/readyz", timeout=2).status_code == 200:
                return
        time.sleep(0.1)
    api.stop(signal.SIGKILL)
    raise RuntimeError(f"API not ready after {timeout} s:\n{api.log()[-4000:]}")


def start_worker(redis_url: str, weights_dir: Path, log_dir: Path, *, name: str | None = None,
                 visibility_s: float = 2.0, max_deliveries: int = 3, metrics_port: int | None = None,
                 **env: str) -> Proc:
    """`s2amnet worker` as a real process. Its metrics are served on a free port (`Proc.url`)."""
    port = metrics_port or free_port()
    log_path = Path(log_dir) / f"worker-{port}.log"
    args = ["worker", "--redis-url", redis_url, "--weights-dir", str(weights_dir), "--metrics-port", str(port),
            "--visibility-timeout", str(visibility_s), "--max-deliveries", str(max_deliveries)]
    if name:
        args += ["--name", name]
    return Proc(f"worker-{port}", _spawn("worker", args, log_path, env), log_path, f"http://127.0.0.1:{port}/metrics")


def live_worker_pids(r: redis.Redis) -> set[int]:
    """PIDs of the workers whose heartbeat key is in Redis."""
    pids = set()
    for key in r.scan_iter("s2amnet:worker:*"):
        with contextlib.suppress(TypeError, ValueError):
            pids.add(int(json.loads(r.get(key) or b"{}")["pid"]))
    return pids


def consumer_of(r: redis.Redis, pid: int) -> str:
    """The consumer name of the worker process ``pid`` (its first stream's), from its heartbeat keys."""
    for key in r.scan_iter("s2amnet:worker:*"):
        info = json.loads(r.get(key) or b"{}")
        if info.get("pid") == pid and info.get("stream") == 1:
            return info["consumer"]
    raise AssertionError(f"no heartbeat of worker pid {pid}")


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
        terminate(self.proc, timeout)

    def client(self, timeout: float = 5.0) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=timeout,
                           socket_connect_timeout=timeout)

    def log(self) -> str:
        with contextlib.suppress(OSError):
            return (self.workdir / "redis.log").read_text(errors="replace")
        return ""


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


# ------------------------------------------------------------------------------------------- stacks
def start_server(mode: str, weights_dir: Path, *, log_dir: Path | None = None, wait_ready: bool = True,
                 ready_timeout: float = 120.0, redis_workers: int = REDIS_WORKERS, **env: str) -> Proc:
    """The API in dispatcher `mode` on a free port with `S2AMNET_*` settings from `env`; waits for /readyz.
    Mode "redis": a redis-server and `redis_workers` workers with the same settings come with it (stopped
    with it), sharing one PROMETHEUS_MULTIPROC_DIR, so the API's /metrics shows the workers' batches."""
    if mode not in MODES:
        raise ValueError(f"unknown dispatcher mode {mode!r}")
    log_dir = Path(log_dir or os.environ.get("TMPDIR", "/tmp"))
    companions: list[subprocess.Popen] = []
    if mode == "redis":
        companions, env = _redis_backend(weights_dir, log_dir, redis_workers, env)
    return start_api(weights_dir, log_dir, wait=wait_ready, timeout=ready_timeout, mode=mode,
                     companions=companions, **env)


def _redis_backend(weights_dir: Path, log_dir: Path, workers: int,
                   env: dict[str, str]) -> tuple[list[subprocess.Popen], dict[str, str]]:
    """A redis-server and `workers` workers, up (heartbeating) or exited; ([workers..., redis-server],
    env + S2AMNET_REDIS_URL)."""
    redis_server = RedisServer(Path(tempfile.mkdtemp(prefix="s2amnet-redis-", dir=log_dir))).start()
    env = {**env, "S2AMNET_REDIS_URL": redis_server.url}
    env.setdefault("PROMETHEUS_MULTIPROC_DIR", tempfile.mkdtemp(prefix="s2amnet-prom-", dir=log_dir))
    procs = [start_worker(redis_server.url, weights_dir, log_dir, **env).popen for _ in range(workers)]
    deadline = time.monotonic() + 120
    with redis_server.client() as r:
        # a worker that exits (e.g. broken weights) is left for the test to see, like the API would be
        while {p.pid for p in procs if p.poll() is None} - live_worker_pids(r):
            if time.monotonic() > deadline:
                for p in procs:
                    p.kill()
                redis_server.stop()
                raise RuntimeError(f"redis-mode workers not up after 120 s (logs in {log_dir})")
            time.sleep(0.1)
    assert redis_server.proc is not None
    return [*procs, redis_server.proc], env


@contextlib.contextmanager
def running_server(mode: str, weights_dir: Path, **env: str) -> Iterator[Proc]:
    server = start_server(mode, weights_dir, **env)
    try:
        yield server
    finally:
        server.stop()


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
        api = start_api(weights_dir, log_dir, wait=False, mode="redis", S2AMNET_REDIS_URL=server.url, **env)
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
