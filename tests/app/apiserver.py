"""Real API servers for the tests: tiny random-weight models and `s2amnet serve` subprocesses.

Every server test is parametrized over MODES, so the same suite runs against every dispatcher mode.
To add a mode (e.g. "redis": redis-server + worker processes), append it to MODES and teach
`start_server` how to bring that mode up (and down, in `Server.stop`). Fixtures: conftest.py.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]
LAUNCH = Path(__file__).with_name("_launch.py")

MODES = ["embedded", "redis"]
REDIS_WORKERS = 2  # worker processes behind a "redis"-mode server (start_server's redis_workers)
API_KEY = "test-key-1"
OTHER_API_KEY = "test-key-2"
INPUT_SIZE = 64  # tiny models at 64x64 keep CPU cost low

# name -> (task, classes, verdict rule)
TEST_MODELS = {
    "cls": (
        "classify",
        ["good", "scratch", "dent"],
        {"type": "classify", "pass_labels": ["good"], "min_score": 0.5},
    ),
    "det": ("detect", ["scratch", "dent"], {"type": "any_defect", "min_score": 0.5, "min_area": 0}),
    "seg": (
        "segment",
        ["background", "scratch", "dent"],
        {"type": "any_defect", "min_score": 0.5, "min_area": 0},
    ),
}

# Settings of the shared server: small limits so that the limit tests send small bodies.
MAIN_SERVER_ENV = {
    "S2AMNET_API_KEYS": f"{API_KEY},{OTHER_API_KEY}",
    "S2AMNET_MAX_BODY_MB": "1",
    "S2AMNET_MAX_PIXELS": "1000000",
    "S2AMNET_MAX_IMAGES": "4",
    "S2AMNET_MAX_DELAY_MS": "20",
}


def make_weights(root: Path, input_size: int = INPUT_SIZE, names: list[str] | None = None) -> Path:
    """Write tiny random-weight model folders (classify/detect/segment) under `root`."""
    import torch

    from model.checkpoint import save_model
    from model.registry import build_model

    torch.manual_seed(0)
    for name, (task, classes, verdict) in TEST_MODELS.items():
        if names and name not in names:
            continue
        model = build_model(task, "tiny", len(classes))
        save_model(
            model,
            root / name,
            {
                "name": name,
                "version": "1",
                "classes": classes,
                "verdict": verdict,
                "arch": {"variant": "tiny", "input_size": [input_size, input_size]},
                "mean": [0.5, 0.5, 0.5],
                "std": [0.25, 0.25, 0.25],
            },
        )
    return root


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    mode: str
    url: str
    proc: subprocess.Popen
    log_path: Path
    extra: list[subprocess.Popen] = field(default_factory=list)  # e.g. redis-server, workers

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def metrics(self) -> str:
        return httpx.get(self.url + "/metrics", timeout=10).text

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int | None:
        for proc in [self.proc, *self.extra]:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(sig)
        code = None
        for proc in [self.proc, *self.extra]:
            try:
                c = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                c = proc.wait(timeout=10)
            code = c if proc is self.proc else code
        return code


def server_env(**env: str) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("S2AMNET_")}
    base.pop("PROMETHEUS_MULTIPROC_DIR", None)
    base.update({"PYTHONUNBUFFERED": "1", "S2AMNET_LOG_LEVEL": "info", "S2AMNET_TORCH_THREADS": "1"})
    base.update({k: str(v) for k, v in env.items()})
    return base


def start_server(
    mode: str,
    weights_dir: Path,
    *,
    log_dir: Path | None = None,
    wait_ready: bool = True,
    ready_timeout: float = 120.0,
    redis_workers: int = REDIS_WORKERS,
    **env: str,
) -> Server:
    """Start the API in `mode` on a free port with `S2AMNET_*` settings from `env`; wait until /readyz.

    `S2AMNET_TEST_INFER_DELAY_S` in env makes every forward pass sleep first (tests/app/_launch.py)."""
    port = free_port()
    log_dir = log_dir or Path(os.environ.get("TMPDIR", "/tmp"))
    log_path = log_dir / f"s2amnet-serve-{mode}-{port}.log"
    extra: list[subprocess.Popen] = []
    if mode == "redis":  # redis-server + worker processes; the API itself is started as in "embedded"
        extra, env = start_redis_backend(weights_dir, log_dir, redis_workers, env)
    if mode in ("embedded", "redis"):
        cmd = [
            sys.executable,
            str(LAUNCH),
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--weights-dir",
            str(weights_dir),
        ]
    else:
        raise ValueError(f"unknown dispatcher mode {mode!r}")
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env=server_env(**env), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    server = Server(mode, f"http://127.0.0.1:{port}", proc, log_path, extra)
    if wait_ready:
        wait_until_ready(server, ready_timeout)
    return server


def wait_until_ready(server: Server, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(f"server exited with {server.proc.returncode}:\n{server.log()[-4000:]}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(server.url + "/readyz", timeout=2).status_code == 200:
                return
        time.sleep(0.1)
    server.stop(signal.SIGKILL)
    raise RuntimeError(f"server not ready after {timeout} s:\n{server.log()[-4000:]}")


@contextlib.contextmanager
def running_server(mode: str, weights_dir: Path, **env: str) -> Iterator[Server]:
    server = start_server(mode, weights_dir, **env)
    try:
        yield server
    finally:
        server.stop()


def start_redis_backend(weights_dir: Path, log_dir: Path, workers: int,
                        env: dict[str, str]) -> tuple[list[subprocess.Popen], dict[str, str]]:
    """Mode "redis": a redis-server on a free port (AOF in a temp dir) and `workers` `s2amnet worker`
    processes with the same settings, up (heartbeating) or exited; returns ([workers..., redis-server],
    env + S2AMNET_REDIS_URL). API and workers share one PROMETHEUS_MULTIPROC_DIR, so the API's /metrics
    shows the batch metrics that the workers record. Process helpers: tests/e2e/redis_harness.py."""
    import tempfile

    sys.path.insert(0, str(ROOT / "tests" / "e2e"))
    from redis_harness import RedisServer, live_worker_pids, start_worker

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
    return [*procs, redis_server.proc], env
