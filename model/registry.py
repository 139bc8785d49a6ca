"""One registry that builds every S2-AMNet task model: ``build_model(task, variant, num_classes, **kw)``.

Tasks (``TASKS``): ``classify`` → :class:`Classifier`, ``segment`` → :class:`Segmenter`, ``detect`` →
:class:`Detector`. Every task model holds the shared :class:`~model.backbone.SSAMNet` as
``self.backbone`` (stable ``backbone.*`` parameter names, so a classify checkpoint's backbone loads into
a segment/detect model) and records ``task``, ``variant`` (canonical name),
``num_classes``, ``layer_scale``, ``drop_path`` and ``pretrained_cfg`` (input size, mean/std,
preprocessing mode the predictor uses by default).

Layer scale / drop path default per task and variant as the published reference uses them (table
``model.backbone.TASK_SETTINGS``); both can be overridden with ``layer_scale=`` /
``drop_path=``.

| task     | tiny      | small     | base          | large              |
|----------|-----------|-----------|---------------|--------------------|
| classify | –         | –         | LS 1e-5       | LS 1e-5, dp 0.1    |
| segment  | –         | –         | –             | –                  |
| detect   | –         | –         | –             | LS 1e-5, dp 0.1    |
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from model.blocks import fold_batchnorm_

__all__ = [
    "TASKS",
    "TaskSpec",
    "TaskModel",
    "Classifier",
    "Segmenter",
    "Detector",
    "build_model",
    "register_task",
    "canonical_variant",
    "variant_names",
    "task_defaults",
    "MIN_INPUT_SIZE",
]

MIN_INPUT_SIZE = 32

_NOT_SET: Any = object()


# ----------------------------------------------------------------------------------------------------
# variants (delegated to the backbone module; imported lazily so that `import model.registry` is cheap
# enough and a missing backbone gives a clear error at build time)


def _backbone_module():
    from model import backbone

    return backbone


def variant_names() -> list[str]:
    """Canonical variant names in size order (tiny, small, base, large)."""
    return list(_backbone_module().VARIANTS)


def canonical_variant(name: str) -> str:
    """Resolve an alias (t/s/b/l, T/S/B/L, tiny...) to the canonical name; ValueError when unknown."""
    bb = _backbone_module()
    try:
        return bb.resolve_variant(name)
    except (KeyError, ValueError, TypeError) as exc:
        raise ValueError(
            f"unknown variant {name!r}; choose one of {', '.join(bb.VARIANTS)} (aliases t/s/b/l)"
        ) from exc


# ----------------------------------------------------------------------------------------------------
# task models


class TaskModel(nn.Module):
    """Common part of the three task models: the backbone, recorded config and the input check."""

    task: str = ""

    def __init__(
        self,
        variant: str = "tiny",
        num_classes: int = 2,
        *,
        layer_scale: float | None = None,
        drop_path: float = 0.0,
        in_chans: int = 3,
        pretrained_cfg: dict | None = None,
    ):
        super().__init__()
        if int(num_classes) < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        from model.backbone import SSAMNet

        self.variant = canonical_variant(variant)
        self.num_classes = int(num_classes)
        self.layer_scale = layer_scale
        self.drop_path = float(drop_path)
        self.in_chans = int(in_chans)
        self.pretrained_cfg = dict(pretrained_cfg or {})
        self.backbone = SSAMNet(self.variant, layer_scale=layer_scale, drop_path=drop_path, in_chans=in_chans)

    @property
    def channels(self) -> tuple[int, ...]:
        return tuple(self.backbone.channels)

    def arch(self) -> dict:
        """Architecture record for manifests (everything needed to rebuild the same tensors)."""
        return {
            "variant": self.variant,
            "num_classes": self.num_classes,
            "layer_scale": self.layer_scale,
            "in_chans": self.in_chans,
        }

    def check_input(self, x: Tensor) -> None:
        """Clear errors for wrong inputs (skipped while tracing/compiling, where shapes are symbolic)."""
        if torch.jit.is_tracing() or torch.compiler.is_compiling():
            return
        if not isinstance(x, Tensor):
            raise TypeError(f"{type(self).__name__} expects a torch.Tensor, got {type(x).__name__}")
        if x.ndim != 4:
            raise ValueError(
                f"Wrong input shape {tuple(x.shape)}: {type(self).__name__} expects a 4-D tensor "
                f"B×{self.in_chans}×H×W (add a batch axis with x[None] for a single image)."
            )
        b, c, h, w = x.shape
        if c != self.in_chans:
            raise ValueError(
                f"Wrong input shape {tuple(x.shape)}: expected {self.in_chans} channels, got {c}. "
                f"Convert grayscale/RGBA images to RGB first (the Predictor does this)."
            )
        if h < MIN_INPUT_SIZE or w < MIN_INPUT_SIZE:
            raise ValueError(
                f"Wrong input shape height={h}, width={w}. Expected image height and width of at least "
                f"{MIN_INPUT_SIZE} pixels (the network has stride 32). Consider resizing or padding your "
                f"images to shape ({max(h, MIN_INPUT_SIZE)}, {max(w, MIN_INPUT_SIZE)})."
            )

    @property
    def is_fused(self) -> bool:
        return self.backbone.is_fused  # fuse() always folds the backbone

    def fuse(self) -> TaskModel:
        """Fold every BatchNorm (backbone and head) into the conv before it, for inference; in place,
        returns self. Puts the model in eval mode; outputs equal the unfused eval model up to float
        rounding. The state dict changes (convs gain biases, no BN keys): load weights before fusing and
        never save or train a fused model (``train()`` raises)."""
        return fold_batchnorm_(self.eval())

    def train(self, mode: bool = True) -> TaskModel:
        if mode and self.is_fused:
            raise RuntimeError(f"{type(self).__name__}.fuse() folded BatchNorm into the convs; the model is "
                               "inference-only")
        return super().train(mode)

    def extra_repr(self) -> str:
        return f"task={self.task}, variant={self.variant}, num_classes={self.num_classes}"


class Classifier(TaskModel):
    """Backbone → ClassifyHead (avg-pool → LayerNorm → Linear). ``forward(x) -> logits B×nc``."""

    task = "classify"

    def __init__(self, variant: str = "tiny", num_classes: int = 10, **kw):
        super().__init__(variant, num_classes, **kw)
        from model.heads.classify import ClassifyHead

        self.head = ClassifyHead(self.channels[-1], self.num_classes)

    def forward(self, x: Tensor) -> Tensor:
        self.check_input(x)
        feats = self.backbone(x)
        return self.head(feats[-1])


class Segmenter(TaskModel):
    """Backbone → MF-LiteSeg decoder. ``forward(x) -> logits B×nc×H×W`` (nc counts background)."""

    task = "segment"

    def __init__(self, variant: str = "tiny", num_classes: int = 2, *, direct_resize: bool = False, **kw):
        if int(num_classes) < 2:
            raise ValueError("segment num_classes counts the background class and must be >= 2")
        super().__init__(variant, num_classes, **kw)
        from model.heads.segment import MFLiteSegDecoder

        kwargs = {"direct_resize": True} if direct_resize else {}
        self.decoder = MFLiteSegDecoder(self.channels, self.num_classes, **kwargs)

    def forward(self, x: Tensor) -> Tensor:
        self.check_input(x)
        feats = self.backbone(x)
        return self.decoder(feats, x.shape[-2:])


class Detector(TaskModel):
    """Backbone → PAN neck → anchor-free DFL head.

    ``forward(x)`` returns the raw per-level tensors (B×(4·reg_max+nc)×h×w, strides 8/16/32);
    ``decode(raw) -> (boxes B×N×4 xyxy in input pixels, scores B×N×nc sigmoid)``.
    """

    task = "detect"

    def __init__(self, variant: str = "tiny", num_classes: int = 5, *, reg_max: int = 16, **kw):
        super().__init__(variant, num_classes, **kw)
        from model.heads.detect import DetectHead, DetectNeck

        self.reg_max = int(reg_max)
        self.strides = (8, 16, 32)
        self.neck = DetectNeck(self.channels)
        self.head = DetectHead(
            self.num_classes, tuple(self.neck.out_channels), reg_max=self.reg_max, strides=self.strides
        )

    def arch(self) -> dict:
        return {**super().arch(), "reg_max": self.reg_max}

    def forward(self, x: Tensor) -> list[Tensor]:
        self.check_input(x)
        feats = self.backbone(x)
        return self.head(self.neck(feats))

    def decode(self, raw: list[Tensor]) -> tuple[Tensor, Tensor]:
        return self.head.decode(raw)

    def flip_raw(self, raw: list[Tensor], dims) -> list[Tensor]:
        """Raw outputs of a flipped input, mirrored back (see `heads.detect.flip_raw`)."""
        return self.head.flip_raw(raw, dims)


# ----------------------------------------------------------------------------------------------------
# the registry


@dataclass(frozen=True)
class TaskSpec:
    """How to build one task: the model class and its defaults. Layer scale / drop path per variant come
    from ``model.backbone.task_settings(variant, task)`` (the D5 table, defined once there)."""

    cls: Callable[..., TaskModel]
    num_classes: int
    pretrained_cfg: dict = field(default_factory=dict)


TASKS: dict[str, TaskSpec] = {}


def register_task(name: str, spec: TaskSpec) -> None:
    TASKS[name] = spec


# Defaults are the published reference recipes: classify mean/std 0.5/0.18 at 224, segment the
# DC-4K crack normalisation at 512, detect x/255 at 512. Geometry: letterbox (pad 114) for every task, as
# the eval path of model/data/augment.py does; a manifest's "preprocess" overrides it.
register_task(
    "classify",
    TaskSpec(
        cls=Classifier,
        num_classes=10,
        pretrained_cfg={
            "input_size": (224, 224),
            "mean": (0.5, 0.5, 0.5),
            "std": (0.18, 0.18, 0.18),
            "resize": "letterbox",
            "pad_value": 114,
        },
    ),
)
register_task(
    "segment",
    TaskSpec(
        cls=Segmenter,
        num_classes=2,
        pretrained_cfg={
            "input_size": (512, 512),
            "mean": (0.59243,) * 3,
            "std": (0.14354,) * 3,
            "resize": "letterbox",
            "pad_value": 114,
        },
    ),
)
register_task(
    "detect",
    TaskSpec(
        cls=Detector,
        num_classes=5,
        pretrained_cfg={
            "input_size": (512, 512),
            "mean": (0.0, 0.0, 0.0),
            "std": (1.0, 1.0, 1.0),
            "resize": "letterbox",
            "pad_value": 114,
        },
    ),
)


def _regularisation(task: str, variant: str) -> tuple[float | None, float]:
    from model.backbone import task_settings

    st = task_settings(variant, task)
    return st["layer_scale"], float(st["drop_path"])


def _spec(task: str) -> TaskSpec:
    try:
        return TASKS[task]
    except KeyError:
        raise ValueError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}") from None


def task_defaults(task: str, variant: str = "tiny") -> dict:
    """Defaults of a task: num_classes, layer_scale, drop_path and the pretrained_cfg (a copy)."""
    spec = _spec(task)
    ls, dp = _regularisation(task, canonical_variant(variant))
    return {
        "num_classes": spec.num_classes,
        "layer_scale": ls,
        "drop_path": dp,
        "pretrained_cfg": dict(spec.pretrained_cfg),
    }


def build_model(
    task: str,
    variant: str = "tiny",
    num_classes: int | None = None,
    *,
    layer_scale: float | None = _NOT_SET,
    drop_path: float | None = _NOT_SET,
    **kw: Any,
) -> TaskModel:
    """Build a task model with fresh (random) weights.

    ``task``: classify | segment | detect. ``variant``: tiny | small | base | large (or an alias).
    ``num_classes``: the task default when None (classify 10, segment 2 incl. background, detect 5 —
    the published reference configurations). ``layer_scale`` / ``drop_path`` default to the
    per-task table above (pass ``layer_scale=None`` to switch layer scale off). Other keyword arguments
    go to the task class (``in_chans``, detect ``reg_max``, segment ``direct_resize``).
    """
    spec = _spec(task)
    v = canonical_variant(variant)
    ls_default, dp_default = _regularisation(task, v)
    ls = ls_default if layer_scale is _NOT_SET else layer_scale
    dp = dp_default if drop_path is _NOT_SET or drop_path is None else drop_path
    nc = spec.num_classes if num_classes is None else int(num_classes)
    model = spec.cls(v, nc, layer_scale=ls, drop_path=dp, pretrained_cfg=spec.pretrained_cfg, **kw)
    return model
