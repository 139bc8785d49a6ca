"""Training and evaluation end to end on tiny synthetic datasets in the "own data" layouts:
train → per-epoch checkpoint + CSV + curves → best weights export → resume → `s2amnet eval --json`."""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from app.cli import main as cli_main
from model.data.readers import split_of
from model.predictor import Predictor
from model.registry import build_model
from model.train import RECIPES, TrainConfig, train

RECIPE_LR = RECIPES["classify"].lr


def _stems(n: int) -> list[str]:
    stems = [f"img{i:03d}" for i in range(n)]
    assert {split_of(s) for s in stems} == {"train", "val", "test"}
    return stems


def _square(rng, defect: bool, size=(48, 64)):
    img = rng.integers(60, 90, size=size, dtype=np.uint8)
    mask = np.zeros(size, np.uint8)
    if defect:
        y, x = rng.integers(4, size[0] - 20), rng.integers(4, size[1] - 20)
        img[y:y + 14, x:x + 14] = 230
        mask[y:y + 14, x:x + 14] = 255
    return img, mask, (x, y, x + 14, y + 14) if defect else None


def make_classify(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for i, stem in enumerate(_stems(24)):
        cls = "bad" if i % 2 else "good"
        (root / cls).mkdir(parents=True, exist_ok=True)
        img, _, _ = _square(rng, cls == "bad")
        Image.fromarray(img).save(root / cls / f"{stem}.png")
    return root


def make_segment(root: Path) -> Path:
    rng = np.random.default_rng(1)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for stem in _stems(16):
        img, mask, _ = _square(rng, True)
        Image.fromarray(img).save(root / "images" / f"{stem}.png")
        Image.fromarray(mask).save(root / "masks" / f"{stem}.png")
    return root


def make_detect(root: Path) -> Path:
    rng = np.random.default_rng(2)
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    (root / "classes.txt").write_text("spot\n")
    for stem in _stems(16):
        img, _, (x1, y1, x2, y2) = _square(rng, True, size=(64, 64))
        Image.fromarray(img).save(root / "images" / f"{stem}.png")
        cx, cy, w, h = (x1 + x2) / 2 / 64, (y1 + y2) / 2 / 64, (x2 - x1) / 64, (y2 - y1) / 64
        (root / "labels" / f"{stem}.txt").write_text(f"0 {cx} {cy} {w} {h}\n")
    return root


MAKERS = {"classify": make_classify, "segment": make_segment, "detect": make_detect}
METRIC = {"classify": "top1", "segment": "miou", "detect": "map50"}


@pytest.mark.parametrize("task", ["classify", "segment", "detect"])
def test_train_export_resume_eval(task, tmp_path, capsys):
    data = MAKERS[task](tmp_path / "data")
    out = tmp_path / "run"
    cfg = TrainConfig(task=task, data=str(data), epochs=1, imgsz=64, crop=48 if task == "segment" else None,
                      batch=4, out=str(out), name=f"syn-{task}", workers=0, max_train_batches=2, command="test")
    result = train(cfg, progress=False)
    assert result["best_epoch"] == 1
    rows = list(csv.DictReader(open(out / "log.csv")))
    assert [int(r["epoch"]) for r in rows] == [1]
    assert all(np.isfinite(float(r["train_loss"])) for r in rows)
    assert f"val_{METRIC[task]}" in rows[0]
    assert (out / "curves.png").stat().st_size > 1000
    assert (out / "last.pt").exists()

    # the exported folder is a loadable weights folder with the validation metrics in its manifest
    manifest = json.loads((out / "best" / "manifest.json").read_text())
    assert manifest["task"] == task and manifest["metrics"]["split"] == "val"
    assert METRIC[task] in manifest["metrics"] and manifest["train_command"] == "test"
    pred = Predictor.from_folder(out / "best")
    assert pred.task == task

    # resume: one more epoch continues the same log
    train(TrainConfig(task=task, data=str(data), out=str(out), epochs=2, resume=True, workers=0,
                      max_train_batches=2, command="test --resume"), progress=False)
    rows = list(csv.DictReader(open(out / "log.csv")))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    # the manifest keeps the original command and says how the run was resumed
    state = torch.load(out / "last.pt", weights_only=True)
    assert json.loads(state["resumed_with"]) == ["test --resume"]
    manifest2 = json.loads((out / "best" / "manifest.json").read_text())
    if manifest2["metrics"]["epoch"] == 2:
        assert manifest2["train_command"] == "test" and manifest2["resumed_with"] == ["test --resume"]

    # eval CLI: last line is one JSON object with the task's metrics
    capsys.readouterr()
    sha = manifest2["sha256"]
    assert cli_main(["eval", "--weights", str(out / "best"), "--data", str(data), "--split", "val",
                     "--json", "--record"]) == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    # --record stores the measured metrics in the manifest; the weights stay as they were
    recorded = json.loads((out / "best" / "manifest.json").read_text())
    assert recorded["metrics"]["eval"]["data:val"][METRIC[task]] == metrics[METRIC[task]]
    assert recorded["sha256"] == sha
    Predictor.from_folder(out / "best")
    assert metrics["task"] == task and 0.0 <= metrics[METRIC[task]] <= 1.0
    assert metrics["num_images"] == sum(split_of(p.stem) == "val" for p in data.rglob("*.png")
                                        if p.parent.name not in ("masks",))
    assert metrics["parts"]["defective"] + metrics["parts"]["defect_free"] == metrics["num_images"]
    # --plot: the task's figure and the escape / false-reject curve beside it
    assert cli_main(["eval", "--weights", str(out / "best"), "--data", str(data), "--split", "val",
                     "--plot", str(tmp_path / "ev.png")]) == 0
    printed = capsys.readouterr().out
    assert "escape:" in printed and "false reject:" in printed
    for png in ("ev.png", "ev-verdict.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # calibrate: per-class thresholds (classify: the defect probability) into the manifest, a new version
    before = json.loads((out / "best" / "manifest.json").read_text())
    assert cli_main(["calibrate", "--weights", str(out / "best"), "--data", str(data), "--max-escape", "0",
                     "--dry-run"]) == 0
    assert "per-class min score" in capsys.readouterr().out or task == "classify"
    assert json.loads((out / "best" / "manifest.json").read_text()) == before
    assert cli_main(["calibrate", "--weights", str(out / "best"), "--data", str(data), "--max-escape", "0",
                     "--json"]) == 0
    told = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    after = json.loads((out / "best" / "manifest.json").read_text())
    assert after["verdict"] == told["verdict"] and after["version"] == told["version"] != before["version"]
    assert after["verdict"]["calibration"]["split"] == "val" and after["sha256"] == sha
    assert task != "classify" or "classes" not in after["verdict"]
    assert cli_main(["calibrate", "--weights", str(out / "best"), "--data", str(data), "--max-escape", "2"]) == 2
    assert "--max-escape" in capsys.readouterr().err

    # --tta: the same evaluation with flipped views averaged in (the manifest has none)
    assert metrics["tta"] == []
    args = ["eval", "--weights", str(out / "best"), "--data", str(data), "--split", "val", "--json"]
    assert cli_main([*args, "--tta", "hflip"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["tta"] == ["hflip"]
    assert cli_main([*args, "--tta", "rot90"]) == 2
    assert "tta" in capsys.readouterr().err


def test_resume_without_checkpoint_fails_clearly(tmp_path):
    data = make_classify(tmp_path / "data")
    with pytest.raises(FileNotFoundError, match="resume"):
        train(TrainConfig(task="classify", data=str(data), out=str(tmp_path / "none"), resume=True))


def test_resume_reads_saved_configurations_with_options_train_does_not_have():
    """A saved run configuration may hold paste_edge / paste_scale / erase: at their no-effect values they
    are left out and the run resumes as trained; set otherwise, --resume is refused with the option named."""
    from model.train import TrainConfigError, _saved_options

    saved = dataclasses.asdict(TrainConfig(task="classify", data="d", copy_paste=0.5))
    old = {**saved, "paste_edge": False, "paste_scale": 1.0, "erase": 0.0}
    assert TrainConfig(**_saved_options(old)) == TrainConfig(**saved)
    assert _saved_options(saved) == saved
    for key, value, flag in (("paste_edge", True, "--paste-edge"), ("paste_scale", 0.5, "--paste-scale"),
                             ("erase", 0.2, "--erase")):
        with pytest.raises(TrainConfigError, match=f"^--resume: .*{flag}"):
            _saved_options({**old, key: value})


def test_resume_refuses_options_that_disagree_with_the_run(tmp_path, capsys):
    """--resume continues the saved run with its own task, data and recipe: an option given with another
    value (another task, data folder or learning rate) is refused with the option named, before anything
    is read or written; the same command again with --resume (the data spelled otherwise, the length and
    the machine's options changed) continues the run."""
    data = make_classify(tmp_path / "data")
    out = tmp_path / "run"
    train(TrainConfig(task="classify", data=str(data), out=str(out), imgsz=32, batch=4, epochs=1, workers=0,
                      max_train_batches=1), progress=False)
    state = (out / "last.pt").read_bytes()
    same = ["train", "--task", "classify", "--data", str(data), "--imgsz", "32", "--batch", "4", "--out", str(out),
            "--resume", "--quiet"]
    for argv, message in (
        ([*same[:2], "detect", "--data", str(make_detect(tmp_path / "voc")), *same[5:]],
         "--task detect: the run in " + str(out) + " was trained with --task classify"),
        ([*same[:4], str(make_classify(tmp_path / "other")), *same[5:]], "--data " + str(tmp_path / "other")),
        ([*same, "--lr", "0.01"], f"--lr 0.01: the run in {out} was trained with --lr {RECIPE_LR}"),
        ([*same, "--seed", "1"], f"--seed 1: the run in {out} was trained with --seed 42"),
        ([*same, "--no-aux-mask"], f"--no-aux-mask: the run in {out} was trained with the auxiliary mask head"),
    ):
        capsys.readouterr()
        assert cli_main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: " + message) and "Traceback" not in err, (argv, err)
        assert len(err.strip().splitlines()) == 1
    assert (out / "last.pt").read_bytes() == state
    assert [int(r["epoch"]) for r in csv.DictReader(open(out / "log.csv"))] == [1]

    again = [*same[:4], str(data) + "/", *same[5:], "--lr", str(RECIPE_LR), "--epochs", "2", "--workers", "0",
             "--threads", "1", "--device", "cpu", "--time-limit", "60", "--max-train-batches", "1"]
    assert cli_main(again) == 0
    assert [int(r["epoch"]) for r in csv.DictReader(open(out / "log.csv"))] == [1, 2]


def test_resume_from_a_damaged_state_names_the_file(tmp_path, capsys):
    from model.checkpoint import CheckpointError

    data = make_classify(tmp_path / "data")
    out = tmp_path / "run"
    out.mkdir()
    (out / "last.pt").write_text("garbage\n")
    with pytest.raises(CheckpointError, match="last.pt is not a training state"):
        train(TrainConfig(task="classify", data=str(data), out=str(out), resume=True), progress=False)
    torch.save({"model": {}}, out / "last.pt")  # a torch file, but not a run's state
    for _ in range(2):
        assert cli_main(["train", "--task", "classify", "--data", str(data), "--out", str(out), "--resume"]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: --resume: {out / 'last.pt'} is not a training state"), err
        assert "Traceback" not in err and "weights_only" not in err
        (out / "last.pt").write_text("garbage\n")


def test_time_limit_shrinks_the_epochs_and_still_exports(tmp_path):
    """--time-limit: a budget that one epoch already exceeds ends the run after that epoch, validated and
    exported; the schedule was fitted to one epoch (the LR reached its final value), and the config of
    the run records the epochs it really had. Resuming with a new budget continues from there."""
    data = make_classify(tmp_path / "data")
    out = tmp_path / "run"
    base = dict(task="classify", data=str(data), out=str(out), imgsz=32, batch=4, workers=0,
                max_train_batches=2, warmup_epochs=0)
    res = train(TrainConfig(**base, epochs=5, time_limit=1e-4), progress=False)
    rows = list(csv.DictReader(open(out / "log.csv")))
    assert [int(r["epoch"]) for r in rows] == [1]
    assert "val_top1" in rows[0] and res["best_epoch"] == 1
    assert float(rows[0]["lr"]) == pytest.approx(RECIPE_LR * 0.01, rel=1e-3)  # cosine ran to its end
    assert json.loads((out / "config.json").read_text())["epochs"] == 1
    # resumed with a generous budget: runs to the asked --epochs, on the device this invocation names
    res = train(TrainConfig(**{**base, "epochs": 2, "time_limit": 60.0, "resume": True, "device": "cpu"}),
                progress=False)
    rows = list(csv.DictReader(open(out / "log.csv")))
    assert [int(r["epoch"]) for r in rows] == [1, 2]


def make_magnetic_tile(root: Path) -> Path:
    """A miniature of the magnetic-tile layout: MT_<Class>/Imgs/<stem>.jpg + <stem>.png mask."""
    rng = np.random.default_rng(3)
    stems = _stems(24)
    for i, stem in enumerate(stems):
        cls = ["MT_Blowhole", "MT_Free"][i % 2]
        d = root / cls / "Imgs"
        d.mkdir(parents=True, exist_ok=True)
        img, mask, _ = _square(rng, cls != "MT_Free")
        Image.fromarray(img).save(d / f"{stem}.jpg", quality=95)
        Image.fromarray(mask).save(d / f"{stem}.png")
    return root


def test_classify_with_mask_head_and_backbone_init(tmp_path):
    """Magnetic-tile-like data carries masks: the classifier trains an auxiliary mask head (its loss is
    logged) that is not exported, and --init-backbone copies a segmenter's backbone in."""
    data = make_magnetic_tile(tmp_path / "mt")
    seg = train(TrainConfig(task="segment", data=str(data), epochs=1, imgsz=64, crop=48, batch=4,
                            out=str(tmp_path / "seg"), workers=0, max_train_batches=1), progress=False)
    out = tmp_path / "cls"
    train(TrainConfig(task="classify", data=str(data), epochs=1, imgsz=64, batch=4, out=str(out),
                      workers=0, max_train_batches=2, init_backbone=seg["best_dir"]), progress=False)
    row = next(csv.DictReader(open(out / "log.csv")))
    assert float(row["loss_mask"]) > 0 and float(row["loss_cls"]) > 0
    pred = Predictor.from_folder(out / "best")
    assert pred.classes[-1] == "MT_Free"
    assert not any(k.startswith("aux") for k in pred.model.state_dict())
    # the segmenter has the same classes as the mask head, so its decoder initialised the head too: two
    # warm-up steps later the run's mask model is still next to it, far from a fresh decoder
    src = Predictor.from_folder(seg["best_dir"], fuse=False).model.decoder.state_dict()
    got = Predictor.from_folder(out / "best-mask", fuse=False).model.decoder.state_dict()
    fresh = build_model("segment", "tiny", len(pred.classes)).decoder.state_dict()
    dist = sum(float((got[k].float() - src[k].float()).abs().sum()) for k in src)
    dist_fresh = sum(float((fresh[k].float() - src[k].float()).abs().sum()) for k in src)
    assert dist < 0.1 * dist_fresh, (dist, dist_fresh)


def test_classify_with_masks_also_exports_its_mask_head_as_a_segmenter(tmp_path):
    """One classify run on masked data yields two models: the classifier and, from the same backbone plus
    the auxiliary decoder, a segmenter validated on its own (val_mask_* columns), exported by
    --export-mask with a segment manifest; a resumed run keeps that model's EMA and best score."""
    data = make_magnetic_tile(tmp_path / "mt")
    out, cls_dst, seg_dst = tmp_path / "run", tmp_path / "w-cls", tmp_path / "w-seg"
    cfg = TrainConfig(task="classify", data=str(data), epochs=1, imgsz=64, batch=4, out=str(out), workers=0,
                      max_train_batches=2)
    res = train(cfg, progress=False)
    assert res["export_mask"] is None and (out / "best-mask" / "manifest.json").exists()
    res = train(dataclasses.replace(cfg, epochs=2, resume=True, export=str(cls_dst), export_mask=str(seg_dst)),
                progress=False)
    assert res["export_mask"] == str(seg_dst)
    rows = list(csv.DictReader(open(out / "log.csv")))
    assert len(rows) == 2 and all(0 <= float(r["val_mask_miou"]) <= 1 for r in rows)
    state = torch.load(out / "last.pt", weights_only=True)
    assert state["best_mask"] == max(float(r["val_mask_miou"]) for r in rows)

    seg = Predictor.from_folder(seg_dst, fuse=False)  # its tensors as saved
    assert seg.task == "segment" and seg.classes[0] == "background" and "MT_Blowhole" in seg.classes
    assert seg.manifest["metrics"]["split"] == "val" and "miou" in seg.manifest["metrics"]
    cls = Predictor.from_folder(cls_dst)
    assert cls.task == "classify"
    assert seg.name != cls.name and seg.name in (seg_dst.name, f"{cls.name}-mask")  # both can be served
    # the segmenter's backbone is the run's (EMA) backbone, not a fresh one: it differs from a new init
    fresh = build_model("segment", "tiny", 2).state_dict()
    got = seg.model.state_dict()
    assert any(not torch.equal(got[k].float(), fresh[k].float()) for k in fresh if k.startswith("backbone."))
    assert "verdict" in seg.predict([np.full((80, 96, 3), 128, np.uint8)])[0]


@pytest.mark.parametrize("variant", ["base", "large"])
def test_export_mask_of_the_larger_variants_loads_and_predicts(variant, tmp_path):
    """--export-mask builds the segmenter from the classifier's variant (layer scale in base/large, drop
    path in large): the exported folder loads with that variant's architecture and predicts."""
    data = make_magnetic_tile(tmp_path / "mt")
    seg_dst = tmp_path / "w-seg"
    train(TrainConfig(task="classify", data=str(data), variant=variant, epochs=1, imgsz=64, batch=4,
                      out=str(tmp_path / "run"), workers=0, max_train_batches=1, max_val_images=4,
                      export_mask=str(seg_dst)), progress=False)
    seg = Predictor.from_folder(seg_dst, fuse=False)
    arch = seg.manifest["arch"]
    assert seg.task == "segment" and arch["variant"] == variant and arch["layer_scale"] == 1e-5  # the classifier's
    got = seg.model.state_dict()
    ref = build_model("segment", variant, len(seg.classes), layer_scale=1e-5).state_dict()
    assert got.keys() == ref.keys() and all(got[k].shape == ref[k].shape for k in ref)
    assert "verdict" in seg.predict([np.full((80, 96, 3), 128, np.uint8)])[0]


def test_copy_paste_trains_defects_pasted_onto_defect_free_images(tmp_path, capsys, monkeypatch):
    """--copy-paste P: the classify training set hands out defect images rebuilt on a defect-free image of
    the set (same label, the pasted mask); data without masks is refused with a message."""
    from model.data.datasets import ClassifyDataset
    from model.data.readers import load_records

    data = make_magnetic_tile(tmp_path / "mt")
    recs = load_records(data, "classify").records
    ds = ClassifyDataset(recs, imgsz=64, train=True, with_mask=True, paste=1.0)
    free = [i for i, r in enumerate(recs) if not ds._has_defect(i)]
    assert free and len(free) < len(recs)
    import model.data.datasets as datasets

    calls = []
    real = datasets.paste_defect
    monkeypatch.setattr(datasets, "paste_defect", lambda *a, **k: calls.append(a[2]) or real(*a, **k))
    items = [ds[i] for i in range(len(recs))]
    monkeypatch.undo()
    assert len(calls) == len(recs) - len(free)  # every defect image, never a defect-free one
    assert all(any(c is ds.load_image(j) for j in free) for c in calls)  # pasted onto defect-free tiles
    for i, it in enumerate(items):
        assert int(it["label"]) == recs[i].label
        assert bool((it["mask"] == 1).any()) == (i not in free)  # the defect (and its class) survives
    with pytest.raises(ValueError, match="paste"):
        ClassifyDataset(recs, imgsz=64, train=False, paste=0.5)

    out = tmp_path / "run"
    res = train(TrainConfig(task="classify", data=str(data), epochs=1, imgsz=64, batch=4, out=str(out),
                            workers=0, max_train_batches=2, copy_paste=0.5), progress=False)
    assert Path(res["best_dir"]).exists()
    plain = make_classify(tmp_path / "plain")
    assert cli_main(["train", "--task", "classify", "--data", str(plain), "--copy-paste", "0.5", "--quiet",
                     "--out", str(tmp_path / "p")]) == 2
    assert "--copy-paste needs a data folder" in capsys.readouterr().err


def test_defect_keep_reaches_the_training_crop(tmp_path, monkeypatch, capsys):
    """--defect-keep F: the classify training set's random crops keep at least F of the defect pixels
    (ClassifyAugment.min_defect_keep; the validation set is not cropped); recorded in config.json."""
    import model.train as train_module

    made = []
    real = train_module.ClassifyDataset

    def spy(*a, **k):
        made.append(real(*a, **k))
        return made[-1]

    monkeypatch.setattr(train_module, "ClassifyDataset", spy)
    data = make_magnetic_tile(tmp_path / "mt")
    out = tmp_path / "run"
    assert cli_main(["train", "--task", "classify", "--data", str(data), "--epochs", "1", "--imgsz", "64",
                     "--batch", "4", "--workers", "0", "--defect-keep", "0.2", "--max-train-batches", "1",
                     "--out", str(out), "--quiet"]) == 0
    assert [d.augment.min_defect_keep for d in made if d.train] == [0.2]
    assert json.loads((out / "config.json").read_text())["defect_keep"] == 0.2
    plain = make_classify(tmp_path / "plain")  # no masks: nothing to keep, refused rather than ignored
    assert cli_main(["train", "--task", "classify", "--data", str(plain), "--defect-keep", "0.2", "--quiet",
                     "--out", str(tmp_path / "p")]) == 2
    assert "--defect-keep needs a data folder" in capsys.readouterr().err


def test_segment_copy_paste_draws_donors_from_the_same_folder_by_defect_area(tmp_path, capsys, monkeypatch):
    """--copy-paste P for segment: an image gets a piece of a donor's defects pasted in; donors come from
    the image's own data folder, in proportion to their defect-pixel fraction (none without defects)."""
    import model.data.datasets as datasets
    from model.data import SegmentDataset
    from model.train import _load_data

    a, b = make_segment(tmp_path / "a"), make_segment(tmp_path / "b")
    both, source = _load_data(f"{a},{b}", "segment")
    recs = both.records
    groups = [source[id(r)] for r in recs]
    ds = SegmentDataset(recs, imgsz=64, train=True, paste=1.0, paste_groups=groups).preload()
    masks = {}
    for i in range(len(recs)):
        m = np.zeros(ds.load_image(i).shape[:2], np.uint8)
        m[: i % 4] = 1  # rows of defect: 0 (no defect: never a donor), 1, 2 or 3
        masks[i] = m
    ds._masks = masks
    table = ds.donor_table()
    assert set(table) == {str(a), str(b)}
    for g, (idx, p) in table.items():
        assert all(groups[j] == g and j % 4 for j in idx)  # own folder, defect images only
        assert np.isclose(p.sum(), 1.0)
        rows = np.array([j % 4 for j in idx], float)
        assert np.allclose(p, rows / rows.sum())  # in proportion to the defect area
    calls = []
    real = datasets.paste_segment
    monkeypatch.setattr(datasets, "paste_segment", lambda *a, **k: calls.append((a[0], a[2])) or real(*a, **k))
    for i in range(len(recs)):
        item = ds[i]
        assert item["mask"].shape == item["image"].shape[-2:]
        src, dst = calls[-1]
        assert dst is ds.load_image(i)
        donor = next(j for j in range(len(recs)) if ds.load_image(j) is src)
        assert groups[donor] == groups[i] and donor % 4
    monkeypatch.undo()
    for bad in ({"paste": 1.5, "train": True}, {"paste": 0.5, "train": False},
                {"paste": 0.5, "train": True, "paste_groups": groups[:3]}):
        with pytest.raises(ValueError, match="paste"):
            SegmentDataset(recs, imgsz=64, **bad)

    out = tmp_path / "run"
    assert cli_main(["train", "--task", "segment", "--data", f"{a},{b}", "--epochs", "1", "--imgsz", "64",
                     "--batch", "4", "--workers", "0", "--copy-paste", "0.5", "--max-train-batches", "1",
                     "--out", str(out), "--quiet"]) == 0
    assert json.loads((out / "config.json").read_text())["copy_paste"] == 0.5
    assert cli_main(["train", "--task", "detect", "--data", str(a), "--copy-paste", "0.5", "--quiet",
                     "--out", str(tmp_path / "d")]) == 2
    assert "--copy-paste P needs --task segment" in capsys.readouterr().err


def test_several_data_folders_with_the_same_classes_combine(tmp_path):
    from model.train import _load_data, _sampler

    a, b = make_segment(tmp_path / "a"), make_segment(tmp_path / "b")
    single, _ = _load_data(str(a), "segment")
    both, source = _load_data(f"{a},{b}", "segment")
    assert len(both.records) == 2 * len(single.records)
    assert both.class_names("segment") == single.class_names("segment")
    # each folder weighs the same in sampling, however many images it has
    small = [r for r in both.records if source[id(r)] == str(b)][:4]
    recs = [r for r in both.records if source[id(r)] == str(a)] + small
    w = _sampler(recs, "segment", 0.5, source).weights.numpy()
    n_a = len(recs) - len(small)
    assert np.isclose(w[:n_a].sum(), w[n_a:].sum())
    assert _sampler(single.records, "segment", 0.5, {}) is None  # one folder, no labels: uniform
    # different class lists cannot be mixed
    c, m = make_classify(tmp_path / "c"), make_magnetic_tile(tmp_path / "m")
    with pytest.raises(ValueError, match="cannot train on both"):
        _load_data(f"{c},{m}", "classify")


def test_fg_sampling_weights_images_by_their_defect_fraction_inside_each_folder(tmp_path, capsys):
    """--fg-sampling P: weight × max(fraction, floor) ** P, normalised inside each data folder, so the
    folders keep equal shares; the fraction ignores the 255 (ignore) pixels; the CLI trains with it."""
    from model.data import SegmentDataset
    from model.train import FG_FLOOR, _load_data, _sampler, defect_fractions

    a, b = make_segment(tmp_path / "a"), make_segment(tmp_path / "b")
    both, source = _load_data(f"{a},{b}", "segment")
    in_b = [r for r in both.records if source[id(r)] == str(b)]
    recs = [r for r in both.records if source[id(r)] == str(a)] + in_b[:4]
    n_a = len(recs) - 4
    fg = np.array([0.0] + [0.01] * (n_a - 2) + [0.04] + [0.02, 0.02, 0.02, 0.08])
    plain = _sampler(recs, "segment", 0.5, source).weights.numpy()
    w = _sampler(recs, "segment", 0.5, source, fg=fg, fg_power=1.0).weights.numpy()
    assert np.isclose(w[:n_a].sum(), w[n_a:].sum())  # the dataset balance is kept
    assert np.isclose(w[n_a - 1] / w[1], 4.0) and np.isclose(w[-1] / w[n_a], 4.0)  # ∝ fraction inside a folder
    assert np.isclose(w[0] / w[1], FG_FLOOR / 0.01)  # no defect pixels: the floor, not zero
    w_sqrt = _sampler(recs, "segment", 0.5, source, fg=fg, fg_power=0.5).weights.numpy()
    assert np.isclose(w_sqrt[n_a - 1] / w_sqrt[1], 2.0)
    assert np.allclose(_sampler(recs, "segment", 0.5, source, fg=fg, fg_power=0.0).weights.numpy(), plain)
    with pytest.raises(ValueError, match="entries"):
        _sampler(recs, "segment", 0.5, source, fg=fg[:3], fg_power=1.0)

    single, _ = _load_data(str(a), "segment")
    ds = SegmentDataset(single.records[:3], imgsz=64).preload()
    masks = [np.zeros((10, 10), np.uint8) for _ in range(3)]
    masks[1][:2] = 1  # 20 % defect
    masks[2][:5] = 255  # ignored pixels are not defects
    masks[2][5] = 1
    ds._masks = dict(enumerate(masks))
    first = defect_fractions(ds)
    assert np.allclose(first, [0.0, 0.2, 0.1])
    ds.load_mask = None  # computed once: the second use (copy-paste donors beside --fg-sampling) reads no mask
    assert defect_fractions(ds) is first and not first.flags.writeable
    assert set(ds.donor_table()[0][0].tolist()) == {1, 2}

    out = tmp_path / "run"
    assert cli_main(["train", "--task", "segment", "--data", str(a), "--epochs", "1", "--imgsz", "64",
                     "--batch", "4", "--workers", "0", "--fg-sampling", "1", "--rotate", "30",
                     "--exposure", "0.5", "--max-train-batches", "1", "--out", str(out), "--quiet"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["fg_sampling"] == 1.0 and config["rotate"] == 30.0 and config["exposure"] == 0.5
    assert cli_main(["train", "--task", "classify", "--data", str(a), "--fg-sampling", "1", "--quiet",
                     "--out", str(tmp_path / "c")]) == 2
    assert "--fg-sampling P needs --task segment" in capsys.readouterr().err


def test_ema_follows_the_ramped_decay_and_copies_integer_buffers():
    """The EMA's fused update equals avg·d + cur·(1 − d) with d = decay·(1 − exp(−n/2000)); BatchNorm's
    integer step counter follows the model."""
    import math

    from model.train import _ema

    net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    ema = _ema(net, 0.999)
    ema.update_parameters(net)  # first update copies
    before = ema.module[0].weight.detach().clone()
    with torch.no_grad():
        net[0].weight.add_(1.0)
    net[1].num_batches_tracked += 7
    ema.update_parameters(net)  # n = 1
    d = 0.999 * (1 - math.exp(-1 / 2000))
    assert torch.allclose(ema.module[0].weight, before * d + net[0].weight.detach() * (1 - d), atol=1e-7)
    assert int(ema.module[1].num_batches_tracked) == 7


def test_init_weights_continues_from_a_weights_folder_of_the_same_model(tmp_path):
    from model.checkpoint import CheckpointError, load_model

    data = make_classify(tmp_path / "data")
    base = dict(task="classify", data=str(data), imgsz=32, batch=4, workers=0, max_train_batches=1, epochs=1)
    train(TrainConfig(**base, out=str(tmp_path / "a")), progress=False)
    src, _ = load_model(tmp_path / "a" / "best")
    # zero optimiser steps: the model equals its source (the EMA's first update copies it)
    train(TrainConfig(**{**base, "max_train_batches": 0}, out=str(tmp_path / "b"),
                      init_weights=str(tmp_path / "a" / "best")), progress=False)
    got, manifest = load_model(tmp_path / "b" / "best")
    src_manifest = json.loads((tmp_path / "a" / "best" / "manifest.json").read_text())
    assert manifest["initialised_from"] == [{"how": "init_weights", "folder": str(tmp_path / "a" / "best"),
                                             "name": src_manifest["name"], "version": src_manifest["version"],
                                             "sha256": src_manifest["sha256"]}]
    for k, v in src.state_dict().items():
        assert torch.equal(got.state_dict()[k], v), k
    with pytest.raises(CheckpointError, match="needs"):
        train(TrainConfig(**{**base, "variant": "small"}, out=str(tmp_path / "c"),
                          init_weights=str(tmp_path / "a" / "best")), progress=False)


def test_a_detector_continued_from_another_keeps_its_nms_threshold(tmp_path):
    from model.checkpoint import read_manifest, save_model, update_verdict

    src = save_model(build_model("detect", "tiny", 1), tmp_path / "src",
                     {"classes": ["spot"], "arch": {"input_size": [64, 64]}, "postprocess": {"iou": 0.45}})
    base = dict(task="detect", data=str(make_detect(tmp_path / "data")), imgsz=64, batch=4, workers=0,
                max_train_batches=0, epochs=1)
    train(TrainConfig(**base, out=str(tmp_path / "b"), init_weights=str(src), keep_epochs=True), progress=False)
    assert read_manifest(tmp_path / "b" / "best")["postprocess"] == {"iou": 0.45}
    # resumed after the source folder changed (e.g. --export to it): the threshold the run started with
    update_verdict(src, read_manifest(src)["verdict"], {"iou": 0.6})
    train(TrainConfig(**{**base, "epochs": 2}, out=str(tmp_path / "b"), init_weights=str(src), resume=True),
          progress=False)
    assert read_manifest(tmp_path / "b" / "epochs" / "002")["postprocess"] == {"iou": 0.45}
    train(TrainConfig(**base, out=str(tmp_path / "c")), progress=False)
    assert read_manifest(tmp_path / "c" / "best")["postprocess"] == {"iou": 0.7}  # from scratch: the default


def test_time_limit_refits_the_schedule_so_the_run_ends_annealed():
    """After the first epochs the horizon only shrinks, to what the measured epoch time leaves; the LR
    is re-set on the new cosine at once (so the last epoch runs at the final LR, not cut off mid-way)."""
    import time

    from model.train import _fit_time_limit, _lr_lambda

    cfg = TrainConfig(task="classify", data="x", epochs=50, time_limit=10.0, val_every=1).resolved()
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=1e-3)
    iters = 10
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(50 * iters, 0, cfg.lr_final))
    for _ in range(5 * iters):
        opt.step()
        sched.step()
    history = [{"epoch": e, "train_s": 20.0, "val_s": 10.0} for e in range(1, 5)]
    now = time.time()
    # epoch 5 trained in 20 s; 150 s of the 600 s budget used: (600 - 150 - 10) // 30 = 14 more epochs
    _fit_time_limit(cfg, 5, 1, 50, now - 150.0, now - 20.0, history, sched, iters, 0)
    assert cfg.epochs == 5 + 14
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-3 * _lr_lambda(19 * iters, 0, cfg.lr_final)(5 * iters))
    # later, slower epochs: the horizon shrinks again; it never grows back after the first two epochs
    history.append({"epoch": 5, "train_s": 20.0, "val_s": 10.0})
    _fit_time_limit(cfg, 6, 1, 50, now - 580.0, now - 20.0, history, sched, iters, 0)
    assert cfg.epochs == 6  # nothing fits: this epoch is the last
    cfg2 = dataclasses.replace(cfg, epochs=8)
    _fit_time_limit(cfg2, 6, 1, 50, now - 10.0, now - 1.0, history, sched, iters, 0)
    assert cfg2.epochs == 8


def test_close_mosaic_trains_the_last_epochs_on_whole_images(tmp_path, monkeypatch, capsys):
    import model.data.augment as augment

    data = make_detect(tmp_path / "data")
    calls = []
    real = augment.mosaic4
    monkeypatch.setattr(augment, "mosaic4", lambda *a, **k: calls.append(1) or real(*a, **k))
    base = dict(task="detect", data=str(data), imgsz=64, batch=4, workers=0, max_train_batches=2, epochs=3)
    train(TrainConfig(**base, out=str(tmp_path / "a")), progress=False)
    per_epoch, rest = divmod(len(calls), 3)
    assert per_epoch >= 2 * 4 and rest == 0  # recipe: every training image is a mosaic
    calls.clear()
    capsys.readouterr()
    train(TrainConfig(**base, out=str(tmp_path / "b"), close_mosaic=2), progress=False)
    assert len(calls) == per_epoch  # only the first epoch
    assert "epoch 2: mosaic off for the last 2 epoch(s)" in capsys.readouterr().out
    # on resume the switch is made again (a fresh dataset starts with mosaic on)
    calls.clear()
    train(TrainConfig(**{**base, "epochs": 4}, out=str(tmp_path / "b"), resume=True), progress=False)
    assert len(calls) == 0
    # the CLI refuses it where it means nothing
    for task, n in (("classify", "2"), ("detect", "-1")):
        assert cli_main(["train", "--task", task, "--data", str(data), "--close-mosaic", n]) == 2
    assert "--close-mosaic" in capsys.readouterr().err


def test_select_folders_picks_the_epoch_by_the_mean_of_each_folders_val_metric(tmp_path, monkeypatch):
    """--select folders: validation scores each data folder's val images on their own (one inference pass,
    the same numbers as evaluating that folder alone), logs them, and the best epoch is the one with the
    highest mean of the folders' metric — not the pooled metric, where the larger folder dominates."""
    import model.train as train_mod
    from model.evaluate import evaluate

    a, b = make_segment(tmp_path / "a"), make_segment(tmp_path / "b")
    both, source = train_mod._load_data(f"{a},{b}", "segment")
    recs = both.records
    groups = [Path(source[id(r)]).name for r in recs]
    net = build_model("segment", "tiny", 2).eval()
    manifest = {"name": "t", "task": "segment", "classes": ["background", "defect"], "mean": [0.5] * 3,
                "std": [0.25] * 3, "arch": {"variant": "tiny", "input_size": [64, 64], "num_classes": 2}}
    pred = Predictor(net, manifest, device="cpu")
    m = evaluate(pred, recs, progress=False, groups=groups)
    for g in ("a", "b"):
        alone = evaluate(pred, [r for r, gg in zip(recs, groups, strict=True) if gg == g], progress=False)
        assert m["by_group"][g]["miou"] == pytest.approx(alone["miou"])
        assert m["by_group"][g]["num_images"] == alone["num_images"] == len(recs) // 2
    assert m["miou"] == pytest.approx(evaluate(pred, recs, progress=False)["miou"])  # pooled as before
    with pytest.raises(ValueError, match="groups"):
        evaluate(pred, recs, progress=False, groups=groups[:-1])
    # folders with the same base name are told apart by their paths
    twin = make_segment(tmp_path / "x" / "a")
    _, src = train_mod._load_data(f"{a},{twin}", "segment")
    assert train_mod._folder_labels(src) == {str(a): str(a), str(twin): str(twin)}
    assert train_mod._folder_labels(source) == {str(a): "a", str(b): "b"}

    # the training loop: scripted val results where the pooled and the per-folder rules disagree
    scripted = iter([  # epoch 1: pooled 0.8, folders (0.9 + 0.3) / 2 = 0.6; epoch 2: pooled 0.7, folders 0.75
        {"miou": 0.8, "by_group": {"a": {"miou": 0.9}, "b": {"miou": 0.3}}},
        {"miou": 0.7, "by_group": {"a": {"miou": 0.8}, "b": {"miou": 0.7}}}])
    seen = []

    def fake_evaluate(predictor, val, **kw):
        seen.append(kw.get("groups"))
        return next(scripted)

    monkeypatch.setattr(train_mod, "evaluate", fake_evaluate)
    out = tmp_path / "run"
    res = train(TrainConfig(task="segment", data=f"{a},{b}", epochs=2, imgsz=64, batch=4, workers=0,
                            max_train_batches=1, select="folders", out=str(out)), progress=False)
    assert res["best_epoch"] == 2 and res["best"]["miou"] == pytest.approx(0.75)
    assert sorted(set(seen[0])) == ["a", "b"] and len(seen[0]) == sum(1 for r in recs if split_of(r.stem) == "val")
    rows = list(csv.DictReader(open(out / "log.csv")))
    assert [float(r["val_select_miou"]) for r in rows] == [0.6, 0.75]
    assert [float(r["val_b_miou"]) for r in rows] == [0.3, 0.7]
    saved = json.loads((out / "best" / "manifest.json").read_text())["metrics"]
    assert saved["epoch"] == 2 and saved["select_miou"] == 0.75 and saved["miou"] == 0.7


@pytest.mark.parametrize(("overrides", "flag"), [
    ({"epochs": 0}, "--epochs"),
    ({"batch": 0}, "--batch"),
    ({"imgsz": 16}, "--imgsz"),
    ({"lr": 0.0}, "--lr"),
    ({"weight_decay": -0.1}, "--weight-decay"),
    ({"warmup_epochs": -1.0}, "--warmup-epochs"),
    ({"val_every": 0}, "--val-every"),
    ({"time_limit": 0.0}, "--time-limit"),
    ({"workers": -1}, "--workers"),
    ({"variant": "huge"}, "--variant"),
    ({"crop": 64}, "--crop"),  # segment only
    ({"close_mosaic": 2}, "--close-mosaic"),  # detect only
    ({"export_mask": "x", "aux_mask": False}, "--export-mask"),
    ({"copy_paste": 1.5}, "--copy-paste"),
    ({"copy_paste": 0.5, "aux_mask": False}, "--copy-paste"),
    ({"task": "detect", "copy_paste": 0.5}, "--copy-paste"),  # classify / segment only
    ({"task": "segment", "copy_paste": 1.5}, "--copy-paste"),
    ({"fg_sampling": 1.0}, "--fg-sampling"),  # segment only
    ({"task": "segment", "fg_sampling": -1.0}, "--fg-sampling"),
    ({"task": "segment", "fg_sampling": 5.0}, "--fg-sampling"),
    ({"ema_decay": 1.0}, "ema_decay"),
    ({"rotate": 30.0}, "--rotate"),  # segment only
    ({"task": "segment", "rotate": 200.0}, "--rotate"),
    ({"task": "segment", "defect_keep": 0.2}, "--defect-keep"),  # classify only
    ({"defect_keep": 0.0}, "--defect-keep"),
    ({"defect_keep": 1.5}, "--defect-keep"),
    ({"task": "detect", "exposure": 0.5}, "--exposure"),  # classify / segment only
    ({"exposure": -0.5}, "--exposure"),
    ({"exposure": 2.0}, "--exposure"),
    ({"balance": -0.5}, "--balance"),
    ({"balance": 1.5}, "--balance"),
    ({"task": "detect", "balance": 0.5}, "--balance"),  # classify / segment only
    ({"select": "best"}, "--select"),
    ({"select": "folders"}, "--select"),  # one data folder: nothing to average over
    ({"task": "count"}, "--task"),
])
def test_train_config_errors_name_the_option_before_any_work(overrides, flag, tmp_path):
    """A library caller gets the errors the CLI gives: nothing is read or written, no silent no-op."""
    from model.train import TrainConfigError

    data = make_classify(tmp_path / "data")
    out = tmp_path / "run"
    with pytest.raises(TrainConfigError, match=f"^{flag}"):
        train(TrainConfig(**{"task": "classify", "data": str(data), "out": str(out), "workers": 0, **overrides}),
              progress=False)
    assert not out.exists()
    # the same options are accepted where they mean something
    TrainConfig(task="segment", data=str(data), crop=64).resolved().validate()
    TrainConfig(task="detect", data=str(data), close_mosaic=0).resolved().validate()
    TrainConfig(task="segment", data=str(data), fg_sampling=1.0).resolved().validate()
    TrainConfig(task="segment", data=f"{data},{data}", select="folders").resolved().validate()
    TrainConfig(task="segment", data=str(data), rotate=180.0).resolved().validate()
    TrainConfig(task="classify", data=str(data), exposure=1.5).resolved().validate()
    TrainConfig(task="classify", data=str(data), copy_paste=0.5).resolved().validate()
    TrainConfig(task="classify", data=str(data), defect_keep=0.2).resolved().validate()
    TrainConfig(task="segment", data=str(data), exposure=0.7).resolved().validate()
    assert TrainConfig(task="classify", data=str(data), balance=0.0).resolved().validate().balance == 0.0
    assert TrainConfig(task="detect", data=str(data)).resolved().validate().balance == 0.0  # the recipe's


def test_train_and_eval_cli_answer_bad_input_with_a_message_and_exit_2(tmp_path, capsys):
    data = make_classify(tmp_path / "data")
    cases = [
        (["train", "--task", "classify", "--data", str(tmp_path / "missing")], "data folder not found"),
        (["train", "--task", "classify", "--data", str(data), "--epochs", "0"], "--epochs must be >= 1"),
        (["train", "--task", "classify", "--data", str(data), "--imgsz", "8"], "--imgsz must be >= 32"),
        (["train", "--task", "classify", "--data", str(data), "--out", str(tmp_path / "r"), "--resume"],
         "no " + str(tmp_path / "r" / "last.pt")),
        (["train", "--task", "classify", "--data", str(data), "--out", str(tmp_path / "i"), "--quiet",
          "--init-weights", str(tmp_path / "nowhere")], str(tmp_path / "nowhere")),
    ]
    for argv, message in cases:
        capsys.readouterr()
        assert cli_main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and "Traceback" not in err, (argv, err)

    out = tmp_path / "ok"
    train(TrainConfig(task="classify", data=str(data), out=str(out), imgsz=64, batch=4, epochs=1, workers=0,
                      max_train_batches=1), progress=False)
    other = make_classify(tmp_path / "other")
    (other / "bad").rename(other / "worse")
    for argv, message in (
        (["eval", "--weights", str(out / "best"), "--data", str(tmp_path / "missing")], "data folder not found"),
        (["eval", "--weights", str(out / "best"), "--data", str(make_segment(tmp_path / "seg"))],
         "supports segment, not 'classify'"),
        (["eval", "--weights", str(out / "best"), "--data", str(other)], "differ from the model's"),
    ):
        capsys.readouterr()
        assert cli_main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err, (argv, err)


def test_train_refuses_a_device_it_cannot_use_before_any_work(tmp_path, capsys, monkeypatch):
    """--device cuda where torch sees no GPU, or a name that is no device: one line, exit 2, nothing written."""
    import model.device

    monkeypatch.setattr(model.device, "gpu_available", lambda: False)
    data = make_classify(tmp_path / "data")
    out = tmp_path / "run"
    for device, message in (("cuda", "--device cuda: torch sees no CUDA GPU here"),
                            ("cuda:1", "--device cuda:1: torch sees no CUDA GPU here"),
                            ("bogus", "--device must be auto, cpu, cuda or cuda:N, got 'bogus'")):
        assert cli_main(["train", "--task", "classify", "--data", str(data), "--out", str(out), "--quiet",
                         "--device", device]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: " + message) and "Traceback" not in err, err
        assert not out.exists()


def test_train_refuses_output_paths_it_cannot_write_before_training(tmp_path, capsys):
    """--out / --export / --export-mask that is an existing file, or that would be made under a file (or
    in a folder not writable), is refused before any work."""
    import os

    data = make_classify(tmp_path / "data")
    a_file = tmp_path / "a-file"
    a_file.write_text("keep me")
    out = tmp_path / "run"
    base = ["train", "--task", "classify", "--data", str(data), "--quiet", "--epochs", "1", "--imgsz", "32",
            "--workers", "0", "--max-train-batches", "1"]
    cases = [
        (["--out", str(a_file)], f"--out {a_file}: exists and is not a folder"),
        (["--out", str(a_file / "run")], f"--out {a_file / 'run'}: {a_file} is not a folder"),
        (["--out", str(out), "--export", str(a_file)], f"--export {a_file}: exists and is not a folder"),
        (["--out", str(out), "--export", str(a_file / "w")], f"--export {a_file / 'w'}: {a_file} is not a folder"),
    ]
    if os.geteuid() != 0:  # (root writes into any folder)
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o555)
        cases.append((["--out", str(out), "--export", str(locked / "w")], f"--export {locked / 'w'}: {locked} "
                                                                          "is not writable"))
    for extra, message in cases:
        assert cli_main([*base, *extra]) == 2, extra
        err = capsys.readouterr().err
        assert err.startswith("error: " + message) and "Traceback" not in err, err
        assert not out.exists() and a_file.read_text() == "keep me"


def test_export_mask_without_masks_is_refused_before_training(tmp_path, capsys):
    """--export-mask where no mask head is trained (data without masks) is refused, as --copy-paste is,
    rather than ignored with exit 0."""
    data = make_classify(tmp_path / "data")
    out, mask_dst = tmp_path / "run", tmp_path / "w-seg"
    assert cli_main(["train", "--task", "classify", "--data", str(data), "--quiet", "--epochs", "1", "--imgsz", "32",
                     "--workers", "0", "--max-train-batches", "1", "--out", str(out),
                     "--export-mask", str(mask_dst)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --export-mask needs a data folder whose images all have defect masks"), err
    assert not mask_dst.exists() and not (out / "last.pt").exists()


def test_train_answers_a_failed_export_with_where_the_weights_are(tmp_path, capsys, monkeypatch):
    """A copy to --export that fails at the end of the run (a full disk): one line naming the option and
    the run's best/ folder, which holds the trained weights; exit 1."""
    import errno
    import shutil

    data = make_classify(tmp_path / "data")
    out, dst = tmp_path / "run", tmp_path / "w"

    def full(src, dst, **kw):
        raise OSError(errno.ENOSPC, "No space left on device", str(dst))

    monkeypatch.setattr(shutil, "copy2", full)
    assert cli_main(["train", "--task", "classify", "--data", str(data), "--quiet", "--epochs", "1", "--imgsz",
                     "32", "--batch", "4", "--workers", "0", "--max-train-batches", "1", "--out", str(out),
                     "--export", str(dst)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: --export {dst}: could not copy the best weights there") and "Traceback" not in err
    assert "No space left on device" in err and err.rstrip().endswith(f"the trained weights are in {out / 'best'}")
    assert (out / "best" / "model.safetensors").is_file()


def test_train_run_folder_defaults_to_runs_name(tmp_path, capsys, monkeypatch):
    """Without --out the run folder is runs/NAME: --name, else <data folder>-<task>; the help says so."""
    data = make_classify(tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    base = ["train", "--task", "classify", "--data", str(data), "--quiet", "--epochs", "1", "--imgsz", "32",
            "--batch", "4", "--workers", "0", "--max-train-batches", "1"]
    assert cli_main([*base, "--name", "foo"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["out"] == str(Path("runs") / "foo")
    assert (tmp_path / "runs" / "foo" / "best" / "manifest.json").is_file()
    with pytest.raises(SystemExit):
        cli_main(["train", "--help"])
    shown = " ".join(capsys.readouterr().out.split())
    assert "--out OUT run folder (default runs/NAME, NAME being --name)" in shown
    assert "(default <data folder>-<task>)" in shown


def test_train_and_eval_cli_run_without_the_service_dependencies(tmp_path):
    """`s2amnet train` / `eval` (`python -m app.cli`) need only the model's dependencies: a GPU machine's
    image has torch but not pydantic, FastAPI or redis-py."""
    import subprocess
    import sys

    data = make_segment(tmp_path / "data")
    out = tmp_path / "run"
    blocked = ["pydantic", "pydantic_settings", "fastapi", "starlette", "uvicorn", "redis", "multipart",
               "python_multipart", "prometheus_client", "httpx"]
    code = (f"import sys\nfor m in {blocked!r}: sys.modules[m] = None  # import of each raises ImportError\n"
            "from app.cli import main\n"
            f"rc = main(['train', '--task', 'segment', '--data', {str(data)!r}, '--epochs', '1', '--imgsz', '64',"
            f" '--batch', '4', '--workers', '0', '--max-train-batches', '1', '--out', {str(out)!r}, '--quiet'])\n"
            f"rc = rc or main(['eval', '--weights', {str(out / 'best')!r}, '--data', {str(data)!r}, '--json'])\n"
            "sys.exit(rc)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[2],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "best" / "model.safetensors").is_file()
    evaluated = json.loads(proc.stdout.splitlines()[-1])  # eval --json: the last line
    assert evaluated["task"] == "segment" and 0 <= evaluated["miou"] <= 1


def test_keep_epochs_saves_every_validated_epoch(tmp_path):
    """--keep-epochs: each validated epoch's EMA weights, a loadable weights folder whose manifest carries
    that epoch's val metrics (the ones in log.csv); epochs not validated are not saved; best/ is unchanged."""
    data = make_classify(tmp_path / "data")
    out = tmp_path / "run"
    assert cli_main(["train", "--task", "classify", "--data", str(data), "--epochs", "3", "--val-every", "2",
                     "--imgsz", "64", "--batch", "4", "--workers", "0", "--max-train-batches", "1",
                     "--keep-epochs", "--out", str(out), "--quiet"]) == 0
    assert json.loads((out / "config.json").read_text())["keep_epochs"] is True
    assert sorted(p.name for p in (out / "epochs").iterdir()) == ["002", "003"]  # every 2nd and the last
    rows = {int(r["epoch"]): r for r in csv.DictReader(open(out / "log.csv"))}
    for name in ("002", "003"):
        manifest = json.loads((out / "epochs" / name / "manifest.json").read_text())
        assert manifest["metrics"]["epoch"] == int(name)
        assert manifest["metrics"]["top1"] == pytest.approx(float(rows[int(name)]["val_top1"]))
        assert Predictor.from_folder(out / "epochs" / name).task == "classify"
    best = json.loads((out / "best" / "manifest.json").read_text())["metrics"]["epoch"]
    kept = load_file(out / "epochs" / f"{best:03d}" / "model.safetensors")
    assert all(torch.equal(v, load_file(out / "best" / "model.safetensors")[k]) for k, v in kept.items())
    # without the flag nothing is kept
    assert cli_main(["train", "--task", "classify", "--data", str(data), "--epochs", "1", "--imgsz", "64",
                     "--batch", "4", "--workers", "0", "--max-train-batches", "1", "--out", str(tmp_path / "r2"),
                     "--quiet"]) == 0
    assert not (tmp_path / "r2" / "epochs").exists()


def test_balance_sets_the_class_sampling_strength(tmp_path, monkeypatch):
    """--balance P: the training sampler draws each image with weight (its class's count) ** -P; the recipe's
    0.5 when not given; recorded in config.json."""
    import model.train as mt
    from model.data.readers import load_records

    data = make_classify(tmp_path / "data")
    for p in sorted((data / "bad").iterdir())[:8]:  # 12 good, 4 bad
        p.unlink()
    seen = []
    real = mt._sampler
    monkeypatch.setattr(mt, "_sampler", lambda recs, task, power, *a, **k: seen.append(power) or real(recs, task,
                                                                                                       power, *a, **k))
    for extra, want in (([], 0.5), (["--balance", "1"], 1.0), (["--balance", "0"], 0.0)):
        out = tmp_path / f"run{len(seen)}"
        assert cli_main(["train", "--task", "classify", "--data", str(data), "--epochs", "1", "--imgsz", "64",
                         "--batch", "4", "--workers", "0", "--max-train-batches", "1", "--out", str(out),
                         "--quiet", *extra]) == 0
        assert seen[-1] == want
        assert json.loads((out / "config.json").read_text())["balance"] == want
    # what the strength does: 1 gives every class the same total weight, 0.5 the square root of its count
    recs = load_records(str(data), "classify").records
    labels = np.array([r.label for r in recs])
    counts = np.bincount(labels)
    assert counts.tolist() == [4, 12]  # (class indices in name order: bad, good)
    for power in (1.0, 0.5):
        w = real(recs, "classify", power).weights.numpy()
        totals = np.array([w[labels == c].sum() for c in range(2)])
        assert np.allclose(totals / totals[0], (counts / counts[0]) ** (1 - power))
    assert real(recs, "classify", 0.0) is None  # uniform: no sampler
