"""Evaluation through the Predictor: the detect NMS threshold it evaluates at, and choosing that threshold
(`nms_iou_sweep`, `s2amnet eval --iou`, `s2amnet calibrate --nms-iou`)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from app.cli import main as cli_main
from model import build_model, save_model
from model.data import load_records, split_records
from model.evaluate import evaluate, nms_iou_sweep
from model.predictor import Predictor
from model.verdict import part_metrics

# Every 64 × 64 image has one ground-truth box, TRUTH. What the model answers depends on the image's grey
# level; each pair of boxes overlaps with an IoU of 0.6, so NMS at 0.5 merges it and NMS at 0.7 keeps both.
TRUTH = (0, 0, 40, 40)
ANSWERS = {
    # on the truth (IoU 0.82, 0.95) and a duplicate beside it (IoU 0.48 with the truth, 0.9): NMS at 0.5
    # removes the false positive
    80: ([[4.0, 0, 44, 40], [14, 0, 54, 40]], [0.95, 0.9]),
    # two boxes beside the truth: B (0.7) overlaps it enough to locate the defect (IoU 0.43), A (0.8) does not
    # (0.21); NMS at 0.5 leaves A alone: the part fails for a box in the wrong place, an escape
    120: ([[26.0, 0, 66, 40], [16, 0, 56, 40]], [0.8, 0.7]),
    # one box on the truth (0.85)
    160: ([[0.0, 0, 40, 40]], [0.85]),
}
# so NMS at 0.5 has the better mAP50 (the duplicate at 0.9 no longer outranks the true box at 0.85) and
# NMS at 0.7 the better verdicts (no escape)


def _level(record) -> int:
    return int(np.asarray(record.load_image()).flat[0])


@pytest.fixture
def folders(tmp_path, monkeypatch):
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    (data / "labels").mkdir()
    (data / "classes.txt").write_text("spot\n")
    levels = list(ANSWERS)
    x1, y1, x2, y2 = TRUTH
    for i in range(90):
        grey = levels[i % 3]
        Image.fromarray(np.full((64, 64), grey, np.uint8)).save(data / "images" / f"img{i:03d}.png")
        (data / "labels" / f"img{i:03d}.txt").write_text(
            f"0 {(x1 + x2) / 128} {(y1 + y2) / 128} {(x2 - x1) / 64} {(y2 - y1) / 64}\n")
    val = split_records(load_records(data, "detect").records_for("detect"), "val")
    assert {_level(r) for r in val} == set(levels)  # every kind in val
    weights = save_model(build_model("detect", "tiny", 1), tmp_path / "det",
                         {"classes": ["spot"], "arch": {"input_size": [64, 64]}, "version": "1.0.0",
                          "postprocess": {"iou": 0.5}})

    def infer(self, arrays):
        out = []
        for a in arrays:
            boxes, scores = ANSWERS[int(a[0, 32, 32])]
            out.append({"boxes": torch.tensor(boxes), "scores": torch.tensor(scores)[:, None]})
        return out

    monkeypatch.setattr(Predictor, "infer", infer)
    return data, weights, val


def test_the_sweep_gives_each_thresholds_metrics_and_outcomes_from_one_pass(folders, tmp_path):
    data, weights, val = folders
    p = Predictor.from_folder(weights)
    sweep = nms_iou_sweep(p, val, [0.5, 0.7], progress=False)
    assert sweep[0.5]["map50"] > sweep[0.7]["map50"] + 0.03
    escaped = {iou: part_metrics(m["outcomes"], p.verdict_rule, p.classes)["escaped"] for iou, m in sweep.items()}
    assert escaped == {0.5: sum(_level(r) == 120 for r in val), 0.7: 0}
    for iou in (0.5, 0.7):  # the same figures as evaluating at that threshold
        p.nms_iou = iou
        m = evaluate(p, val, progress=False)
        assert m["map50"] == pytest.approx(sweep[iou]["map50"]) and m["parts"]["escaped"] == escaped[iou]
    with pytest.raises(ValueError, match="detect setting"):
        classify = save_model(build_model("classify", "tiny", 2), tmp_path / "cls", {"classes": ["a", "b"]})
        nms_iou_sweep(Predictor.from_folder(classify), val, [0.5])


def test_eval_and_calibrate_choose_and_keep_the_nms_threshold(folders, capsys):
    data, weights, _ = folders
    base = ["--weights", str(weights), "--data", str(data), "--split", "val"]
    assert cli_main(["eval", *base, "--json"]) == 0  # the manifest's 0.5
    at_05 = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert at_05["nms_iou"] == 0.5 and at_05["parts"]["escaped"] > 0
    assert cli_main(["eval", *base, "--json", "--iou", "0.7"]) == 0
    at_07 = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert at_07["nms_iou"] == 0.7 and at_07["map50"] < at_05["map50"] and at_07["parts"]["escaped"] == 0

    # the verdict comes first: 0.7, where the rule meets the bounds, although 0.5 has the better mAP50
    assert cli_main(["calibrate", *base, "--max-escape", "0", "--nms-iou", "0.5,0.7"]) == 0
    printed = capsys.readouterr().out
    assert f"0.5    {at_05['map50']:.4f}  {at_05['parts']['escaped']:>7}  NOT met" in printed
    assert f"0.7    {at_07['map50']:.4f}        0  met" in printed
    assert "NMS IoU threshold: 0.5 -> 0.7" in printed
    manifest = json.loads((weights / "manifest.json").read_text())
    assert manifest["postprocess"] == {"iou": 0.7} and manifest["version"] == "1.1.0"
    assert manifest["verdict"]["calibration"]["nms_iou"]["0.7"] == {"map50": round(at_07["map50"], 4),
                                                                    "met": True, "escaped": 0}
    assert Predictor.from_folder(weights).nms_iou == 0.7
    # where the bounds hold at both values, the better mAP50 decides
    assert cli_main(["calibrate", *base, "--max-escape", "1", "--nms-iou", "0.5,0.7", "--json"]) == 0
    told = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert told["postprocess"] == {"iou": 0.5} == json.loads((weights / "manifest.json").read_text())["postprocess"]

    manifest = json.loads((weights / "manifest.json").read_text())
    for bad in ("0,0.5", "x", "1.5"):
        assert cli_main(["calibrate", *base, "--max-escape", "1", "--nms-iou", bad]) == 2
        assert "--nms-iou" in capsys.readouterr().err
    assert cli_main(["eval", *base, "--iou", "0"]) == 2
    assert "--iou" in capsys.readouterr().err
    assert json.loads((weights / "manifest.json").read_text()) == manifest  # refused: nothing written


@pytest.mark.parametrize(("command", "args", "message"), [
    ("eval", ["--batch", "0"], "argument --batch: must be >= 1, got 0"),
    ("eval", ["--batch", "-1"], "argument --batch: must be >= 1, got -1"),
    ("calibrate", ["--max-escape", "0", "--batch", "0"], "argument --batch: must be >= 1, got 0"),
    ("eval", ["--device", "bogus"], "--device bogus: not a torch device"),
    ("calibrate", ["--max-escape", "0", "--device", "bogus"], "--device bogus: not a torch device"),
    ("eval", ["--tta", "hflip,spin"], "--tta takes distinct views from hflip, vflip (or none), not 'hflip,spin'"),
    ("eval", ["--plot", "."], "--plot . is a folder; name a file"),
    ("eval", ["--plot", "no/such/folder/p.png"], "--plot no/such/folder/p.png: no folder no/such/folder"),
])
def test_eval_and_calibrate_refuse_bad_options_before_any_work(folders, capsys, command, args, message):
    data, weights, _ = folders
    manifest = (weights / "manifest.json").read_text()
    argv = [command, "--weights", str(weights), "--data", str(data), "--split", "val", *args]
    try:
        code = cli_main(argv)
    except SystemExit as exc:  # argparse's own refusal
        code = exc.code
    assert code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err
    assert (weights / "manifest.json").read_text() == manifest


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_eval_on_a_gpu_that_is_not_there_says_so(folders, capsys):
    data, weights, _ = folders
    assert cli_main(["eval", "--weights", str(weights), "--data", str(data), "--device", "cuda"]) == 2
    assert "--device cuda: torch sees no CUDA GPU here; use --device cpu" in capsys.readouterr().err


def test_eval_names_an_image_whose_pixels_do_not_decode(folders, capsys):
    data, weights, val = folders
    image = val[0].image
    image.write_bytes(image.read_bytes()[:60])  # the header reads, the pixels are cut off
    assert cli_main(["eval", "--weights", str(weights), "--data", str(data), "--split", "val"]) == 2
    err = capsys.readouterr().err
    assert f"{image}: not a readable image" in err and "Traceback" not in err, err
