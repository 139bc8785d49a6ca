"""app.runtime: allocator tuning and torch threads of the process that runs the forwards."""

from __future__ import annotations

import time
from pathlib import Path

from app.settings import Settings

ROOT = Path(__file__).resolve().parents[2]


def test_allocator_tuning_applies_on_glibc_and_yields_to_the_environment(monkeypatch):
    import platform

    from app import runtime

    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_", raising=False)
    assert runtime.tune_allocator() is (platform.libc_ver()[0] == "glibc")  # mallopt accepted both values
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "131072")  # the operator's own setting wins
    assert runtime.tune_allocator() is False


def test_configure_runtime_follows_the_settings(monkeypatch):
    from app import runtime

    calls = []
    monkeypatch.setattr(runtime, "tune_allocator", lambda: calls.append("tuned") or True)
    monkeypatch.setattr(runtime, "configure_torch_threads", lambda n: calls.append(("threads", n)))
    runtime.configure_runtime(Settings(torch_threads=3))
    runtime.configure_runtime(Settings(allocator_tuning=False))
    assert calls == [("threads", 3), "tuned", ("threads", None)]


def _tree(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def test_the_cpu_quota_is_read_from_cgroup_v2_and_v1_the_lowest_along_the_path(tmp_path):
    from app.runtime import cgroup_cpu_limit

    def limit(proc: str, files: dict[str, str]) -> float | None:
        case = tmp_path / str(len(list(tmp_path.iterdir())))
        _tree(case / "fs", files)
        return cgroup_cpu_limit(case / "fs", _tree(case, {"self_cgroup": proc}) / "self_cgroup")

    # a container on cgroup v2: its own cgroup is the mount; the host's path of it does not exist there
    assert limit("0::/system.slice/docker-1.scope\n",
                 {"cgroup.controllers": "cpu io", "cpu.max": "150000 100000"}) == 1.5
    assert limit("0::/\n", {"cgroup.controllers": "cpu", "cpu.max": "max 100000"}) is None
    # a host cgroup below one whose quota is lower: the parent's holds
    assert limit("0::/a/b\n", {"cgroup.controllers": "cpu", "a/cpu.max": "100000 100000",
                                "a/b/cpu.max": "400000 100000"}) == 1.0
    # v2 beside v1 hierarchies (mounted at unified/), and v1's cpu controller with cpuacct
    assert limit("1:cpu,cpuacct:/docker/1\n0::/docker/1\n",
                 {"unified/docker/1/cpu.max": "250000 100000", "cpu,cpuacct/cpu.cfs_quota_us": "300000",
                  "cpu,cpuacct/cpu.cfs_period_us": "100000"}) == 2.5
    assert limit("3:cpu:/job\n", {"cpu/job/cpu.cfs_quota_us": "50000", "cpu/job/cpu.cfs_period_us": "100000",
                                   "cpu/cpu.cfs_quota_us": "-1", "cpu/cpu.cfs_period_us": "100000"}) == 0.5
    assert limit("3:cpu:/\n", {"cpu/cpu.cfs_quota_us": "-1", "cpu/cpu.cfs_period_us": "100000"}) is None
    assert limit("3:memory:/x\n", {}) is None
    assert limit("0::/\n", {"cgroup.controllers": "cpu", "cpu.max": "garbage"}) is None  # never a crash at start
    assert cgroup_cpu_limit(tmp_path, tmp_path / "no-such-file") is None


def test_a_process_under_a_cpu_quota_runs_its_forwards_on_as_many_threads_as_the_quota_allows(tmp_path):
    """A real cgroup (v1 cpu controller, as root): 1.5 CPUs of a quota give one torch thread, not one per core."""
    import os
    import subprocess
    import sys

    import pytest

    mount = Path("/sys/fs/cgroup/cpu")
    if os.geteuid() != 0 or not (mount / "cgroup.procs").exists() or not os.access(mount, os.W_OK):
        pytest.skip("needs root and a writable cgroup v1 cpu controller")
    if (os.cpu_count() or 1) < 2:
        pytest.skip("needs two cores")
    group = mount / f"s2amnet-test-{os.getpid()}"
    group.mkdir()
    try:
        (group / "cpu.cfs_period_us").write_text("100000")
        (group / "cpu.cfs_quota_us").write_text("150000")
        probe = ("from app.runtime import cgroup_cpu_limit, default_torch_threads\n"
                 "import torch; print(torch.get_num_threads(), cgroup_cpu_limit(), default_torch_threads())")

        def run(cgroup: Path | None) -> list[str]:
            enter = f"echo $$ > {cgroup / 'cgroup.procs'}; " if cgroup else ""
            out = subprocess.run(["sh", "-c", f'{enter}exec "$0" -c "$1"', sys.executable, probe], cwd=ROOT,
                                 capture_output=True, text=True, timeout=120, check=True)
            return out.stdout.split()
        torch_default, quota, threads = run(group)
        assert (quota, threads) == ("1.5", "1") and int(torch_default) >= 2
        from app.runtime import cgroup_cpu_limit

        if cgroup_cpu_limit() is None:  # outside the group, on a machine without a quota: torch's own count
            assert run(None)[2] == torch_default
    finally:
        group.rmdir()


def test_the_service_runs_a_model_on_onnxruntime_when_asked(exported_classifier, tmp_path):
    """S2AMNET_MODEL_BACKEND puts one model on ONNX Runtime (its graph found in S2AMNET_CACHE_DIR: no export
    at start-up), the others get the CPU's default (S2AMNET_BACKEND unset: eager in channels-last order);
    /metrics says which; the answers are those of the eager model."""
    import shutil

    import httpx
    import pytest

    pytest.importorskip("onnxruntime")
    from support.harness import running_server
    from support.images import encode, pattern
    from support.metrics import metric
    from support.weights import make_weights

    from model.predictor import Predictor

    folder, shared = exported_classifier
    weights = make_weights(tmp_path / "weights", names=["det"])
    shutil.copytree(folder, weights / "cls")
    (graph,) = shared.glob("*.onnx")
    (tmp_path / "cache").mkdir()
    shutil.copy2(graph, tmp_path / "cache" / graph.name)
    upright = pattern(64, 64, seed=4)
    image = encode(upright)
    with running_server("embedded", weights, S2AMNET_MODEL_BACKEND="cls=onnxruntime",
                        S2AMNET_CACHE_DIR=str(tmp_path / "cache")) as server, \
            httpx.Client(base_url=server.url, timeout=60) as client:
        text = client.get("/metrics").text
        assert "start-up objects moved out of the garbage collector's reach" in server.log()  # `s2amnet serve`
        assert metric(text, "s2amnet_model_backend", model="cls", backend="onnxruntime") == 1
        assert metric(text, "s2amnet_model_backend", model="det", backend="eager-channels-last") == 1
        got = client.post("/classify", files={"file": ("a.png", image)}).json()
    assert [p.name for p in (tmp_path / "cache").glob("*.onnx")] == [graph.name]  # the cached graph, loaded
    want = Predictor.from_folder(weights / "cls").predict([upright], top_k=5)[0]
    assert [t["label"] for t in got["top_k"]] == [t["label"] for t in want["top_k"][:len(got["top_k"])]]
    assert [t["score"] for t in got["top_k"]] == pytest.approx([t["score"] for t in want["top_k"]][:len(got["top_k"])],
                                                               abs=1e-4)


def test_the_service_serves_the_compiled_package_and_tunes_the_forward_batch_for_it(compiled_classifier):
    """S2AMNET_BACKEND=compile with the package in S2AMNET_CACHE_DIR: the server loads it (no compiling at
    start), /metrics says so, and the answers are the eager model's."""
    import httpx
    import pytest
    from support.harness import running_server
    from support.images import encode, pattern
    from support.metrics import metric

    from model.predictor import Predictor

    folder, cache = compiled_classifier
    upright = pattern(64, 64, seed=5)
    packages = sorted(cache.glob("*.pt2"))
    with running_server("embedded", folder.parent, S2AMNET_BACKEND="compile", S2AMNET_CACHE_DIR=str(cache),
                        S2AMNET_MODELS="cls", S2AMNET_TORCH_THREADS="2") as server, \
            httpx.Client(base_url=server.url, timeout=60) as client:
        text = client.get("/metrics").text
        assert metric(text, "s2amnet_model_backend", model="cls", backend="compile") == 1
        assert metric(text, "s2amnet_cpu_streams") == 1  # a compiled model runs one forward at a time
        got = client.post("/classify", files={"file": ("a.png", encode(upright))}).json()
    assert sorted(cache.glob("*.pt2")) == packages
    want = Predictor.from_folder(folder).predict([upright], top_k=5)[0]
    n = len(got["top_k"])
    assert [t["label"] for t in got["top_k"]] == [t["label"] for t in want["top_k"][:n]]
    assert [t["score"] for t in got["top_k"]] == pytest.approx([t["score"] for t in want["top_k"][:n]], abs=1e-4)


def test_the_backend_is_chosen_before_the_forward_batch_is_tuned(monkeypatch):
    from app import runtime

    calls = []
    monkeypatch.setattr(runtime, "warm_up", lambda p: 0.0)
    timed = {"a": {1: 30.0, 2: 20.0}, "b": None}  # what choosing each backend measured, passed on

    def set_backend(name, p, s, m):
        calls.append(("backend", name, m))
        return timed[name]

    monkeypatch.setattr(runtime, "set_backend", set_backend)
    monkeypatch.setattr(runtime, "set_forward_batch",
                        lambda name, p, s, m, w, measured: calls.append(("batch", name, m, measured)))
    runtime.prepare_predictors({"a": object(), "b": object()}, Settings(), {"a": 4, "b": 8})
    assert calls == [("backend", "a", 4), ("batch", "a", 4, timed["a"]), ("backend", "b", 8), ("batch", "b", 8, None)]


def test_no_batch_is_larger_than_one_forward():
    from types import SimpleNamespace

    from app.runtime import one_forward_per_batch

    predictors = {"a": SimpleNamespace(forward_batch=4), "b": SimpleNamespace(forward_batch=None),
                  "c": SimpleNamespace(forward_batch=8)}
    # a: forwards of 4 (CPU, tuned); b: whole batches (GPU, or no warm-up); c: the batch cap is lower already
    assert one_forward_per_batch(predictors, {"a": 16, "b": 16, "c": 2}) == {"a": 4, "b": 16, "c": 2}


def test_a_serving_process_freezes_what_start_up_left_after_collecting_its_garbage():
    """`freeze_startup_objects` (run by `s2amnet serve` and `s2amnet worker` once ready) collects first, so that
    garbage is freed and not frozen, then freezes the survivors: a full collection afterwards has nothing
    of them to walk. In a process of its own: the test runner's heap must stay collectable."""
    import subprocess
    import sys

    from support.harness import ROOT, process_env

    code = """
import gc, time, weakref
gc.disable()  # no automatic collection before the call
from app.runtime import freeze_startup_objects
class Node: pass
a = Node(); a.me = a; dead = weakref.ref(a); del a  # garbage in a cycle: only the collector frees it
kept = [Node() for _ in range(100_000)]
tracked = len(gc.get_objects())
n = freeze_startup_objects()
assert dead() is None, "the garbage was frozen instead of collected"
assert n == gc.get_freeze_count() >= 100_000 and len(gc.get_objects()) < tracked // 100, (n, tracked)
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=process_env(PYTHONPATH=str(ROOT)),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_several_cpu_streams_only_where_every_backend_can_run_forwards_side_by_side():
    from types import SimpleNamespace

    import torch

    from app.runtime import cpu_streams

    def model(device="cpu", backend="eager-channels-last", concurrency=None):
        runner = None if backend == "eager" else SimpleNamespace(concurrency=concurrency)
        return SimpleNamespace(device=torch.device(device), backend=backend, runner=runner)

    assert cpu_streams("auto", {"a": model(), "b": model(backend="eager")}, 2)[0] == 2
    assert cpu_streams(4, {"a": model()}, 16)[0] == 4
    assert cpu_streams(4, {"a": model()}, 2)[0] == 2  # at most one per thread
    assert cpu_streams(4, {"a": model(), "b": model(backend="compile", concurrency=2)}, 16)[0] == 2
    assert cpu_streams("auto", {"a": model()}, 1) == (1, "one torch thread")
    assert cpu_streams("auto", {"a": model(), "b": model(device="meta")}, 8) == (1, "forwards on a GPU")
    n, why = cpu_streams("auto", {"a": model(), "b": model(backend="onnxruntime", concurrency=1)}, 8)
    assert n == 1 and "onnxruntime" in why  # its session keeps a thread pool of its own


def test_thread_shares_give_a_lone_forward_every_thread_and_never_more_than_there_are():
    import threading

    import torch

    from app.runtime import ThreadShares

    shares = ThreadShares(threads=4, streams=2)
    seen: dict[str, int] = {}

    def take(name: str, waiting: bool, first: bool, hold: threading.Event | None = None) -> None:
        got = shares.take(waiting, first)
        seen[name] = got
        seen[name + " torch"] = torch.get_num_threads()  # the calling thread's own count
        if hold is not None:
            hold.wait(10)
        shares.give(got)

    def run(*args) -> threading.Thread:
        t = threading.Thread(target=take, args=args)
        t.start()
        return t

    run("alone", False, True).join()
    run("others waiting", True, True).join()
    run("second stream", False, False).join()
    assert (seen["alone"], seen["others waiting"], seen["second stream"]) == (4, 2, 2)
    assert (seen["alone torch"], seen["others waiting torch"], seen["second stream torch"]) == (4, 2, 2)

    # a lone forward holds every thread: the second stream's forward waits for it, then both run on a share
    hold = threading.Event()
    first = run("first", False, True, hold)
    while "first" not in seen:
        time.sleep(0.01)
    second = run("second", False, False)
    time.sleep(0.2)
    assert "second" not in seen  # waiting for threads
    hold.set()
    first.join()
    second.join(10)
    assert seen["second"] == 2
    # a stream waiting for threads is company: the first stream, giving its threads back and taking again at
    # once, takes its share and leaves the waiting stream the rest (else it could take them all, again and again)
    seen.clear()
    before = torch.get_num_threads()
    try:
        got = shares.take(False, True)
        waiter = run("waiter", False, False)
        while shares._waiting == 0:
            time.sleep(0.01)
        shares.give(got)
        again = shares.take(False, True)
        waiter.join(10)
        shares.give(again)
    finally:
        torch.set_num_threads(before)
    assert (got, again, seen["waiter"]) == (4, 2, 2)
