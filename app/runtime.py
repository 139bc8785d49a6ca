"""Process runtime of the code that runs the forwards (embedded inference thread, Redis worker).

- torch intra-op threads: the thread that runs the forwards keeps torch's default (or
  S2AMNET_TORCH_THREADS); threads that run torch beside it (model loading, postprocessing) use one; several
  inference streams may share them (S2AMNET_CPU_STREAMS, `ThreadShares`);
- allocator tuning (glibc's mallopt), so that every forward's activations reuse memory;
- warm-up (one blank image per model), the per-model forward-batch size (S2AMNET_FORWARD_BATCH) and
  backend (S2AMNET_BACKEND: eager PyTorch or ONNX Runtime).
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from app import metrics

if TYPE_CHECKING:
    from app.settings import Settings
    from model.predictor import Predictor

log = logging.getLogger("s2amnet.runtime")


CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_CGROUP = Path("/proc/self/cgroup")


def _cgroup_dirs(mount: Path, path: str):
    """The cgroup's directory under ``mount`` and each of its parents up to the mount (limits of the parents
    apply too). In a container the mount is the container's own cgroup, so only the mount itself exists."""
    d = mount / path.strip("/")
    while True:
        yield d
        if d == mount or mount not in d.parents:
            return
        d = d.parent


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _v2_limit(d: Path) -> float | None:
    text = _read(d / "cpu.max")  # "max 100000" or "<quota> <period>" (microseconds)
    if not text or text.startswith("max"):
        return None
    quota, _, period = text.partition(" ")
    return _ratio(quota, period or "100000")


def _v1_limit(d: Path) -> float | None:
    quota, period = _read(d / "cpu.cfs_quota_us"), _read(d / "cpu.cfs_period_us")
    return _ratio(quota, period) if quota and period else None


def _ratio(quota: str, period: str) -> float | None:
    """quota ÷ period; None for no quota (-1) or what is not a pair of positive integers."""
    try:
        q, p = int(quota), int(period)
    except ValueError:
        return None
    return q / p if q > 0 and p > 0 else None


def cgroup_cpu_limit(root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_CGROUP) -> float | None:
    """CPUs per second this process may use by its cgroup's CPU quota (cgroup v2 ``cpu.max``, v1
    ``cpu.cfs_quota_us``), the lowest along its cgroup's path; None without a quota. A container started with
    ``--cpus 2`` (compose: ``cpus`` or ``deploy.resources.limits.cpus``) has one; its affinity mask still
    shows every core of the host."""
    text = _read(proc_cgroup)
    if text is None:
        return None
    limits: list[float | None] = []
    for line in text.splitlines():
        hierarchy, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        if hierarchy == "0":  # cgroup v2: mounted at the root, or at root/unified beside v1 hierarchies
            mount = root if (root / "cgroup.controllers").exists() else root / "unified"
            limits += [_v2_limit(d) for d in _cgroup_dirs(mount, path)]
        elif "cpu" in controllers.split(","):
            mount = root / controllers if (root / controllers).is_dir() else root / "cpu"
            limits += [_v1_limit(d) for d in _cgroup_dirs(mount, path)]
    found = [x for x in limits if x is not None]
    return min(found) if found else None


@functools.cache
def default_torch_threads() -> int:
    """The forward's intra-op threads when S2AMNET_TORCH_THREADS is unset: torch's count as the process
    started (the CPUs of its affinity mask; read once, before `one_torch_thread`), at most the CPUs its
    cgroup's quota allows (at least one). With more threads than the quota allows, the kernel throttles the
    whole process once the quota is spent, and the threads of every op wait for the throttled ones."""
    import torch

    threads = torch.get_num_threads()
    limit = cgroup_cpu_limit()
    if limit is not None and limit < threads:
        capped = max(1, int(limit))
        log.info("torch threads: %d, for a CPU quota of %.2f CPUs (of %d cores)", capped, limit, threads)
        return capped
    return threads


def configure_torch_threads(num_threads: int | None) -> None:
    """Set the intra-op threads of the thread that runs the forwards: ``num_threads``, else torch's default
    (set explicitly: other threads lower the process default, see `one_torch_thread`)."""
    import torch

    torch.set_num_threads(int(num_threads or default_torch_threads()))


def one_torch_thread() -> None:
    """For threads that run torch ops beside the forwards (model loading, postprocessing): one intra-op
    thread, so that they start no OpenMP thread team of their own. With such a team idle elsewhere, libgomp
    counts more threads than cores and throttles the spinning of the inference thread's team, which can
    double the cost of every forward. Lowers torch's process default as well; the inference thread then
    sets its own (`configure_torch_threads`)."""
    default_torch_threads()  # read it before lowering it
    import torch

    torch.set_num_threads(1)


def cpu_streams(setting: int | str, predictors: Mapping[str, Predictor], threads: int) -> tuple[int, str]:
    """How many forwards the embedded service or a worker runs at once (S2AMNET_CPU_STREAMS), and why: on a CPU, the
    setting ('auto': 2), at most one per torch thread and at most what every model's backend can run at once on
    threads of its own (its runner's ``concurrency``: eager and `ModuleRunner` no limit, a compiled package what
    it was loaded for, 1 by default, ONNX Runtime and OpenVINO 1, for their thread pools take the cores
    themselves); with a GPU, 1."""
    if not all(runs_on_cpu(p) for p in predictors.values()):
        return 1, "forwards on a GPU"
    limits: dict[str, int] = {}  # backends with a limit (eager, runner None, has none)
    for p in predictors.values():
        limit = None if p.runner is None else getattr(p.runner, "concurrency", 1)
        if limit is not None:
            limits[p.backend] = limit
    single = sorted(b for b, limit in limits.items() if limit <= 1)
    if single:
        return 1, f"backend {', '.join(single)} runs one forward at a time"
    if threads < 2:
        return 1, "one torch thread"
    streams = max(1, min(2 if setting == "auto" else int(setting), threads, *limits.values()))
    how = "auto" if setting == "auto" else "requested"
    return streams, f"{how}; {threads} torch threads, {max(1, threads // streams)} per forward while others wait"


class ThreadShares:
    """The forwards' torch threads, shared by the inference streams (`cpu_streams`) of the embedded service or
    of a Redis worker.

    The first stream's forward gets every thread when no other forward runs and no job waits (a part sent
    alone gets the whole CPU), else its share (threads ÷ streams); the other streams' forwards always get
    their share: a thread whose OpenMP team once had every core keeps that team, and two such teams make
    libgomp throttle both (lone forwards taken in turn by two such threads took twice as long). A forward
    waits until its threads are free, so that the streams together never ask for more threads than there
    are. `take` sets the calling thread's torch threads to what it got (each thread has its own count)."""

    def __init__(self, threads: int, streams: int):
        self.total = max(1, int(threads))
        self.share = max(1, self.total // max(1, int(streams)))
        self._free = self.total  # a forward runs while fewer are free
        self._waiting = 0  # streams in `take`
        self._cond = threading.Condition()

    def take(self, waiting: bool, first: bool = True) -> int:
        """Threads for the calling stream's next forward (``waiting``: other jobs wait for a forward;
        ``first``: the first stream); blocks until they are free. Give them back with `give`."""
        import torch

        with self._cond:
            self._waiting += 1
            while True:  # another stream's batch waiting for threads counts as company, or it could starve
                alone = first and not (waiting or self._free < self.total or self._waiting > 1)
                want = self.total if alone else self.share
                if want <= self._free:
                    break
                self._cond.wait()
            self._waiting -= 1
            self._free -= want
        if torch.get_num_threads() != want:
            torch.set_num_threads(want)
        return want

    def give(self, threads: int) -> None:
        with self._cond:
            self._free += threads
            self._cond.notify_all()


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def tune_allocator(mmap_threshold: int = 32 << 20, trim_threshold: int = 256 << 20) -> bool:
    """Linux/glibc, process-wide: serve blocks below ``mmap_threshold`` from the heap and keep up to
    ``trim_threshold`` of freed memory, so that the activations of every forward reuse memory instead of
    being mapped and page-faulted anew (glibc's defaults map blocks above 128 KiB-32 MiB afresh each time).
    Large-activation models run their CPU forwards markedly faster; resident memory stays nearer its
    peak. Returns whether it was applied: not with another C library, nor when the environment already
    sets MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ (the operator's choice wins)."""
    if any(k in os.environ for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")):
        return False
    try:
        import ctypes

        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, int(mmap_threshold))) and bool(
        mallopt(_M_TRIM_THRESHOLD, int(trim_threshold)))


def freeze_startup_objects() -> int:
    """Once a serving process has started (models loaded and warmed up): collect the garbage, then move every
    object that survived (modules, models, the app) into the collector's permanent generation (`gc.freeze`).
    A full collection then walks only what was made since; with the four shipped models loaded it took
    140-150 ms, during which every Python thread (event loop, decoding, postprocessing) stands still, and
    under 1 ms after. Only for a process's own entry point: a test runner's heap must stay collectable.
    Returns the number of objects frozen."""
    import gc

    gc.collect()
    gc.freeze()
    count = gc.get_freeze_count()
    log.info("%d start-up objects moved out of the garbage collector's reach", count)
    return count


def configure_runtime(settings: Settings) -> None:
    """Process-wide settings of the process that runs the forwards: torch threads, allocator tuning."""
    configure_torch_threads(settings.torch_threads)
    if settings.allocator_tuning:
        log.info("allocator tuning %s", "on" if tune_allocator() else "not applied (not glibc, or MALLOC_* set)")


def warm_up(predictor: Predictor) -> float:
    """One preprocess + forward + postprocess on a blank image at the model's input size; returns seconds."""
    from PIL import Image

    t0 = time.perf_counter()
    h, w = (int(v) for v in predictor.input_size)
    sample = predictor.preprocess(Image.new("RGB", (w, h), (128, 128, 128)))
    raws = predictor.infer([sample.array])
    predictor.postprocess(raws[0], sample.meta)
    return time.perf_counter() - t0


def runs_on_cpu(predictor: Predictor) -> bool:
    """Whether the model's forwards run on the CPU."""
    return predictor.device.type == "cpu"


def set_forward_batch(name: str, predictor: Predictor, setting: int | str, max_batch: int, warmed: bool,
                      measured: Mapping[int, float] | None = None) -> None:
    """Apply S2AMNET_FORWARD_BATCH to one model (on the thread that runs its forwards): N → at most N images
    per forward; 'auto' → on a CPU, after warm-up, `Predictor.tune_forward_batch` measures it (or ``measured``,
    its ms per image by forward batch when choosing the backend already timed them); otherwise the whole
    batch in one forward. Logged, and exported as ``s2amnet_forward_batch_size``."""
    from model.predictor import choose_forward_batch

    if setting != "auto":
        predictor.forward_batch = int(setting)
    elif warmed and runs_on_cpu(predictor) and max_batch > 1:
        if measured:
            timings = dict(measured)
            predictor.forward_batch = choose_forward_batch(timings)
        else:
            timings = predictor.tune_forward_batch(max_batch)
        log.info("forward batch of %s: %d (measured ms per image: %s)", name, predictor.forward_batch,
                 ", ".join(f"{k}: {v:.1f}" for k, v in timings.items()))
    else:
        predictor.forward_batch = None
    metrics.FORWARD_BATCH.labels(model=name).set(min(max_batch, predictor.forward_batch or max_batch))


def one_forward_per_batch(predictors: Mapping[str, Predictor], caps: Mapping[str, int]) -> dict[str, int]:
    """Batch caps lowered to each model's forward batch (once `set_forward_batch` has set it). A batch of several
    forwards answers all of its jobs after its last forward; batches of one forward each answer every job as
    soon as its own forward ends, with forwards of the same size."""
    return {name: max(1, min(cap, predictors[name].forward_batch or cap)) for name, cap in caps.items()}


def prepare_predictors(predictors: Mapping[str, Predictor], settings: Settings,
                       batch_sizes: Mapping[str, int]) -> dict[str, float]:
    """On the thread that will run the forwards (embedded inference thread, Redis worker): warm every model
    up (unless S2AMNET_WARMUP is off), then apply S2AMNET_FORWARD_BATCH. Returns warm-up seconds per model."""
    warmed = settings.warmup
    seconds: dict[str, float] = {}
    if warmed:
        for name, predictor in predictors.items():
            seconds[name] = warm_up(predictor)
            log.info("warmed up %s in %.3f s", name, seconds[name])
    for name, predictor in predictors.items():  # the backend first: the forward batch is tuned for it
        measured = set_backend(name, predictor, settings, batch_sizes[name])
        set_forward_batch(name, predictor, settings.forward_batch, batch_sizes[name], warmed, measured)
    return seconds


def default_backend(device_type: str) -> str:
    """What runs a model's forward when S2AMNET_BACKEND is unset, by the torch device type: on a CPU
    ``eager-channels-last`` (eager's arithmetic with weights and input in the memory order oneDNN convolves
    fastest: 1.03-1.34x eager on every shipped model, nothing to build at start-up), elsewhere ``eager``."""
    return "eager-channels-last" if device_type == "cpu" else "eager"


def set_backend(name: str, predictor: Predictor, settings: Settings, max_batch: int) -> dict[int, float] | None:
    """Apply S2AMNET_BACKEND / S2AMNET_MODEL_BACKEND (unset: `default_backend`) to one model
    (`model.backends.choose_backend`: a graph exported or compiled once and cached, checked against eager;
    'auto' keeps the fastest, each backend at its best forward batch up to ``max_batch``, or at
    S2AMNET_FORWARD_BATCH when that is a number).
    Logged with the reason, and exported as ``s2amnet_model_backend{model,backend} 1``. Returns the chosen
    backend's ms per image by forward batch when choosing measured them (else None)."""
    from model.backends import choose_backend

    requested = settings.model_backend.get(name, settings.backend)
    why = "requested" if requested else f"the default on {predictor.device.type.upper()} (S2AMNET_BACKEND unset)"
    fixed = None if settings.forward_batch == "auto" else int(settings.forward_batch)
    report = choose_backend(predictor, requested or default_backend(predictor.device.type),
                            cache_dir=settings.cache_dir, threads=settings.torch_threads or default_torch_threads(),
                            batch=fixed, max_batch=max(1, max_batch), why=why)
    log.info("backend of %s: %s (%s)", name, report.chosen, report.reason)
    metrics.MODEL_BACKEND.labels(model=name, backend=report.chosen).set(1)
    return report.forward_batch_ms.get(report.chosen)
