"""scripts/mt_new_tiles.py: magnetic-tile images grouped into tiles by their file numbers, and val metrics
reported apart for images whose tile has an exposure in train and for new tiles."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "mt_new_tiles.py"
sys.path.insert(0, str(ROOT / "scripts"))

from mt_new_tiles import tiles  # noqa: E402

from model.data.readers import MT_CLASSIFY_CLASSES, is_val_stem  # noqa: E402


def _rec(folder: str, stem: str):
    return SimpleNamespace(key=f"{folder}/{stem}", stem=stem)


def test_tiles_start_where_the_number_jumps_or_the_exposure_does_not_increase():
    recs = [_rec("MT_Break", s) for s in ("exp1_num_100", "exp3_num_160", "exp2_num_130",  # one tile, any order
                                          "exp4_num_700",  # a jump of more than 400
                                          "exp4_num_760")]  # exposure 4 again: the next tile
    recs.append(_rec("MT_Fray", "exp2_num_131"))  # another class folder: its own tile
    got = tiles(recs, gap=400)
    assert got == {"MT_Break/exp1_num_100": "MT_Break/100", "MT_Break/exp2_num_130": "MT_Break/100",
                   "MT_Break/exp3_num_160": "MT_Break/100", "MT_Break/exp4_num_700": "MT_Break/700",
                   "MT_Break/exp4_num_760": "MT_Break/760", "MT_Fray/exp2_num_131": "MT_Fray/131"}
    assert tiles(recs, gap=20)["MT_Break/exp3_num_160"] == "MT_Break/160"  # steps of 30 are jumps at gap 20


def _stems(n_tiles: int, start: int):
    """Tiles of three exposures each: exp1..exp3 at num, num+30, num+60; tiles 1,000 apart."""
    return [[f"exp{e}_num_{start + 1000 * t + 30 * (e - 1)}" for e in (1, 2, 3)] for t in range(n_tiles)]


def test_the_script_reports_seen_and_new_tiles_apart(tmp_path):
    import torch

    from model.checkpoint import save_model
    from model.registry import build_model

    data = tmp_path / "magnetic-tile"
    # a Break tile whose single image is a val image (a new tile) and Free tiles of three exposures
    new_stem = next(s for s in (f"exp1_num_{n}" for n in range(500_000, 600_000, 1000)) if is_val_stem(s))
    free_tiles = _stems(12, 10_000)
    files = [("MT_Break", new_stem)] + [("MT_Free", s) for tile in free_tiles for s in tile]
    rng = np.random.default_rng(0)
    for folder, stem in files:
        d = data / folder / "Imgs"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (40, 48), np.uint8)).save(d / f"{stem}.jpg")
        Image.fromarray(np.zeros((40, 48), np.uint8)).save(d / f"{stem}.png")
    torch.manual_seed(0)
    weights = tmp_path / "w"
    save_model(build_model("classify", "tiny", len(MT_CLASSIFY_CLASSES)), weights,
               {"name": "mt", "version": "1", "classes": MT_CLASSIFY_CLASSES,
                "verdict": {"type": "classify", "pass_labels": ["MT_Free"], "min_score": 0.5},
                "arch": {"variant": "tiny", "input_size": [64, 64]}, "mean": [0.5] * 3, "std": [0.25] * 3})
    out = subprocess.run([sys.executable, str(SCRIPT), "--data", str(data), str(weights)], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    rows = {r["val images"]: r for r in map(json.loads, out.stdout.strip().splitlines())}
    val = [s for tile in free_tiles for s in tile if is_val_stem(s)]
    new_free = [f"MT_Free/{s}" for tile in free_tiles for s in tile
                if is_val_stem(s) and all(is_val_stem(x) for x in tile)]
    assert val and set(rows["new tile"]["images"]) == {f"MT_Break/{new_stem}", *new_free}
    assert rows["new tile"]["num_images"] == 1 + len(new_free)
    assert rows["tile seen in train"]["num_images"] == len(val) - len(new_free)
    assert "top1" in rows["new tile"] and "macro_recall" in rows["tile seen in train"]
