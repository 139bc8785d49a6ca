"""app.metrics: every metric defined once, multiprocess mode."""

from __future__ import annotations

import re
from pathlib import Path

from support.metrics import metric

from app import metrics

ROOT = Path(__file__).resolve().parents[2]


def test_every_metric_of_the_interface_is_defined_once():
    spec = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    section = spec.split("## app/metrics.py", 1)[1].split("\n", 1)[1].split("\n## ", 1)[0]
    section = re.sub(r"\(buckets[^)]*\)", "", section)
    section = re.sub(r"\{[^}]*\}", lambda m: m.group(0).replace(",", ";"), section)
    listed = []
    for item in section.replace("\n", " ").split(","):
        m = re.fullmatch(r"\s*([a-z_]+)(?:\{([a-z_;]*)\})?\s*\.?\s*", item)
        assert m, item
        listed.append((m.group(1), [x for x in (m.group(2) or "").split(";") if x]))
    assert len(listed) == 34 and ("inflight_requests", []) in listed
    from prometheus_client.metrics import MetricWrapperBase

    defined = [m for m in vars(metrics).values() if isinstance(m, MetricWrapperBase)]
    by_name = {m._name: m for m in defined}
    assert len(by_name) == len(defined) == 34  # each defined once, nothing else
    for name, labels in listed:
        full = "s2amnet_" + name
        m = by_name.get(full[: -len("_total")] if full.endswith("_total") else full)
        assert m is not None, f"{full} is not defined"
        assert list(m._labelnames) == labels, (full, m._labelnames)
        if full.endswith("_total"):
            assert m._type == "counter", full
        elif name.endswith("_seconds") and "timestamp" not in name and "load" not in name:
            assert m._type == "histogram", full
    assert metrics.BATCH_SIZE._upper_bounds[:-1] == [1, 2, 4, 8, 16, 32, 64]


def test_multiprocess_mode_merges_processes(tmp_path):
    import subprocess
    import sys

    code = (
        "from app import metrics\n"
        "metrics.REQUESTS.labels(endpoint='/detect', status='200').inc()\n"
        "metrics.BATCH_SIZE.labels(model='m').observe(4)\n"
        "metrics.QUEUE_DEPTH.labels(model='m').set(3)\n"
    )
    env = {"PROMETHEUS_MULTIPROC_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"}
    pids = []
    for _ in range(2):  # two processes
        proc = subprocess.run(
            [sys.executable, "-c", code + "import os; print(os.getpid())"],
            env=env,
            cwd=ROOT,
            check=True,
            capture_output=True,
            text=True,
        )
        pids.append(int(proc.stdout))

    def render(dead=()) -> str:
        mark = "".join(f"multiprocess.mark_process_dead({pid})\n" for pid in dead)
        return subprocess.run(
            [sys.executable, "-c", "from app import metrics\nfrom prometheus_client import multiprocess\n"
             f"{mark}print(metrics.render()[0].decode())"],
            env=env,
            cwd=ROOT,
            check=True,
            capture_output=True,
            text=True,
        ).stdout

    out = render()
    assert metric(out, "s2amnet_requests_total", endpoint="/detect", status="200") == 2
    assert metric(out, "s2amnet_batch_size_count", model="m") == 2
    assert metric(out, "s2amnet_queue_depth", model="m") == 6  # livesum over the two processes
    out = render(dead=pids)  # what a supervisor does when its children exit
    assert metric(out, "s2amnet_queue_depth", model="m") == 0
    assert metric(out, "s2amnet_requests_total", endpoint="/detect", status="200") == 2  # counters stay


def test_multiprocess_queue_depth_is_the_max_in_redis_mode(tmp_path):
    """Redis mode: every API process polls the same stream backlog, so two processes that each see
    3 waiting jobs mean 3 jobs (max), not 6 (the embedded mode's sum, tested above)."""
    import subprocess
    import sys

    env = {"PROMETHEUS_MULTIPROC_DIR": str(tmp_path), "PATH": "/usr/bin:/bin",
           "S2AMNET_REDIS_URL": "redis://127.0.0.1:1/0"}
    for depth in (3, 2):  # two processes, polled a moment apart
        subprocess.run([sys.executable, "-c", f"from app import metrics\n"
                        f"metrics.QUEUE_DEPTH.labels(model='m').set({depth})\n"],
                       env=env, cwd=ROOT, check=True)
    out = subprocess.run([sys.executable, "-c", "from app import metrics\nprint(metrics.render()[0].decode())"],
                         env=env, cwd=ROOT, check=True, capture_output=True, text=True).stdout
    assert metric(out, "s2amnet_queue_depth", model="m") == 3
