"""Magnetic-tile val metrics apart for images of tiles seen in training and of new tiles.

The magnetic-tile set photographs each tile at up to seven exposures (``exp0``..``exp6``), numbered close
together in increasing exposure order (``exp1_num_135544``, ``exp2_num_135572``, ... ``exp6_num_135686``).
The shipped split is by file stem (issue 4), so most val images have another exposure of their tile in
the training split; only a few val images come from a tile with no exposure in train. This script groups
the images into tiles (per class folder, sorted by number: a new tile starts where the number jumps by
more than ``--gap`` or the exposure index does not increase — a heuristic, the names carry no tile id)
and evaluates each weights folder with the Predictor on the val images of both kinds.

    .venv/bin/python scripts/mt_new_tiles.py --data ../shared/data/magnetic-tile \\
        weights/mt-classify weights/mt-segment
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.data import load_records, split_records  # noqa: E402
from model.evaluate import evaluate  # noqa: E402
from model.predictor import Predictor  # noqa: E402

NAME = re.compile(r"exp(\d+)_num_(\d+)$")


def tiles(records, gap: int) -> dict[str, str]:
    """Record key -> tile id (``<class folder>/<first number of the tile>``)."""
    by_folder: dict[str, list[tuple[int, int, str]]] = {}
    for r in records:
        m = NAME.match(r.stem)
        if m is None:
            raise SystemExit(f"{r.key}: not a magnetic-tile name (exp<E>_num_<N>)")
        by_folder.setdefault(r.key.split("/")[0], []).append((int(m.group(2)), int(m.group(1)), r.key))
    out: dict[str, str] = {}
    for folder, items in by_folder.items():
        tile, prev = "", None
        for num, exp, key in sorted(items):
            if prev is None or num - prev[0] > gap or exp <= prev[1]:
                tile = f"{folder}/{num}"
            out[key] = tile
            prev = (num, exp)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("weights", nargs="+", help="weights folders (classify or segment, magnetic-tile classes)")
    ap.add_argument("--data", default="../shared/data/magnetic-tile")
    ap.add_argument("--gap", type=int, default=400, help="number jump that starts a new tile")
    args = ap.parse_args()
    info = load_records(args.data)
    for folder in args.weights:
        p = Predictor.from_folder(folder)
        recs = info.records_for(p.task)
        tile = tiles(recs, args.gap)
        in_train = {tile[r.key] for r in split_records(recs, "train")}
        val = split_records(recs, "val")
        kind = ["tile seen in train" if tile[r.key] in in_train else "new tile" for r in val]
        m = evaluate(p, val, groups=kind, progress=False)
        for name in ("tile seen in train", "new tile"):
            g = m["by_group"].get(name)
            if g is None:
                continue
            keep = {k: g[k] for k in ("num_images", "top1", "macro_recall", "miou", "iou_per_class", "confusion")
                    if k in g}
            if name == "new tile":
                keep["images"] = [r.key for r, k in zip(val, kind, strict=True) if k == name]
            print(json.dumps({"weights": folder, "val images": name, **keep}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
