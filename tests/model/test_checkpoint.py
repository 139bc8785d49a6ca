"""safetensors + manifest.json weights folders: round trip, sha256, clear errors, backbone transfer (D6)."""

from __future__ import annotations

import json
import struct

import pytest
import torch

from model import build_model, load_model, save_model
from model.checkpoint import (
    MANIFEST_FILE,
    WEIGHTS_FILE,
    CheckpointError,
    bump_minor,
    describe_state_dict,
    find_weights,
    load_backbone_from,
    read_manifest,
    update_verdict,
)

MANIFESTS = {
    "classify": {
        "classes": ["ok", "scratch", "dent"],
        "verdict": {"type": "classify", "pass_labels": ["ok"]},
    },
    "segment": {"classes": ["background", "crack"]},
    "detect": {"classes": ["a", "b", "c"]},
}


def _save(task, tmp_path, name=None, **man):
    torch.manual_seed(0)
    model = build_model(task, "tiny", len(MANIFESTS[task]["classes"])).eval()
    folder = save_model(model, tmp_path / (name or task), {**MANIFESTS[task], "version": "1.2", **man})
    return model, folder


def _edit_manifest(folder, fn):
    path = folder / MANIFEST_FILE
    m = json.loads(path.read_text())
    fn(m)
    path.write_text(json.dumps(m))


@pytest.mark.parametrize("task", ["classify", "segment", "detect"])
def test_roundtrip_identical_outputs(task, tmp_path):
    model, folder = _save(task, tmp_path, metrics={"top1": 0.9}, trained_on="unit test")
    assert (folder / WEIGHTS_FILE).is_file() and (folder / MANIFEST_FILE).is_file()
    loaded, manifest = load_model(folder)
    assert not loaded.training
    assert manifest["task"] == task and manifest["arch"]["variant"] == "tiny"
    assert manifest["arch"]["num_classes"] == len(MANIFESTS[task]["classes"])
    assert manifest["name"] == task and manifest["version"] == "1.2" and manifest["metrics"] == {"top1": 0.9}
    assert len(manifest["sha256"]) == 64 and len(manifest["mean"]) == 3
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        a, b = model(x), loaded(x)
    if task == "detect":
        for ra, rb in zip(a, b, strict=True):
            assert torch.equal(ra, rb)
    else:
        assert torch.equal(a, b)
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k


def test_file_is_safetensors_not_pickle(tmp_path):
    _, folder = _save("detect", tmp_path)
    data = (folder / WEIGHTS_FILE).read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    assert header["__metadata__"]["task"] == "detect"
    assert header["__metadata__"]["variant"] == "tiny"
    assert not data.startswith(b"\x80") and b"PK\x03\x04" not in data[:8]  # no pickle / torch zip
    text = (folder / MANIFEST_FILE).read_text()
    assert list(json.loads(text))[:4] == ["name", "version", "task", "arch"]


def test_sha256_mismatch(tmp_path):
    _, folder = _save("classify", tmp_path)
    raw = bytearray((folder / WEIGHTS_FILE).read_bytes())
    raw[-1] ^= 0xFF
    (folder / WEIGHTS_FILE).write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="sha256"):
        load_model(folder)


def test_missing_things(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no manifest.json"):
        load_model(tmp_path / "empty")
    _, folder = _save("classify", tmp_path)
    (folder / WEIGHTS_FILE).unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load_model(folder)
    _, folder = _save("classify", tmp_path, name="bad_json")
    (folder / MANIFEST_FILE).write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_model(folder)
    _, folder = _save("classify", tmp_path, name="no_sha")
    _edit_manifest(folder, lambda m: m.pop("sha256"))
    with pytest.raises(CheckpointError, match="sha256"):
        load_model(folder)


def test_num_classes_mismatch_says_what_the_weights_are(tmp_path):
    _, folder = _save("detect", tmp_path)

    def fewer(m):
        m["arch"]["num_classes"] = 2
        m["classes"] = ["a", "b"]

    _edit_manifest(folder, fewer)
    with pytest.raises(CheckpointError, match=r"num_classes=2.*head has 3 classes, not 2"):
        load_model(folder)


def test_variant_and_task_mismatch(tmp_path):
    _, folder = _save("segment", tmp_path)
    _edit_manifest(folder, lambda m: m["arch"].update(variant="small"))
    with pytest.raises(CheckpointError, match="backbone is variant 'tiny', not 'small'"):
        load_model(folder)
    _, folder = _save("segment", tmp_path, name="seg2")

    def as_classify(m):
        m["task"] = "classify"
        m["verdict"] = {"type": "classify", "pass_labels": ["background"]}

    _edit_manifest(folder, as_classify)
    with pytest.raises(CheckpointError, match="segment model, not classify"):
        load_model(folder)


def test_manifest_validation(tmp_path):
    _, folder = _save("segment", tmp_path)
    _edit_manifest(folder, lambda m: m.update(classes=["crack", "background"]))
    with pytest.raises(CheckpointError, match="background"):
        read_manifest(folder)
    _edit_manifest(folder, lambda m: m.update(classes=["background"]))
    with pytest.raises(CheckpointError, match="1 classes but arch.num_classes is 2"):
        read_manifest(folder)
    _edit_manifest(folder, lambda m: m.update(classes=["background", "crack"], verdict={"type": "maybe"}))
    with pytest.raises(CheckpointError, match="verdict type"):
        read_manifest(folder)
    _edit_manifest(folder, lambda m: m.update(verdict=None, task="segmentation"))
    with pytest.raises(CheckpointError, match="task 'segmentation'"):
        read_manifest(folder)
    _, folder = _save("classify", tmp_path)
    _edit_manifest(folder, lambda m: m["verdict"].update(pass_labels=["OK"]))
    with pytest.raises(CheckpointError, match=r"pass_labels \['OK'\]"):
        read_manifest(folder)


WRONG_TYPES = [  # edits of a detect manifest, and the field the error names
    pytest.param(lambda m: m["verdict"].update(min_score="high"),
                 r"verdict min_score must be a number within \[0, 1\], got 'high'", id="min_score"),
    pytest.param(lambda m: m["verdict"].update(min_score=True), "verdict min_score", id="min_score-bool"),
    pytest.param(lambda m: m["verdict"].update(min_area="big"), r"verdict min_area must be a number >= 0, got 'big'",
                 id="min_area"),
    pytest.param(lambda m: m["verdict"].update(classes={"b": {"min_score": None}}), "verdict classes.b.min_score",
                 id="class-min_score"),
    pytest.param(lambda m: m["verdict"].update(classes={"b": {"min_area": "big"}}), "verdict classes.b.min_area",
                 id="class-min_area"),
    pytest.param(lambda m: m.update(mean=["a", "b", "c"]), "manifest mean must be 1 or 3 numbers", id="mean"),
    pytest.param(lambda m: m.update(std=[0.2, None, 0.2]), "manifest std", id="std"),
    pytest.param(lambda m: m.update(preprocess={"pad_value": "x"}), "preprocess.pad_value", id="pad_value"),
    pytest.param(lambda m: m.update(preprocess="letterbox"), "preprocess must be an object", id="preprocess"),
    pytest.param(lambda m: m["arch"].update(in_chans="3"), "arch.in_chans must be a positive integer", id="in_chans"),
    pytest.param(lambda m: m["arch"].update(reg_max=16.5), "arch.reg_max", id="reg_max"),
    pytest.param(lambda m: m["arch"].update(layer_scale="x"), "arch.layer_scale", id="layer_scale"),
    pytest.param(lambda m: m.update(tta=[["hflip"]]), "manifest tta", id="tta"),
]


@pytest.mark.parametrize(("edit", "match"), WRONG_TYPES)
def test_manifest_fields_of_the_wrong_type_are_refused_naming_the_field(tmp_path, edit, match):
    _, folder = _save("detect", tmp_path)
    _edit_manifest(folder, edit)
    with pytest.raises(CheckpointError, match=match):
        read_manifest(folder)
    with pytest.raises(CheckpointError, match=match):
        load_model(folder)


def test_classify_pass_labels_must_be_a_list_of_names(tmp_path):
    _, folder = _save("classify", tmp_path)
    for bad in ("ok", [1], None):
        _edit_manifest(folder, lambda m, bad=bad: m["verdict"].update(pass_labels=bad))
        with pytest.raises(CheckpointError, match="verdict pass_labels must be a list of class names"):
            read_manifest(folder)
    _edit_manifest(folder, lambda m: m["verdict"].update(pass_labels=["ok"], min_area="big"))
    with pytest.raises(CheckpointError, match="verdict min_area"):
        read_manifest(folder)


def test_per_class_verdict_rules(tmp_path):
    _, folder = _save("detect", tmp_path)
    rule = {"type": "any_defect", "min_score": 0.5, "min_area": 0, "classes": {"b": {"min_score": 0.1}},
            "calibration": {"split": "val"}}
    m = update_verdict(folder, rule)
    assert m["version"] == "1.3" and read_manifest(folder)["verdict"] == rule
    sha = m["sha256"]
    for bad, match in (({"zz": {"min_score": 0.1}}, "'zz' is not a defect class"),
                       ({"b": {"min_score": 1.5}}, "within"), ({"b": {"score": 0.1}}, "min_score and/or min_area"),
                       ({"b": {"min_area": -1}}, "min_area")):
        with pytest.raises(CheckpointError, match=match):
            update_verdict(folder, {**rule, "classes": bad})
    assert read_manifest(folder)["version"] == "1.3" and read_manifest(folder)["sha256"] == sha  # untouched
    _, folder = _save("classify", tmp_path)
    with pytest.raises(CheckpointError, match="'ok' is not a defect class"):  # a pass label has no threshold
        update_verdict(folder, {"type": "classify", "pass_labels": ["ok"], "classes": {"ok": {"min_score": 0.2}}})
    assert [bump_minor(v) for v in ("1.0.0", "0.8.0-interim", "1.2", "v2")] == ["1.1.0", "0.9.0-interim", "1.3",
                                                                                 "v2.1"]


def test_detect_manifests_carry_their_nms_iou(tmp_path):
    _, folder = _save("detect", tmp_path)
    assert read_manifest(folder)["postprocess"] == {"iou": 0.7}  # a manifest naming none gets the default
    _, plain = _save("classify", tmp_path)
    assert "postprocess" not in json.loads((plain / MANIFEST_FILE).read_text())  # only detect has one
    rule = read_manifest(folder)["verdict"]
    m = update_verdict(folder, rule, {"iou": 0.5})
    assert m["version"] == "1.3" and read_manifest(folder)["postprocess"] == {"iou": 0.5}
    for bad, match in (({"iou": 0}, r"postprocess.iou must be a number in \(0, 1\]"),
                       ({"iou": 1.5}, "postprocess.iou"), ({"iou": True}, "postprocess.iou"),
                       ({"nms": 0.5}, "'nms' is not a setting of a detect model")):
        with pytest.raises(CheckpointError, match=match):
            update_verdict(folder, rule, bad)
    assert read_manifest(folder)["postprocess"] == {"iou": 0.5} and read_manifest(folder)["version"] == "1.3"
    _edit_manifest(plain, lambda m: m.update(postprocess={"iou": 0.5}))
    with pytest.raises(CheckpointError, match="'iou' is not a setting of a classify model"):
        read_manifest(plain)
    _edit_manifest(plain, lambda m: m.update(postprocess=[0.5]))
    with pytest.raises(CheckpointError, match="postprocess must be an object"):
        read_manifest(plain)


def test_save_rejects_contradictions(tmp_path):
    model = build_model("classify", "tiny", 3)
    with pytest.raises(CheckpointError, match="num_classes"):
        save_model(model, tmp_path / "a", {"arch": {"num_classes": 4}, "classes": list("abcd")})
    with pytest.raises(CheckpointError, match="task"):
        save_model(model, tmp_path / "b", {"task": "detect"})
    with pytest.raises(CheckpointError, match="2 classes"):
        save_model(model, tmp_path / "c", {"classes": ["a", "b"]})
    assert not (tmp_path / "a").exists() or not (tmp_path / "a" / MANIFEST_FILE).exists()


def test_defaults_and_find_weights(tmp_path):
    model = build_model("segment", "tiny", 3)
    folder = save_model(model, tmp_path / "weights" / "seg", {})
    m = read_manifest(folder)
    assert m["classes"][0] == "background" and len(m["classes"]) == 3
    assert m["verdict"] == {"type": "any_defect", "min_score": 0.5, "min_area": 0}
    assert m["arch"]["input_size"] == [512, 512] and m["preprocess"]["resize"] == "letterbox"
    assert find_weights(tmp_path / "weights") == [folder]
    assert find_weights(tmp_path / "missing") == []


def test_describe_state_dict():
    sd = build_model("classify", "small", 7, layer_scale=1e-5).state_dict()
    d = describe_state_dict(sd)
    assert d == {"task": "classify", "variant": "small", "num_classes": 7, "layer_scale": True}


def test_backbone_transfer_classify_to_segment_and_detect(tmp_path):
    torch.manual_seed(1)
    cls = build_model("classify", "tiny", 10).eval()
    folder = save_model(cls, tmp_path / "cls", {})
    seg = build_model("segment", "tiny", 2).eval()
    info = load_backbone_from(seg, folder)
    assert info["ignored"] == [
        "head.classifier.bias",
        "head.classifier.weight",
        "head.norm.bias",
        "head.norm.weight",
    ]
    for k, v in cls.backbone.state_dict().items():
        assert torch.equal(seg.backbone.state_dict()[k], v)
    det = build_model("detect", "tiny", 3)
    load_backbone_from(det, cls.state_dict())
    load_backbone_from(det, cls.backbone)  # a bare backbone module works too
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        for a, b in zip(cls.backbone(x), det.eval().backbone(x), strict=True):
            assert torch.equal(a, b)
    with pytest.raises(CheckpointError, match="different variant"):
        load_backbone_from(build_model("segment", "small", 2), folder)


def test_backbone_transfer_layer_scale(tmp_path):
    torch.manual_seed(2)
    # base classify has layer scale, base segment has none (D6 of the reference)
    cls = build_model("classify", "base", 10).eval()
    with pytest.raises(CheckpointError, match="layer_scale"):
        load_backbone_from(build_model("segment", "base", 2), cls)
    seg = build_model("segment", "base", 2, layer_scale=0.5)
    load_backbone_from(seg, cls)
    assert torch.equal(seg.backbone.stages[3].blocks[0].gamma1, cls.backbone.stages[3].blocks[0].gamma1)
    # no layer scale → target with layer scale: gammas become 1 (same function)
    src = build_model("segment", "tiny", 2).eval()
    dst = build_model("classify", "tiny", 4, layer_scale=1e-5).eval()
    info = load_backbone_from(dst, src)
    assert len(info["filled"]) == 12  # 6 SSAM blocks × (gamma1, gamma2)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        for a, b in zip(src.backbone(x), dst.backbone(x), strict=True):
            torch.testing.assert_close(a, b)


def _record_many(folder: str, worker: int, n: int) -> None:
    from model.checkpoint import record_metrics

    for i in range(n):
        record_metrics(folder, f"w{worker}:{i}", {"miou": worker + i / 100})


def test_concurrent_record_metrics_keep_every_entry(tmp_path):
    """Several `s2amnet eval --record` processes on one weights folder (e.g. one per dataset, run side by
    side): each read-modify-write of the manifest holds a lock, so no process's entry is lost."""
    import multiprocessing as mp

    folder = tmp_path / "w"
    save_model(build_model("segment", "tiny", 2), folder, {"name": "w", "classes": ["background", "crack"]})
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_record_many, args=(str(folder), w, 15)) for w in range(6)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    evals = json.loads((folder / "manifest.json").read_text())["metrics"]["eval"]
    assert sorted(evals) == sorted(f"w{w}:{i}" for w in range(6) for i in range(15))
    assert sorted(p.name for p in folder.iterdir()) == ["manifest.json", "model.safetensors"]  # no lock file
    load_model(folder)  # the weights and their sha256 are untouched
