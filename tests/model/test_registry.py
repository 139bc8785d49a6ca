"""build_model: tasks, variants, per-task layer-scale/drop-path defaults, shapes, clear input errors."""

from __future__ import annotations

import pytest
import torch

from model import build_model
from model.registry import TASKS, Classifier, Detector, Segmenter, canonical_variant, task_defaults

# parameter totals of the published reference configurations (classify nc=10, segment nc=2, detect nc=5)
REFERENCE = {
    "classify": {"tiny": 638_834, "small": 1_392_442, "base": 2_439_682, "large": 5_396_626},
    "segment": {"tiny": 718_778, "small": 1_484_658, "base": 2_540_074, "large": 5_519_514},
    "detect": {"tiny": 2_271_335, "small": 3_140_271, "base": 4_315_127, "large": 7_588_743},
}
NC = {"classify": 10, "segment": 2, "detect": 5}


def _nparams(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


@pytest.fixture(scope="module")
def tiny_models():
    torch.manual_seed(0)
    return {t: build_model(t, "tiny", NC[t]).eval() for t in TASKS}


def test_registry_lists_three_tasks():
    assert set(TASKS) == {"classify", "segment", "detect"}
    assert TASKS["classify"].cls is Classifier and TASKS["segment"].cls is Segmenter
    assert TASKS["detect"].cls is Detector


@pytest.mark.parametrize("task", ["classify", "segment", "detect"])
@pytest.mark.parametrize("variant", ["tiny", "small"])
def test_param_counts_match_design(task, variant):
    m = build_model(task, variant, NC[task])
    assert _nparams(m) == REFERENCE[task][variant]
    assert m.task == task and m.variant == variant and m.num_classes == NC[task]
    assert hasattr(m, "backbone") and all(
        k.startswith(("backbone.", "head.", "decoder.", "neck.")) for k in m.state_dict()
    )


def test_layer_scale_and_drop_path_defaults_per_task():
    # D5 table: classify base LS, large LS + dp 0.1; segment none; detect base none, large LS + dp 0.1
    assert task_defaults("classify", "base")["layer_scale"] == 1e-5
    assert task_defaults("classify", "large")["drop_path"] == pytest.approx(0.1)
    assert task_defaults("segment", "large")["layer_scale"] is None
    assert task_defaults("segment", "large")["drop_path"] == 0.0
    assert task_defaults("detect", "base")["layer_scale"] is None
    assert task_defaults("detect", "large")["layer_scale"] == 1e-5
    cls_b = build_model("classify", "base", 10)
    assert any(k.endswith("gamma1") for k in cls_b.state_dict())
    assert cls_b.layer_scale == 1e-5 and cls_b.drop_path == 0.0
    seg_b = build_model("segment", "b", 2)
    assert not any(k.endswith("gamma1") for k in seg_b.state_dict())
    # overridable
    off = build_model("classify", "base", 10, layer_scale=None)
    assert not any(k.endswith("gamma1") for k in off.state_dict())
    on = build_model("segment", "tiny", 2, layer_scale=0.1, drop_path=0.05)
    assert on.layer_scale == 0.1 and on.drop_path == 0.05
    assert _nparams(on) == REFERENCE["segment"]["tiny"] + 2 * (4 * 128 + 2 * 256)


def test_aliases_and_unknown_names():
    assert canonical_variant("T") == "tiny" and canonical_variant("s") == "small"
    assert build_model("classify", "T", 3).variant == "tiny"
    with pytest.raises(ValueError, match="unknown task 'detekt'.*classify"):
        build_model("detekt")
    with pytest.raises(ValueError, match="unknown variant 'huge'.*tiny"):
        build_model("classify", "huge")
    with pytest.raises(ValueError, match="background"):
        build_model("segment", "tiny", 1)
    with pytest.raises(ValueError):
        build_model("classify", "tiny", 0)


def test_forward_shapes(tiny_models):
    x = torch.randn(2, 3, 33, 47)
    with torch.no_grad():
        assert tiny_models["classify"](x).shape == (2, 10)
        assert tiny_models["segment"](x).shape == (2, 2, 33, 47)
        det = tiny_models["detect"]
        raw = det(torch.randn(1, 3, 64, 96))
        assert [tuple(r.shape) for r in raw] == [(1, 69, 8, 12), (1, 69, 4, 6), (1, 69, 2, 3)]
        boxes, scores = det.decode(raw)
    assert boxes.shape == (1, 8 * 12 + 4 * 6 + 2 * 3, 4) and scores.shape == (1, 126, 5)
    assert det.strides == (8, 16, 32) and det.reg_max == 16
    assert 0 <= float(scores.min()) and float(scores.max()) <= 1


@pytest.mark.parametrize("task", ["classify", "segment", "detect"])
def test_input_errors_are_clear(task, tiny_models):
    m = tiny_models[task]
    with pytest.raises(ValueError, match="expected 3 channels, got 1"):
        m(torch.randn(1, 1, 64, 64))
    with pytest.raises(ValueError, match="height=31, width=64.*at least 32"):
        m(torch.randn(1, 3, 31, 64))
    with pytest.raises(ValueError, match="4-D tensor"):
        m(torch.randn(3, 64, 64))


def test_minimum_size_runs(tiny_models):
    with torch.no_grad():
        assert tiny_models["classify"](torch.randn(1, 3, 32, 32)).shape == (1, 10)
        assert tiny_models["segment"](torch.randn(1, 3, 32, 32)).shape == (1, 2, 32, 32)


def test_pretrained_cfg_and_arch(tiny_models):
    cfg = tiny_models["detect"].pretrained_cfg
    assert tuple(cfg["input_size"]) == (512, 512) and cfg["resize"] == "letterbox"
    assert tuple(tiny_models["classify"].pretrained_cfg["input_size"]) == (224, 224)
    arch = tiny_models["detect"].arch()
    assert arch["variant"] == "tiny" and arch["num_classes"] == 5 and arch["reg_max"] == 16


@pytest.mark.parametrize("variant", ["tiny", "large"])  # large: layer scale and drop path
@pytest.mark.parametrize("task", ["classify", "segment", "detect"])
def test_fuse_folds_every_batchnorm_and_keeps_outputs(task, variant):
    """TaskModel.fuse folds the BatchNorms of backbone *and* head (the detector's Conv units, the segment
    decoder's DSC units); with non-trivial running statistics the outputs stay equal up to rounding."""
    import copy

    torch.manual_seed(3)
    m = build_model(task, variant, NC[task])
    bns = [mod for mod in m.modules() if isinstance(mod, torch.nn.BatchNorm2d)]
    head_bns = [n for n, mod in m.named_modules()
                if isinstance(mod, torch.nn.BatchNorm2d) and not n.startswith("backbone.")]
    assert bool(head_bns) == (task != "classify"), head_bns  # decoder, neck, head; the classify head has none
    with torch.no_grad():
        for bn in bns:  # a fresh BN (mean 0, var 1, affine 1/0) would make folding a near no-op
            bn.running_mean.normal_(0.0, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_(0.0, 0.2)
    m.eval()
    fused = copy.deepcopy(m).fuse()
    assert fused.is_fused and not m.is_fused
    assert not any(isinstance(mod, torch.nn.BatchNorm2d) for mod in fused.modules())
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        ref, out = m(x), fused(x)
    refs, outs = (ref, out) if isinstance(ref, (list, tuple)) else ((ref,), (out,))
    for a, b in zip(outs, refs, strict=True):
        assert a.shape == b.shape
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-4), float((a - b).abs().max())
    with pytest.raises(RuntimeError, match="inference-only"):
        fused.train()
    fused.eval()  # eval stays allowed
    m.train()  # the original is untouched and still trains
