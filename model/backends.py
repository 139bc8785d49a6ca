"""Inference backends behind the `Predictor`: the same forward, run by eager PyTorch, compiled by TorchInductor,
or run by ONNX Runtime or OpenVINO.

- ``eager``: the PyTorch module (BatchNorm folded), as trained.
- ``eager-channels-last``: the same module with its weights and input in channels-last memory order (NHWC),
  the order oneDNN's and cuDNN's convolutions run fastest in; the same arithmetic.
- ``eager-bf16``: the same, under autocast to bfloat16: convolutions and matrix products in bf16, the
  frequency blocks in float32 as always (they turn autocast off); on a GPU, or a CPU with bf16 matrix units.
  Less exact: like every backend, used only where its outputs pass the parity check.
- ``compile``: the module captured by `torch.export` (real-valued frequency blocks, dynamic batch) and compiled
  ahead of time by TorchInductor (AOTInductor, weights frozen into the graph) into a ``.pt2`` package of native
  code for this CPU's instruction set; CPU only. Compiling takes minutes on a small CPU, once: the package is
  cached, and loading it takes milliseconds.
- ``compile-bf16``: the same, captured under autocast to bfloat16 (the frequency blocks in float32, as in
  eager-bf16); on a CPU with bf16 matrix units. Less exact, like every bf16 backend.
- ``onnxruntime``: the module exported to ONNX (`export_onnx`: the frequency blocks switched to their
  real-valued formulation, detect with its box decoding inside the graph, a dynamic batch dimension) and
  run by ONNX Runtime's CPU provider (or CUDA where it is installed and the device is a GPU).
- ``openvino``: the same ONNX graph compiled by OpenVINO for the CPU, in fp32 (the ``openvino`` extra).
- ``openvino-bf16``: the same, with OpenVINO computing in bfloat16 where the CPU has bf16 matrix units
  (AVX512-BF16, AMX). Less exact: used only where its outputs pass the same parity check as every backend.

`choose_backend` picks one for a Predictor: the requested backend, or with ``auto`` the fastest one (each at
its own best forward batch, or at the one the operator fixed) whose outputs agree with eager on a fixed check
set (`check_parity`). Exported graphs and compiled packages are cached (`cache_key`: weights sha256, input
size, the versions of torch and of the network's code (`graph_sources`), and for compiled code the CPU's
instruction set), so only the first start of a model pays for the export.

Test-time augmentation runs only in eager (the flipped views are averaged between the forward and NMS).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from model.blocks import use_real_valued_fft

__all__ = ["BACKENDS", "ModuleRunner", "CompiledRunner", "OnnxRuntimeRunner", "OpenVinoRunner", "export_onnx",
           "compile_package", "cache_key", "cache_path", "check_parity", "choose_backend", "load_runner",
           "try_backend", "Trial", "BackendReport", "default_cache_dir", "cpu_has_bf16_units", "graph_sources"]

# run an exported graph, not the module
GRAPH_BACKENDS = ("compile", "compile-bf16", "onnxruntime", "openvino", "openvino-bf16")
MODULE_BACKENDS = ("eager-channels-last", "eager-bf16")  # run the module itself, differently
BACKENDS = ("eager", *MODULE_BACKENDS, *GRAPH_BACKENDS)
RUNNER_BACKENDS = BACKENDS[1:]  # set a runner on the Predictor: what `auto` chooses among, beside plain eager
MAX_EXPORT_BATCH = 256
# forwards a compiled package runs at once by default (model instances sharing the weights). One: its parallel
# regions start an OpenMP team even on one thread, and with a second forward's thread among libgomp's busy
# threads, the service's lone forwards on every thread ran 1.6x slower (measured with mt-classify)
COMPILED_CONCURRENCY = 1

log = logging.getLogger("s2amnet.backends")


def default_cache_dir() -> Path:
    """``$S2AMNET_CACHE_DIR``, else ``$XDG_CACHE_HOME/s2amnet``, else ``~/.cache/s2amnet``."""
    if os.environ.get("S2AMNET_CACHE_DIR"):
        return Path(os.environ["S2AMNET_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "s2amnet"


# Sources that take no part in an exported or compiled graph (training, data, evaluation, preprocessing and
# postprocessing): editing them keeps the cached exports; every other source under model/ is the graph's.
NOT_IN_GRAPH = ("data/", "train.py", "losses.py", "evaluate.py", "metrics.py", "plots.py", "transforms.py",
                "verdict.py", "masks.py")


def graph_sources() -> list[Path]:
    """The model sources an exported graph is built from (`cache_key` hashes them)."""
    root = Path(__file__).resolve().parent
    return [path for path in sorted(root.rglob("*.py"))
            if not path.relative_to(root).as_posix().startswith(NOT_IN_GRAPH)]


def _model_code_hash() -> str:
    """sha1 of the graph's sources: an exported graph is stale once the code of the network changes."""
    h = hashlib.sha1()
    root = Path(__file__).resolve().parent
    for path in graph_sources():
        h.update(path.relative_to(root).as_posix().encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:12]


def cache_key(sha256: str, input_size: Sequence[int], kind: str = "onnx") -> str:
    """File stem of a cached export: the weights, the input size, torch and this package's model code (an ONNX
    graph does not depend on the runtime that runs it). ``kind``: ``onnx``, or ``aoti-<ISA>`` for native code
    compiled for one CPU instruction set (`cpu_isa`)."""
    versions = f"torch{torch.__version__}-model{_model_code_hash()}"
    tag = hashlib.sha1(f"{sha256}|{kind}|{tuple(input_size)}|{versions}".encode()).hexdigest()[:16]
    return f"{sha256[:16]}-{kind}-{input_size[0]}x{input_size[1]}-{tag}"


def cpu_isa() -> str:
    """The vector instruction set torch's CPU kernels (and code compiled here) use: e.g. AVX2, AVX512."""
    return str(torch.backends.cpu.get_cpu_capability()).lower().replace(" ", "")


@contextlib.contextmanager
def _real_valued(model: torch.nn.Module):
    """The frequency blocks in their real-valued formulation (every op exportable) for the duration."""
    use_real_valued_fft(model, True)
    try:
        yield model
    finally:
        use_real_valued_fft(model, False)


class _Exported(torch.nn.Module):
    """What the graph computes: normalised input → classify / segment logits, detect (boxes, scores).
    ``bf16``: under autocast to bfloat16 on the CPU, the outputs handed back in float32."""

    def __init__(self, model: torch.nn.Module, bf16: bool = False):
        super().__init__()
        self.model, self.bf16 = model, bf16

    def forward(self, x: torch.Tensor):
        if self.bf16:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = self._forward(x)
            return out.float() if isinstance(out, torch.Tensor) else tuple(o.float() for o in out)
        return self._forward(x)

    def _forward(self, x: torch.Tensor):
        y = self.model(x)
        if getattr(self.model, "task", "") == "detect":
            return self.model.decode(y)
        return y


def export_onnx(model: torch.nn.Module, input_size: Sequence[int], path: str | os.PathLike) -> Path:
    """Export ``model`` (eval mode, BatchNorm folded or not) to an ONNX file with a dynamic batch dimension.
    The frequency blocks are switched to their real-valued formulation for the export and back after."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    h, w = (int(v) for v in input_size)
    wrapped = _Exported(model).eval()
    x = torch.zeros(2, 3, h, w)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    data = tmp.with_name(tmp.name + ".data")
    try:
        with _real_valued(model):
            quiet = logging.getLogger("torch.onnx")
            level = quiet.level
            quiet.setLevel(logging.ERROR)
            try:
                torch.onnx.export(wrapped, (x,), str(tmp), dynamo=True, verbose=False, input_names=["x"],
                                  dynamic_shapes={"x": {0: _batch_dim()}})
            finally:
                quiet.setLevel(level)
        if data.exists():  # weights stored beside the graph: keep them inside one file instead
            import onnx

            onnx.save_model(onnx.load(str(tmp)), str(tmp), save_as_external_data=False)
            data.unlink()
        os.replace(tmp, path)  # atomic: a concurrent start never loads half a file
    except BaseException:  # nothing half-made left behind
        tmp.unlink(missing_ok=True)
        data.unlink(missing_ok=True)
        raise
    return path


def _batch_dim():
    return torch.export.Dim("batch", min=1, max=MAX_EXPORT_BATCH)


def compile_package(model: torch.nn.Module, input_size: Sequence[int], path: str | os.PathLike,
                    bf16: bool = False, threads: int | None = None) -> Path:
    """Compile ``model`` (eval mode, on the CPU) ahead of time with TorchInductor into a ``.pt2`` package:
    `torch.export` of what `_Exported` computes with a dynamic batch dimension, the weights frozen into the
    graph (constant folding, convolutions fused with what follows them), native code for this machine's CPU.
    ``bf16``: captured under autocast to bfloat16 (outputs in float32); only on a CPU with bf16 units.
    ``threads`` (default: the calling thread's torch threads): the most threads the code may run on. Its
    parallel reductions keep one partial sum per thread in arrays of that size, so run on more threads it
    writes past them and crashes the process (`CompiledRunner` never lets it)."""
    threads = int(threads or torch.get_num_threads())
    if bf16:
        require_cpu_bf16_units()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    h, w = (int(v) for v in input_size)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.pt2")
    try:
        with _real_valued(model), torch.inference_mode():
            program = torch.export.export(_Exported(model, bf16).eval(), (torch.zeros(2, 3, h, w),),
                                          dynamic_shapes={"x": {0: _batch_dim()}})
            torch._inductor.aoti_compile_and_package(program, package_path=str(tmp),
                                                     inductor_configs={"freezing": True, "cpp.threads": threads})
        os.replace(tmp, path)  # atomic: a replica starting beside this one never loads half a package
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _outputs(outs) -> tuple[torch.Tensor, ...]:
    return tuple(outs) if isinstance(outs, (list, tuple)) else (outs,)


def cpu_has_bf16_units() -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (AVX512-BF16 or AMX), from /proc/cpuinfo."""
    from model.device import cpu_info

    flags = cpu_info()[1]
    return "avx512_bf16" in flags or "amx_bf16" in flags


NO_BF16_UNITS = "this CPU has no bf16 matrix units (AVX512-BF16 or AMX)"


def require_cpu_bf16_units() -> None:
    """Raise ValueError unless this CPU has bf16 matrix units (`cpu_has_bf16_units`): the bf16 backends need them."""
    if not cpu_has_bf16_units():
        raise ValueError(NO_BF16_UNITS)


class ModuleRunner:
    """``eager-channels-last`` and ``eager-bf16``: the module itself, nothing exported or compiled, on a copy of
    its weights in channels-last memory order (NHWC) and fed its input in the same order. Convolutions in
    oneDNN (CPU) and cuDNN (GPU) run fastest in that order and eager PyTorch otherwise reorders around every
    one of them; the arithmetic is the same, so the outputs agree with eager to float rounding. ``bf16``
    (``eager-bf16``): also under `torch.autocast` to bfloat16 (the frequency blocks stay in float32: they turn
    autocast off), on a GPU or a CPU with bf16 matrix units. Returns what an exported graph returns (classify /
    segment logits, detect boxes and scores), in the usual contiguous order. Forwards on several threads may run
    at once, each on its calling thread's torch threads (``concurrency`` None: no limit)."""

    concurrency = None

    def __init__(self, model: torch.nn.Module, device: str = "cpu", bf16: bool = False):
        dev = torch.device(device)
        if bf16 and dev.type == "cpu":
            require_cpu_bf16_units()
        if bf16 and dev.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ValueError(f"{device} does not compute in bfloat16")
        self.name = "eager-bf16" if bf16 else "eager-channels-last"
        self.bf16, self.device_type = bf16, dev.type
        self.module = _Exported(copy.deepcopy(model).to(memory_format=torch.channels_last)).eval()

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), torch.autocast(self.device_type, dtype=torch.bfloat16, enabled=self.bf16):
            return tuple(o.contiguous() for o in _outputs(self.module(x)))


class _AotiLibrary:
    """The native library of a `compile_package` package, called through AOTInductor's C interface (its model
    container) with ctypes, which lets go of the GIL for the whole forward. Through torch's own loader
    (``torch._inductor.aoti_load_package``) a forward holds the GIL from start to end, so that in the service the
    event loop, decoding and postprocessing would all stop for every batch. ``models``: forwards that may run at
    once (the container's model instances; they share the weights). Raises ValueError for a package laid out
    otherwise than this torch version writes it (one ``.so`` under ``data/aotinductor/``, weights inside)."""

    def __init__(self, path: Path, models: int = 1):
        import ctypes
        import tempfile
        import weakref
        import zipfile

        with zipfile.ZipFile(path) as z:
            parts = [n for n in z.namelist() if "/data/aotinductor/" in f"/{n}" and not n.endswith("/")]
            libs = [n for n in parts if n.endswith(".so")]
            others = [n for n in parts if not n.endswith((".so", ".cpp", ".json"))]
            if len(libs) != 1 or others:
                raise ValueError(f"{path}: not one native library with its weights inside ({len(libs)} libraries, "
                                 f"{len(others)} other files)")
            fd, tmp = tempfile.mkstemp(suffix=".so", prefix="s2amnet-aoti-")
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(z.read(libs[0]))
                self._lib = ctypes.CDLL(tmp)
            finally:
                os.unlink(tmp)  # the loaded library stays mapped; nothing is left behind in the temp folder
        self._ct = ctypes
        handle = ctypes.c_void_p()
        self._check(self._lib.AOTInductorModelContainerCreateWithDevice(
            ctypes.byref(handle), ctypes.c_size_t(models), b"cpu", None), "create the model container")
        self._handle = handle
        n = ctypes.c_size_t()
        self._check(self._lib.AOTInductorModelContainerGetNumOutputs(handle, ctypes.byref(n)), "count its outputs")
        self.num_outputs = int(n.value)
        self._finalizer = weakref.finalize(self, self._lib.AOTInductorModelContainerDelete, handle)
        # torch hands tensors to AOTInductor (and takes them back) as capsules holding AtenTensorHandle pointers
        self._pointer = ctypes.pythonapi.PyCapsule_GetPointer
        self._pointer.restype, self._pointer.argtypes = ctypes.c_void_p, [ctypes.py_object, ctypes.c_char_p]
        self._capsule = ctypes.pythonapi.PyCapsule_New
        self._capsule.restype = ctypes.py_object
        self._capsule.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]

    @staticmethod
    def _check(code: int, what: str) -> None:
        if code != 0:
            raise RuntimeError(f"AOTInductor could not {what} (error {code}; its message is on stderr)")

    def run(self, x: torch.Tensor) -> list[torch.Tensor]:
        ct = self._ct
        inputs = torch._C._aoti.unsafe_alloc_void_ptrs_from_tensors([x])  # new handles, taken over by the run
        in_arr = (ct.c_void_p * 1)(self._pointer(inputs[0], None))
        out_arr = (ct.c_void_p * self.num_outputs)()
        code = self._lib.AOTInductorModelContainerRun(self._handle, in_arr, ct.c_size_t(1), out_arr,
                                                      ct.c_size_t(self.num_outputs), None, None)
        self._check(code, "run the forward")
        return torch._C._aoti.alloc_tensors_by_stealing_from_void_ptrs(
            [self._capsule(p, None, None) for p in out_arr])


class CompiledRunner:
    """Runs a `compile_package` package on the CPU, on the calling thread's torch threads, without holding the
    GIL (`_AotiLibrary`; through torch's loader, holding it, should the package be laid out otherwise). Same
    call as `OnnxRuntimeRunner`. ``input_size`` (H, W), when given, is checked before each forward: the native
    code does not check shapes, and a batch of another size would crash the process instead of raising.
    ``threads``: what the package was compiled for (default: the calling thread's torch threads); a forward
    asked of it on more threads runs on that many (more would crash the process, see `compile_package`).
    ``concurrency``: forwards that may run at once, on threads of their own (1 through torch's loader)."""

    def __init__(self, path: str | os.PathLike, device: str = "cpu", input_size: Sequence[int] | None = None,
                 name: str = "compile", threads: int | None = None, concurrency: int = COMPILED_CONCURRENCY):
        if not device.startswith("cpu"):
            raise ValueError(f"the compile backend runs on the CPU, not {device}")
        self.name = name  # compile, or compile-bf16 (what the package was compiled as)
        self.path = Path(path)
        self.input_size = tuple(int(v) for v in input_size) if input_size is not None else None
        self.threads = int(threads or torch.get_num_threads())
        try:
            self.fn = _AotiLibrary(self.path, models=max(1, int(concurrency))).run
            self.releases_gil = True
            self.concurrency = max(1, int(concurrency))
        except ValueError as exc:
            log.warning("%s; running it through torch's loader, which holds the GIL during each forward", exc)
            self.fn = torch._inductor.aoti_load_package(str(path))
            self.releases_gil = False
            self.concurrency = 1
        self._slots = threading.BoundedSemaphore(self.concurrency)  # one forward per model instance

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.input_size is not None and (x.dim() != 4 or tuple(x.shape[1:]) != (3, *self.input_size)
                                            or not 1 <= x.shape[0] <= MAX_EXPORT_BATCH):
            raise ValueError(f"the compiled model takes N x 3 x {self.input_size[0]} x {self.input_size[1]} "
                             f"(N 1-{MAX_EXPORT_BATCH}), not {tuple(x.shape)}")
        asked = torch.get_num_threads()
        if asked > self.threads:
            torch.set_num_threads(self.threads)
        try:
            with self._slots, torch.inference_mode():
                return _outputs(self.fn(x.detach().to("cpu", torch.float32).contiguous()))
        finally:
            if asked > self.threads:
                torch.set_num_threads(asked)


class OnnxRuntimeRunner:
    """Runs an exported graph: ``runner(x)`` with ``x`` the normalised float32 batch on the CPU → tuple of
    float32 CPU tensors, as `_Exported` returns them."""

    name = "onnxruntime"
    concurrency = 1  # its session's own thread pool takes the cores: one forward at a time

    def __init__(self, path: str | os.PathLike, threads: int | None = None, device: str = "cpu"):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            opts.intra_op_num_threads = int(threads)
        opts.inter_op_num_threads = 1
        # no busy-waiting between runs: spinning pool threads would take the cores from the eager models and
        # the request handling of the same process
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        providers = ["CPUExecutionProvider"]
        if device.startswith("cuda") and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        self.path = Path(path)
        self.session = ort.InferenceSession(str(path), opts, providers=providers)
        self.input = self.session.get_inputs()[0].name

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outs = self.session.run(None, {self.input: x.detach().to("cpu", torch.float32).contiguous().numpy()})
        return tuple(torch.from_numpy(np.ascontiguousarray(o)) for o in outs)


def _require_bf16_units(core=None) -> None:
    """Raise ValueError unless OpenVINO finds bf16 matrix units on this CPU (ImportError without OpenVINO)."""
    if core is None:
        import openvino as ov

        core = ov.Core()
    if "BF16" not in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
        raise ValueError(NO_BF16_UNITS)


class OpenVinoRunner:
    """Runs an exported graph (ONNX, or OpenVINO IR ``.xml``) with OpenVINO on the CPU, in fp32, or with
    ``precision="bf16"`` in bfloat16 (only on a CPU with bf16 units). The precision hint is always pinned: on
    CPUs with bf16 units OpenVINO would otherwise lower fp32 by itself. Same call as `OnnxRuntimeRunner`.
    Compiled blobs are cached in ``cache_dir`` when given (faster later starts)."""

    concurrency = 1  # its own thread pool takes the cores: one forward at a time

    def __init__(self, path: str | os.PathLike, threads: int | None = None, device: str = "cpu",
                 cache_dir: str | os.PathLike | None = None, precision: str = "f32"):
        import openvino as ov

        if not device.startswith("cpu"):
            raise ValueError(f"the openvino backend runs on the CPU, not {device}")
        if precision not in ("f32", "bf16"):
            raise ValueError(f"precision must be f32 or bf16, not {precision!r}")
        core = ov.Core()
        if precision == "bf16":
            _require_bf16_units(core)
        self.name = "openvino" if precision == "f32" else "openvino-bf16"
        if cache_dir is not None:
            core.set_property({"CACHE_DIR": str(cache_dir)})
        config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": precision}
        if threads:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        self.path = Path(path)
        self.compiled = core.compile_model(str(path), "CPU", config)
        self.request = self.compiled.create_infer_request()
        self._lock = threading.Lock()  # one infer request: one batch at a time

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        with self._lock:
            res = self.request.infer({0: x.detach().to("cpu", torch.float32).contiguous().numpy()})
            return tuple(torch.from_numpy(np.array(res[o])) for o in self.compiled.outputs)


# ----------------------------------------------------------------------------------------------------
# choosing a backend


def _check_images(predictor, n: int = 4, seed: int = 0) -> list[np.ndarray]:
    """A fixed check set: smooth random images with bright and dark blobs, at the input size."""
    rng = np.random.default_rng(seed)
    h, w = predictor.input_size
    out = []
    for _ in range(n):
        base = rng.normal(128, 20, (h // 8 + 1, w // 8 + 1)).clip(0, 255)
        img = np.kron(base, np.ones((8, 8)))[:h, :w]
        for _ in range(3):
            y, x = rng.integers(0, h - 8), rng.integers(0, w - 8)
            img[y:y + rng.integers(4, h // 4 + 5), x:x + rng.integers(4, w // 4 + 5)] = rng.choice([10, 245])
        out.append(np.repeat(img.astype(np.uint8)[None], 3, axis=0))
    return out


def check_parity(predictor, runner: Callable, images: Sequence[np.ndarray] | None = None) -> tuple[bool, str]:
    """Whether ``runner`` gives what eager gives on ``images`` (default: the fixed check set): classify
    probabilities within 1e-3; detect the same detections after NMS (labels, scores within 1e-3, boxes
    within 0.5 px); segment label maps agreeing on ≥ 99.9 % of the pixels. Returns (ok, why)."""
    images = list(images if images is not None else _check_images(predictor))
    saved = predictor.runner
    try:
        predictor.runner = None
        ref = predictor.infer(images)
        predictor.runner = runner
        got = predictor.infer(images)
    finally:
        predictor.runner = saved
    meta = predictor.preprocess(np.zeros((*predictor.input_size, 3), np.uint8)).meta
    worst = 0.0
    for a, b in zip(ref, got, strict=True):
        if predictor.task == "classify":
            worst = max(worst, float((a["probs"] - b["probs"]).abs().max()))
            if worst > 1e-3:
                return False, f"class probabilities differ by {worst:.2e} (allowed 1e-3)"
        elif predictor.task == "segment":
            agree = float((a["logits"].argmax(0) == b["logits"].argmax(0)).float().mean())
            worst = max(worst, 1.0 - agree)
            if agree < 0.999:
                return False, f"label maps agree on {agree:.4%} of the pixels (needed 99.9 %)"
        else:
            da = predictor.postprocess(a, meta)["defects"]
            db = predictor.postprocess(b, meta)["defects"]
            if [d["label"] for d in da] != [d["label"] for d in db]:
                return False, f"detections differ after NMS ({len(da)} vs {len(db)})"
            for x, y in zip(da, db, strict=True):
                if abs(x["score"] - y["score"]) > 1e-3 or any(abs(x["box"][k] - y["box"][k]) > 0.5 for k in x["box"]):
                    return False, "a detection's score or box differs after NMS"
    return True, f"outputs agree on {len(images)} check images"


def _ms_per_image(predictor, runner, batch: int, rounds: int = 3) -> float:
    images = _check_images(predictor, n=batch, seed=1)
    saved = predictor.runner
    predictor.runner = runner
    try:
        predictor.infer(images)  # warm-up
        best = float("inf")
        for _ in range(rounds):
            t = time.perf_counter()
            predictor.infer(images)
            best = min(best, (time.perf_counter() - t) * 1000.0 / batch)
        return best
    finally:
        predictor.runner = saved


@dataclass
class BackendReport:
    """What `choose_backend` chose and why."""

    model: str
    requested: str
    chosen: str = "eager"
    reason: str = ""
    ms_per_image: dict[str, float] = field(default_factory=dict)
    export_s: float | None = None
    cached: bool = False
    parity: dict[str, str] = field(default_factory=dict)  # how each usable backend agreed with eager
    # auto without a fixed batch: ms per image at each forward batch measured, per backend
    forward_batch_ms: dict[str, dict[int, float]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # backends left out, and why

    def as_dict(self) -> dict[str, Any]:
        return {"model": self.model, "requested": self.requested, "chosen": self.chosen, "reason": self.reason,
                "ms_per_image": {k: round(v, 2) for k, v in self.ms_per_image.items()},
                "export_s": None if self.export_s is None else round(self.export_s, 1), "cached": self.cached}


def cache_path(predictor, backend: str, cache_dir: str | os.PathLike | None = None,
               threads: int | None = None) -> Path:
    """Where the export cache keeps ``backend``'s artefact for the predictor's weights, present or not: the
    ONNX graph (onnxruntime and both openvino backends run it) or, for compile and compile-bf16, the package
    for this CPU and ``threads`` torch threads (default: the calling thread's; `compile_package`)."""
    if backend not in GRAPH_BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(GRAPH_BACKENDS)}, not {backend!r}")
    sha = str(predictor.manifest.get("sha256") or "")
    if not sha:
        raise ValueError("the weights have no sha256 in their manifest: nothing to key a cached export by")
    if backend.startswith("compile"):
        threads = int(threads or torch.get_num_threads())
        suffix, kind = "pt2", f"aoti{'-bf16' if backend.endswith('bf16') else ''}-{cpu_isa()}-t{threads}"
    else:
        suffix, kind = "onnx", "onnx"
    return Path(cache_dir or default_cache_dir()) / f"{cache_key(sha, predictor.input_size, kind)}.{suffix}"


def _cached(path: Path, build: Callable[[Path], Any]) -> tuple[Path, float | None]:
    """``path``, built now by ``build(path)`` when missing: (path, seconds spent building or None when it
    came from the cache)."""
    if path.exists():
        return path, None
    t = time.perf_counter()
    build(path)
    return path, time.perf_counter() - t


def exported_graph(predictor, cache_dir: str | os.PathLike | None = None) -> tuple[Path, float | None]:
    """The predictor's ONNX graph in the export cache, exported now when missing: (path, export seconds or
    None when it came from the cache)."""
    return _cached(cache_path(predictor, "onnxruntime", cache_dir),
                   lambda path: export_onnx(predictor.model, predictor.input_size, path))


def compiled_package(predictor, cache_dir: str | os.PathLike | None = None, bf16: bool = False,
                     threads: int | None = None) -> tuple[Path, float | None, int]:
    """The predictor's AOTInductor package for this CPU in the cache (``bf16``: the compile-bf16 one), the
    seconds spent compiling it (None when cached) and the threads it was compiled for: the one compiled for
    ``threads`` torch threads (default: the calling thread's); else, when the cache holds one compiled for more
    threads (it runs on fewer, see `compile_package`), the closest such; else compiled now (minutes)."""
    if predictor.device.type != "cpu":
        raise ValueError(f"the compile backends run on the CPU, not {predictor.device}")
    backend = "compile-bf16" if bf16 else "compile"
    threads = int(threads or torch.get_num_threads())
    exact = cache_path(predictor, backend, cache_dir, threads)
    if not exact.is_file():
        pattern = cache_path(predictor, backend, cache_dir, 1).name.replace("-t1-", "-t*-", 1)
        pattern = pattern[: pattern.rindex("-")] + "-*.pt2"
        counts = {int(m.group(1)) for f in exact.parent.glob(pattern) if (m := re.search(r"-t(\d+)-", f.name))}
        for more in sorted(c for c in counts if c > threads):
            path = cache_path(predictor, backend, cache_dir, more)
            if path.is_file():  # the same weights, model code and torch (the name's tag), more threads
                return path, None, more
    path, spent = _cached(exact, lambda path: compile_package(predictor.model, predictor.input_size, path,
                                                               bf16=bf16, threads=threads))
    return path, spent, threads


def load_runner(predictor, backend: str, cache_dir: str | os.PathLike | None = None,
                threads: int | None = None) -> tuple[Callable, float | None, bool]:
    """(runner, seconds spent exporting or compiling, or None, whether it came from the cache) for ``backend``."""
    if backend not in RUNNER_BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(RUNNER_BACKENDS)}, not {backend!r}")
    device = str(predictor.device)
    if backend in MODULE_BACKENDS:  # nothing to export or compile
        return ModuleRunner(predictor.model, device, bf16=backend == "eager-bf16"), None, True
    if backend.startswith("compile"):
        bf16 = backend == "compile-bf16"
        if bf16:  # refused before minutes of compiling, or before loading a package built on another CPU
            require_cpu_bf16_units()
        path, spent, compiled_for = compiled_package(predictor, cache_dir, bf16=bf16, threads=threads)
        runner = CompiledRunner(path, device=device, input_size=predictor.input_size, name=backend,
                                threads=compiled_for)
        return runner, spent, spent is None
    if backend == "openvino-bf16":
        _require_bf16_units()  # before exporting a graph it could not run
    path, spent = exported_graph(predictor, cache_dir)
    if backend.startswith("openvino"):
        blobs = Path(cache_dir or default_cache_dir()) / "openvino"
        precision = "bf16" if backend.endswith("bf16") else "f32"
        runner: Callable = OpenVinoRunner(path, threads=threads, device=device, cache_dir=blobs, precision=precision)
    else:
        runner = OnnxRuntimeRunner(path, threads=threads, device=device)
    return runner, spent, spent is None


@dataclass
class Trial:
    """What trying one backend on a predictor found: its runner (None when it could not be loaded), the
    seconds spent exporting or compiling (None when cached), whether its outputs agree with eager, and why
    (the parity check's finding, or why it could not be loaded)."""

    backend: str
    runner: Callable | None = None
    spent: float | None = None
    cached: bool = False
    agrees: bool = False
    detail: str = ""


def try_backend(predictor, backend: str, cache_dir: str | os.PathLike | None = None,
                threads: int | None = None) -> Trial:
    """Load ``backend`` for ``predictor`` (exporting or compiling into the cache when needed) and check its
    outputs against eager. Never raises: a failure of an optional backend is a finding, not an error."""
    trial = Trial(backend)
    try:
        trial.runner, trial.spent, trial.cached = load_runner(predictor, backend, cache_dir, threads)
    except Exception as exc:  # noqa: BLE001 - any failure of an optional backend leaves eager serving
        if isinstance(exc, ImportError):  # onnxruntime / openvino: optional extras of the package
            trial.detail = f"{backend} is not installed (pip install 's2amnet[{backend.split('-')[0]}]')"
        else:
            trial.detail = f"{backend} unavailable: {type(exc).__name__}: {exc}"[:300]
        return trial
    trial.agrees, trial.detail = check_parity(predictor, trial.runner)
    return trial


def _usable(predictor, backend: str, report: BackendReport, cache_dir, threads) -> Callable | None:
    """The backend's runner when it loads and agrees with eager; else None, with the reason in ``report``."""
    trial = try_backend(predictor, backend, cache_dir, threads)
    if trial.spent is not None:
        report.export_s = (report.export_s or 0.0) + trial.spent
    if trial.runner is not None and trial.agrees:
        report.parity[backend] = trial.detail
        return trial.runner
    report.notes.append(trial.detail if trial.runner is None else f"{backend} disagrees with eager: {trial.detail}")
    log.warning("%s: %s", predictor.name, report.notes[-1])
    return None


def _speed(predictor, runner, batch: int | None, max_batch: int) -> tuple[float, int, dict[int, float]]:
    """(ms per image, images per forward, ms per image at each size measured) of ``runner``: at ``batch`` when
    fixed, else at its own best forward batch up to ``max_batch`` (`Predictor.tune_forward_batch`). Leaves the
    Predictor as it found it."""
    saved = predictor.runner, predictor.forward_batch
    try:
        if batch:
            ms = _ms_per_image(predictor, runner, batch)
            return ms, batch, {batch: ms}
        predictor.runner = runner
        timings = predictor.tune_forward_batch(max_batch)
        return timings[predictor.forward_batch], predictor.forward_batch, timings
    finally:
        predictor.runner, predictor.forward_batch = saved


def choose_backend(predictor, requested: str = "auto", *, cache_dir: str | os.PathLike | None = None,
                   threads: int | None = None, batch: int | None = None, max_batch: int = 8,
                   why: str = "requested") -> BackendReport:
    """Set ``predictor.runner`` by ``requested`` (auto or one of `BACKENDS`) and say why (``why``: how the
    backend was asked for, the reason's first words when it is used as asked).

    A requested backend that cannot be used (runtime not installed, export failed, no bf16 units, outputs
    disagree with eager) falls back to eager, with the reason. ``auto`` times eager and every usable backend
    and keeps the fastest: at ``batch`` images per forward when given (a fixed forward batch), else each at
    its own best forward batch up to ``max_batch`` (what `Predictor.tune_forward_batch` then picks for it).
    """
    if requested not in ("auto", *BACKENDS):
        raise ValueError(f"backend must be auto or one of {', '.join(BACKENDS)}, not {requested!r}")
    report = BackendReport(model=predictor.name, requested=requested)
    predictor.runner = None
    if requested == "eager":
        report.reason = why
        return report
    if predictor.tta:
        report.reason = "test-time augmentation runs in eager only"
        return report
    candidates = RUNNER_BACKENDS if requested == "auto" else (requested,)
    runners = {b: r for b in candidates if (r := _usable(predictor, b, report, cache_dir, threads)) is not None}
    report.cached = bool(runners) and report.export_s is None
    if not runners:
        report.reason = "; ".join(report.notes)
        return report
    if requested != "auto":
        predictor.runner = runners[requested]
        report.chosen, report.reason = requested, f"{why}; {report.parity[requested]}"
        return report
    at: dict[str, int] = {}
    for name, runner in {"eager": None, **runners}.items():
        report.ms_per_image[name], at[name], timings = _speed(predictor, runner, batch, max_batch)
        if not batch:
            report.forward_batch_ms[name] = timings
    report.chosen = min(report.ms_per_image, key=report.ms_per_image.get)
    predictor.runner = runners.get(report.chosen)
    timed = ", ".join(f"{n} {v:.1f} ms at {at[n]}" for n, v in report.ms_per_image.items())
    how = f"at {batch} images per forward" if batch else "each at its best forward batch"
    parts = [f"fastest {how} ({timed} per image)", report.parity.get(report.chosen), *report.notes]
    report.reason = "; ".join(p for p in parts if p)
    return report
