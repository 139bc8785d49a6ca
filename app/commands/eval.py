"""`s2amnet eval`: metrics of a weights folder on a labelled dataset, through the service's Predictor."""

from __future__ import annotations

import json
import sys


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a weights folder on a dataset folder",
                       description="Runs the Predictor (the code the service uses) over every labelled "
                                   "image of --data and prints the task's metrics.")
    p.add_argument("--weights", required=True, help="weights folder (model.safetensors + manifest.json)")
    p.add_argument("--data", required=True, help="dataset folder in its native layout")
    p.add_argument("--split", default="all", choices=["all", "val", "train"],
                   help="all images (default) or the validation part of the training split")
    p.add_argument("--json", action="store_true", help="last line of output is one JSON object")
    p.add_argument("--tta", metavar="VIEWS",
                   help="test-time augmentation for this evaluation instead of the manifest's: comma-separated "
                        "views (hflip, vflip) or 'none'")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--device", default="auto")
    p.add_argument("--plot", help="write a PNG (confusion matrix / prediction examples) here")
    p.add_argument("--record", action="store_true",
                   help="store the metrics in the weights folder's manifest (metrics.eval['<data>:<split>'])")
    p.set_defaults(func=run)


def run(args) -> int:
    import torch

    from model.checkpoint import CheckpointError
    from model.data import DatasetFormatError, load_records, split_records
    from model.evaluate import evaluate
    from model.predictor import Predictor

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    tta = None
    if args.tta is not None:
        tta = [] if args.tta == "none" else [v.strip() for v in args.tta.split(",") if v.strip()]
    try:  # fused, as the service loads it: evaluate what is served
        predictor = Predictor.from_folder(args.weights, device=device, tta=tta)
        info = load_records(args.data, predictor.task)
    except (CheckpointError, FileNotFoundError, DatasetFormatError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if info.class_names(predictor.task) != predictor.classes:
        print(f"error: the dataset's classes {info.class_names(predictor.task)} differ from the model's "
              f"{predictor.classes}", file=sys.stderr)
        return 2
    records = split_records(info.records_for(predictor.task), args.split)
    if not records:
        print(f"error: {args.data} has no labelled images for {predictor.task} in split {args.split!r}",
              file=sys.stderr)
        return 2
    metrics = evaluate(predictor, records, batch_size=args.batch, progress=not args.json,
                       keep_predictions=bool(args.plot))
    preds = metrics.pop("predictions", None)
    if args.plot:
        from model.plots import plot_eval

        plot_eval(args.plot, predictor, records, metrics, preds)
    metrics = {"model": predictor.name, "task": predictor.task, "data": str(args.data), "split": args.split,
               "tta": predictor.tta, **metrics}
    if args.record:
        from pathlib import Path

        from model.checkpoint import record_metrics

        key = f"{Path(args.data).resolve().name}:{args.split}"
        record_metrics(args.weights, key, {k: v for k, v in metrics.items() if k not in ("model", "data")})
    if args.json:
        print(json.dumps(metrics))
    else:
        for k, v in metrics.items():
            if k in ("confusion",) or isinstance(v, (list, dict)):
                print(f"{k}: {json.dumps(v)}")
            else:
                print(f"{k}: {v}")
    return 0
