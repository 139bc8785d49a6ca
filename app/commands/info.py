"""`s2amnet info`: the S2-AMNet variants with parameter counts and GFLOPs, and the models in weights/.

Standard configurations (DESIGN-model.md §1.3, §2, §3): classify nc=10 at 224×224, segment nc=2 (crack +
background) at 512×512, detect nc=6 (NEU-DET, the shipped detector) at 512×512 — with the parameter count
at the DESIGN's reference nc=5 alongside. GFLOPs = 2 × MAC as counted by
``torch.utils.flop_counter.FlopCounterMode`` (FFTs, grid_sample and element-wise ops are not counted, as
in the DESIGN tables), with AFMM's complex matmuls counted as 4 real ones — the reference computes them in
real arithmetic, so this keeps the figures comparable with DESIGN-model's. Counting runs under
FakeTensorMode (shapes only, no arithmetic) when torch supports it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

STANDARD = (
    # task, num_classes, input size, extra num_classes reported for params
    ("classify", 10, 224, None),
    ("segment", 2, 512, None),
    ("detect", 6, 512, 5),
)


def _build(task: str, variant: str, nc: int):
    """A model for counting: on the meta device when the modules allow it (no memory, no init), else CPU."""
    import torch

    from model.registry import build_model

    try:
        with torch.device("meta"):
            return build_model(task, variant, nc), True
    except Exception:  # noqa: BLE001 - some constructors need real tensors
        return build_model(task, variant, nc), False


def _params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def _complex_aware_mapping() -> dict:
    """FlopCounterMode counts a complex matmul like a real one; one complex MAC is 4 real MACs, which
    is what the reference's real-arithmetic AFMM (and so DESIGN-model's tables) counts. Scale them."""
    import torch
    from torch.utils import flop_counter

    registry = getattr(flop_counter, "flop_registry", {})
    aten = torch.ops.aten
    mapping = {}
    for op in (aten.mm, aten.bmm, aten.addmm, aten.baddbmm):
        base = registry.get(op)
        if base is None:
            continue

        def formula(*args, out_val=None, _base=base, **kwargs):
            n = _base(*args, out_val=out_val, **kwargs)
            if any(isinstance(a, torch.Tensor) and a.is_complex() for a in args):
                n *= 4
            return n

        formula._get_raw = True  # receive tensors (for the dtype), not shapes
        mapping[op] = formula
    return mapping


def _count(model, height: int, width: int, fake: bool) -> float:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    try:
        mapping = _complex_aware_mapping()
    except Exception:  # noqa: BLE001 - private details of torch changed: plain counts
        mapping = {}
    x = None
    if fake:  # shapes only: no arithmetic is done, much faster on a busy CPU
        from torch._subclasses.fake_tensor import FakeTensorMode

        with FakeTensorMode(allow_non_fake_inputs=True):
            x = torch.zeros(1, 3, height, width)
            with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=mapping) as counter:
                model(x)
    else:
        x = torch.zeros(1, 3, height, width)
        with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=mapping) as counter:
            model(x)
    return counter.get_total_flops() / 1e9


def forward_gflops(model, height: int, width: int) -> float | None:
    """GFLOPs of one forward of one height×width image, counted as this module's docstring says (None when
    it cannot be counted). Runs under FakeTensorMode when torch supports it (identical counts, no real
    compute), else a real forward on zeros. ``model`` must be in eval mode."""
    for fake in (True, False):
        try:
            return _count(model, height, width, fake)
        except Exception:  # noqa: BLE001 - fall back to a real forward; the callers must still print the rest
            continue
    return None


def _gflops(model, on_meta: bool, size: int) -> float | None:
    """GFLOPs of one forward at size×size (batch 1) of a model built for counting (see _build)."""
    import torch

    if on_meta:  # allocate without initialising (values do not change FLOP counts)
        model = model.to_empty(device="cpu")
        with torch.no_grad():
            for t in list(model.parameters()) + list(model.buffers()):
                if t.is_floating_point():
                    t.zero_()
    model.eval()
    return forward_gflops(model, size, size)


def variant_table(variants: list[str] | None = None, flops: bool = True) -> list[dict[str, Any]]:
    from model.backbone import VARIANTS
    from model.registry import canonical_variant

    names = [canonical_variant(v) for v in variants] if variants else list(VARIANTS)
    rows = []
    for v in names:
        cfg = VARIANTS[v]
        row: dict[str, Any] = {"variant": v, "widths": list(cfg["widths"]), "depths": list(cfg["depths"])}
        for task, nc, size, ref_nc in STANDARD:
            model, on_meta = _build(task, v, nc)
            entry: dict[str, Any] = {"num_classes": nc, "input_size": size, "params": _params(model)}
            if ref_nc is not None:
                entry[f"params_nc{ref_nc}"] = _params(_build(task, v, ref_nc)[0])
            if flops:
                g = _gflops(model, on_meta, size)
                entry["gflops"] = None if g is None else round(g, 3)
            row[task] = entry
            del model
        rows.append(row)
    return rows


def weights_table(weights_dir: str) -> list[dict[str, Any]]:
    from model.checkpoint import CheckpointError, find_weights, read_manifest

    out = []
    for folder in find_weights(weights_dir):
        try:
            m = read_manifest(folder)
        except CheckpointError as exc:
            out.append({"folder": str(folder), "error": str(exc)})
            continue
        out.append(
            {
                "folder": str(folder),
                "name": m["name"],
                "version": m["version"],
                "task": m["task"],
                "variant": m["arch"]["variant"],
                "num_classes": m["arch"]["num_classes"],
                "input_size": m["arch"]["input_size"],
                "classes": m["classes"],
                "metrics": m.get("metrics") or {},
            }
        )
    return out


def _fmt_int(n: int | None) -> str:
    return "-" if n is None else f"{n:,}"


def _fmt_g(g: float | None) -> str:
    return "-" if g is None else f"{g:.3f}"


def _print_text(rows: list[dict], weights: list[dict], weights_dir: str, flops: bool) -> None:
    import torch

    print(f"S2-AMNet (SSAMNet backbone) model family — torch {torch.__version__}")
    print(
        "parameters / GFLOPs (2×MAC, torch FlopCounterMode, a complex MAC = 4 real MACs; FFT, grid_sample "
        "and element-wise ops not counted) at the standard configurations:"
    )
    head = (
        f"{'variant':<8} {'widths':<16} {'classify nc=10 @224':>22} {'segment nc=2 @512':>22} "
        f"{'detect nc=6 @512':>22} {'detect nc=5 (DESIGN ref)':>25}"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        c, s, d = r["classify"], r["segment"], r["detect"]

        def cell(e):
            g = f" / {_fmt_g(e.get('gflops'))} GF" if flops else ""
            return f"{_fmt_int(e['params'])}{g}"

        print(
            f"{r['variant']:<8} {','.join(map(str, r['widths'])):<16} {cell(c):>22} {cell(s):>22} "
            f"{cell(d):>22} {_fmt_int(d.get('params_nc5')):>25}"
        )
    print("depths (2, 4, 4, 2) in every variant; layer scale / drop path per task as DESIGN-model §5 D5.")
    print()
    if weights:
        print(f"models in {weights_dir}/:")
        for w in weights:
            if "error" in w:
                print(f"  {w['folder']}: INVALID — {w['error']}")
                continue
            metrics = ", ".join(
                f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                for k, v in w["metrics"].items()
                if not isinstance(v, (dict, list))
            )
            print(
                f"  {w['name']:<20} v{w['version']:<8} {w['task']:<9} {w['variant']:<6} "
                f"{w['num_classes']:>3} classes  input {w['input_size'][0]}×{w['input_size'][1]}"
                + (f"  {metrics}" if metrics else "")
            )
    else:
        print(f"no models in {weights_dir}/ (train one with `s2amnet train`)")


def run(args: argparse.Namespace) -> int:
    flops = not args.no_flops
    try:
        rows = variant_table(args.variant, flops=flops)
    except ValueError as exc:
        print(f"s2amnet info: {exc}", file=sys.stderr)
        return 2
    weights = weights_table(args.weights_dir)
    if args.json:
        import torch

        print(
            json.dumps(
                {
                    "torch": torch.__version__,
                    "flops_counter": "torch.utils.flop_counter (2×MAC)",
                    "variants": rows,
                    "weights_dir": args.weights_dir,
                    "weights": weights,
                }
            )
        )
    else:
        _print_text(rows, weights, args.weights_dir, flops)
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "info",
        help="list the model variants (parameters, GFLOPs) and the models in weights/",
        description="Print every S2-AMNet variant with parameter counts for classify (nc=10, 224), segment "
        "(nc=2, 512) and detect (nc=6, 512; plus the DESIGN's nc=5 reference) and GFLOPs at those sizes, "
        "then the models found in the weights folder.",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    p.add_argument(
        "--weights-dir",
        default=os.environ.get("S2AMNET_WEIGHTS_DIR", "weights"),
        help="folder of model folders (default: S2AMNET_WEIGHTS_DIR or weights)",
    )
    p.add_argument(
        "--variant",
        action="append",
        metavar="NAME",
        help="only this variant (repeatable; aliases t/s/b/l); default: all",
    )
    p.add_argument(
        "--no-flops", action="store_true", help="skip the GFLOPs count (faster: no forward passes)"
    )
    p.set_defaults(func=run)
