"""Part-level verdicts: the rule that turns one image's defects into ``pass`` / ``fail``, how well a rule
catches defective parts, and the calibration of per-class thresholds from labelled images.

A verdict rule (the manifest's ``verdict``):

- ``{"type": "any_defect", "min_score", "min_area", "classes": {name: {"min_score", "min_area"}}}``
  (detect / segment): fail when any defect reaches its class's minimum score and area; classes not listed
  use the default ``min_score`` / ``min_area``.
- ``{"type": "classify", "pass_labels", "min_score", "classes": {name: {"min_score"}}}``: fail when the
  probability of the defect classes together reaches ``min_score``, or one defect class reaches its own.

Part-level figures (what a line acts on, beside mAP / mIoU):

- **escape rate**: defective images that are not caught. For detect and segment a part counts as caught only
  when a defect that fails it overlaps one of its ground-truth regions (box IoU ≥ ``LOCALISE_IOU``, or any
  mask overlap): a fail for a box in the wrong place is not a catch. A defective image without annotated
  regions is caught by a ``fail``.
- **false-reject rate**: defect-free images judged ``fail`` (only where the data has defect-free images).
- **precision per class**: of the defects reported at the rule's thresholds, the fraction that overlaps a
  ground-truth region.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = [
    "LOCALISE_IOU",
    "Candidate",
    "PartOutcome",
    "thresholds",
    "verdict_for",
    "part_metrics",
    "calibrate",
    "threshold_sweep",
]

LOCALISE_IOU = 0.3  # a reported box catches a part when it overlaps one of the part's boxes this much
SCORE_GRID = np.round(np.arange(0.99, 0.0, -0.01), 2)  # thresholds calibration chooses from


@dataclass
class Candidate:
    """One defect the model reports for an image, before any threshold."""

    class_id: int
    score: float
    area: float = 0.0
    localised: bool = True  # overlaps a ground-truth defect region of the image


@dataclass
class PartOutcome:
    """What the model said about one labelled image, at every threshold at once.

    ``defect_mass`` (classify): 1 − the probability of the pass classes. ``has_regions``: the ground truth
    locates the defects (boxes or mask pixels), so a catch must overlap them.
    """

    defective: bool
    gt_classes: tuple[int, ...] = ()
    candidates: list[Candidate] = field(default_factory=list)
    defect_mass: float | None = None
    has_regions: bool = False


def thresholds(rule: Mapping[str, Any], classes: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Per-class (min_score, min_area) arrays of a rule, index = class id."""
    score = np.full(len(classes), float(rule.get("min_score", 0.5)))
    area = np.full(len(classes), float(rule.get("min_area", 0)))
    for name, per in (rule.get("classes") or {}).items():
        if name in classes:
            k = list(classes).index(name)
            score[k] = float(per.get("min_score", score[k]))
            area[k] = float(per.get("min_area", area[k]))
    return score, area


def verdict_for(rule: Mapping[str, Any], defects: Iterable[Mapping[str, Any]]) -> str:
    """Apply an ``any_defect`` rule to detect/segment defects (``score``, ``area`` and, for per-class
    thresholds, ``label`` keys)."""
    s, a = float(rule.get("min_score", 0.5)), float(rule.get("min_area", 0))
    per = rule.get("classes") or {}
    for d in defects:
        c = per.get(d.get("label"), {})
        if d["score"] >= float(c.get("min_score", s)) and d.get("area", 0) >= float(c.get("min_area", a)):
            return "fail"
    return "pass"


# ----------------------------------------------------------------------------------------------------
# part-level figures


class _Table:
    """The outcomes as flat arrays, so that a rule is scored without Python loops over candidates."""

    def __init__(self, outcomes: Sequence[PartOutcome], num_classes: int):
        self.n = len(outcomes)
        self.nc = num_classes
        self.defective = np.array([o.defective for o in outcomes], bool)
        self.regions = np.array([o.has_regions for o in outcomes], bool)
        self.mass = np.array([np.nan if o.defect_mass is None else o.defect_mass for o in outcomes])
        self.gt = np.zeros((self.n, num_classes), bool)
        for i, o in enumerate(outcomes):
            self.gt[i, list(o.gt_classes)] = True
        cands = [(i, c) for i, o in enumerate(outcomes) for c in o.candidates]
        self.img = np.array([i for i, _ in cands], np.int64)
        self.cls = np.array([c.class_id for _, c in cands], np.int64)
        self.score = np.array([c.score for _, c in cands], np.float64)
        self.area = np.array([c.area for _, c in cands], np.float64)
        self.loc = np.array([c.localised for _, c in cands], bool)

    def judge(self, min_score: np.ndarray, min_area: np.ndarray, global_score: float | None = None):
        """(fails, caught, reported) for a rule: per image bool, per image bool, per candidate bool."""
        rep = (self.score >= min_score[self.cls]) & (self.area >= min_area[self.cls]) if len(self.cls) \
            else np.zeros(0, bool)
        fails = np.zeros(self.n, bool)
        np.logical_or.at(fails, self.img[rep], True)
        hit = np.zeros(self.n, bool)
        np.logical_or.at(hit, self.img[rep & self.loc], True)
        if global_score is not None:  # classify: the defect classes' probability together
            fails |= np.nan_to_num(self.mass, nan=-1.0) >= global_score
            hit = fails
        caught = np.where(self.regions, hit, fails)
        return fails, caught, rep


def _rate(num: int, den: int) -> float | None:
    return None if den == 0 else num / den


def _figures(t: _Table, classes: Sequence[str], fails, caught, rep) -> dict[str, Any]:
    d, free = t.defective, ~t.defective
    escaped = d & ~caught
    out: dict[str, Any] = {
        "defective": int(d.sum()),
        "escaped": int(escaped.sum()),
        "escape_rate": _rate(int(escaped.sum()), int(d.sum())),
        "judged_pass": int((d & ~fails).sum()),
        "unlocalised": int((d & fails & ~caught).sum()),
        "defect_free": int(free.sum()),
        "false_rejects": int((free & fails).sum()),
        "false_reject_rate": _rate(int((free & fails).sum()), int(free.sum())),
    }
    per_class = {}
    for k, name in enumerate(classes):
        has = d & t.gt[:, k]
        if has.any():
            per_class[name] = {"images": int(has.sum()), "escaped": int((has & escaped).sum()),
                               "escape_rate": _rate(int((has & escaped).sum()), int(has.sum()))}
    out["escape_per_class"] = per_class
    out["unlocalised_reports"] = int((rep & ~t.loc).sum())
    if t.regions.any():
        prec = {}
        for k, name in enumerate(classes):
            sel = rep & (t.cls == k)
            if sel.any():
                prec[name] = float(t.loc[sel].mean())
        out["precision_per_class"] = prec
    return out


def part_metrics(outcomes: Sequence[PartOutcome], rule: Mapping[str, Any], classes: Sequence[str]) -> dict:
    """Escape / false-reject figures of ``rule`` over ``outcomes`` (see module docstring)."""
    t = _Table(outcomes, len(classes))
    score, area = thresholds(rule, classes)
    glob = float(rule.get("min_score", 0.5)) if rule.get("type") == "classify" else None
    return _figures(t, classes, *t.judge(score, area, glob))


def threshold_sweep(outcomes: Sequence[PartOutcome], rule: Mapping[str, Any], classes: Sequence[str],
                    grid: Sequence[float] = tuple(SCORE_GRID)) -> dict[str, list]:
    """Escape and false-reject rates with every class's min_score set to each value of ``grid`` (min_area as
    in the rule): the curve behind ``s2amnet eval --plot``."""
    t = _Table(outcomes, len(classes))
    _, area = thresholds(rule, classes)
    esc, fr = [], []
    for g in grid:
        glob = float(g) if rule.get("type") == "classify" else None
        score = np.full(len(classes), 2.0 if glob is not None else float(g))  # classify: the mass decides
        f = _figures(t, classes, *t.judge(score, area, glob))
        esc.append(f["escape_rate"])
        fr.append(f["false_reject_rate"])
    return {"threshold": [float(g) for g in grid], "escape_rate": esc, "false_reject_rate": fr}


# ----------------------------------------------------------------------------------------------------
# calibration


def calibrate(outcomes: Sequence[PartOutcome], rule: Mapping[str, Any], classes: Sequence[str], *,
              max_escape: float, max_false_reject: float | None = None, max_class_escape: float | None = None,
              min_precision: float = 0.5, floor: float = 0.05,
              area_grid: Sequence[float] | None = None) -> tuple[dict, dict]:
    """Choose thresholds on labelled outcomes; returns ``(new_rule, report)``.

    classify: the highest defect-probability threshold whose escape rate is within ``max_escape``.
    detect / segment: a minimum score per class (and, with ``area_grid``, a minimum area from it). Every class
    starts at its strictest setting; the class whose next more lenient setting catches the most further parts
    per false reject (or per unlocalised report, where there are no defect-free images) is relaxed, until the
    escape bounds hold; then every class is made as strict again as the escape figures allow (fewest false
    rejects). No score goes below ``floor``, nor, on data without defect-free images, to where a class's
    reported defects overlap ground truth less often than ``min_precision``. A given ``max_false_reject`` is
    a hard bound: where both bounds cannot hold, the thresholds give the fewest escapes within it and the
    report says that the escape bound is not met.
    """
    t = _Table(outcomes, len(classes))
    if not t.defective.any():
        raise ValueError("calibration needs defective images (none among the labelled images)")
    has_free = bool((~t.defective).any())
    _, rule_area = thresholds(rule, classes)
    grid = [float(g) for g in SCORE_GRID if g >= floor - 1e-9]
    notes: list[str] = []
    if not has_free:
        notes.append("the data has no defect-free images: false rejects cannot be bounded from it; per-class "
                     f"thresholds keep box precision >= {min_precision}")
    elif max_false_reject is None:
        notes.append("no --max-false-reject: thresholds are as high as the escape bound allows")

    def figures(score: np.ndarray, area: np.ndarray, glob: float | None = None) -> dict:
        return _figures(t, classes, *t.judge(score, area, glob))

    def meets_escape(f: dict) -> bool:
        if f["escape_rate"] > max_escape + 1e-12:
            return False
        return max_class_escape is None or all(
            c["escape_rate"] <= max_class_escape + 1e-12 for c in f["escape_per_class"].values())

    def meets_fr(f: dict) -> bool:
        return max_false_reject is None or f["false_reject_rate"] is None or \
            f["false_reject_rate"] <= max_false_reject + 1e-12

    new_rule = {k: v for k, v in rule.items() if k not in ("classes", "calibration")}
    if rule.get("type") == "classify":
        never = np.full(len(classes), 2.0)
        sweep = [(g, figures(never, rule_area, g)) for g in grid]  # descending: ascending false rejects
        allowed = [(g, f) for g, f in sweep if meets_fr(f)] or sweep[:1]
        good = [(g, f) for g, f in allowed if meets_escape(f)]
        # the highest threshold that meets the bounds, else the one with the fewest escapes
        chosen = good[0][0] if good else min(allowed, key=lambda gf: (gf[1]["escaped"], -gf[0]))[0]
        new_rule["min_score"] = chosen
        final = figures(never, rule_area, chosen)
    else:
        final = _relax_per_class(t, classes, grid, area_grid, rule_area, has_free, min_precision, figures,
                                 meets_escape, meets_fr, new_rule)
    if not meets_escape(final):
        notes.append("the escape bound is not met"
                     + (" within the false-reject bound" if max_false_reject is not None and has_free else "")
                     + ": these thresholds give the fewest escapes that the other bounds allow")
    report = {"bounds": {"max_escape": max_escape, "max_false_reject": max_false_reject,
                         "max_class_escape": max_class_escape, "min_precision": None if has_free else min_precision,
                         "floor": floor, "area_grid": None if area_grid is None else [float(a) for a in area_grid]},
              "met": meets_escape(final) and meets_fr(final), "expected": final, "notes": notes}
    return new_rule, report


def _relax_per_class(t: _Table, classes, grid, area_grid, rule_area, has_free, min_precision, figures,
                     meets_escape, meets_fr, new_rule: dict) -> dict:
    """The greedy search of `calibrate` for detect / segment; writes ``new_rule["classes"]``, returns the
    figures of the chosen thresholds."""
    defect_ids = [k for k, name in enumerate(classes) if name != "background"]
    knobs = [grid, sorted({float(a) for a in area_grid}, reverse=True) if area_grid else [None]]
    level = {k: [0, 0] for k in defect_ids}  # per class: index into the score grid, into the area grid

    def arrays() -> tuple[np.ndarray, np.ndarray]:
        s, a = np.full(len(classes), 2.0), rule_area.copy()
        for k, (i, j) in level.items():
            s[k] = grid[i]
            if knobs[1][j] is not None:
                a[k] = knobs[1][j]
        return s, a

    def precise(f: dict, k: int) -> bool:
        p = f.get("precision_per_class", {}).get(classes[k])
        return has_free or p is None or p >= min_precision

    f = figures(*arrays())
    while not meets_escape(f):
        best = None  # (ratio, -step, class, score level, area level)
        for k in defect_ids:
            i0, j0 = level[k]
            for i in range(i0, len(grid)):
                for j in range(j0, len(knobs[1])):
                    if (i, j) == (i0, j0):
                        continue
                    level[k] = [i, j]
                    g = figures(*arrays())
                    level[k] = [i0, j0]
                    gain = f["escaped"] - g["escaped"]
                    if gain <= 0 or not precise(g, k) or not meets_fr(g):
                        continue
                    cost = (g["false_rejects"] - f["false_rejects"]) if has_free else \
                        0.1 * (g["unlocalised_reports"] - f["unlocalised_reports"])
                    step = (i - i0) + (j - j0)
                    cand = (gain / (1.0 + cost), -step, k, i, j)
                    if best is None or cand[:2] > best[:2]:
                        best = cand
        if best is None:
            break
        level[best[2]] = [best[3], best[4]]
        f = figures(*arrays())
    target_met = meets_escape(f)
    for k in defect_ids:  # each class as strict again as the escape figures allow
        for dim in (0, 1):
            while level[k][dim] > 0:
                old = level[k][dim]
                level[k][dim] -= 1
                g = figures(*arrays())
                if g["escaped"] > f["escaped"] or (target_met and not meets_escape(g)):
                    level[k][dim] = old
                    break
                f = g
    s, a = arrays()
    new_rule["classes"] = {classes[k]: {"min_score": round(float(s[k]), 2), "min_area": float(a[k])}
                           for k in defect_ids}
    return figures(s, a)
