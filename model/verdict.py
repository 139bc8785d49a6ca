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

    The search starts from ``rule`` and moves thresholds only where the labelled images ask for it, so that
    a threshold does not settle just below the weakest defect of a small validation set:

    1. relax: while the escape bounds do not hold, make the setting more lenient that catches the most
       further parts per false reject (per unlocalised report, where the data has no defect-free images) —
       classify: the defect-probability threshold; detect / segment: one class's minimum score (or, with
       ``area_grid``, minimum area). No score goes below ``floor``; on data without defect-free images no
       class goes where fewer than ``min_precision`` of its reported defects lie on a ground-truth region.
    2. tighten (data with defect-free images): while some stricter setting rejects fewer defect-free parts
       without letting another defective part through (or, while ``max_false_reject`` is broken, without
       breaking the escape bounds), take the smallest such step.

    A given ``max_false_reject`` is a hard bound: where both bounds cannot hold, the thresholds give the fewest
    escapes within it and the report says that the escape bound is not met.
    """
    t = _Table(outcomes, len(classes))
    if not t.defective.any():
        raise ValueError("calibration needs defective images (none among the labelled images)")
    has_free = bool((~t.defective).any())
    notes: list[str] = []
    if not has_free:
        notes.append("the data has no defect-free images: false rejects cannot be bounded from it; per-class "
                     f"thresholds keep box precision >= {min_precision}")

    def meets_escape(f: dict) -> bool:
        if f["escape_rate"] > max_escape + 1e-12:
            return False
        return max_class_escape is None or all(
            c["escape_rate"] <= max_class_escape + 1e-12 for c in f["escape_per_class"].values())

    def meets_fr(f: dict) -> bool:
        return max_false_reject is None or f["false_reject_rate"] is None or \
            f["false_reject_rate"] <= max_false_reject + 1e-12

    search = _Search(t, classes, rule, floor, area_grid, has_free, min_precision, meets_escape, meets_fr)
    search.relax()
    if has_free:
        search.tighten()
    new_rule, final = search.result()
    if not meets_escape(final):
        notes.append("the escape bound is not met"
                     + (" within the false-reject bound" if max_false_reject is not None and has_free else "")
                     + ": these thresholds give the fewest escapes that the other bounds allow")
    report = {"bounds": {"max_escape": max_escape, "max_false_reject": max_false_reject,
                         "max_class_escape": max_class_escape, "min_precision": None if has_free else min_precision,
                         "floor": floor, "area_grid": None if area_grid is None else [float(a) for a in area_grid]},
              "met": meets_escape(final) and meets_fr(final), "expected": final, "notes": notes}
    return new_rule, report


class _Search:
    """The settings `calibrate` moves: per knob (classify: the one defect-probability threshold; detect /
    segment: each defect class), an index into the score grid and one into the area grid (higher index =
    more lenient)."""

    def __init__(self, t: _Table, classes, rule, floor, area_grid, has_free, min_precision, meets_escape, meets_fr):
        self.t, self.classes, self.rule = t, list(classes), dict(rule)
        self.classify = rule.get("type") == "classify"
        self.has_free, self.min_precision = has_free, min_precision
        self.meets_escape, self.meets_fr = meets_escape, meets_fr
        score, self.rule_area = thresholds(rule, classes)
        if self.classify:
            self.knobs = [-1]
            start = {-1: float(rule.get("min_score", 0.5))}
        else:
            self.knobs = [k for k, name in enumerate(classes) if name != "background"]
            start = {k: float(score[k]) for k in self.knobs}
        # the grids hold the rule's own values, so that "no change" is one of the settings
        self.scores = sorted({float(g) for g in SCORE_GRID if g >= floor - 1e-9} | set(start.values()), reverse=True)
        areas = set(area_grid or [])
        if area_grid:
            areas |= {float(self.rule_area[k]) for k in self.knobs if k >= 0}
        self.areas: list[float | None] = sorted(areas, reverse=True) if area_grid else [None]
        self.level = {k: [self.scores.index(start[k]),
                          0 if not area_grid or k < 0 else self.areas.index(float(self.rule_area[k]))]
                      for k in self.knobs}
        self.f = self.figures()

    def arrays(self) -> tuple[np.ndarray, np.ndarray, float | None]:
        if self.classify:
            return np.full(len(self.classes), 2.0), self.rule_area, self.scores[self.level[-1][0]]
        s, a = np.full(len(self.classes), 2.0), self.rule_area.copy()
        for k, (i, j) in self.level.items():
            s[k] = self.scores[i]
            if self.areas[j] is not None:
                a[k] = self.areas[j]
        return s, a, None

    def figures(self) -> dict:
        s, a, glob = self.arrays()
        return _figures(self.t, self.classes, *self.t.judge(s, a, glob))

    def _try(self, k: int, i: int, j: int) -> dict:
        old, self.level[k] = self.level[k], [i, j]
        g = self.figures()
        self.level[k] = old
        return g

    def _precise(self, g: dict, k: int) -> bool:
        p = g.get("precision_per_class", {}).get(self.classes[k]) if k >= 0 else None
        return self.has_free or p is None or p >= self.min_precision

    def _cost(self, g: dict) -> float:
        return g["false_rejects"] if self.has_free else 0.1 * g["unlocalised_reports"]

    def _apply_best(self, lenient: bool, value) -> bool:
        """Move one knob to the setting (more lenient or stricter than now) with the highest ``value(knob,
        figures)`` (None = not allowed), the smallest step on ties; False when no setting is allowed."""
        best = None  # (value, -step, knob, score level, area level)
        for k in self.knobs:
            i0, j0 = self.level[k]
            scores = range(i0, len(self.scores)) if lenient else range(i0, -1, -1)
            for i in scores:
                for j in range(j0, len(self.areas)) if lenient else range(j0, -1, -1):
                    if (i, j) == (i0, j0):
                        continue
                    v = value(k, self._try(k, i, j))
                    cand = (v, -abs(i - i0) - abs(j - j0), k, i, j)
                    if v is not None and (best is None or cand[:2] > best[:2]):
                        best = cand
        if best is None:
            return False
        self.level[best[2]] = [best[3], best[4]]
        self.f = self.figures()
        return True

    def relax(self) -> None:
        def value(k: int, g: dict) -> float | None:  # further parts caught per false reject
            gain = self.f["escaped"] - g["escaped"]
            if gain <= 0 or not self._precise(g, k) or not self.meets_fr(g):
                return None
            return gain / (1.0 + self._cost(g) - self._cost(self.f))

        while not self.meets_escape(self.f) and self._apply_best(True, value):
            pass

    def tighten(self) -> None:
        met = self.meets_escape(self.f)

        def value(k: int, g: dict) -> float | None:  # false rejects saved
            saved = self.f["false_rejects"] - g["false_rejects"]
            # no part let through for it, unless a false-reject bound is still broken and the escape bound
            # still holds
            more = g["escaped"] > self.f["escaped"]
            if saved <= 0 or (met and not self.meets_escape(g)) or (more and (self.meets_fr(self.f) or not met)):
                return None
            return float(saved)

        while self._apply_best(False, value):
            pass

    def result(self) -> tuple[dict, dict]:
        new_rule = {k: v for k, v in self.rule.items() if k not in ("classes", "calibration")}
        s, a, glob = self.arrays()
        if self.classify:
            new_rule["min_score"] = round(float(glob), 2)
        else:  # only the classes whose thresholds differ from the rule's defaults
            default = (round(float(self.rule.get("min_score", 0.5)), 2), float(self.rule.get("min_area", 0)))
            per = {self.classes[k]: {"min_score": round(float(s[k]), 2), "min_area": float(a[k])}
                   for k in self.knobs}
            per = {name: v for name, v in per.items() if (v["min_score"], v["min_area"]) != default}
            if per:
                new_rule["classes"] = per
        return new_rule, self.f
