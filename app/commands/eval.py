"""`s2amnet eval`: metrics of a weights folder on a labelled dataset, through the service's Predictor."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from app.commands import positive_int

SPLIT_HELP = ("part of the split by file stem: train (80 %%), val (10 %%: picks epochs and thresholds), "
              "test (10 %%: only for reporting), heldout (val + test), all")


def add_model_data_args(p, split: str) -> None:
    """--weights, --data, --split (default ``split``), --batch and --device, as eval and calibrate take them."""
    p.add_argument("--weights", required=True, help="weights folder (model.safetensors + manifest.json)")
    p.add_argument("--data", required=True, help="dataset folder in its native layout")
    p.add_argument("--split", default=split, choices=["all", "train", "val", "test", "heldout"],
                   help=f"{SPLIT_HELP} (default {split})")
    p.add_argument("--batch", type=positive_int, default=16, help="images per forward (default 16)")
    p.add_argument("--device", default="auto", help="auto (a GPU when torch sees one, else cpu), cpu, cuda, cuda:N")


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a weights folder on a dataset folder",
                       description="Runs the Predictor (the code the service uses) over every labelled "
                                   "image of --data and prints the task's metrics and the part-level "
                                   "figures of the manifest's verdict rule (escape, false reject).")
    add_model_data_args(p, split="all")
    p.add_argument("--json", action="store_true", help="last line of output is one JSON object")
    p.add_argument("--tta", metavar="VIEWS",
                   help="test-time augmentation for this evaluation instead of the manifest's: comma-separated "
                        "views (hflip, vflip) or 'none'")
    p.add_argument("--iou", type=float, metavar="IOU",
                   help="detect: the NMS IoU threshold for this evaluation instead of the manifest's "
                        "(s2amnet calibrate --nms-iou chooses it)")
    p.add_argument("--backend", default="eager",
                   help="what runs the forward: eager (default), compile, onnxruntime, openvino or openvino-bf16; "
                        "evaluate the model as a service started with S2AMNET_BACKEND=that serves it (exports and "
                        "compiled packages are cached, as the service caches them)")
    p.add_argument("--plot", help="write a PNG (confusion matrix / prediction examples) here, and beside it "
                                  "<name>-verdict.png: escape and false-reject rates over the threshold")
    p.add_argument("--record", action="store_true",
                   help="store the metrics in the weights folder's manifest (metrics.eval['<data>:<split>'])")
    p.set_defaults(func=run)


def load_inputs(weights: str, data: str, split: str, device: str = "auto", tta: list[str] | None = None):
    """(predictor, records) for evaluating ``weights`` on ``data``'s ``split``; raises SystemExit(2) with a
    message on stderr when either cannot be used."""
    import torch

    from model.checkpoint import CheckpointError
    from model.data import DatasetFormatError, load_records, split_records
    from model.device import missing_gpu, resolve_device
    from model.predictor import Predictor

    device = resolve_device(device)
    try:
        torch.device(device)
    except RuntimeError:
        print(f"error: --device {device}: not a torch device (auto, cpu, cuda, cuda:N)", file=sys.stderr)
        raise SystemExit(2) from None
    if missing_gpu(device):
        print(f"error: --device {device}: torch sees no CUDA GPU here; use --device cpu", file=sys.stderr)
        raise SystemExit(2)
    try:  # fused, as the service loads it: evaluate what is served
        predictor = Predictor.from_folder(weights, device=device, tta=tta)
        info = load_records(data, predictor.task)
    except (CheckpointError, FileNotFoundError, DatasetFormatError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    if info.class_names(predictor.task) != predictor.classes:
        print(f"error: the dataset's classes {info.class_names(predictor.task)} differ from the model's "
              f"{predictor.classes}", file=sys.stderr)
        raise SystemExit(2)
    records = split_records(info.records_for(predictor.task), split)
    if not records:
        print(f"error: {data} has no labelled images for {predictor.task} in split {split!r}", file=sys.stderr)
        raise SystemExit(2)
    return predictor, records


def format_parts(parts: dict[str, Any]) -> str:
    """Part-level figures as a few readable lines."""
    lines = [f"escape: {parts['escaped']} of {parts['defective']} defective images"
             + (f" ({parts['escape_rate']:.3f}; {parts['judged_pass']} judged pass, "
                f"{parts['unlocalised']} failed without a defect at a ground-truth region)"
                if parts["defective"] else "")]
    for name, c in parts["escape_per_class"].items():
        prec = parts.get("precision_per_class", {}).get(name)
        lines.append(f"  {name:<18} escaped {c['escaped']:>3} of {c['images']:>3}  ({c['escape_rate']:.3f})"
                     + (f"   box precision {prec:.3f}" if prec is not None else ""))
    if parts["defect_free"]:
        lines.append(f"false reject: {parts['false_rejects']} of {parts['defect_free']} defect-free images "
                     f"({parts['false_reject_rate']:.3f})")
    else:
        lines.append("false reject: the data has no defect-free images")
    return "\n".join(lines)


def writable_file(path: str | Path, flag: str) -> str | None:
    """Why ``path`` cannot be written as a file (``flag`` names the option), or None: checked before the work
    that ends in writing it."""
    path = Path(path)
    if path.is_dir():
        return f"{flag} {path} is a folder; name a file"
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        return f"{flag} {path}: no folder {parent}"
    if not os.access(parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        return f"{flag} {path}: not writable"
    return None


def run(args) -> int:
    from model.checkpoint import TTA_VIEWS
    from model.evaluate import evaluate

    tta = None
    if args.tta is not None:
        tta = [] if args.tta == "none" else [v.strip() for v in args.tta.split(",") if v.strip()]
        unknown = [v for v in tta if v not in TTA_VIEWS]
        if unknown or len(set(tta)) != len(tta):
            print(f"error: --tta takes distinct views from {', '.join(sorted(TTA_VIEWS))} (or none), "
                  f"not {args.tta!r}", file=sys.stderr)
            return 2
    problems = [writable_file(args.plot, "--plot")] if args.plot else []
    if args.record:
        problems.append(writable_file(Path(args.weights) / "manifest.json", "--record: the manifest"))
    if any(problems):
        print(f"error: {next(p for p in problems if p)}", file=sys.stderr)
        return 2
    from model.backends import BACKENDS, choose_backend

    if args.backend not in BACKENDS:
        print(f"error: --backend must be one of {', '.join(BACKENDS)}, not {args.backend!r}", file=sys.stderr)
        return 2
    if args.iou is not None and not 0.0 < args.iou <= 1.0:
        print(f"error: --iou must be within (0, 1], got {args.iou}", file=sys.stderr)
        return 2
    try:
        predictor, records = load_inputs(args.weights, args.data, args.split, args.device, tta)
    except SystemExit as exc:
        return int(exc.code or 2)
    if args.iou is not None:
        if predictor.task != "detect":
            print(f"error: --iou is the NMS threshold of detect models; {predictor.name} is a {predictor.task} "
                  "model", file=sys.stderr)
            return 2
        predictor.nms_iou = args.iou
    if args.backend != "eager":
        report = choose_backend(predictor, args.backend)
        if report.chosen != args.backend:
            print(f"error: {args.backend} cannot run this model: {report.reason}", file=sys.stderr)
            return 2
    from model.data import DatasetFormatError

    try:
        metrics = evaluate(predictor, records, batch_size=args.batch, progress=not args.json,
                           keep_predictions=bool(args.plot), keep_outcomes=bool(args.plot))
    except DatasetFormatError as exc:  # a file that reads as an image, but whose pixels do not decode
        print(f"error: {exc}", file=sys.stderr)
        return 2
    preds = metrics.pop("predictions", None)
    outcomes = metrics.pop("outcomes", None)
    if args.plot:
        from model.plots import plot_eval, plot_verdict
        from model.verdict import threshold_sweep

        out = Path(args.plot)
        try:
            plot_eval(out, predictor, records, metrics, preds)
            plot_verdict(out.with_name(f"{out.stem}-verdict.png"), predictor.name,
                         threshold_sweep(outcomes, predictor.verdict_rule, predictor.classes), metrics["parts"],
                         title=f"{predictor.name} {predictor.version} on {Path(args.data).name}:{args.split} "
                               f"({len(records)} images)")
        except (OSError, ValueError) as exc:  # e.g. a file name matplotlib has no format for
            print(f"error: --plot {out}: {exc}", file=sys.stderr)
            return 1
    metrics = {"model": predictor.name, "version": predictor.version, "task": predictor.task,
               "data": str(args.data), "split": args.split, "tta": predictor.tta, "backend": predictor.backend,
               **({"nms_iou": predictor.nms_iou} if predictor.task == "detect" else {}), **metrics}
    if args.record:
        from model.checkpoint import record_metrics

        key = f"{Path(args.data).resolve().name}:{args.split}"
        try:
            record_metrics(args.weights, key, {k: v for k, v in metrics.items() if k not in ("model", "data")})
        except OSError as exc:
            print(f"error: --record: could not write {args.weights}/manifest.json: {exc}", file=sys.stderr)
            return 1
    if args.json:
        print(json.dumps(metrics))
    else:
        for k, v in metrics.items():
            if k == "parts":
                continue
            if k in ("confusion",) or isinstance(v, (list, dict)):
                print(f"{k}: {json.dumps(v)}")
            else:
                print(f"{k}: {v}")
        print(format_parts(metrics["parts"]))
    return 0
