"""Verdict rules, part-level figures and threshold calibration (model.verdict)."""

from __future__ import annotations

import pytest

from model.verdict import Candidate, PartOutcome, calibrate, part_metrics, threshold_sweep, thresholds, verdict_for

CLASSES = ["crazing", "patches"]


def _part(gt, *cands, regions=True):
    """A defective image of classes ``gt`` (empty: defect-free) with candidates (class, score, localised)."""
    return PartOutcome(defective=bool(gt), gt_classes=tuple(gt), has_regions=regions and bool(gt),
                       candidates=[Candidate(c, s, 100.0, loc) for c, s, loc in cands])


def _score(rule, name):
    return float(thresholds(rule, CLASSES)[0][CLASSES.index(name)])


def _area(rule, name):
    return float(thresholds(rule, CLASSES)[1][CLASSES.index(name)])


def test_thresholds_and_verdict_for():
    rule = {"type": "any_defect", "min_score": 0.5, "min_area": 10, "classes": {"crazing": {"min_score": 0.1}}}
    score, area = thresholds(rule, CLASSES)
    assert score.tolist() == [0.1, 0.5] and area.tolist() == [10, 10]
    assert verdict_for(rule, [{"label": "crazing", "score": 0.2, "area": 20}]) == "fail"
    assert verdict_for(rule, [{"label": "patches", "score": 0.2, "area": 20}]) == "pass"
    assert verdict_for(rule, [{"label": "crazing", "score": 0.2, "area": 5}]) == "pass"  # the default area
    assert verdict_for({"min_score": 0.5}, [{"score": 0.5}]) == "fail"  # no label: the default rule


def test_part_metrics_count_a_catch_only_at_a_ground_truth_region():
    outcomes = [
        _part([0], (0, 0.9, True)),               # caught
        _part([0], (0, 0.9, False)),              # fails, but the box is elsewhere: escaped, unlocalised
        _part([1], (1, 0.3, True)),               # below the threshold: judged pass
        _part([1], (1, 0.8, False), regions=False),  # no ground-truth region: a fail is a catch
        _part([], (1, 0.7, False)),               # defect-free, rejected
        _part([], (0, 0.2, False)),               # defect-free, passed
    ]
    f = part_metrics(outcomes, {"type": "any_defect", "min_score": 0.5, "min_area": 0}, CLASSES)
    assert (f["defective"], f["escaped"], f["judged_pass"], f["unlocalised"]) == (4, 2, 1, 1)
    assert f["escape_rate"] == 0.5 and (f["false_rejects"], f["defect_free"], f["false_reject_rate"]) == (1, 2, 0.5)
    assert f["escape_per_class"] == {"crazing": {"images": 2, "escaped": 1, "escape_rate": 0.5},
                                     "patches": {"images": 2, "escaped": 1, "escape_rate": 0.5}}
    # reported at 0.5: crazing 0.9 (at a region), crazing 0.9 (not), patches 0.8 (no regions: not), 0.7 (not)
    assert f["precision_per_class"] == {"crazing": 0.5, "patches": 0.0}
    # a lower patches threshold catches the 0.3 one
    g = part_metrics(outcomes, {"type": "any_defect", "min_score": 0.5, "classes": {"patches": {"min_score": 0.3}}},
                     CLASSES)
    assert g["escaped"] == 1 and g["escape_per_class"]["patches"]["escaped"] == 0


def test_classify_parts_use_the_defect_probability():
    cls = ["scratch", "ok"]
    rule = {"type": "classify", "pass_labels": ["ok"], "min_score": 0.5}
    outcomes = [PartOutcome(True, (0,), [Candidate(0, 0.6)], defect_mass=0.6),
                PartOutcome(True, (0,), [Candidate(0, 0.3)], defect_mass=0.3),
                PartOutcome(False, (), [Candidate(0, 0.2)], defect_mass=0.2)]
    f = part_metrics(outcomes, rule, cls)
    assert (f["escaped"], f["false_rejects"]) == (1, 0)
    f = part_metrics(outcomes, {**rule, "min_score": 0.15}, cls)
    assert (f["escaped"], f["false_rejects"]) == (0, 1)
    f = part_metrics(outcomes, {**rule, "classes": {"scratch": {"min_score": 0.25}}}, cls)  # a class's own bound
    assert (f["escaped"], f["false_rejects"]) == (0, 0)


def test_calibrate_lowers_only_the_classes_that_escape_and_keeps_precision():
    # crazing scores low but at the right place; patches scores high; a wrong patches box at 0.4
    outcomes = [_part([0], (0, s, True)) for s in (0.12, 0.2, 0.3, 0.35, 0.15)]
    outcomes += [_part([1], (1, s, True), (1, 0.4, False)) for s in (0.8, 0.9, 0.85, 0.95)]
    rule = {"type": "any_defect", "min_score": 0.5, "min_area": 0}
    new, report = calibrate(outcomes, rule, CLASSES, max_escape=0.0)
    assert _score(new, "crazing") == 0.12  # as high as catches every crazing part
    assert _score(new, "patches") == 0.5 and "patches" not in new["classes"]  # nothing asked to move it
    assert report["met"] and report["expected"]["escaped"] == 0
    assert any("no defect-free images" in n for n in report["notes"])
    assert part_metrics(outcomes, new, CLASSES)["precision_per_class"] == {"crazing": 1.0, "patches": 1.0}
    # a class that escapes at the rule's threshold is relaxed only as far as its escapes need
    new, _ = calibrate(outcomes, {**rule, "min_score": 0.9}, CLASSES, max_escape=0.0)
    assert _score(new, "patches") == 0.8 and _score(new, "crazing") == 0.12
    # a precision floor stops a class where its reports would mostly miss
    noisy = outcomes + [_part([0], (0, 0.06, False), (0, 0.07, False), (0, 0.08, False))]
    new, report = calibrate(noisy, rule, CLASSES, max_escape=0.0, min_precision=0.7)
    assert _score(new, "crazing") == 0.12 and not report["met"]
    assert report["expected"]["escaped"] == 1 and any("not met" in n for n in report["notes"])


def test_calibrate_keeps_a_false_reject_bound():
    outcomes = [_part([0], (0, s, True)) for s in (0.9, 0.8, 0.3)]
    outcomes += [_part([], (0, s, False)) for s in (0.35, 0.1, 0.1, 0.1)]
    rule = {"type": "any_defect", "min_score": 0.5, "min_area": 0}
    new, report = calibrate(outcomes, rule, CLASSES, max_escape=0.0)  # no bound: escapes first
    assert _score(new, "crazing") == 0.3 and report["expected"]["false_rejects"] == 1
    new, report = calibrate(outcomes, rule, CLASSES, max_escape=0.0, max_false_reject=0.0)
    assert _score(new, "crazing") > 0.35 and report["expected"]["false_rejects"] == 0
    assert not report["met"] and report["expected"]["escaped"] == 1


def test_calibrate_classify_and_the_sweep():
    cls = ["scratch", "ok"]
    rule = {"type": "classify", "pass_labels": ["ok"], "min_score": 0.5}
    outcomes = [PartOutcome(True, (0,), [Candidate(0, m)], defect_mass=m) for m in (0.9, 0.45, 0.3)]
    outcomes += [PartOutcome(False, (), [Candidate(0, m)], defect_mass=m) for m in (0.05, 0.2, 0.1)]
    new, report = calibrate(outcomes, rule, cls, max_escape=0.0)
    assert new["min_score"] == 0.3 and report["met"] and report["expected"]["false_rejects"] == 0
    blocked = outcomes[:4] + [PartOutcome(False, (), [Candidate(0, 0.35)], defect_mass=0.35)]
    new, report = calibrate(blocked, rule, cls, max_escape=0.0, max_false_reject=0.0)
    assert new["min_score"] == 0.45 and report["expected"]["escaped"] == 1 and not report["met"]
    new, report = calibrate(blocked, {**rule, "min_score": 0.2}, cls, max_escape=0.5, max_false_reject=0.0)
    assert new["min_score"] == 0.36 and report["met"]  # tightened just past the defect-free part
    sweep = threshold_sweep(outcomes, rule, cls, grid=[0.9, 0.5, 0.25, 0.01])
    assert sweep["escape_rate"] == pytest.approx([2 / 3, 2 / 3, 0, 0])
    assert sweep["false_reject_rate"] == pytest.approx([0, 0, 0, 1])


def test_calibrate_needs_defective_images():
    with pytest.raises(ValueError, match="defective"):
        calibrate([_part([])], {"type": "any_defect", "min_score": 0.5}, CLASSES, max_escape=0.1)


def test_calibrate_chooses_minimum_areas_from_a_grid():
    def part(gt, *cands):  # candidates (class, score, area, localised)
        return PartOutcome(defective=bool(gt), gt_classes=tuple(gt), has_regions=bool(gt),
                           candidates=[Candidate(c, s, a, loc) for c, s, a, loc in cands])

    # good parts show small bright specks; real defects are large, some of them faint
    outcomes = [part([0], (0, 0.9, 300, True)), part([0], (0, 0.55, 200, True)), part([1], (1, 0.7, 90, True))]
    outcomes += [part([], (0, 0.8, 6, False)), part([], (1, 0.9, 12, False)), part([])]
    rule = {"type": "any_defect", "min_score": 0.5, "min_area": 0}
    new, report = calibrate(outcomes, rule, CLASSES, max_escape=0.0, max_false_reject=0.0)
    assert not report["met"]  # by score alone the specks cannot be told apart
    new, report = calibrate(outcomes, rule, CLASSES, max_escape=0.0, max_false_reject=0.0,
                            area_grid=[0, 16, 64, 256])
    assert report["met"] and report["expected"]["false_rejects"] == 0 and report["expected"]["escaped"] == 0
    # the smallest areas that drop the specks (scores stay: no step of them alone saves a false reject)
    assert _area(new, "crazing") == 16 and _area(new, "patches") == 16
    assert _score(new, "crazing") == 0.5
    assert part_metrics(outcomes, new, CLASSES)["escaped"] == 0


def test_a_manifest_rule_reaches_the_thresholds_only_with_numbers():
    from model.checkpoint import CheckpointError, validate_manifest

    manifest = {"task": "detect", "arch": {"variant": "tiny", "num_classes": 2}, "classes": CLASSES}
    rule = {"type": "any_defect", "min_score": 0.4, "min_area": 8, "classes": {"patches": {"min_area": 2}}}
    checked = validate_manifest({**manifest, "verdict": rule}, require_sha=False)["verdict"]
    assert thresholds(checked, CLASSES)[1].tolist() == [8, 2]
    for bad in ({"min_area": "big"}, {"min_score": "high"}, {"classes": {"patches": {"min_score": None}}}):
        with pytest.raises(CheckpointError, match="must be a number"):
            validate_manifest({**manifest, "verdict": {**rule, **bad}}, require_sha=False)
