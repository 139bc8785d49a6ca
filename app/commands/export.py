"""`s2amnet export`: a weights folder as an ONNX graph, an OpenVINO IR or a TorchInductor package compiled for
this CPU (for edge devices, or to fill the service's export cache ahead of its start), with a parity report
against eager PyTorch."""

from __future__ import annotations

import functools
import json
import sys
import time
from pathlib import Path


def add_parser(sub) -> None:
    p = sub.add_parser(
        "export", help="export a weights folder to ONNX, OpenVINO IR or a compiled package; check it against PyTorch",
        description="Exports the model (BatchNorm folded, the frequency blocks in their real-valued form, "
                    "detect with its box decoding, a dynamic batch dimension) to ONNX (or, --format openvino, "
                    "to OpenVINO IR: model.xml + model.bin; --format compile, to a TorchInductor package of "
                    "native code for this machine's CPU: model.pt2; --format compile-bf16, the same computing "
                    "in bfloat16 on a CPU with bf16 units: model-bf16.pt2), runs it on a fixed "
                    "check set and reports whether its outputs agree with eager PyTorch "
                    "(classify probabilities within 1e-3, the same detections after NMS, segment labels on "
                    ">= 99.9 % of the pixels). The graph takes the normalised image, N x 3 x H x W float32 "
                    "((pixel / 255 - mean) / std, from the manifest); detect returns boxes in input pixels "
                    "and per-class scores before NMS.")
    p.add_argument("--weights", required=True, help="weights folder (model.safetensors + manifest.json)")
    p.add_argument("--format", default="onnx", choices=["onnx", "openvino", "compile", "compile-bf16"],
                   help="output format (default onnx)")
    p.add_argument("--out", help="output file (default: <weights>/model.onnx, model.xml for openvino, model.pt2 "
                                 "for compile, model-bf16.pt2 for compile-bf16); made from the service's export "
                                 "cache when it holds these weights")
    p.add_argument("--cache", action="store_true",
                   help="write into the service's export cache (S2AMNET_CACHE_DIR) instead, so that a service "
                        "started with S2AMNET_BACKEND=auto, compile, compile-bf16, onnxruntime or openvino finds it")
    p.add_argument("--threads", type=int,
                   help="compile, compile-bf16: the torch threads to compile for (default: this process's, as a "
                        "service without S2AMNET_TORCH_THREADS on this machine runs); the package runs on at most "
                        "that many, and the service's cache keeps one package per thread count")
    p.add_argument("--json", action="store_true", help="last line of output is one JSON object")
    p.set_defaults(func=run)


def run(args) -> int:
    from model import backends
    from model.checkpoint import CheckpointError
    from model.predictor import Predictor

    if args.threads is not None:
        if args.threads < 1:
            print(f"error: --threads must be >= 1, got {args.threads}", file=sys.stderr)
            return 2
        import torch

        torch.set_num_threads(args.threads)  # what the package is compiled, checked and cached for
    if args.out and args.cache:
        print("error: --out and --cache name two places: give one", file=sys.stderr)
        return 2
    if args.out and Path(args.out).is_dir():  # found out now, not after minutes of exporting
        print(f"error: --out {args.out} is a folder; name the file to write (e.g. {Path(args.out) / 'model.onnx'})",
              file=sys.stderr)
        return 2
    try:
        predictor = Predictor.from_folder(args.weights)
    except CheckpointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        path, runner, spent, cached = _export(args, predictor)
    except Exception as exc:  # noqa: BLE001 - report any exporter failure as a clear error
        if isinstance(exc, ImportError):
            print(f"error: {args.format} is not installed: pip install 's2amnet[openvino]'", file=sys.stderr)
        else:
            print(f"error: export failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    ok, why = backends.check_parity(predictor, runner)
    report = {"model": predictor.name, "version": predictor.version, "format": args.format,
              "path": str(path), "export_s": None if spent is None else round(spent, 1),
              "cached": cached, "parity": ok, "detail": why, "input": [1, 3, *predictor.input_size],
              "mean": predictor.manifest["mean"], "std": predictor.manifest["std"]}
    threads = getattr(runner, "threads", None)  # a compiled package: the most threads it may run on
    if threads is not None:
        report["threads"] = threads
    if args.json:
        print(json.dumps(report))
    else:
        print(f"{predictor.name} {predictor.version} -> {path}"
              + ("" if spent is None else f" (exported in {spent:.1f} s)") + (" (cached)" if cached else ""))
        if threads is not None:
            print(f"compiled for {threads} torch thread(s): run it on at most {threads} "
                  "(torch.set_num_threads; more crash the process)")
        print(f"parity with eager PyTorch: {'ok' if ok else 'FAILED'} — {why}")
    return 0 if ok else 1


def _export(args, predictor):
    """(path written, runner over it, export seconds or None, whether it came from the cache)."""
    from model import backends
    from model.checkpoint import atomic_write_bytes

    backend = args.format if args.format in ("openvino", "compile", "compile-bf16") else "onnxruntime"
    if args.cache:  # the service's cache holds the ONNX graph (OpenVINO compiles it at start) or the package
        runner, spent, cached = backends.load_runner(predictor, backend)
        return runner.path, runner, spent, cached
    t0 = time.perf_counter()
    default = {"openvino": "model.xml", "compile": "model.pt2", "compile-bf16": "model-bf16.pt2"}.get(
        args.format, "model.onnx")
    path = Path(args.out) if args.out else Path(args.weights) / default
    path.parent.mkdir(parents=True, exist_ok=True)
    found = _in_cache(predictor, backend)  # the service exported these weights already: the same graph
    if args.format != "openvino":
        if args.format == "onnx":
            build, make_runner = backends.export_onnx, backends.OnnxRuntimeRunner
        else:
            build = functools.partial(backends.compile_package, bf16=args.format == "compile-bf16")
            make_runner = functools.partial(backends.CompiledRunner, input_size=predictor.input_size, name=args.format)
        if found:
            atomic_write_bytes(path, found.read_bytes())
        else:
            build(predictor.model, predictor.input_size, path)  # written atomically
        runner = make_runner(path)
    else:
        import tempfile

        import openvino as ov

        with tempfile.TemporaryDirectory() as tmp:
            onnx_path = found or backends.export_onnx(predictor.model, predictor.input_size, Path(tmp) / "model.onnx")
            ov.save_model(ov.convert_model(str(onnx_path)), str(path), compress_to_fp16=False)
        runner = backends.OpenVinoRunner(path)
    return path, runner, None if found else time.perf_counter() - t0, bool(found)


def _in_cache(predictor, backend: str) -> Path | None:
    """The service's cached graph (or package) of these weights, when there is one."""
    from model import backends

    try:
        path = backends.cache_path(predictor, backend)
    except ValueError:  # weights without a sha256: nothing cached can be theirs
        return None
    return path if path.is_file() else None
