"""Training: `s2amnet train --task {classify,detect,segment} --data DIR ...`.

One loop for the three tasks; what differs per task (datasets, loss, the metric that picks the best
epoch, defaults) is a `TaskRecipe`. Every epoch: train (AdamW, linear warm-up then cosine, EMA of the
weights, class-balanced sampling where classes are skewed), validate the EMA weights through the same
`Predictor` + `evaluate` code the service and `s2amnet eval` use, append to ``log.csv``, redraw
``curves.png``, write ``last.pt`` (everything needed to resume) and, when the validation metric
improved, export the EMA weights to ``<out>/best/`` (model.safetensors + manifest.json).

The output folder layout (``--out runs/NAME``)::

    runs/NAME/config.json   the resolved configuration
    runs/NAME/last.pt       resume state: model, EMA, optimiser, scheduler, epoch, history
    runs/NAME/log.csv       one row per epoch
    runs/NAME/curves.png    training curves
    runs/NAME/best/         the best EMA weights (a weights folder ready for `weights/`)
    runs/NAME/best-mask/    classify with masks only: the backbone + auxiliary mask decoder as a
                            segment model, picked by its own validation mIoU (``--export-mask``)
    runs/NAME/epochs/NNN/   ``--keep-epochs``: every validated epoch's EMA weights with its val metrics
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import shlex
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel
from torch.utils.data import DataLoader, WeightedRandomSampler
from tqdm import tqdm

from model.checkpoint import save_model
from model.data import (
    DEFECT_KEEP,
    ClassifyDataset,
    DatasetFormatError,
    DetectDataset,
    SegmentDataset,
    collate,
    collate_detect,
    defect_fractions,
    load_records,
    sample_weights,
    split_records,
)
from model.device import missing_gpu
from model.evaluate import evaluate
from model.losses import DetectionLoss, SegmentationLoss
from model.predictor import Predictor
from model.registry import MIN_INPUT_SIZE, build_model

__all__ = ["TrainConfig", "TrainConfigError", "TrainOutputError", "RECIPES", "train"]


@dataclass(frozen=True)
class TaskRecipe:
    """Per-task defaults (each overridable from the command line) and the selection metric."""

    imgsz: int
    batch: int
    epochs: int
    lr: float
    weight_decay: float
    warmup_epochs: float
    metric: str
    balance_power: float  # class-balanced sampling strength (0 = uniform)
    crop: int | None = None  # segment: training crop size
    extra: dict = field(default_factory=dict)


RECIPES: dict[str, TaskRecipe] = {
    # DESIGN-model §4.2 (AdamW 1e-3, wd 0.01-0.05, label smoothing 0.1, warm-up + cosine), CPU-sized.
    # Where the images carry defect masks (magnetic-tile), an auxiliary MF-LiteSeg decoder on the same
    # backbone is trained on them (training only; not exported): image labels alone teach a small network
    # too little about small blowholes and cracks. 320 px keeps those defects visible.
    "classify": TaskRecipe(imgsz=320, batch=16, epochs=40, lr=2e-3, weight_decay=0.05, warmup_epochs=2,
                           metric="macro_recall", balance_power=0.5,
                           extra={"label_smoothing": 0.1, "aux_mask_weight": 1.0}),
    # §4.3 (AdamW 1e-3, wd 1e-4, warm-up + poly); CE + Dice against the thin-crack class imbalance. Half
    # of the crops are centred on a defect pixel: small defects (magnetic-tile: ~0.1 % of the pixels)
    # are otherwise seldom in a crop at all.
    "segment": TaskRecipe(imgsz=512, batch=8, epochs=80, lr=2e-3, weight_decay=1e-4, warmup_epochs=3,
                          metric="miou", balance_power=0.5, crop=256, extra={"dice_weight": 1.0, "fg_crop": 0.5}),
    # §4.4 (AdamW, cosine to 1 %, mosaic, loss gains 7.5/0.5/1.5), at 256 px for the CPU budget.
    "detect": TaskRecipe(imgsz=256, batch=16, epochs=150, lr=2e-3, weight_decay=5e-4, warmup_epochs=3,
                         metric="map50", balance_power=0.0),
}


class TrainConfigError(ValueError):
    """A training option out of range or meaningless for the task; the message names the CLI flag."""


class TrainOutputError(RuntimeError):
    """The run trained, but copying its result to --export / --export-mask failed; the message names the
    option and where the trained weights are."""


MAX_BALANCE = 1.0  # --balance: 1 = every class equally often (weights 1 / class count)
MAX_EXPOSURE = 1.5  # --exposure: gains up to e^1.5 ≈ 4.5 (magnetic tile's exposures differ by up to ≈ 2.5x)
SELECT_RULES = ("pooled", "folders")  # --select: the val score that picks the best epoch


@dataclass
class TrainConfig:
    task: str
    data: str
    variant: str = "tiny"
    epochs: int | None = None
    imgsz: int | None = None
    batch: int | None = None
    lr: float | None = None
    weight_decay: float | None = None
    warmup_epochs: float | None = None
    crop: int | None = None
    balance: float | None = None  # classify/segment: class-balanced sampling strength (recipe: 0.5)
    out: str = ""
    name: str = ""
    resume: bool = False
    export: str | None = None
    workers: int | None = None
    seed: int = 42
    device: str = "auto"
    amp: bool | None = None  # None: bf16 autocast on CUDA only (no bf16 units on the CPU machines here)
    ema_decay: float = 0.999
    lr_final: float = 0.01  # final LR as a fraction of lr
    val_every: int = 1
    time_limit: float | None = None  # minutes for this invocation: --epochs shrinks to what fits
    max_train_batches: int | None = None  # smoke tests: cap batches per epoch
    max_val_images: int | None = None
    threads: int | None = None
    init_backbone: str | None = None  # weights folder whose backbone.* tensors initialise the model (D6)
    init_weights: str | None = None  # weights folder of the same task/variant/classes to continue from
    aux_mask: bool = True  # classify: auxiliary mask head when the records carry masks
    export_mask: str | None = None  # classify with aux mask head: copy best-mask/ here at the end
    close_mosaic: int | None = None  # detect: no mosaic in the last N epochs (None/0: mosaic throughout)
    copy_paste: float = 0.0  # classify with masks: paste a defect onto a defect-free image; segment: a donor's
    # defects into the image (probability)
    defect_keep: float = DEFECT_KEEP  # classify with masks: least fraction of the defect pixels a random crop keeps
    fg_sampling: float = 0.0  # segment: sample images in proportion to (defect-pixel fraction) ** P; 0 = off
    rotate: float = 0.0  # segment: rotate training images by an angle drawn from [-rotate, rotate] degrees
    exposure: float = 0.0  # classify/segment: intensity gain drawn log-uniformly from [e^-G, e^G]; 0 = off
    select: str = "pooled"  # several data folders: best epoch by the pooled val metric or the mean of each folder's
    keep_epochs: bool = False  # also save every validated epoch's EMA weights to <out>/epochs/NNN/
    command: str = ""

    def validate(self) -> TrainConfig:
        """Check a resolved config (see `resolved`); raises `TrainConfigError` naming the CLI flag.
        `train()` calls it, so library callers get the same errors as `s2amnet train`."""
        from model.backbone import resolve_variant

        def bad(flag: str, why: str) -> NoReturn:
            raise TrainConfigError(f"{flag} {why}")

        try:  # (an unknown --task is refused by `resolved`, which every config passes first)
            resolve_variant(self.variant)
        except (TypeError, ValueError) as exc:
            raise TrainConfigError(f"--variant: {exc}") from None
        for flag, value in (("--epochs", self.epochs), ("--batch", self.batch), ("--val-every", self.val_every),
                            ("--max-val-images", self.max_val_images), ("--threads", self.threads)):
            if value is not None and value < 1:
                bad(flag, f"must be >= 1, got {value}")
        if self.max_train_batches is not None and self.max_train_batches < 0:  # 0: no steps (tests)
            bad("--max-train-batches", f"must be >= 0, got {self.max_train_batches}")
        if self.imgsz < MIN_INPUT_SIZE:
            bad("--imgsz", f"must be >= {MIN_INPUT_SIZE} (the network's total stride), got {self.imgsz}")
        if self.crop is not None:
            if self.task != "segment":
                bad("--crop", "is the training crop of --task segment")
            if self.crop < MIN_INPUT_SIZE:
                bad("--crop", f"must be >= {MIN_INPUT_SIZE}, got {self.crop}")
        if not self.lr > 0:
            bad("--lr", f"must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            bad("--weight-decay", f"must be >= 0, got {self.weight_decay}")
        if self.warmup_epochs < 0:
            bad("--warmup-epochs", f"must be >= 0, got {self.warmup_epochs}")
        if self.time_limit is not None and not self.time_limit > 0:
            bad("--time-limit", f"must be > 0 minutes, got {self.time_limit}")
        if self.workers is not None and self.workers < 0:
            bad("--workers", f"must be >= 0, got {self.workers}")
        if not 0.0 <= self.ema_decay < 1.0:
            bad("ema_decay", f"must be in [0, 1), got {self.ema_decay}")
        if not 0.0 <= self.lr_final <= 1.0:
            bad("lr_final", f"must be in [0, 1] (a fraction of --lr), got {self.lr_final}")
        if self.close_mosaic is not None and (self.task != "detect" or self.close_mosaic < 0):
            bad("--close-mosaic", "N needs --task detect and N >= 0 (mosaic is a detection augmentation)")
        if self.copy_paste and (self.task == "detect" or (self.task == "classify" and not self.aux_mask)
                                or not 0 < self.copy_paste <= 1):
            bad("--copy-paste", "P needs --task segment, or classify with masks (no --no-aux-mask), and "
                f"0 <= P <= 1, got {self.copy_paste}")
        if self.defect_keep != DEFECT_KEEP and (self.task != "classify" or not 0 < self.defect_keep <= 1):
            bad("--defect-keep", f"F needs --task classify and 0 < F <= 1, got {self.defect_keep}")
        if self.fg_sampling and (self.task != "segment" or not 0 < self.fg_sampling <= 4):
            bad("--fg-sampling", f"P needs --task segment and 0 <= P <= 4, got {self.fg_sampling}")
        if self.rotate and (self.task != "segment" or not 0 < self.rotate <= 180):
            bad("--rotate", f"DEG needs --task segment and 0 <= DEG <= 180, got {self.rotate}")
        if self.balance and (self.task == "detect" or not 0 < self.balance <= MAX_BALANCE):
            bad("--balance", f"P needs --task classify or segment and 0 <= P <= {MAX_BALANCE}, got {self.balance}")
        if self.exposure and (self.task == "detect" or not 0 < self.exposure <= MAX_EXPOSURE):
            bad("--exposure", f"G needs --task classify or segment and 0 <= G <= {MAX_EXPOSURE}, got {self.exposure}")
        if self.select not in SELECT_RULES:
            bad("--select", f"must be one of {', '.join(SELECT_RULES)}, got {self.select!r}")
        if self.select == "folders" and "," not in self.data:
            bad("--select", "folders needs several comma-separated --data folders")
        if self.export_mask and (self.task != "classify" or not self.aux_mask):
            bad("--export-mask", "needs --task classify with the auxiliary mask head (no --no-aux-mask)")
        # --device: cpu, or a CUDA GPU that torch sees here (refused now, not as a traceback mid-run)
        try:
            device = torch.device(self.device)
        except (RuntimeError, TypeError, ValueError):
            device = torch.device("meta")
        if device.type not in ("cpu", "cuda"):
            bad("--device", f"must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        if missing_gpu(self.device):
            bad("--device", f"{self.device}: torch sees no CUDA GPU here (torch {torch.__version__}); "
                            "use --device cpu")
        if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
            bad("--device", f"{self.device}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
        return self

    def resolved(self) -> TrainConfig:
        """Fill every None from the task recipe."""
        if self.task not in RECIPES:
            raise TrainConfigError(f"--task must be one of {sorted(RECIPES)}, got {self.task!r}")
        r = RECIPES[self.task]
        c = dataclasses.replace(self)
        for k in ("epochs", "imgsz", "batch", "lr", "weight_decay", "warmup_epochs", "crop"):
            if getattr(c, k) is None:
                setattr(c, k, getattr(r, k))
        if c.balance is None:
            c.balance = r.balance_power
        if not c.name:
            c.name = f"{Path(c.data).name}-{c.task}"
        if not c.out:
            c.out = str(Path("runs") / c.name)
        if c.device == "auto":
            c.device = "cuda" if torch.cuda.is_available() else "cpu"
        if c.amp is None:
            c.amp = c.device.startswith("cuda")
        if c.workers is None:
            c.workers = max(0, min(4, (os.cpu_count() or 1) - 1))
        return c


# ----------------------------------------------------------------------------------------------------
# pieces


def _ema(model: nn.Module, decay: float) -> AveragedModel:
    """EMA of weights and buffers; the decay ramps up over the first ~2000 updates (early weights are
    poor, so they should not dominate the average)."""

    def multi_avg_fn(avg: list[torch.Tensor], cur: list[torch.Tensor], n: torch.Tensor) -> None:
        # called once per (device, dtype) group: one host sync for n, then one fused update
        if not avg[0].is_floating_point():  # integer buffers (BatchNorm's num_batches_tracked): follow
            torch._foreach_copy_(avg, cur)
            return
        d = decay * (1.0 - math.exp(-float(n) / 2000.0))
        torch._foreach_lerp_(avg, cur, 1.0 - d)  # avg·d + cur·(1 − d)

    return AveragedModel(model, multi_avg_fn=multi_avg_fn, use_buffers=True)


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on norms, biases, layer-scale and other 1-D parameters; skip frozen ones."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _lr_lambda(total_iters: int, warmup_iters: int, final: float):
    def f(it: int) -> float:
        if it < warmup_iters:
            return 1e-3 + (1 - 1e-3) * it / max(1, warmup_iters)
        p = min(1.0, (it - warmup_iters) / max(1, total_iters - warmup_iters))
        return final + (1 - final) * 0.5 * (1 + math.cos(math.pi * p))

    return f


def _mean_std(dataset, limit: int = 256) -> tuple[list[float], list[float]]:
    """Per-channel mean/std (0..1) over up to `limit` training images (grayscale data: equal channels)."""
    idx = np.linspace(0, len(dataset) - 1, min(limit, len(dataset))).astype(int)
    s = np.zeros(3)
    s2 = np.zeros(3)
    n = 0
    for i in idx:
        img = dataset.load_image(int(i)).astype(np.float64) / 255.0
        if img.ndim == 2:
            img = np.repeat(img[..., None], 3, axis=2)
        flat = img.reshape(-1, 3)
        s += flat.sum(0)
        s2 += (flat ** 2).sum(0)
        n += flat.shape[0]
    mean = s / n
    std = np.sqrt(np.maximum(s2 / n - mean ** 2, 1e-8))
    return [round(float(v), 5) for v in mean], [round(float(v), 5) for v in std]


def _verdict_rule(task: str, pass_classes: list[str]) -> dict:
    if task == "classify":
        return {"type": "classify", "pass_labels": list(pass_classes), "min_score": 0.5}
    return {"type": "any_defect", "min_score": 0.5, "min_area": 0}


class _Task:
    """Datasets, loss and one training step for a task."""

    def __init__(self, cfg: TrainConfig, info, train_recs, nc: int, groups: list[str] | None = None):
        self.cfg = cfg
        task = cfg.task
        self.aux: nn.Module | None = None
        if task == "classify":
            have_masks = all(r.has_mask for r in train_recs)
            use_masks = cfg.aux_mask and have_masks and "segment" in info.tasks
            if cfg.copy_paste and not use_masks:
                raise TrainConfigError("--copy-paste needs a data folder whose images all have defect masks "
                                       "(magnetic-tile layout)")
            if cfg.export_mask and not use_masks:
                raise TrainConfigError("--export-mask needs a data folder whose images all have defect masks "
                                       "(magnetic-tile layout): without them no mask head is trained")
            if cfg.defect_keep != DEFECT_KEEP and not have_masks:
                raise TrainConfigError("--defect-keep needs a data folder whose images all have defect masks "
                                       "(the crop keeps a fraction of the masked defect)")
            self.train_ds = ClassifyDataset(train_recs, imgsz=cfg.imgsz, train=True, with_mask=use_masks,
                                            paste=cfg.copy_paste, exposure=cfg.exposure,
                                            min_defect_keep=cfg.defect_keep)
            self.collate = collate
            self.loss = nn.CrossEntropyLoss(label_smoothing=RECIPES[task].extra["label_smoothing"])
            if use_masks:
                from model.heads.segment import MFLiteSegDecoder

                n_seg = info.num_classes("segment")
                self.aux = MFLiteSegDecoder(_backbone_channels(cfg.variant), n_seg)
                self.aux_nc = n_seg
                self.aux_loss = SegmentationLoss(n_seg, dice_weight=1.0)
                self.aux_weight = RECIPES[task].extra["aux_mask_weight"]
        elif task == "segment":
            self.train_ds = SegmentDataset(train_recs, imgsz=cfg.imgsz, crop=cfg.crop, train=True,
                                           fg_crop=RECIPES[task].extra["fg_crop"], rotate=cfg.rotate,
                                           paste=cfg.copy_paste, paste_groups=groups, exposure=cfg.exposure)
            self.collate = collate
            self.loss = SegmentationLoss(nc, dice_weight=RECIPES[task].extra["dice_weight"])
        else:
            self.train_ds = DetectDataset(train_recs, imgsz=cfg.imgsz, train=True)
            self.collate = collate_detect
            self.loss = DetectionLoss(nc)

    def step_loss(self, model: nn.Module, batch: dict, x: torch.Tensor, device) -> tuple[torch.Tensor, dict]:
        if self.cfg.task == "classify":
            if self.aux is None:
                return self.loss(model(x).float(), batch["label"].to(device)), {}
            feats = model.backbone(x)
            cls = self.loss(model.head(feats[-1]).float(), batch["label"].to(device))
            seg = self.aux_loss(self.aux(feats, x.shape[-2:]).float(), batch["mask"].to(device))
            return cls + self.aux_weight * seg, {"cls": cls.item(), "mask": seg.item()}
        out = model(x)
        if self.cfg.task == "segment":
            loss = self.loss(out.float(), batch["mask"].to(device))
            return loss, {}
        targets = [(b.to(device), c.to(device)) for b, c in zip(batch["boxes"], batch["classes"], strict=True)]
        loss, parts = self.loss([r.float() for r in out], targets)
        return loss, {k: float(v) for k, v in parts.items()}


def _write_csv(path: Path, history: list[dict]) -> None:
    keys: list[str] = []
    for row in history:
        keys += [k for k in row if k not in keys]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(history)


def _plot(path: Path, history: list[dict], metric: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = [h["epoch"] for h in history]
    fig, ax = plt.subplots(1, 3, figsize=(14, 4))
    ax[0].plot(ep, [h["train_loss"] for h in history], label="train loss")
    ax[0].set_xlabel("epoch")
    ax[0].legend()
    ax[0].set_yscale("log")
    for k in sorted({k for h in history for k in h if k.startswith("val_")}):
        if k.endswith("_s") or "num_" in k:  # seconds and counts are not scores
            continue
        pts = [(h["epoch"], h[k]) for h in history if h.get(k) not in (None, "")]
        if pts:
            ax[1].plot(*zip(*pts, strict=True), label=k[4:], lw=2.5 if k == f"val_{metric}" else 1)
    ax[1].set_xlabel("epoch")
    ax[1].set_ylim(0, 1)
    ax[1].grid(alpha=0.3)
    if ax[1].lines:
        ax[1].legend(fontsize=8)
    ax[2].plot(ep, [h["lr"] for h in history])
    ax[2].set_xlabel("epoch")
    ax[2].set_ylabel("learning rate")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _scalar_metrics(metrics: dict) -> dict:
    return {k: round(float(v), 5) for k, v in metrics.items() if isinstance(v, (int, float)) and k != "num_images"}


# ----------------------------------------------------------------------------------------------------
# the loop


# options a saved run configuration may hold that TrainConfig does not have, with the value that leaves
# training unchanged
_OPTIONS_WITHOUT_EFFECT = {"paste_edge": False, "paste_scale": 1.0, "erase": 0.0}


def _saved_options(saved: dict) -> dict:
    """A run's saved configuration as `TrainConfig` keywords: the `_OPTIONS_WITHOUT_EFFECT` left out when
    they hold their no-effect value; a run that set one otherwise cannot be continued as it was trained."""
    out = dict(saved)
    for key, neutral in _OPTIONS_WITHOUT_EFFECT.items():
        if key in out and out.pop(key) != neutral:
            raise TrainConfigError(f"--resume: the run was trained with --{key.replace('_', '-')} "
                                   f"{saved[key]}, which s2amnet train does not offer")
    return out


def _close_mosaic(ds, cfg: TrainConfig, epoch: int) -> bool:
    """Detection: turn mosaic off for the last ``cfg.close_mosaic`` epochs (the validation and service
    images are whole images, not 4-image collages). True when it was switched off now."""
    aug = getattr(ds, "augment", None)
    if not cfg.close_mosaic or aug is None or not getattr(aug, "mosaic", 0):
        return False
    if epoch <= cfg.epochs - cfg.close_mosaic:
        return False
    aug.mosaic = 0.0
    print(f"epoch {epoch}: mosaic off for the last {cfg.epochs - epoch + 1} epoch(s)")
    return True


# --resume: the options this invocation may set anew (the length of the run, the machine, the outputs);
# given, they replace the saved run's
RESUME_OPTIONS = ("epochs", "time_limit", "close_mosaic", "workers", "threads", "max_train_batches",
                  "max_val_images", "export", "export_mask")
# always this invocation's: the machine may differ from the one that started the run
_RESUME_MACHINE = ("device", "amp", "val_every")
RESUME_FLAGS = ("--epochs, --time-limit, --close-mosaic, --workers, --threads, --export, --export-mask, "
                "--keep-epochs, --device, --val-every")  # the CLI flags of the above, for messages
_FLAG_NAMES = {"aux_mask": "--no-aux-mask", "ema_decay": "ema_decay", "lr_final": "lr_final"}  # not --field-name


def _as_option(key: str, value: Any) -> str:
    """A TrainConfig field's value as the option that gives it: ``--lr 0.001``, ``no --init-weights``."""
    flag = _FLAG_NAMES.get(key, "--" + key.replace("_", "-"))
    if key == "aux_mask":
        return "the auxiliary mask head" if value else flag
    if isinstance(value, bool):
        return flag if value else f"no {flag}"
    return f"no {flag}" if value is None else f"{flag} {value}"


def _same_data(given: str, saved: str) -> bool:
    """Whether two --data values name the same folders (as written, or resolved from here)."""
    def folders(data: str) -> list[Path]:
        return [Path(d.strip()).resolve() for d in data.split(",") if d.strip()]

    return given == saved or folders(given) == folders(saved)


def _check_resume_options(cfg: TrainConfig, saved: TrainConfig, last_path: Path) -> None:
    """--resume continues a run as it was trained: an option of this invocation that is neither one of the
    `RESUME_OPTIONS` nor left at its default must agree with the saved run (e.g. the same command again with
    --resume); otherwise it is refused with the option named, rather than silently dropped."""
    may_differ = {*RESUME_OPTIONS, *_RESUME_MACHINE, "keep_epochs", "out", "resume", "command"}
    for f in dataclasses.fields(TrainConfig):
        if f.name in may_differ:
            continue
        given, was = getattr(cfg, f.name), getattr(saved, f.name)
        if f.default is not dataclasses.MISSING and given == f.default:
            continue  # not given: the saved run's value
        if given == was or (f.name == "data" and _same_data(given, was)):
            continue
        raise TrainConfigError(
            f"{_as_option(f.name, given)}: the run in {last_path.parent} was trained with "
            f"{_as_option(f.name, was)}; --resume continues a run as it was trained (only {RESUME_FLAGS} "
            "may change): start a new run in another --out to train otherwise")


def _load_state(last_path: Path) -> tuple[dict, TrainConfig]:
    """The resume state in ``last.pt`` and the run's saved configuration; `CheckpointError` naming the file
    where it is not one `train` wrote (damaged, truncated, another kind of file)."""
    from model.checkpoint import CheckpointError

    try:
        state = torch.load(last_path, map_location="cpu", weights_only=True)
        saved = json.loads(state["config"])
    except Exception as exc:  # noqa: BLE001 - any damage to the file reads as one of many errors
        raise CheckpointError(f"--resume: {last_path} is not a training state that s2amnet train wrote "
                              f"(damaged or another file: {type(exc).__name__}); start the run again without "
                              "--resume, or in another --out") from None
    try:
        return state, TrainConfig(**_saved_options(saved))
    except TypeError as exc:
        raise CheckpointError(f"--resume: {last_path} holds a configuration this version cannot continue "
                              f"({exc})") from None


def _resume(cfg: TrainConfig, last_path: Path) -> tuple[TrainConfig, dict | None, list[str]]:
    """(config, saved state or None, the commands that resumed the run): ``--resume`` continues the saved
    run with its data, architecture and recipe; only the `RESUME_OPTIONS` (when given), the machine's
    options and --keep-epochs come from this invocation, any other option given must agree with the run."""
    if not cfg.resume:
        return cfg, None, []
    if not last_path.is_file():
        raise FileNotFoundError(f"--resume: no {last_path} to resume from")
    state, saved = _load_state(last_path)
    _check_resume_options(cfg, saved, last_path)
    overrides = {k: getattr(cfg, k) for k in RESUME_OPTIONS if getattr(cfg, k) is not None}
    resumed_with = json.loads(state.get("resumed_with", "[]")) + ([cfg.command] if cfg.command else [])
    cfg = dataclasses.replace(saved, **overrides, **{k: getattr(cfg, k) for k in _RESUME_MACHINE}, resume=True,
                              keep_epochs=saved.keep_epochs or cfg.keep_epochs, out=str(last_path.parent))
    return cfg, state, resumed_with


def _splits(cfg: TrainConfig, records: list, source: dict) -> tuple[list, list, list[str] | None]:
    """(train records, val records, val groups for --select folders)."""
    train_recs = split_records(records, "train")
    val_recs = split_records(records, "val")
    if cfg.max_val_images:
        val_recs = val_recs[: cfg.max_val_images]
    if not train_recs or not val_recs:
        raise DatasetFormatError(f"{cfg.data}: need labelled images in both the train and the val split "
                                 f"(got {len(train_recs)} / {len(val_recs)})")
    # --select folders: each val record's folder name, so validation also scores every folder on its own
    labels = _folder_labels(source)
    val_groups = [labels[source[id(r)]] for r in val_recs] if cfg.select == "folders" else None
    return train_recs, val_recs, val_groups


@dataclasses.dataclass
class _Models:
    """The trained modules: the task model and its EMA; with an auxiliary mask head also the segment model
    it forms with the shared backbone, and that model's EMA."""

    model: nn.Module
    ema: Any
    trained: nn.ModuleList
    mask_model: nn.Module | None = None
    ema_mask: Any = None


def _build_models(cfg: TrainConfig, task: _Task, info, classes: list[str], device, fresh: bool) -> _Models:
    model = build_model(cfg.task, cfg.variant, len(classes)).to(device)
    if cfg.init_backbone and fresh:
        from model.checkpoint import load_backbone_from

        loaded = load_backbone_from(model, cfg.init_backbone)
        print(f"initialised {len(loaded['loaded'])} backbone tensors from {cfg.init_backbone}")
    if cfg.init_weights and fresh:
        _init_weights(model, cfg, classes)
    out = _Models(model, _ema(model, cfg.ema_decay),
                  nn.ModuleList([model] + ([task.aux.to(device)] if task.aux is not None else [])))
    # classify with masks: the same backbone + the auxiliary decoder form a segment model; it gets its
    # own EMA and validation, so one run also yields a segmenter (the backbone is shared, not copied)
    if task.aux is not None:
        # built with the classifier's layer scale (on in base/large): its manifest must describe that backbone
        mask_model = build_model("segment", cfg.variant, task.aux_nc, layer_scale=model.layer_scale).to(device)
        mask_model.backbone, mask_model.decoder = model.backbone, task.aux
        if cfg.init_backbone and fresh:
            _init_aux_decoder(task.aux, cfg.init_backbone, info.class_names("segment"))
        out.mask_model, out.ema_mask = mask_model, _ema(mask_model, cfg.ema_decay)
    return out


def _train_epoch(cfg: TrainConfig, task: _Task, m: _Models, loader, opt, sched, iters: int, epoch: int,
                 norm: tuple[torch.Tensor, torch.Tensor], device, progress: bool) -> tuple[float, dict, int]:
    """One pass over the training data: (summed loss, summed loss parts, batches)."""
    m.trained.train()
    mean, std = norm
    loss_sum, parts_sum, n = 0.0, {}, 0
    bar = tqdm(total=iters, desc=f"{cfg.name} {epoch}/{cfg.epochs}", disable=not progress, leave=False,
               unit="batch")
    for i, batch in enumerate(loader):
        if i >= iters:
            break
        x = (batch["image"].to(device, non_blocking=True).float() / 255.0 - mean) / std
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.amp):
            loss, parts = task.step_loss(m.model, batch, x, device)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss at epoch {epoch}, batch {i}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(m.trained.parameters(), 10.0)
        opt.step()
        sched.step()
        m.ema.update_parameters(m.model)
        if m.ema_mask is not None:
            m.ema_mask.update_parameters(m.mask_model)
        loss_sum += loss.item()
        for k, v in parts.items():
            parts_sum[k] = parts_sum.get(k, 0.0) + v
        n += 1
        bar.set_postfix(loss=f"{loss_sum / n:.4f}")
        bar.update(1)
    bar.close()
    return loss_sum, parts_sum, n


def _manifest_base(cfg: TrainConfig, info, classes, mean, std, data_name: str, train_count: int,
                   resumed_with: list[str], lineage: list) -> dict[str, Any]:
    # a detector continued from a calibrated one keeps its NMS threshold (epochs are picked at it), as the
    # source's manifest had it when the run started (in the lineage)
    post = next((e["postprocess"] for e in lineage if e["how"] == "init_weights" and "postprocess" in e), None)
    return {
        "name": cfg.name,
        "version": "1.0.0",
        "task": cfg.task,
        "arch": {"variant": cfg.variant, "input_size": [cfg.imgsz, cfg.imgsz], "num_classes": len(classes)},
        "classes": classes,
        "mean": mean,
        "std": std,
        "preprocess": {"resize": "letterbox", "pad_value": 114},
        "verdict": _verdict_rule(cfg.task, info.pass_classes),
        "trained_on": f"{info.format}: {data_name}, {train_count} train images "
                      f"(split train: sha1('val:'+stem) % 5 != 0; the epoch picked on split val)",
        "train_command": cfg.command or "s2amnet train " + shlex.join(sys.argv[1:]),
        **({"resumed_with": resumed_with} if resumed_with else {}),
        **({"initialised_from": lineage} if lineage else {}),
        **({"postprocess": post} if post else {}),
    }


def _save_last(path: Path, cfg: TrainConfig, m: _Models, opt, sched, progress_state: dict[str, Any]) -> None:
    """The resumable state (`--resume`), written atomically."""
    tmp = path.with_suffix(".tmp")
    torch.save({"model": m.trained.state_dict(), "ema": m.ema.state_dict(), "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(), **({"ema_mask": m.ema_mask.state_dict()} if m.ema_mask else {}),
                "config": json.dumps(dataclasses.asdict(cfg)), "rng": torch.get_rng_state(), **progress_state}, tmp)
    os.replace(tmp, path)


def _setup_process(cfg: TrainConfig) -> torch.device:
    """Threads, seeds and cuDNN for the run; returns its device."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    device = torch.device(cfg.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input sizes in training and validation
    return device


def _optimizer(cfg: TrainConfig, m: _Models, iters_per_epoch: int, device) -> tuple[Any, Any, int]:
    """AdamW with warm-up + cosine schedule: (optimizer, scheduler, warm-up iterations)."""
    opt = torch.optim.AdamW(_param_groups(m.trained, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.999),
                            fused=device.type == "cuda")  # one kernel per step: small models are launch-bound
    warmup_iters = int(cfg.warmup_epochs * iters_per_epoch)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, _lr_lambda(cfg.epochs * iters_per_epoch, warmup_iters, cfg.lr_final))
    return opt, sched, warmup_iters


def _restore(state: dict | None, m: _Models, opt, sched) -> tuple[int, list, float, int, float]:
    """Load a resumed run's modules, optimiser, schedule and RNG; (first epoch, history, best, best epoch,
    best mask score) — a fresh run: (1, [], -1, 0, -1)."""
    if state is None:
        return 1, [], -1.0, 0, -1.0
    m.trained.load_state_dict(state["model"])
    m.ema.load_state_dict(state["ema"])
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"])
    if m.ema_mask is not None and "ema_mask" in state:
        m.ema_mask.load_state_dict(state["ema_mask"])
    return (int(state["epoch"]) + 1, json.loads(state["history"]), float(state["best"]), int(state["best_epoch"]),
            float(state.get("best_mask", -1.0)))


def _write_log(out: Path, history: list[dict], metric: str, cfg: TrainConfig) -> None:
    """log.csv and curves.png of the run so far (a failing plot never stops training)."""
    _write_csv(out / "log.csv", history)
    try:
        _plot(out / "curves.png", history, metric, f"{cfg.name} ({cfg.task}, {cfg.variant})")
    except Exception as exc:  # noqa: BLE001
        print(f"warning: could not draw curves: {exc}", file=sys.stderr)


def train(cfg: TrainConfig, progress: bool = True) -> dict[str, Any]:
    """Train (or resume) and return ``{"best": {...metrics}, "best_epoch": n, "export": path}``."""
    out = Path(cfg.out or Path("runs") / (cfg.name or f"{Path(cfg.data).name}-{cfg.task}"))
    last_path = out / "last.pt"
    cfg, state, resumed_with = _resume(cfg, last_path)
    cfg = cfg.resolved().validate()
    _check_outputs(cfg, out)
    device = _setup_process(cfg)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise TrainConfigError(f"--out {out}: cannot create the run folder ({exc.strerror or exc})") from None
    recipe = RECIPES[cfg.task]

    info, source = _load_data(cfg.data, cfg.task)
    data_name = "+".join(Path(d).name for d in cfg.data.split(","))
    classes = info.class_names(cfg.task)
    train_recs, val_recs, val_groups = _splits(cfg, info.records_for(cfg.task), source)
    # segment copy-paste draws its donors from the image's own data folder
    task = _Task(cfg, info, train_recs, len(classes), groups=[source[id(r)] for r in train_recs])
    task.train_ds.preload(progress=progress)
    (out / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))

    mean, std = (state["mean"], state["std"]) if state is not None else _mean_std(task.train_ds)
    fg = defect_fractions(task.train_ds) if cfg.fg_sampling else None
    sampler = _sampler(train_recs, cfg.task, cfg.balance, source, fg=fg, fg_power=cfg.fg_sampling)

    def make_loader() -> DataLoader:
        return DataLoader(task.train_ds, batch_size=cfg.batch, shuffle=sampler is None, sampler=sampler,
                          num_workers=cfg.workers, collate_fn=task.collate, drop_last=len(train_recs) > cfg.batch,
                          persistent_workers=cfg.workers > 0, pin_memory=device.type == "cuda")

    loader = make_loader()
    iters_per_epoch = len(loader) if cfg.max_train_batches is None else min(len(loader), cfg.max_train_batches)
    m = _build_models(cfg, task, info, classes, device, fresh=state is None)
    opt, sched, warmup_iters = _optimizer(cfg, m, iters_per_epoch, device)
    start_epoch, history, best, best_epoch, best_mask = _restore(state, m, opt, sched)

    # read at the start: on resume the folders may since hold other weights (e.g. --export to the source)
    lineage = json.loads(state["lineage"]) if state is not None and "lineage" in state else _lineage(cfg)
    manifest_base = _manifest_base(cfg, info, classes, mean, std, data_name, len(train_recs), resumed_with,
                                   lineage)
    norm = (torch.tensor(mean, device=device).view(1, 3, 1, 1), torch.tensor(std, device=device).view(1, 3, 1, 1))
    best_dir = out / "best"
    t_start, epoch, requested = time.time(), start_epoch - 1, cfg.epochs
    while epoch < cfg.epochs:
        epoch += 1
        if _close_mosaic(task.train_ds, cfg, epoch):
            loader = make_loader()  # persistent workers hold their own copy of the dataset
        t0 = time.time()
        loss_sum, parts_sum, n = _train_epoch(cfg, task, m, loader, opt, sched, iters_per_epoch, epoch, norm,
                                              device, progress)
        if cfg.time_limit:
            _fit_time_limit(cfg, epoch, start_epoch, requested, t_start, t0, history, sched, iters_per_epoch,
                            warmup_iters)
        row: dict[str, Any] = {"epoch": epoch, "lr": opt.param_groups[0]["lr"],
                               "train_loss": round(loss_sum / max(n, 1), 5),
                               **{f"loss_{k}": round(v / max(n, 1), 5) for k, v in parts_sum.items()},
                               "train_s": round(time.time() - t0, 1)}
        improved = False
        if epoch % cfg.val_every == 0 or epoch == cfg.epochs:
            t1 = time.time()
            score = _validate(m.ema.module, manifest_base, val_recs, recipe.metric, "val_", row, best_dir, best,
                              epoch, data_name, cfg, device, progress, groups=val_groups,
                              keep_dir=out / "epochs" / f"{epoch:03d}" if cfg.keep_epochs else None)
            if score > best:
                best, best_epoch, improved = score, epoch, True
            if m.ema_mask is not None:
                best_mask = max(best_mask, _validate_mask(m.ema_mask.module, manifest_base, info, cfg, device,
                                                          progress, row, out / "best-mask", best_mask, epoch,
                                                          data_name))
            row["val_s"] = round(time.time() - t1, 1)  # both validations
        history.append(row)
        _write_log(out, history, recipe.metric, cfg)
        _save_last(last_path, cfg, m, opt, sched, {
            "epoch": epoch, "best": best, "best_epoch": best_epoch, "best_mask": best_mask,
            "history": json.dumps(history), "resumed_with": json.dumps(resumed_with),
            "lineage": json.dumps(lineage), "mean": mean, "std": std})
        (out / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))  # epochs may shrink
        msg = " ".join(f"{k}={v}" for k, v in row.items())
        print(f"[{cfg.name}] {msg}{'  *best*' if improved else ''}", flush=True)

    return _finish(cfg, out, recipe.metric, best, best_epoch, best_mask if m.ema_mask is not None else None)


def _check_outputs(cfg: TrainConfig, out: Path) -> None:
    """Refuse, before any work, a run folder (--out) or --export / --export-mask folder that cannot be
    written: an existing file, or a folder to be made under an existing file or a folder not writable."""
    for flag, path in (("--out", out), ("--export", cfg.export), ("--export-mask", cfg.export_mask)):
        if not path:
            continue
        folder = Path(path)
        if folder.exists() and not folder.is_dir():
            raise TrainConfigError(f"{flag} {folder}: exists and is not a folder")
        nearest = folder  # the missing folders are made under the nearest existing one
        while not nearest.exists() and nearest != nearest.parent:
            nearest = nearest.parent
        if not nearest.is_dir():
            raise TrainConfigError(f"{flag} {folder}: {nearest} is not a folder")
        if not os.access(nearest, os.W_OK | os.X_OK):
            raise TrainConfigError(f"{flag} {folder}: {nearest} is not writable")


def _finish(cfg: TrainConfig, out: Path, metric: str, best: float, best_epoch: int,
            best_mask: float | None) -> dict[str, Any]:
    """Copy the best weights (and mask model) to --export / --export-mask; the run's result.
    `TrainOutputError` where a copy fails (a full disk, permissions changed during the run)."""
    copied, failed = {}, []
    for flag, src, dst in (("--export", out / "best", cfg.export),
                           ("--export-mask", out / "best-mask", cfg.export_mask)):
        try:
            copied[flag] = _copy_folder(src, dst)
        except OSError as exc:
            failed.append(f"{flag} {dst}: could not copy the best weights there ({exc}); "
                          f"the trained weights are in {src}")
    if failed:
        raise TrainOutputError("; ".join(failed))
    export, export_mask = copied["--export"], copied["--export-mask"]
    result = {"best": {metric: best}, "best_epoch": best_epoch, "out": str(out),
              "best_dir": str(out / "best"), "export": str(export) if export else None}
    if best_mask is not None:
        result.update(best_mask={"miou": best_mask}, export_mask=str(export_mask) if export_mask else None)
    return result


def _fit_time_limit(cfg: TrainConfig, epoch: int, start_epoch: int, requested: int, t_start: float,
                    t_epoch: float, history: list[dict], sched, iters_per_epoch: int, warmup_iters: int) -> None:
    """--time-limit: after the training part of `epoch`, fit cfg.epochs (and the cosine schedule) to the
    time budget, so that the run ends annealed rather than cut off.

    The epoch time is estimated from this invocation's recent epochs (training + validation). During
    the first two epochs the horizon may grow or shrink (never beyond the requested --epochs); after
    that it only shrinks — down to this epoch, which then is the last (validated and exported)."""
    budget = cfg.time_limit * 60.0
    now = time.time()
    elapsed = now - t_start
    mine = [r for r in history if r["epoch"] >= start_epoch]
    trains = [float(r["train_s"]) for r in mine[1:]][-3:] + [now - t_epoch]  # the first carries warm-up
    vals = [float(r["val_s"]) for r in mine if "val_s" in r][-3:]
    val_s = sum(vals) / len(vals) if vals else 0.5 * trains[-1]  # before the first validation: a guess
    per_epoch = sum(trains) / len(trains) + val_s / max(1, cfg.val_every)
    fit = epoch + int(max(0.0, budget - elapsed - val_s) // max(per_epoch, 1e-6))
    new = max(epoch, min(requested, fit))
    if epoch - start_epoch >= 2:
        new = min(new, cfg.epochs)
    if new == cfg.epochs:
        return
    print(f"[{cfg.name}] --time-limit {cfg.time_limit:g} min: {new} epochs (asked {requested}; "
          f"{per_epoch:.1f} s per epoch)", flush=True)
    cfg.epochs = new
    f = _lr_lambda(cfg.epochs * iters_per_epoch, warmup_iters, cfg.lr_final)
    sched.lr_lambdas = [f] * len(sched.lr_lambdas)
    for g, base in zip(sched.optimizer.param_groups, sched.base_lrs, strict=True):
        g["lr"] = base * f(sched.last_epoch)


def _lineage(cfg: TrainConfig) -> list[dict]:
    """The weights folders a run started from (--init-backbone / --init-weights), with their name,
    version and sha256 (and, for --init-weights of a detector, its postprocess settings), so that a shipped
    model's whole history can be followed."""
    from model.checkpoint import read_manifest

    out = []
    for how, folder in (("init_backbone", cfg.init_backbone), ("init_weights", cfg.init_weights)):
        if folder:
            m = read_manifest(folder)
            out.append({"how": how, "folder": folder, "name": m.get("name"), "version": m.get("version"),
                        "sha256": m.get("sha256"),
                        **({"postprocess": m["postprocess"]} if how == "init_weights" and "postprocess" in m else {})})
    return out


def _init_weights(model: nn.Module, cfg: TrainConfig, classes: list[str]) -> None:
    """--init-weights: start from a shipped model of the same task, variant and classes (all tensors; a
    new optimiser, schedule and EMA). The manifest's train_command then records where it came from."""
    from model.checkpoint import CheckpointError, load_model

    src, m = load_model(cfg.init_weights)
    want = {"task": cfg.task, "variant": cfg.variant, "classes": list(classes)}
    got = {"task": m.get("task"), "variant": m["arch"].get("variant"), "classes": list(m.get("classes", []))}
    if got != want:
        raise CheckpointError(f"--init-weights {cfg.init_weights}: it is {got}, this run needs {want}")
    model.load_state_dict(src.state_dict())
    print(f"initialised all {len(src.state_dict())} tensors from {cfg.init_weights}")


def _init_aux_decoder(aux: nn.Module, folder: str, seg_classes: list[str]) -> None:
    """--init-backbone from a segmenter of the same classes (e.g. one trained on the same masks) also
    initialises the auxiliary mask decoder from that segmenter's decoder."""
    from model.checkpoint import read_manifest

    path = Path(folder)
    try:
        m = read_manifest(path)
    except Exception:
        return
    if m.get("task") != "segment" or list(m.get("classes", [])) != list(seg_classes):
        return
    from safetensors.torch import load_file

    dec = {k[len("decoder."):]: v for k, v in load_file(str(path / "model.safetensors")).items()
           if k.startswith("decoder.")}
    aux.load_state_dict(dec)
    print(f"initialised the auxiliary mask decoder ({len(dec)} tensors) from {folder}")


def _copy_folder(src: Path, dst: str | None) -> Path | None:
    if not dst or not src.exists():
        return None
    import shutil

    out = Path(dst)
    out.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        shutil.copy2(f, out / f.name)
    return out


def _validate_mask(seg_model: nn.Module, manifest_base: dict, info, cfg: TrainConfig, device, progress: bool,
                   row: dict, best_dir: Path, best: float, epoch: int, data_name: str) -> float:
    """Validate the EMA segment model formed by the classifier's backbone and its auxiliary mask decoder
    on the segment records of the val split; save it to ``best_dir`` when its mIoU improved. Adds
    ``val_mask_*`` columns to ``row`` and returns the score."""
    t = time.time()
    recs = split_records(info.records_for("segment"), "val")
    if cfg.max_val_images:
        recs = recs[: cfg.max_val_images]
    classes = info.class_names("segment")
    # its own name (the service keys models by name): the export folder's, else <run name>-mask
    name = Path(cfg.export_mask).name if cfg.export_mask else f"{cfg.name}-mask"
    manifest = {**manifest_base, "name": name, "task": "segment", "classes": classes,
                "arch": {**manifest_base["arch"], "num_classes": len(classes)},
                "verdict": _verdict_rule("segment", info.pass_classes),
                "note": "backbone shared with the classifier of the same run, decoder trained as its "
                        "auxiliary mask head"}
    score = _validate(seg_model, manifest, recs, "miou", "val_mask_", row, best_dir, best, epoch, data_name,
                      cfg, device, progress)
    row["val_mask_s"] = round(time.time() - t, 1)
    return score


def _validate(model: nn.Module, manifest: dict, recs, metric: str, prefix: str, row: dict, best_dir: Path,
              best: float, epoch: int, data_name: str, cfg: TrainConfig, device, progress: bool,
              groups: list[str] | None = None, keep_dir: Path | None = None) -> float:
    """Evaluate a frozen copy of the (EMA) `model` through the Predictor on `recs`; add its scalar metrics
    to `row` as ``<prefix><name>``; save it with its val metrics to `best_dir` when the score beat `best`,
    and to `keep_dir` (``--keep-epochs``) whatever the score.
    The score is `metric` over all of `recs`, or with `groups` (a data folder name per record,
    ``--select folders``) the mean of each folder's `metric`, added to `row` as ``<prefix><folder>_<metric>``
    and ``<prefix>select_<metric>``. Returns the score."""
    copy = _frozen_copy(model)
    metrics = evaluate(Predictor(copy, {**manifest, "metrics": {}}, device=device), recs,
                       batch_size=max(8, cfg.batch), progress=progress, groups=groups)
    scal = _scalar_metrics(metrics)
    score = float(metrics[metric])
    if groups is not None:
        per = {g: float(m[metric]) for g, m in metrics["by_group"].items()}
        score = float(np.mean(list(per.values())))
        scal.update({f"{g}_{metric}": round(v, 5) for g, v in per.items()})
        scal[f"select_{metric}"] = round(score, 5)
    row.update({f"{prefix}{k}": v for k, v in scal.items()})
    record = {**manifest, "metrics": {"split": "val", "data": data_name, "num_images": len(recs), "epoch": epoch,
                                      **scal}}
    if score > best:
        save_model(copy, best_dir, record)
    if keep_dir is not None:
        save_model(copy, keep_dir, record)
    return score


FG_FLOOR = 1e-4  # --fg-sampling: an image without defect pixels counts as this fraction


def _sampler(records, task: str, power: float, source: dict[int, str] | None = None, *,
             fg: np.ndarray | None = None, fg_power: float = 0.0) -> WeightedRandomSampler | None:
    """Class-balanced sampling (classify/segment, strength `power`), times dataset balance when the
    records come from several folders: each folder then contributes equally per epoch, so a small
    dataset (CrackForest beside DeepCrack) is not drowned by a large one.

    With `fg` (each record's defect-pixel fraction, `defect_fractions`) and ``fg_power > 0`` each
    weight is also multiplied by ``max(fg, FG_FLOOR) ** fg_power``, normalised to mean 1 inside each
    folder (the dataset balance is kept): the few images whose defects cover much of the image (e.g.
    CrackForest's filled alligator-crack areas) are shown more often."""
    n = len(records)
    w = np.ones(n)
    if power > 0 and task != "detect":
        w = sample_weights(records, task, power=power)
    roots = [(source or {}).get(id(r), "") for r in records]
    counts = Counter(roots)
    if len(counts) > 1:
        w = w * np.array([1.0 / counts[root] for root in roots])
    if fg is not None and fg_power > 0:
        if len(fg) != n:
            raise ValueError(f"fg has {len(fg)} entries for {n} records")
        g = np.maximum(np.asarray(fg, np.float64), FG_FLOOR) ** fg_power
        for root in counts:
            idx = np.array([i for i, x in enumerate(roots) if x == root])
            g[idx] = g[idx] / g[idx].mean()
        w = w * g
    if np.allclose(w, w[0]):
        return None
    return WeightedRandomSampler(torch.as_tensor(w / w.mean(), dtype=torch.double), n, replacement=True)


def _folder_labels(source: dict[int, str]) -> dict[str, str]:
    """Each data folder's name in logs (``val_<name>_miou``): its base name, or its path where two folders
    of the run share a base name."""
    roots = set(source.values())
    names = [Path(r).name for r in roots]
    return {r: Path(r).name if names.count(Path(r).name) == 1 else r for r in roots}


def _load_data(data: str, task: str):
    """One dataset folder, or several separated by commas (same classes; records concatenated).
    Returns the (merged) DatasetInfo and ``{id(record): folder}``."""
    import dataclasses as dc

    infos = [load_records(d.strip(), task) for d in data.split(",") if d.strip()]
    first = infos[0]
    for other in infos[1:]:
        if other.class_names(task) != first.class_names(task):
            raise DatasetFormatError(f"{other.root} has classes {other.class_names(task)}, "
                                     f"{first.root} has {first.class_names(task)}: cannot train on both")
    source = {id(r): str(i.root) for i in infos for r in i.records}
    if len(infos) == 1:
        return first, source
    merged = dc.replace(first, format="+".join(i.format for i in infos),
                        records=[r for i in infos for r in i.records],
                        pass_classes=sorted({c for i in infos for c in i.pass_classes}))
    return merged, source


def _backbone_channels(variant: str) -> tuple[int, ...]:
    from model.backbone import VARIANTS, resolve_variant

    return tuple(VARIANTS[resolve_variant(variant)]["widths"])


def _frozen_copy(module: nn.Module) -> nn.Module:
    """A detached copy for validation (the Predictor freezes and moves the model it is given)."""
    import copy

    return copy.deepcopy(module).eval()
