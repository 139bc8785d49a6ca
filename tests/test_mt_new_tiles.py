"""scripts/mt_new_tiles.py: magnetic-tile images grouped into tiles by their file numbers and joined across
class folders by their look, and val metrics reported apart for images whose tile is in train under the same
class, only under other classes, or not at all."""

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

from mt_new_tiles import NEW, OTHER_CLASS, SAME_CLASS, kinds, link_tiles, signature, tiles  # noqa: E402

from model.data.readers import MT_CLASSIFY_CLASSES, is_val_stem  # noqa: E402


def _rec(folder: str, stem: str, image=None):
    return SimpleNamespace(key=f"{folder}/{stem}", stem=stem, image=image)


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


def _texture(seed: int, gain: float = 1.0, shape=(60, 80)) -> Image.Image:
    """A part's surface (random structure + a shading ramp) photographed at an exposure ``gain``."""
    rng = np.random.default_rng(seed)
    a = rng.normal(0, 25, shape) + np.linspace(60, 140, shape[1])[None, :]
    return Image.fromarray(np.clip(a * gain, 0, 255).astype(np.uint8))


def test_signature_matches_exposures_of_one_part_not_other_parts(tmp_path):
    paths = {}
    for name, seed, gain in (("a1", 1, 0.6), ("a2", 1, 1.5), ("b", 2, 1.0)):
        paths[name] = tmp_path / f"{name}.jpg"
        _texture(seed, gain).save(paths[name])
    a1, a2, b = (signature(paths[n]) for n in ("a1", "a2", "b"))
    assert abs(float(a1 @ a1) - 1.0) < 1e-4
    assert float(a1 @ a2) > 0.8  # the same part at 0.6x and 1.5x exposure
    assert abs(float(a1 @ b)) < 0.3  # another part


def test_links_join_tiles_across_class_folders_and_kinds_follow_the_train_classes():
    # one part filed under two folders (Fray exp0 in val; Free exp2/exp4 in train), a Break tile in train,
    # a Free tile in val alone, and a look-alike beyond the number gap (not joined)
    recs = [_rec("MT_Fray", "exp0_num_1000", "p"), _rec("MT_Free", "exp2_num_1030", "p"),
            _rec("MT_Free", "exp4_num_1060", "p"), _rec("MT_Break", "exp1_num_1010", "q"),
            _rec("MT_Break", "exp2_num_1040", "q"), _rec("MT_Free", "exp1_num_5000", "r"),
            _rec("MT_Blowhole", "exp1_num_9000", "p")]
    looks = {"p": np.array([1.0, 0.0]), "q": np.array([0.0, 1.0]), "r": np.array([0.6, 0.8])}
    tile = tiles(recs, gap=400)
    joined, links = link_tiles(recs, tile, gap=400, min_sim=0.7, sig=looks.__getitem__)
    assert joined["MT_Fray/exp0_num_1000"] == joined["MT_Free/exp2_num_1030"] == joined["MT_Free/exp4_num_1060"]
    assert joined["MT_Break/exp1_num_1010"] != joined["MT_Fray/exp0_num_1000"]
    assert joined["MT_Blowhole/exp1_num_9000"] != joined["MT_Fray/exp0_num_1000"]  # 8,000 numbers away
    assert {(a, b) for _, a, b in links} == {("MT_Fray/exp0_num_1000", "MT_Free/exp2_num_1030"),
                                             ("MT_Fray/exp0_num_1000", "MT_Free/exp4_num_1060")}
    train = {"MT_Free/exp2_num_1030", "MT_Free/exp4_num_1060", "MT_Break/exp1_num_1010"}
    got = kinds(recs, joined, train)
    assert got == {"MT_Fray/exp0_num_1000": (OTHER_CLASS, ["MT_Free"]),
                   "MT_Break/exp2_num_1040": (SAME_CLASS, ["MT_Break"]),
                   "MT_Free/exp1_num_5000": (NEW, []), "MT_Blowhole/exp1_num_9000": (NEW, [])}
    # without the links the Fray image's tile is its own: new
    assert kinds(recs, tile, train)["MT_Fray/exp0_num_1000"] == (NEW, [])


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
    lines = [json.loads(line) for line in out.stdout.strip().splitlines()]
    assert not [r for r in lines if "link across class folders" in r]  # random images look like nothing
    rows = {r["val images"]: r for r in lines}
    val = [s for tile in free_tiles for s in tile if is_val_stem(s)]
    new_free = [f"MT_Free/{s}" for tile in free_tiles for s in tile
                if is_val_stem(s) and all(is_val_stem(x) for x in tile)]
    assert val and set(rows[NEW]["images"]) == {f"MT_Break/{new_stem}", *new_free}
    assert rows[NEW]["num_images"] == 1 + len(new_free)
    assert rows[SAME_CLASS]["num_images"] == len(val) - len(new_free)
    assert OTHER_CLASS not in rows
    assert "top1" in rows[NEW] and "macro_recall" in rows[SAME_CLASS]
    assert len(rows[NEW]["answers"]) == rows[NEW]["num_images"]
    assert set(rows[NEW]["answers"]) <= set(MT_CLASSIFY_CLASSES)
    assert rows[NEW]["classes in train"] == [[]] * rows[NEW]["num_images"]
    bad = subprocess.run([sys.executable, str(SCRIPT), "--data", str(data), "--link", "2", str(weights)], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "--link" in bad.stderr
