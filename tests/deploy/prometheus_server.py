"""A real `prometheus` process for the end-to-end monitoring test: a config derived from the shipped
docker/prometheus/prometheus.yml (same jobs, metrics paths and rule files; static targets on the test's
ports instead of Docker DNS; second-scale intervals), a temp TSDB, and a small HTTP API client."""

from __future__ import annotations

import contextlib
import copy
import math
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

from .helpers import PROMETHEUS_CONFIG, find_tool, load_yaml


def derive_config(
    targets: dict[str, list[str]], *, interval_s: float = 1.0, shipped: Path = PROMETHEUS_CONFIG
) -> dict[str, Any]:
    """The shipped config with each job's service discovery replaced by `targets[job_name]`.

    Every job of the shipped file must be given targets, and every given job must exist there, so that a
    job added to (or renamed in) prometheus.yml makes this test fail instead of silently not scraping it.
    rule_files stay the shipped ones (made absolute: they are relative to the shipped file)."""
    cfg = copy.deepcopy(load_yaml(shipped))
    interval = f"{int(interval_s * 1000)}ms"
    glob = cfg.setdefault("global", {})
    glob.update(scrape_interval=interval, evaluation_interval=interval, scrape_timeout=interval)
    cfg["rule_files"] = [str((shipped.parent / f).resolve()) for f in cfg.get("rule_files", [])]
    cfg.pop("alerting", None)  # no Alertmanager in the test; alerts are still evaluated
    cfg.pop("remote_write", None)
    jobs = [job["job_name"] for job in cfg["scrape_configs"]]
    assert sorted(jobs) == sorted(targets), f"shipped jobs {jobs} != jobs the test scrapes {sorted(targets)}"
    for job in cfg["scrape_configs"]:
        for key in [k for k in job if k.endswith("_sd_configs") or k == "static_configs"]:
            del job[key]
        for key in ("scrape_interval", "scrape_timeout"):  # per-job overrides: use the test's
            job.pop(key, None)
        job["static_configs"] = [{"targets": targets[job["job_name"]]}]
    return cfg


class Prometheus:
    """`prometheus` on 127.0.0.1:`port` with `config` (a dict), storage in `workdir`."""

    def __init__(self, workdir: Path, port: int, config: dict[str, Any]):
        self.binary = find_tool("prometheus", "apt-get install prometheus (make test: system-deps)")
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port
        self.config_path = self.workdir / "prometheus.yml"
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        self.log_path = self.workdir / "prometheus.log"
        self.proc: subprocess.Popen | None = None
        self.http = httpx.Client(base_url=self.url, timeout=10)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60.0) -> Prometheus:
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [
                    self.binary,
                    f"--config.file={self.config_path}",
                    f"--storage.tsdb.path={self.workdir / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    "--log.level=warn",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prometheus exited with {self.proc.returncode}:\n{self.log()[-4000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if self.http.get("/-/ready", timeout=2).status_code == 200:
                    return self
            time.sleep(0.1)
        raise RuntimeError(f"prometheus not ready after {timeout} s:\n{self.log()[-4000:]}")

    def stop(self) -> None:
        self.http.close()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def log(self) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")
        return ""

    # -------------------------------------------------------------------------------------- HTTP API
    def api(self, path: str, **params: Any) -> dict[str, Any]:
        """GET /api/v1/<path>; the parsed body ({"status": "success"|"error", ...}) whatever the code."""
        res = self.http.get(f"/api/v1/{path}", params=params)
        body = res.json()
        assert body.get("status") in ("success", "error"), (path, res.status_code, res.text[:500])
        return body

    def query(self, expr: str, at: float | None = None) -> dict[str, Any]:
        return self.api("query", query=expr, **({"time": f"{at:.3f}"} if at is not None else {}))

    def query_range(self, expr: str, start: float, end: float, step: float) -> dict[str, Any]:
        return self.api("query_range", query=expr, start=f"{start:.3f}", end=f"{end:.3f}", step=f"{step}")

    def value(self, expr: str) -> float | None:
        """The single value of a scalar-valued instant query, or None when it is empty."""
        body = self.query(expr)
        assert body["status"] == "success", (expr, body)
        data = body["data"]
        if data["resultType"] == "scalar":
            return float(data["result"][1])
        return float(data["result"][0]["value"][1]) if data["result"] else None


def sample_values(data: dict[str, Any]) -> list[float]:
    """Every value of a query result (vector, matrix or scalar) as floats (NaN/Inf included)."""
    kind, result = data["resultType"], data["result"]
    if kind == "scalar":
        return [float(result[1])]
    if kind == "vector":
        return [float(s["value"][1]) for s in result]
    if kind == "matrix":
        return [float(v[1]) for s in result for v in s["values"]]
    return []


def finite(values: list[float]) -> list[float]:
    return [v for v in values if math.isfinite(v)]
