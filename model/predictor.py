"""`Predictor`: decoded image → preprocess → batched forward → postprocess in ORIGINAL image coordinates.

The three steps are separate so that a server can run them in different places:

* :meth:`Predictor.preprocess` (any thread / the API process): image → :class:`Sample` (uint8 C×H×W at
  the model input size + a JSON-serialisable ``meta`` dict describing the geometry).
* :meth:`Predictor.infer` (ONE inference thread): a list of sample arrays → one batched forward on the
  device (normalisation on the device, eval mode, ``torch.inference_mode``) → one small CPU
  tensor set per sample, independent of the batch it was computed in.
* :meth:`Predictor.postprocess` (any thread; pure function of its inputs): raw + meta + options → plain
  Python result ``{"verdict", "defects", ["top_k"]}``.

Results (all coordinates in original image pixels, continuous pixel-corner convention: pixel (c, r) spans
[c, c+1) × [r, r+1), so a box of a full W×H image is (0, 0, W, H)):

* classify: ``top_k`` = [{label, class_id, score}] (softmax), ``defects`` = [] when the verdict is pass,
  else [the most probable non-pass class].
* detect: ``defects`` = [{label, class_id, score, box {x1, y1, x2, y2}, area (box area, px²)}] after
  per-class NMS, boxes clipped to the image, sorted by score, at most ``max_det``.
* segment: logits are resampled to the original size (inverse letterbox/resize, bilinear), then
  softmax/argmax per pixel; ``defects`` has ONE ENTRY PER CONNECTED COMPONENT (8-connectivity) of each
  non-background class: {label, class_id, score = mean probability of that class over the component,
  box (tight, exclusive x2/y2), area (pixel count), mask (bool H×W, original size)}, sorted by score.

detect and segment report the defects scoring at least the request's ``conf`` and, below it, every
defect that fails the part by the verdict rule: a ``fail`` always shows what caused it.

Verdict (the manifest's rule, independent of the request's ``conf`` so that a display threshold can
never turn a fail into a pass):

* ``{"type": "any_defect", "min_score": s, "min_area": a, "classes": {...}}``: fail when any
  detection/component reaches its class's ``min_score`` and ``min_area`` (classes not listed: s and a).
* ``{"type": "classify", "pass_labels": [...], "min_score": s, "classes": {...}}``: fail when the
  probability mass of the non-pass classes (1 − Σ p(pass labels)) is ≥ s, or one defect class reaches
  its own ``min_score``.

`model.verdict` holds the rule and the part-level figures (escape, false reject) computed from it.

Thread safety: preprocess/postprocess are re-entrant; infer must be called from one thread at a time
(the service's single inference thread).
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from model import masks as mask_ops
from model import transforms as T
from model.checkpoint import DEFAULT_NMS_IOU, TTA_VIEWS, CheckpointError, load_model, validate_manifest
from model.verdict import thresholds as verdict_thresholds
from model.verdict import verdict_for

__all__ = ["Sample", "Predictor", "choose_forward_batch"]


@dataclass(frozen=True)
class Rule:
    """A verdict rule (``rule``, the manifest's form) with its per-class thresholds as arrays (index = class id);
    classify: the pass classes' ids (their minimum score is infinite)."""

    rule: dict
    min_scores: np.ndarray
    min_areas: np.ndarray
    pass_ids: list[int]

    def decides(self, cid: int, score: float, area: float) -> bool:
        """Whether a defect of class ``cid`` fails the part by this rule."""
        return score >= self.min_scores[cid] and area >= self.min_areas[cid]


@dataclass
class Sample:
    """A preprocessed image: ``array`` uint8 C×H×W at the model input size; ``meta`` plain JSON."""

    array: np.ndarray
    meta: dict


def _below(x: float) -> float:
    """Largest float strictly below x (turns a ``score > thr`` filter into ``score >= x``)."""
    return float(np.nextafter(np.float32(x), np.float32(-np.inf)))


def choose_forward_batch(ms_per_image: Mapping[int, float], tolerance: float = 0.05) -> int:
    """The forward batch size to use, from measured milliseconds per image at each size: the smallest size
    within ``tolerance`` (relative) of the fastest one — as fast, and each image waits for fewer others."""
    if not ms_per_image:
        raise ValueError("no timings to choose from")
    best = min(ms_per_image.values())
    return min(k for k, v in ms_per_image.items() if v <= best * (1.0 + tolerance))


class Predictor:
    """Runs one model. ``Predictor(model, manifest, device)`` or ``Predictor.from_folder(path, device)``."""

    def __init__(
        self, model: torch.nn.Module, manifest: Mapping[str, Any], device: str | torch.device = "cpu"
    ):
        m = validate_manifest(manifest, require_sha=False)
        task = getattr(model, "task", m["task"])
        if task != m["task"]:
            raise CheckpointError(f"the model is a {task} model but the manifest says {m['task']}")
        nc = getattr(model, "num_classes", m["arch"]["num_classes"])
        if nc != len(m["classes"]):
            raise CheckpointError(f"the model has {nc} classes but the manifest lists {len(m['classes'])}")
        self.manifest = m
        self.task: str = m["task"]
        self.name: str = str(m["name"])
        self.version: str = str(m["version"])
        self.classes: list[str] = list(m["classes"])
        self.input_size: tuple[int, int] = (int(m["arch"]["input_size"][0]), int(m["arch"]["input_size"][1]))
        self.verdict_rule: dict = dict(m["verdict"])
        self.resize_mode: str = m["preprocess"]["resize"]
        self.pad_value: int = int(m["preprocess"]["pad_value"])
        # detect: the NMS IoU threshold of answers that ask for none (the manifest's postprocess.iou)
        self.nms_iou: float = float(m.get("postprocess", {}).get("iou", DEFAULT_NMS_IOU))
        self.tta: list[str] = list(m["tta"])
        # most images per forward pass; None = a whole batch at once. On a CPU, large activations make a
        # batch slower per image than single images for some models (tune_forward_batch measures it)
        self.forward_batch: int | None = None
        # what runs the forward: None = the PyTorch module; else a callable from model.backends (e.g. ONNX
        # Runtime) taking the normalised batch and returning the module's outputs (detect: boxes, scores)
        self.runner: Any = None
        self.folder: Path | None = None  # the weights folder, when loaded by from_folder
        self.device = torch.device(device)
        # NB: switches the given module to eval mode and moves it to `device` (in place, like nn.Module.to);
        # requires_grad is untouched (infer uses inference_mode): an EMA copy can be wrapped in training.
        self.model = model.eval().to(self.device)
        std = torch.tensor(m["std"], dtype=torch.float32)
        mean = torch.tensor(m["mean"], dtype=torch.float32)
        # x = (u8 / 255 − mean) / std  =  u8 · scale + shift
        self._scale = (1.0 / (255.0 * std)).view(1, -1, 1, 1).to(self.device)
        self._shift = (-mean / std).view(1, -1, 1, 1).to(self.device)
        self._rule = self.rule(self.verdict_rule)  # the manifest's rule, as arrays

    @classmethod
    def from_folder(cls, path: str | os.PathLike, device: str | torch.device = "cpu", *,
                    fuse: bool = True, tta: Sequence[str] | None = None) -> Predictor:
        """Load a weights folder for inference. ``fuse`` folds BatchNorm into the convs (``TaskModel.fuse``:
        same outputs up to float rounding; 0-9 % less time per image at batch 1 on the 2-core CPU); the service,
        ``s2amnet eval``, ``predict`` and ``bench`` all run fused models. ``tta`` (views, ``[]`` = none)
        replaces the manifest's test-time augmentation (``s2amnet eval --tta``); checked like the manifest's."""
        model, manifest = load_model(path, device=device)
        if tta is not None:
            manifest = {**manifest, "tta": list(tta)}
        if fuse:
            model.fuse()
        predictor = cls(model, manifest, device=device)
        predictor.folder = Path(path)
        return predictor

    def __repr__(self) -> str:
        return (
            f"Predictor(name={self.name!r}, task={self.task}, variant={self.manifest['arch']['variant']}, "
            f"classes={len(self.classes)}, input_size={self.input_size}, device={self.device})"
        )

    # ------------------------------------------------------------------------------------------------
    # preprocess

    def preprocess(self, image) -> Sample:
        """PIL image or uint8/uint16/float array (H×W, H×W×3, H×W×4) → Sample at the input size."""
        array, meta = T.prepare(image, self.input_size, self.resize_mode, self.pad_value)
        return Sample(array, meta)

    # ------------------------------------------------------------------------------------------------
    # infer

    def _stack(self, arrays: Sequence[np.ndarray | Sample]) -> torch.Tensor:
        if len(arrays) == 0:
            raise ValueError("infer() needs at least one array")
        want = (3, *self.input_size)
        items = []
        for i, a in enumerate(arrays):
            a = a.array if isinstance(a, Sample) else np.asarray(a)
            if a.shape != want or a.dtype != np.uint8:
                raise ValueError(
                    f"array {i} has shape {a.shape} dtype {a.dtype}; expected uint8 {want} "
                    f"(use Predictor.preprocess)"
                )
            items.append(a)
        batch = torch.from_numpy(np.stack(items))
        if self.device.type == "cuda":
            batch = batch.pin_memory().to(self.device, non_blocking=True)
        else:
            batch = batch.to(self.device)
        return batch

    def infer(self, arrays: Sequence[np.ndarray | Sample]) -> list[dict[str, torch.Tensor]]:
        """One batched forward (with ``forward_batch`` set: consecutive forwards of at most that many
        images; the results do not depend on it). Returns per sample a dict of CPU float32 tensors:
        classify ``{"probs": nc}``, segment ``{"logits": nc×H×W}``, detect ``{"boxes": N×4 (input
        pixels), "scores": N×nc}``.

        With the manifest's ``tta`` views (e.g. ``["hflip"]``) each image is also run flipped, in the same
        forward (batch ×(1 + views)), and the outputs are averaged in the plain image's frame: class
        probabilities; per-pixel probabilities (returned as log-probabilities, so softmax gives their mean);
        per-anchor boxes and scores (the flipped head maps are mirrored back anchor by anchor, before NMS).
        """
        x = self._stack(arrays)
        k = self.forward_batch
        if not k or x.shape[0] <= k:
            return self._forward(x)
        return [r for i in range(0, x.shape[0], k) for r in self._forward(x[i : i + k])]

    def _forward(self, x: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        """One forward of a stacked uint8 batch (see infer)."""
        b = x.shape[0]
        dims = [TTA_VIEWS[v] for v in self.tta]
        with torch.inference_mode():
            x = x.float().mul_(self._scale).add_(self._shift)
            if dims:
                x = torch.cat([x] + [x.flip(d) for d in dims])
            if self.runner is not None and not dims:
                return self._forward_runner(x, b)
            y = self.model(x)
            if self.task == "classify":
                probs = torch.softmax(y.float(), dim=1)
                out = {"probs": probs.view(-1, b, *probs.shape[1:]).mean(0)}
            elif self.task == "segment":
                if dims:
                    p = torch.softmax(y.float(), dim=1).split(b)
                    p = torch.stack([p[0]] + [q.flip(d) for q, d in zip(p[1:], dims, strict=True)]).mean(0)
                    out = {"logits": p.clamp_min(1e-12).log()}
                else:
                    out = {"logits": y.float()}
            else:
                if dims:
                    views = [list(t) for t in zip(*(r.split(b) for r in y), strict=True)]
                    views = [views[0]] + [self.model.flip_raw(v, d) for v, d in zip(views[1:], dims, strict=True)]
                    y = [torch.cat(level) for level in zip(*views, strict=True)]
                boxes, scores = self.model.decode(y)
                out = {"boxes": boxes.float().view(-1, b, *boxes.shape[1:]).mean(0),
                       "scores": scores.float().view(-1, b, *scores.shape[1:]).mean(0)}
            cpu = {k: v.to("cpu") for k, v in out.items()}
        # clone per sample: a sample's raw must not keep the whole batch alive
        return [{k: v[i].clone() for k, v in cpu.items()} for i in range(b)]

    def _forward_runner(self, x: torch.Tensor, b: int) -> list[dict[str, torch.Tensor]]:
        outs = self.runner(x)
        if self.task == "classify":
            out = {"probs": torch.softmax(outs[0].float(), dim=1)}
        elif self.task == "segment":
            out = {"logits": outs[0].float()}
        else:
            out = {"boxes": outs[0].float(), "scores": outs[1].float()}
        cpu = {k: v.to("cpu") for k, v in out.items()}
        return [{k: v[i].clone() for k, v in cpu.items()} for i in range(b)]

    @property
    def backend(self) -> str:
        """Which backend runs the forward: ``eager`` or the runner's name (see model.backends)."""
        return "eager" if self.runner is None else str(getattr(self.runner, "name", "custom"))

    # ------------------------------------------------------------------------------------------------
    # postprocess

    def postprocess(
        self,
        raw: Mapping[str, Any],
        meta: Mapping[str, Any],
        conf: float = 0.25,
        iou: float | None = None,
        max_det: int = 300,
        top_k: int = 5,
        mask_crops: bool = False,
        rule: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Raw output of one sample + its meta → ``{"verdict", "defects"[, "top_k"]}`` (plain Python;
        segment masks are bool numpy arrays of the original size, or with ``mask_crops`` only the part
        inside the defect's box, ``mask[y1:y2, x1:x2]``: a large image with many defects then holds one
        box-sized array per defect instead of one full-size array each). ``rule``: the verdict rule to
        apply instead of the manifest's (a recipe's). A defect that fails the part by the rule is always
        reported, even under ``conf``, so that every ``fail`` shows what caused it. ``iou`` (detect): the NMS
        IoU threshold; None = the model's own (`nms_iou`)."""
        r = self.rule(rule)
        if self.task == "classify":
            return self._post_classify(raw, int(top_k), r)
        if self.task == "detect":
            return self._post_detect(raw, meta, float(conf), self.nms_iou if iou is None else float(iou),
                                     int(max_det), r)
        return self._post_segment(raw, meta, float(conf), int(max_det), bool(mask_crops), r)

    def rule(self, rule: Mapping[str, Any] | None = None) -> Rule:
        """A verdict rule (the manifest's when None; else e.g. a recipe's, `model.verdict`) as per-class arrays.
        ValueError when it names a class this model does not have."""
        if rule is None:
            return self._rule
        unknown = sorted(set(rule.get("classes") or {}) - set(self.classes))
        unknown += sorted(set(rule.get("pass_labels") or []) - set(self.classes))
        if unknown:
            raise ValueError(f"the verdict rule names {', '.join(map(repr, unknown))}, not a class of {self.name} "
                             f"(classes: {', '.join(self.classes)})")
        min_scores, min_areas = verdict_thresholds(rule, self.classes)
        pass_ids: list[int] = []
        if self.task == "classify":
            pl = set(rule.get("pass_labels", []))
            pass_ids = [i for i, c in enumerate(self.classes) if c in pl]
            min_scores[pass_ids] = np.inf
        return Rule(dict(rule), min_scores, min_areas, pass_ids)

    def _entry(self, cid: int, score: float) -> dict[str, Any]:
        return {"label": self.classes[cid], "class_id": int(cid), "score": float(score)}

    def _post_classify(self, raw, top_k: int, r: Rule) -> dict[str, Any]:
        probs = torch.as_tensor(raw["probs"]).float().numpy().astype(np.float64)
        order = np.argsort(-probs, kind="stable")
        k = max(1, min(top_k, len(order)))
        result: dict[str, Any] = {"top_k": [self._entry(int(i), probs[i]) for i in order[:k]]}
        pass_mass = float(probs[r.pass_ids].sum()) if r.pass_ids else 0.0
        fail = (1.0 - pass_mass) >= float(r.rule.get("min_score", 0.5)) or bool((probs >= r.min_scores).any())
        result["verdict"] = "fail" if fail else "pass"
        defects = []
        if fail:
            worst = next((int(i) for i in order if int(i) not in r.pass_ids), None)
            if worst is not None:
                defects.append(self._entry(worst, probs[worst]))
        result["defects"] = defects
        return result

    def _post_detect(self, raw, meta, conf: float, iou: float, max_det: int, r: Rule) -> dict[str, Any]:
        from model.heads.detect import postprocess_detections

        boxes = torch.as_tensor(raw["boxes"]).float()
        scores = torch.as_tensor(raw["scores"]).float()
        thr = min(conf, float(r.min_scores.min()))
        det = postprocess_detections(
            boxes[None], scores[None], conf=_below(thr), iou=iou, max_det=boxes.shape[0]
        )[0]
        b = T.boxes_to_original(det["boxes"].numpy(), meta)
        areas = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
        cands = []
        for (x1, y1, x2, y2), area, s, c in zip(
            b.tolist(), areas.tolist(), det["scores"].tolist(), det["labels"].tolist(), strict=True
        ):
            if area <= 0:  # entirely in the letterbox padding
                continue
            cands.append(
                {
                    **self._entry(int(c), s),
                    "box": {"x1": x1, "y1": y1, "x2": x2, "y2": y2},
                    "area": float(area),
                }
            )
        verdict = verdict_for(r.rule, cands)
        defects = [d for d in cands if d["score"] >= conf or r.decides(d["class_id"], d["score"], d["area"])]
        return {"verdict": verdict, "defects": defects[: max(0, max_det)]}

    def _post_segment(self, raw, meta, conf: float, max_det: int, mask_crops: bool, r: Rule) -> dict[str, Any]:
        labels, probs = T.logits_to_original(raw["logits"], meta)
        return self.segment_defects(labels, probs, conf, max_det, mask_crops, r)

    def segment_defects(self, labels: np.ndarray, probs: np.ndarray, conf: float = 0.25, max_det: int = 300,
                        mask_crops: bool = False, r: Rule | None = None) -> dict[str, Any]:
        """``{"verdict", "defects"}`` of a label map and its class probabilities at the original size (what
        `T.logits_to_original` returns): one defect per connected region of each defect class."""
        h, w = labels.shape
        cands = []
        for cid in range(1, len(self.classes)):
            cmask = labels == cid
            if not cmask.any():
                continue
            comp, n = mask_ops.label_components(cmask, connectivity=8)
            areas, boxes, sums = mask_ops.component_stats(comp, n, probs)
            for k in range(n):
                cands.append((float(sums[k] / areas[k]), int(areas[k]), cid, k + 1, boxes[k], comp))
        r = r or self._rule
        verdict = verdict_for(r.rule, ({"score": c[0], "area": c[1], "label": self.classes[c[2]]} for c in cands))
        keep = sorted((c for c in cands if c[0] >= conf or r.decides(c[2], c[0], c[1])),
                      key=lambda c: (-c[0], -c[1]))[: max(0, max_det)]
        defects = []
        for score, area, cid, k, (x1, y1, x2, y2), comp in keep:
            crop = comp[y1:y2, x1:x2] == k
            if mask_crops:
                mask = crop
            else:
                mask = np.zeros((h, w), dtype=bool)
                mask[y1:y2, x1:x2] = crop
            defects.append(
                {
                    **self._entry(cid, score),
                    "box": {"x1": float(x1), "y1": float(y1), "x2": float(x2), "y2": float(y2)},
                    "area": float(area),
                    "mask": mask,
                }
            )
        return {"verdict": verdict, "defects": defects}

    # ------------------------------------------------------------------------------------------------
    # convenience

    def predict(
        self,
        images,
        *,
        batch_size: int = 16,
        conf: float = 0.25,
        iou: float | None = None,
        max_det: int = 300,
        top_k: int = 5,
    ) -> list[dict[str, Any]]:
        """preprocess → infer (in batches of ``batch_size``) → postprocess. A single image is accepted too
        (the result is still a list). Each result also carries ``image {width, height}``."""
        if not isinstance(images, (list, tuple)):
            images = [images]
        samples = [self.preprocess(im) for im in images]
        results: list[dict[str, Any]] = []
        for start in range(0, len(samples), max(1, int(batch_size))):
            chunk = samples[start : start + max(1, int(batch_size))]
            raws = self.infer([s.array for s in chunk])
            for s, r in zip(chunk, raws, strict=True):
                out = self.postprocess(r, s.meta, conf=conf, iou=iou, max_det=max_det, top_k=top_k)
                out["image"] = {"width": s.meta["orig_w"], "height": s.meta["orig_h"]}
                results.append(out)
        return results

    def tune_forward_batch(self, max_batch: int, *, tolerance: float = 0.05, min_seconds: float = 0.0,
                           clock=time.perf_counter, rounds: int = 3, give_up: float = 0.10) -> dict[int, float]:
        """Measure milliseconds per image of one forward of 1, 2, 4, … images at the input size (at most
        ``max_batch``, at most 8: beyond that gains are small and measuring costs start-up time) and set
        ``forward_batch`` by `choose_forward_batch`. Each size: one untimed forward, then at least ``rounds``
        timed ones, more until ``min_seconds`` have passed; the fastest counts. Doubling goes on until a size
        costs more per image than the best before it by more than ``give_up``: the cost per image is not
        monotonic (the classifier on the 2-core CPU: 25.1, 24.0, 22.9, 23.2 ms at 1, 2, 4, 8), so a size
        that is merely not faster does not end the search, one clearly slower does (larger activations only
        get slower on a CPU, and a batch of 8 costs the segmenters seconds to measure). Returns
        ``{size: ms per image}``."""
        random = np.random.default_rng(0).integers(0, 256, (3, *self.input_size), dtype=np.uint8)
        self.forward_batch = None
        timings: dict[int, float] = {}
        size, top = 1, max(1, min(int(max_batch), 8))
        while size <= top:
            x = self._stack([random] * size)  # infer stacks a batch once, then runs its forwards
            self._forward(x)
            runs: list[float] = []
            start = clock()
            while len(runs) < max(1, rounds) or clock() - start < min_seconds:
                t0 = clock()
                self._forward(x)
                runs.append(clock() - t0)
            best = min(timings.values(), default=None)
            timings[size] = 1000.0 * min(runs) / size
            if best is not None and timings[size] > best * (1.0 + give_up):
                break  # clearly slower per image than a smaller size: larger ones will be slower still
            size *= 2
        self.forward_batch = choose_forward_batch(timings, tolerance)
        return timings
