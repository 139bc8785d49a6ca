"""Magnetic-tile val metrics apart for images of tiles seen in training and of new tiles.

The magnetic-tile set photographs each tile at up to seven exposures (``exp0``..``exp6``), numbered close
together in increasing exposure order (``exp1_num_135544``, ``exp2_num_135572``, ... ``exp6_num_135686``).
The shipped split is by file stem (issue 4), so most val images have another exposure of their tile in
the training split; only a few val images come from a tile with no exposure in train. This script groups
the images into tiles (per class folder, sorted by number: a new tile starts where the number jumps by
more than ``--gap`` or the exposure index does not increase — a heuristic, the names carry no tile id)
and evaluates each weights folder with the Predictor on the val images of both kinds.

A tile can also be filed under several class folders: one exposure labelled with a defect, another of the
same tile labelled with another defect or MT_Free (the same chip is Fray in ``exp0_num_797``, Blowhole in
``exp3_num_853`` and defect-free in ``exp4_num_889``). With ``--link SIM`` (default 0.6; 0 = off) images
whose numbers are within ``--gap`` and whose high-pass thumbnails correlate at least SIM (see `signature`)
are joined into one tile, across folders too, and the val images are reported in three kinds: tile in
train under the same class, tile in train only under other classes (with each image's classes in train
and, for a classifier, its answer), new tile. The links are a heuristic as well; each cross-folder link is
printed so that it can be checked by eye.

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

import numpy as np  # noqa: E402
from PIL import Image, ImageFilter  # noqa: E402

from model.data import load_records, split_records  # noqa: E402
from model.evaluate import evaluate  # noqa: E402
from model.predictor import Predictor  # noqa: E402

NAME = re.compile(r"exp(\d+)_num_(\d+)$")
SAME_CLASS, OTHER_CLASS, NEW = "tile in train, same class", "tile in train, other class only", "new tile"


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


def signature(path, size: int = 48, blur: float = 4.0) -> np.ndarray:
    """A unit vector describing an image's structure, not its exposure: the grey image at ``size``×``size``
    minus its Gaussian blur (the exposure-dependent shading), standardised. Two exposures of one tile
    correlate highly (their dot product), other tiles hardly."""
    im = Image.open(path).convert("L").resize((size, size), Image.BILINEAR)
    a = np.asarray(im, np.float32) - np.asarray(im.filter(ImageFilter.GaussianBlur(blur)), np.float32)
    a = (a - a.mean()) / (a.std() + 1e-6)
    return (a / np.sqrt(a.size)).ravel()


def link_tiles(records, tile: dict[str, str], gap: int, min_sim: float, sig=signature):
    """Join tiles whose images look alike: any two images (any class folders) whose numbers are within
    ``gap`` and whose signatures correlate ``>= min_sim``. Returns ``(record key -> tile id, the joining
    links across class folders as (similarity, key, key))``."""
    parent = {t: t for t in tile.values()}

    def root(t: str) -> str:
        while parent[t] != t:
            parent[t] = parent[parent[t]]
            t = parent[t]
        return t

    sigs = {r.key: sig(r.image) for r in records}
    items = sorted((int(NAME.match(r.stem).group(2)), r.key) for r in records)
    links = []
    for i, (num, key) in enumerate(items):
        for num2, key2 in items[i + 1:]:
            if num2 - num > gap:
                break
            s = float(sigs[key] @ sigs[key2])
            if s >= min_sim:
                parent[root(tile[key2])] = root(tile[key])
                if key.split("/")[0] != key2.split("/")[0]:
                    links.append((round(s, 3), key, key2))
    return {k: root(t) for k, t in tile.items()}, links


def kinds(records, tile: dict[str, str], train_keys: set[str]) -> dict[str, tuple[str, list[str]]]:
    """Val record key -> (kind, the class folders its tile has in train)."""
    in_train: dict[str, set[str]] = {}
    for r in records:
        if r.key in train_keys:
            in_train.setdefault(tile[r.key], set()).add(r.key.split("/")[0])
    out = {}
    for r in records:
        if r.key in train_keys:
            continue
        classes = sorted(in_train.get(tile[r.key], ()))
        kind = NEW if not classes else SAME_CLASS if r.key.split("/")[0] in classes else OTHER_CLASS
        out[r.key] = (kind, classes)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("weights", nargs="+", help="weights folders (classify or segment, magnetic-tile classes)")
    ap.add_argument("--data", default="../shared/data/magnetic-tile")
    ap.add_argument("--gap", type=int, default=400, help="number jump that starts a new tile")
    ap.add_argument("--link", type=float, default=0.6, metavar="SIM",
                    help="join images within --gap whose signatures correlate at least SIM (0 = off)")
    args = ap.parse_args()
    if not 0.0 <= args.link <= 1.0:
        ap.error("--link is a correlation in [0, 1] (0 = off)")
    info = load_records(args.data)
    linked: dict[tuple[str, ...], tuple] = {}  # the joins, once per set of records
    for folder in args.weights:
        p = Predictor.from_folder(folder)
        recs = info.records_for(p.task)
        tile = tiles(recs, args.gap)
        if args.link > 0:
            keys = tuple(sorted(r.key for r in recs))
            if keys not in linked:
                linked[keys] = link_tiles(recs, tile, args.gap, args.link)
                for s, a, b in linked[keys][1]:
                    print(json.dumps({"link across class folders": [a, b], "similarity": s}))
            tile = linked[keys][0]
        kind_of = kinds(recs, tile, {r.key for r in split_records(recs, "train")})
        val = split_records(recs, "val")
        kind = [kind_of[r.key][0] for r in val]
        m = evaluate(p, val, groups=kind, progress=False)
        for name in (SAME_CLASS, OTHER_CLASS, NEW):
            g = m["by_group"].get(name)
            if g is None:
                continue
            keep = {k: g[k] for k in ("num_images", "top1", "macro_recall", "miou", "iou_per_class", "confusion")
                    if k in g}
            if name != SAME_CLASS:
                keep["images"] = [r.key for r, k in zip(val, kind, strict=True) if k == name]
                keep["classes in train"] = [kind_of[r][1] for r in keep["images"]]
                if p.task == "classify":
                    wanted = set(keep["images"])
                    todo = [r for r in val if r.key in wanted]
                    keep["answers"] = [p.classes[int(o["probs"].argmax())] for i in range(0, len(todo), 16)
                                       for o in p.infer([p.preprocess(r.load_image()) for r in todo[i:i + 16]])]
            print(json.dumps({"weights": folder, "val images": name, **keep}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
