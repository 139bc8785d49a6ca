"""`s2amnet calibrate`: per-class verdict thresholds chosen from labelled images, written to the manifest."""

from __future__ import annotations

import json
from pathlib import Path

from app.commands.eval import add_model_data_args, format_parts, load_inputs, writable_file


def add_parser(sub) -> None:
    p = sub.add_parser(
        "calibrate", help="choose the verdict thresholds of a weights folder from labelled images",
        description="Runs the model over the --split images of --data, chooses the thresholds of its verdict "
                    "rule (classify: the defect probability; detect / segment: a minimum score per class) that "
                    "keep the escape rate (defective parts not caught) within --max-escape with the fewest "
                    "false rejects, prints the trade-off and writes the rule, with a new version and the "
                    "figures it is expected to give, into the manifest. Choose thresholds on the val split; "
                    "report figures from the test split (s2amnet eval --split test).")
    add_model_data_args(p, split="val")
    p.add_argument("--max-escape", type=float, required=True, metavar="RATE",
                   help="most defective images that may go uncaught, as a fraction (e.g. 0.02)")
    p.add_argument("--max-false-reject", type=float, metavar="RATE",
                   help="most defect-free images that may be judged fail (a hard bound; needs defect-free "
                        "images in the data)")
    p.add_argument("--max-class-escape", type=float, metavar="RATE",
                   help="detect / segment: also bound each defect class's escape rate")
    p.add_argument("--min-precision", type=float, default=0.5, metavar="P",
                   help="data without defect-free images: no class's threshold goes below where fewer than P "
                        "of its reported defects lie on a ground-truth region (default 0.5)")
    p.add_argument("--floor", type=float, default=0.05, help="lowest threshold to consider (default 0.05)")
    p.add_argument("--areas", metavar="PX,PX,...",
                   help="detect / segment: also choose each class's minimum defect area (pixels; box area for "
                        "detect) from these values, e.g. 0,16,64,256 (default: keep the rule's min_area)")
    p.add_argument("--nms-iou", metavar="IOU,IOU,...",
                   help="detect: also choose the NMS IoU threshold among these values (e.g. 0.3,0.4,0.5,0.6,0.7): "
                        "the thresholds are calibrated at each, and of the values whose rule meets the bounds the one "
                        "with the best mAP50 is kept (where none does, the one that lets the fewest parts escape); "
                        "both are written")
    p.add_argument("--dry-run", action="store_true", help="print the thresholds; leave the manifest as it is")
    p.add_argument("--json", action="store_true", help="last line of output is one JSON object")
    p.set_defaults(func=run)


def _check(args) -> str | None:
    for name in ("max_escape", "max_false_reject", "max_class_escape", "min_precision", "floor"):
        v = getattr(args, name)
        if v is not None and not 0.0 <= v <= 1.0:
            return f"--{name.replace('_', '-')} must be within [0, 1], got {v}"
    return None


def run(args) -> int:
    import sys

    from model.checkpoint import CheckpointError, update_verdict
    from model.evaluate import evaluate, nms_iou_sweep
    from model.verdict import calibrate, part_metrics

    problem = _check(args)
    areas = None
    if args.areas:
        try:
            areas = [float(v) for v in args.areas.split(",") if v.strip()]
        except ValueError:
            areas = []
        if not areas or any(a < 0 for a in areas):
            problem = f"--areas must be comma-separated pixel counts >= 0, got {args.areas!r}"
    ious = None
    if args.nms_iou:
        try:
            ious = sorted({float(v) for v in args.nms_iou.split(",") if v.strip()})
        except ValueError:
            ious = []
        if not ious or not all(0.0 < v <= 1.0 for v in ious):
            problem = f"--nms-iou must be comma-separated values within (0, 1], got {args.nms_iou!r}"
    if not problem and not args.dry_run:  # found out before the evaluation, not after it
        problem = writable_file(Path(args.weights) / "manifest.json", "--weights: the manifest")
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    try:
        predictor, records = load_inputs(args.weights, args.data, args.split, args.device, None)
    except SystemExit as exc:
        return int(exc.code or 2)

    def fit(outcomes):
        return calibrate(outcomes, predictor.verdict_rule, predictor.classes, max_escape=args.max_escape,
                         max_false_reject=args.max_false_reject, max_class_escape=args.max_class_escape,
                         min_precision=args.min_precision, floor=args.floor, area_grid=areas)

    sweep, was = None, predictor.nms_iou
    try:
        if ious is None:
            outcomes = evaluate(predictor, records, batch_size=args.batch, progress=not args.json,
                                keep_outcomes=True)["outcomes"]
            rule, report = fit(outcomes)
            after = part_metrics(outcomes, rule, predictor.classes)
        else:
            if predictor.task != "detect":
                raise ValueError(f"--nms-iou is a detect setting; {predictor.name} is a {predictor.task} model")
            sweep, fitted = {}, {}
            for iou, m in nms_iou_sweep(predictor, records, ious, batch_size=args.batch,
                                        progress=not args.json).items():
                rule, report = fit(m["outcomes"])
                fitted[iou] = (m["outcomes"], rule, report, part_metrics(m["outcomes"], rule, predictor.classes))
                sweep[iou] = {"map50": round(m["map50"], 4), "met": report["met"], "escaped": fitted[iou][3]["escaped"]}
            # the verdict first: of the values whose calibrated rule meets the bounds, the best mAP50; where none
            # does, the fewest escapes. Of equal ones the value the model has, else the highest (fewest merges)
            predictor.nms_iou = max(sweep, key=lambda v: (sweep[v]["met"], 0 if sweep[v]["met"] else
                                                          -sweep[v]["escaped"], sweep[v]["map50"], v == was, v))
            outcomes, rule, report, after = fitted[predictor.nms_iou]
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    before = part_metrics(outcomes, predictor.verdict_rule, predictor.classes)
    rule["calibration"] = {"data": Path(args.data).resolve().name, "split": args.split, "num_images": len(records),
                           "from_version": predictor.version, **report}
    post = None
    if sweep is not None:
        post = {"iou": predictor.nms_iou}
        rule["calibration"]["nms_iou"] = {f"{iou:g}": v for iou, v in sweep.items()}
    version = predictor.version
    if not args.dry_run:
        try:
            version = update_verdict(args.weights, rule, post)["version"]
        except CheckpointError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        except OSError as exc:
            print(f"error: could not write {args.weights}/manifest.json: {exc}", file=sys.stderr)
            return 1
    if args.json:
        print(json.dumps({"model": predictor.name, "version": version, "verdict": rule, "before": before,
                          **({"postprocess": post} if post else {})}))
        return 0
    print(f"{predictor.name} {predictor.version} on {Path(args.data).name}:{args.split} ({len(records)} images)")
    if sweep is not None:
        print("\neach NMS IoU threshold, with the thresholds calibrated at it:\n  IoU    mAP50   escaped  bounds")
        for iou, v in sweep.items():
            print(f"  {iou:<5g}  {v['map50']:.4f}  {v['escaped']:>7}  {'met' if v['met'] else 'NOT met'}")
        print(f"NMS IoU threshold: {was:g} -> {predictor.nms_iou:g}")
    print("\nwith the rule it had" + (f" (NMS IoU {predictor.nms_iou:g})" if sweep else "") + ":\n"
          + format_parts(before))
    if predictor.task == "classify":
        print(f"\ndefect-probability threshold: {predictor.verdict_rule['min_score']} -> {rule['min_score']}")
    else:
        print("\nper-class min score (min area):")
        old = predictor.verdict_rule
        for name in predictor.classes:
            if name == "background":
                continue
            per = {**rule, **(rule.get("classes") or {}).get(name, {})}
            was = {**old, **(old.get("classes") or {}).get(name, {})}
            print(f"  {name:<18} {float(was['min_score']):.2f} ({float(was['min_area']):g} px) -> "
                  f"{per['min_score']:.2f} ({per['min_area']:g} px)")
    print("\nwith the chosen thresholds:\n" + format_parts(after))
    for note in report["notes"]:
        print(f"note: {note}")
    print("bounds met" if report["met"] else "bounds NOT met")
    print(f"\nwrote {args.weights}/manifest.json: version {version}" if not args.dry_run
          else "\n--dry-run: the manifest is unchanged")
    return 0
