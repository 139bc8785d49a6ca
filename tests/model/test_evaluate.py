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
from model.data.readers import split_of
from model.evaluate import evaluate, nms_iou_sweep
from model.predictor import Predictor

# one ground-truth box per 64 × 64 image; the model answers two boxes of the same class that overlap each
# other with IoU 0.67: A (0.9) lies beside the truth (IoU 0.43, a false positive), B (0.8) on it (IoU 0.67).
# NMS at 0.5 lets A remove B (nothing found: AP50 0); at 0.7 both stay (B found after one false positive:
# AP50 0.5).
TRUTH = (0, 0, 40, 40)
ANSWER = torch.tensor([[16.0, 0, 56, 40], [8, 0, 48, 40]]), torch.tensor([[0.9], [0.8]])


@pytest.fixture
def folders(tmp_path, monkeypatch):
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    (data / "labels").mkdir()
    (data / "classes.txt").write_text("spot\n")
    stems = [f"img{i:03d}" for i in range(40)]
    assert "val" in {split_of(s) for s in stems}
    x1, y1, x2, y2 = TRUTH
    for stem in stems:
        Image.fromarray(np.full((64, 64), 80, np.uint8)).save(data / "images" / f"{stem}.png")
        (data / "labels" / f"{stem}.txt").write_text(f"0 {(x1 + x2) / 128} {(y1 + y2) / 128} {(x2 - x1) / 64} "
                                                     f"{(y2 - y1) / 64}\n")
    weights = save_model(build_model("detect", "tiny", 1), tmp_path / "det",
                         {"classes": ["spot"], "arch": {"input_size": [64, 64]}, "version": "1.0.0",
                          "postprocess": {"iou": 0.5}})
    monkeypatch.setattr(Predictor, "infer",
                        lambda self, arrays: [{"boxes": ANSWER[0], "scores": ANSWER[1]} for _ in arrays])
    return data, weights


def test_the_sweep_gives_each_thresholds_metrics_from_one_pass(folders, tmp_path):
    data, weights = folders
    p = Predictor.from_folder(weights)
    records = split_records(load_records(data, "detect").records_for("detect"), "val")
    sweep = nms_iou_sweep(p, records, [0.5, 0.7], progress=False)
    assert sweep[0.5]["map50"] == pytest.approx(0.0) and sweep[0.7]["map50"] == pytest.approx(0.5, abs=0.01)
    for iou in (0.5, 0.7):  # the same figures as evaluating at that threshold
        p.nms_iou = iou
        assert evaluate(p, records, progress=False)["map50"] == pytest.approx(sweep[iou]["map50"])
    with pytest.raises(ValueError, match="detect setting"):
        classify = save_model(build_model("classify", "tiny", 2), tmp_path / "cls", {"classes": ["a", "b"]})
        nms_iou_sweep(Predictor.from_folder(classify), records, [0.5])


def test_eval_and_calibrate_choose_and_keep_the_nms_threshold(folders, capsys):
    data, weights = folders
    base = ["--weights", str(weights), "--data", str(data), "--split", "val"]
    assert cli_main(["eval", *base, "--json"]) == 0  # the manifest's 0.5
    told = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert told["nms_iou"] == 0.5 and told["map50"] == pytest.approx(0.0)
    assert cli_main(["eval", *base, "--json", "--iou", "0.7"]) == 0
    told = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert told["nms_iou"] == 0.7 and told["map50"] == pytest.approx(0.5, abs=0.01)

    assert cli_main(["calibrate", *base, "--max-escape", "1", "--nms-iou", "0.5,0.7"]) == 0
    printed = capsys.readouterr().out
    assert "mAP50 by NMS IoU threshold: 0.5: 0.0000, 0.7: 0.5" in printed
    assert "NMS IoU threshold: 0.5 -> 0.7" in printed
    manifest = json.loads((weights / "manifest.json").read_text())
    assert manifest["postprocess"] == {"iou": 0.7} and manifest["version"] == "1.1.0"
    assert manifest["verdict"]["calibration"]["nms_iou_map50"] == {"0.5": 0.0, "0.7": pytest.approx(0.5, abs=0.01)}
    assert Predictor.from_folder(weights).nms_iou == 0.7

    for bad in ("0,0.5", "x", "1.5"):
        assert cli_main(["calibrate", *base, "--max-escape", "1", "--nms-iou", bad]) == 2
        assert "--nms-iou" in capsys.readouterr().err
    assert cli_main(["eval", *base, "--iou", "0"]) == 2
    assert "--iou" in capsys.readouterr().err
    assert json.loads((weights / "manifest.json").read_text()) == manifest  # refused: nothing written
