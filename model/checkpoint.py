"""Weights folders: ``model.safetensors`` + ``manifest.json``. No pickle anywhere.

``save_model(model, folder, manifest)`` writes both files atomically (temp file + rename; the manifest
last, with the sha256 of the weights). ``load_model(folder, device)`` checks the files, the sha256 and
the manifest, rebuilds the architecture through the registry, compares every tensor name and shape
with the file and strict-loads; anything wrong raises :class:`CheckpointError` with a message saying
what is wrong and, where it can tell, what the weights really are (task, variant, number of classes).

``load_backbone_from(model, source)`` loads only the ``backbone.*`` tensors of another checkpoint
(classify → segment/detect transfer), mapping layer scale between the two.

Manifest (see docs/ARCHITECTURE.md): ``name``, ``version``, ``task``, ``arch {variant, input_size [H, W],
num_classes, layer_scale, in_chans, reg_max (detect)}``, ``classes``, ``mean``, ``std`` (0..1 scale),
``preprocess {resize: resize|letterbox, pad_value}``, ``postprocess {iou}`` (detect: the NMS IoU threshold),
``verdict``, ``metrics``, ``trained_on``, ``train_command``, ``sha256``.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "CheckpointError",
    "WEIGHTS_FILE",
    "MANIFEST_FILE",
    "save_model",
    "load_model",
    "read_manifest",
    "validate_manifest",
    "default_verdict",
    "bump_minor",
    "update_verdict",
    "DEFAULT_NMS_IOU",
    "load_state_dict_file",
    "load_backbone_from",
    "describe_state_dict",
    "sha256_file",
    "record_metrics",
    "find_weights",
]

WEIGHTS_FILE = "model.safetensors"
MANIFEST_FILE = "manifest.json"
CARD_FILE = "MODEL_CARD.md"  # the model card beside the weights: data, recipe, figures, known limits
FORMAT = "s2amnet/1"
DEFAULT_NMS_IOU = 0.7  # detect: the NMS IoU threshold of a manifest that names none
# test-time augmentation: extra views the Predictor averages with the plain image (input dims flipped)
TTA_VIEWS = {"hflip": (3,), "vflip": (2,)}


class CheckpointError(RuntimeError):
    """A weights folder is missing, corrupt, or does not match its manifest."""


# ----------------------------------------------------------------------------------------------------
# helpers


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file beside it: a reader never sees half a file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def default_verdict(task: str) -> dict:
    """Verdict rule used when a manifest has none.

    detect/segment: fail when any defect scores ≥ 0.5. classify: no label is known to be good, so every
    image fails with its most probable class — give classify models an explicit rule.
    """
    if task == "classify":
        return {"type": "classify", "pass_labels": [], "min_score": 0.5}
    return {"type": "any_defect", "min_score": 0.5, "min_area": 0}


def _task_cfg(task: str) -> dict:
    from model.registry import task_defaults

    return task_defaults(task)["pretrained_cfg"]


def validate_manifest(manifest: Mapping[str, Any], *, require_sha: bool = True) -> dict:
    """Check a manifest and return a normalised copy with defaults filled in (CheckpointError if bad)."""
    from model.registry import TASKS

    if not isinstance(manifest, Mapping):
        raise CheckpointError(f"manifest must be a JSON object, got {type(manifest).__name__}")
    m = copy.deepcopy(dict(manifest))
    task = m.get("task")
    if task not in TASKS:
        raise CheckpointError(f"manifest task {task!r} is not one of {', '.join(TASKS)}")
    cfg = _task_cfg(task)
    m["arch"] = _checked_arch(m.get("arch"), cfg)
    m["classes"] = _checked_classes(m.get("classes"), task, m["arch"]["num_classes"])
    for key in ("mean", "std"):
        m[key] = _checked_norm(key, m.get(key, list(cfg[key])))
    m["preprocess"] = _checked_preprocess(m.get("preprocess"), cfg)
    post = _checked_postprocess(m.get("postprocess"), task)
    if post:
        m["postprocess"] = post
    else:
        m.pop("postprocess", None)
    m["verdict"] = _checked_verdict(m.get("verdict") or default_verdict(task), task, m["classes"])
    m["tta"] = _checked_tta(m.get("tta"), task, m["arch"]["input_size"])
    m.setdefault("name", "model")
    m.setdefault("version", "0")
    m["version"] = str(m["version"])
    m.setdefault("metrics", {})
    m.setdefault("trained_on", None)
    m.setdefault("train_command", None)
    if require_sha and not isinstance(m.get("sha256"), str):
        raise CheckpointError("manifest has no sha256 of model.safetensors")
    return m


def _checked_arch(arch: Any, cfg: Mapping[str, Any]) -> dict:
    from model.registry import MIN_INPUT_SIZE, canonical_variant

    if not isinstance(arch, Mapping):
        raise CheckpointError("manifest has no 'arch' object {variant, input_size, num_classes}")
    arch = dict(arch)
    try:
        arch["variant"] = canonical_variant(arch.get("variant", ""))
    except ValueError as exc:
        raise CheckpointError(f"manifest arch.variant: {exc}") from None
    nc = arch.get("num_classes")
    if not isinstance(nc, int) or isinstance(nc, bool) or nc < 1:
        raise CheckpointError(f"manifest arch.num_classes must be a positive integer, got {nc!r}")
    size = arch.get("input_size", list(cfg["input_size"]))
    if isinstance(size, int):
        size = [size, size]
    if (
        not isinstance(size, (list, tuple))
        or len(size) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) and v >= MIN_INPUT_SIZE for v in size)
    ):
        raise CheckpointError(f"manifest arch.input_size must be [H, W] integers >= {MIN_INPUT_SIZE}, got {size!r}")
    arch["input_size"] = [int(size[0]), int(size[1])]
    arch.setdefault("in_chans", 3)
    for key in ("in_chans", "reg_max"):
        val = arch.get(key, 1)
        if not isinstance(val, int) or isinstance(val, bool) or val < 1:
            raise CheckpointError(f"manifest arch.{key} must be a positive integer, got {val!r}")
    ls = arch.get("layer_scale")
    if ls is not None and not _is_number(ls, low=0.0, open_low=True):
        raise CheckpointError(f"manifest arch.layer_scale must be null or a number > 0, got {ls!r}")
    return arch


def _is_number(val: Any, *, low: float | None = None, high: float | None = None, open_low: bool = False) -> bool:
    """True for a finite JSON number (not a boolean) within the bounds."""
    if isinstance(val, bool) or not isinstance(val, (int, float)) or not math.isfinite(val):
        return False
    if low is not None and (val <= low if open_low else val < low):
        return False
    return high is None or val <= high


def _checked_number(what: str, val: Any, *, low: float = 0.0, high: float | None = None) -> Any:
    """``val`` unchanged when it is a number within [low, high] (no upper bound when ``high`` is None);
    CheckpointError naming the field ``what`` if not."""
    if not _is_number(val, low=low, high=high):
        bounds = f"within [{low:g}, {high:g}]" if high is not None else f">= {low:g}"
        raise CheckpointError(f"{what} must be a number {bounds}, got {val!r}")
    return val


def _checked_classes(classes: Any, task: str, nc: int) -> list[str]:
    if classes is None:
        classes = (
            (["background"] + [f"class{i}" for i in range(1, nc)])
            if task == "segment"
            else [f"class{i}" for i in range(nc)]
        )
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
        raise CheckpointError("manifest classes must be a list of strings")
    if len(classes) != nc:
        raise CheckpointError(
            f"manifest lists {len(classes)} classes but arch.num_classes is {nc}"
            + (" (segment classes include 'background' at index 0)" if task == "segment" else "")
        )
    if len(set(classes)) != len(classes):
        raise CheckpointError(f"manifest classes are not unique: {classes}")
    if task == "segment" and classes[0] != "background":
        raise CheckpointError(f"segment manifests need classes[0] == 'background', got {classes[0]!r}")
    return classes


def _checked_norm(key: str, val: Any) -> list[float]:
    if isinstance(val, (int, float)) and not isinstance(val, bool):
        val = [float(val)] * 3
    if not isinstance(val, (list, tuple)) or len(val) not in (1, 3) or not all(_is_number(v) for v in val):
        raise CheckpointError(f"manifest {key} must be 1 or 3 numbers (0..1 scale), got {val!r}")
    val = [float(v) for v in val] * (3 if len(val) == 1 else 1)
    if key == "std" and any(v <= 0 for v in val):
        raise CheckpointError(f"manifest std must be > 0, got {val}")
    return val


def _checked_preprocess(pre: Any, cfg: Mapping[str, Any]) -> dict:
    if pre is not None and not isinstance(pre, Mapping):
        raise CheckpointError("manifest preprocess must be an object {resize, pad_value}")
    pre = dict(pre or {})
    pre.setdefault("resize", cfg.get("resize", "resize"))
    pre.setdefault("pad_value", int(cfg.get("pad_value", 114)))
    pad = pre["pad_value"]
    if not isinstance(pad, int) or isinstance(pad, bool) or not 0 <= pad <= 255:
        raise CheckpointError(f"manifest preprocess.pad_value must be an integer within [0, 255], got {pad!r}")
    if not isinstance(pre["resize"], str) or pre["resize"] not in ("resize", "stretch", "letterbox"):
        raise CheckpointError(
            f"manifest preprocess.resize must be 'letterbox' or 'resize' (alias 'stretch'), "
            f"got {pre['resize']!r}"
        )
    pre["resize"] = "resize" if pre["resize"] == "stretch" else pre["resize"]
    return pre


def _checked_postprocess(post: Any, task: str) -> dict:
    """Detect: ``{"iou": NMS IoU threshold}`` (default `DEFAULT_NMS_IOU`); the other tasks have none."""
    if post is None:
        post = {}
    if not isinstance(post, Mapping):
        raise CheckpointError("manifest postprocess must be an object")
    post = dict(post)
    unknown = sorted(set(post) - ({"iou"} if task == "detect" else set()))
    if unknown:
        raise CheckpointError(f"manifest postprocess: {', '.join(map(repr, unknown))} is not a setting of a "
                              f"{task} model" + (" (detect has 'iou')" if task != "detect" else ""))
    if task == "detect":
        iou = post.setdefault("iou", DEFAULT_NMS_IOU)
        if not isinstance(iou, (int, float)) or isinstance(iou, bool) or not 0.0 < iou <= 1.0:
            raise CheckpointError(f"manifest postprocess.iou must be a number in (0, 1], got {iou!r}")
        post["iou"] = float(iou)
    return post


def _checked_verdict(verdict: Any, task: str, classes: list[str]) -> dict:
    """The verdict rule (see model.verdict), with its defaults."""
    if not isinstance(verdict, Mapping):
        raise CheckpointError("manifest verdict must be an object")
    verdict = dict(verdict)
    vtype = verdict.get("type")
    if vtype == "classify":
        if task != "classify":
            raise CheckpointError(f"verdict type 'classify' needs a classify model, this one is {task}")
        pl = verdict.setdefault("pass_labels", [])
        if not isinstance(pl, list) or not all(isinstance(p, str) for p in pl):
            raise CheckpointError(f"verdict pass_labels must be a list of class names, got {pl!r}")
        unknown = [p for p in pl if p not in classes]
        if unknown:
            raise CheckpointError(f"verdict pass_labels {unknown} are not among the classes {classes}")
        verdict.setdefault("min_score", 0.5)
    elif vtype == "any_defect":
        verdict.setdefault("min_score", 0.5)
        verdict.setdefault("min_area", 0)
    else:
        raise CheckpointError(f"verdict type must be 'classify' or 'any_defect', got {vtype!r}")
    _checked_number("verdict min_score", verdict["min_score"], high=1.0)
    if "min_area" in verdict:
        _checked_number("verdict min_area", verdict["min_area"])
    per_class = verdict.get("classes") or {}
    if not isinstance(per_class, Mapping):
        raise CheckpointError("verdict classes must be an object: class name -> {min_score, min_area}")
    for name, per in per_class.items():
        if name not in classes or (vtype == "classify" and name in verdict["pass_labels"]):
            raise CheckpointError(f"verdict classes: {name!r} is not a defect class of this model")
        if not isinstance(per, Mapping) or set(per) - {"min_score", "min_area"}:
            raise CheckpointError(f"verdict classes.{name} must be an object with min_score and/or min_area")
        if "min_score" in per:
            _checked_number(f"verdict classes.{name}.min_score", per["min_score"], high=1.0)
        if "min_area" in per:
            _checked_number(f"verdict classes.{name}.min_area", per["min_area"])
    return verdict


def _checked_tta(tta: Any, task: str, input_size: list[int]) -> list[str]:
    from model.registry import MIN_INPUT_SIZE

    views = tta or []
    if (
        not isinstance(views, (list, tuple))
        or not all(isinstance(v, str) and v in TTA_VIEWS for v in views)
        or len(set(views)) != len(views)
    ):
        raise CheckpointError(f"manifest tta must be a list of distinct views from {sorted(TTA_VIEWS)}, got {tta!r}")
    # MIN_INPUT_SIZE is the network's total stride: mirrored anchors line up only on whole stride cells
    if views and task == "detect" and any(int(s) % MIN_INPUT_SIZE for s in input_size):
        raise CheckpointError(f"manifest tta for a detector needs an input size that is a multiple of "
                              f"{MIN_INPUT_SIZE} (the largest stride), got {input_size}")
    return list(views)


def _model_arch(model) -> dict:
    for attr in ("task", "variant", "num_classes"):
        if not hasattr(model, attr):
            raise CheckpointError(
                f"save_model needs a registry model (with .task/.variant/...), got {type(model).__name__}"
            )
    return (
        model.arch()
        if hasattr(model, "arch")
        else {"variant": model.variant, "num_classes": model.num_classes}
    )


# ----------------------------------------------------------------------------------------------------
# save

_KEY_ORDER = (
    "name",
    "version",
    "task",
    "arch",
    "classes",
    "mean",
    "std",
    "preprocess",
    "postprocess",
    "tta",
    "verdict",
    "metrics",
    "trained_on",
    "train_command",
    "sha256",
)


def _ordered(manifest: Mapping[str, Any]) -> dict:
    out = {k: manifest[k] for k in _KEY_ORDER if k in manifest}
    out.update({k: v for k, v in manifest.items() if k not in out})
    return out


def save_model(model, folder: str | os.PathLike, manifest: Mapping[str, Any] | None = None) -> Path:
    """Write ``folder/model.safetensors`` and ``folder/manifest.json``; returns the folder.

    ``manifest`` gives name, version, classes, input size, mean/std, verdict, metrics, ...; task and
    arch (variant, num_classes, layer scale, ...) are taken from the model and must not contradict it.
    """
    from safetensors.torch import save as st_save

    manifest = dict(manifest or {})
    task = manifest.get("task", model.task if hasattr(model, "task") else None)
    if hasattr(model, "task") and task != model.task:
        raise CheckpointError(f"manifest task {task!r} contradicts the model's task {model.task!r}")
    arch = dict(manifest.get("arch") or {})
    from model.registry import canonical_variant

    for key, val in _model_arch(model).items():
        given = arch.get(key, val)
        if key == "variant":
            try:
                given = canonical_variant(given)
            except ValueError:
                pass
        if given != val:
            raise CheckpointError(f"manifest arch.{key}={arch[key]!r} contradicts the model ({val!r})")
        arch[key] = val
    if "input_size" not in arch:
        arch["input_size"] = list(
            getattr(model, "pretrained_cfg", {}).get("input_size") or _task_cfg(task)["input_size"]
        )
    manifest["task"] = task
    manifest["arch"] = arch
    manifest.setdefault("name", Path(folder).name)
    manifest["sha256"] = "0" * 64  # placeholder for validation; replaced below
    manifest = validate_manifest(manifest)

    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    meta = {
        "format": FORMAT,
        "task": task,
        "variant": arch["variant"],
        "num_classes": str(arch["num_classes"]),
    }
    data = st_save(state, metadata=meta)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(folder / WEIGHTS_FILE, data)
    manifest["sha256"] = hashlib.sha256(data).hexdigest()
    text = json.dumps(_ordered(manifest), indent=2, ensure_ascii=False) + "\n"
    atomic_write_bytes(folder / MANIFEST_FILE, text.encode("utf-8"))
    return folder


# ----------------------------------------------------------------------------------------------------
# load


def read_manifest(folder: str | os.PathLike) -> dict:
    """Read and validate ``folder/manifest.json`` (no weights are read)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"weights folder {str(folder)!r} does not exist")
    path = folder / MANIFEST_FILE
    if not path.is_file():
        raise CheckpointError(f"{str(folder)!r} has no {MANIFEST_FILE}")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path} is not valid JSON: {exc}") from None
    try:
        return validate_manifest(raw)
    except CheckpointError as exc:
        raise CheckpointError(f"{path}: {exc}") from None


@contextlib.contextmanager
def _manifest_locked(path: Path):
    """Hold an exclusive lock on the manifest file for a read-modify-write (POSIX ``flock``; no lock file
    is left behind). The manifest is replaced atomically on write, so a waiter whose lock is on the
    replaced file (a different inode now) takes the lock again on the new one."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: no lock
        yield
        return
    while True:
        f = open(path, "rb")  # noqa: SIM115 - held for the whole block
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            if os.fstat(f.fileno()).st_ino == os.stat(path).st_ino:
                break
        except BaseException:
            f.close()
            raise
        f.close()
    try:
        yield
    finally:
        f.close()  # releases the lock


def record_metrics(folder: str | os.PathLike, key: str, metrics: Mapping[str, Any]) -> dict:
    """Store what `s2amnet eval` measured under ``manifest["metrics"]["eval"][key]`` (key = data:split).
    The weights and their sha256 are untouched. Returns the updated manifest. Safe to run from several
    processes at once (e.g. one `s2amnet eval --record` per dataset): the update holds a lock."""
    folder = Path(folder)
    path = folder / MANIFEST_FILE
    if not path.is_file():
        return _record_metrics(folder, key, metrics)  # read_manifest says what is missing
    with _manifest_locked(path):
        return _record_metrics(folder, key, metrics)


def _record_metrics(folder: Path, key: str, metrics: Mapping[str, Any]) -> dict:
    manifest = read_manifest(folder)
    block = dict(manifest.get("metrics") or {})
    evals = dict(block.get("eval") or {})
    evals[key] = dict(metrics)
    block["eval"] = evals
    manifest["metrics"] = block
    text = json.dumps(_ordered(manifest), indent=2) + "\n"
    atomic_write_bytes(folder / MANIFEST_FILE, text.encode("utf-8"))
    return manifest


def bump_minor(version: str) -> str:
    """``1.0.0`` → ``1.1.0``, ``0.8.0-interim`` → ``0.9.0-interim``; any other form gets ``+1`` appended to
    its last number-free part (``v2`` → ``v2.1``)."""
    core, sep, suffix = str(version).partition("-")
    parts = core.split(".")
    if len(parts) >= 2 and all(p.isdigit() for p in parts):
        parts = [parts[0], str(int(parts[1]) + 1)] + ["0"] * (len(parts) - 2)
        return ".".join(parts) + sep + suffix
    return f"{version}.1"


def update_verdict(folder: str | os.PathLike, rule: Mapping[str, Any],
                   postprocess: Mapping[str, Any] | None = None) -> dict:
    """Replace the manifest's verdict rule (and, when given, its postprocess settings: detect's NMS IoU),
    validated first, and bump its minor version: the weights are unchanged, but the same images may now
    get other answers. Returns the updated manifest."""
    folder = Path(folder)
    path = folder / MANIFEST_FILE
    with _manifest_locked(path):
        manifest = read_manifest(folder)
        candidate = {**manifest, "verdict": dict(rule)}
        if postprocess is not None:
            candidate["postprocess"] = {**(manifest.get("postprocess") or {}), **postprocess}
        validate_manifest(candidate)  # a bad rule is refused before anything is written
        candidate["version"] = bump_minor(str(manifest.get("version", "0.0.0")))
        text = json.dumps(_ordered(candidate), indent=2) + "\n"
        atomic_write_bytes(path, text.encode("utf-8"))
        return candidate


def load_state_dict_file(path: str | os.PathLike) -> dict:
    """Tensors of a safetensors file (CPU), CheckpointError if it is not one."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is not a readable safetensors file: {exc}") from None


def _shapes(model) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _build_shapes(task: str, variant: str, num_classes: int, **kw) -> dict[str, tuple[int, ...]]:
    """State-dict shapes of a registry model, built on the meta device when possible (no allocation)."""
    import torch

    from model.registry import build_model

    try:
        with torch.device("meta"):
            return _shapes(build_model(task, variant, num_classes, **kw))
    except Exception:  # noqa: BLE001 - fall back to a real (CPU) build
        return _shapes(build_model(task, variant, num_classes, **kw))


def describe_state_dict(tensors: Mapping[str, Any]) -> dict:
    """Best guess of what a state dict holds: ``{task, variant, num_classes, layer_scale}`` (None = unknown).

    Compares the names/shapes with every registered task and variant (built on the meta device).
    """
    from model.registry import TASKS, variant_names

    shapes = {k: tuple(v.shape) for k, v in tensors.items()}
    keys = set(shapes)
    has_ls = any(k.endswith(("gamma1", "gamma2")) for k in keys)
    out: dict[str, Any] = {"task": None, "variant": None, "num_classes": None, "layer_scale": has_ls}
    # task: the task whose non-backbone key set matches best
    best = (0.0, None)
    for task in TASKS:
        ref = {k for k in _build_shapes(task, "tiny", 3, layer_scale=None) if not k.startswith("backbone.")}
        got = {k for k in keys if not k.startswith("backbone.")}
        if not ref:
            continue
        score = len(ref & got) / len(ref | got) if (ref | got) else 0.0
        if score > best[0]:
            best = (score, task)
    if best[0] < 0.5:
        return out
    task = out["task"] = best[1]
    for v in variant_names():
        ref = _build_shapes(task, v, 3, layer_scale=1e-5 if has_ls else None)
        if all(shapes.get(k) == s for k, s in ref.items() if k.startswith("backbone.")):
            out["variant"] = v
            break
    # num_classes: shapes that depend on nc are affine in nc; solve from two builds
    v = out["variant"] or "tiny"
    ls = 1e-5 if has_ls else None
    a, b = 3, 7
    sa, sb = _build_shapes(task, v, a, layer_scale=ls), _build_shapes(task, v, b, layer_scale=ls)
    for k, shp_a in sa.items():
        shp_b = sb.get(k)
        if shp_b is None or shp_a == shp_b or k not in shapes or len(shapes[k]) != len(shp_a):
            continue
        for d, (xa, xb) in enumerate(zip(shp_a, shp_b, strict=True)):
            if xa != xb:
                slope = (xb - xa) / (b - a)
                nc = (shapes[k][d] - (xa - slope * a)) / slope
                if nc == int(nc) and nc >= 1:
                    out["num_classes"] = int(nc)
                break
        if out["num_classes"] is not None:
            break
    return out


def _mismatch_message(manifest: dict, tensors: Mapping[str, Any], expected: dict[str, tuple]) -> str | None:
    got = {k: tuple(v.shape) for k, v in tensors.items()}
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    wrong = sorted(k for k in set(expected) & set(got) if expected[k] != got[k])
    if not (missing or unexpected or wrong):
        return None
    arch = manifest["arch"]
    said = f"task={manifest['task']}, variant={arch['variant']}, num_classes={arch['num_classes']}"
    parts = [f"the weights do not match the manifest ({said})."]
    try:
        guess = describe_state_dict(tensors)
    except Exception:  # noqa: BLE001 - the diagnosis is best effort
        guess = {}
    facts = []
    if guess.get("task") and guess["task"] != manifest["task"]:
        facts.append(f"the tensors are a {guess['task']} model, not {manifest['task']}")
    if guess.get("variant") and guess["variant"] != arch["variant"]:
        facts.append(f"the backbone is variant {guess['variant']!r}, not {arch['variant']!r}")
    if (
        guess.get("num_classes")
        and guess["num_classes"] != arch["num_classes"]
        and (guess.get("task") in (None, manifest["task"]))
    ):
        facts.append(f"the head has {guess['num_classes']} classes, not {arch['num_classes']}")
    if bool(guess.get("layer_scale")) != bool(arch.get("layer_scale")) and guess:
        facts.append(
            "layer scale is "
            + (
                "present in the weights but off in the manifest"
                if guess.get("layer_scale")
                else "absent from the weights but on in the manifest"
            )
        )
    if facts:
        parts.append("It looks like " + "; ".join(facts) + ".")
    for label, items in (
        ("wrong shape", wrong),
        ("missing from the file", missing),
        ("unexpected in the file", unexpected),
    ):
        if items:
            shown = ", ".join(
                f"{k} (file {got[k]} vs model {expected[k]})" if label == "wrong shape" else k
                for k in items[:4]
            )
            more = f" and {len(items) - 4} more" if len(items) > 4 else ""
            parts.append(f"{len(items)} tensor(s) {label}: {shown}{more}.")
    return " ".join(parts)


def _arch_kwargs(arch: dict, task: str) -> dict:
    kw: dict[str, Any] = {"layer_scale": arch.get("layer_scale"), "in_chans": int(arch.get("in_chans", 3))}
    if task == "detect" and "reg_max" in arch:
        kw["reg_max"] = int(arch["reg_max"])
    if "layer_scale" not in arch:  # older manifests: the task's default
        kw.pop("layer_scale")
    return kw


def load_model(folder: str | os.PathLike, device="cpu", *, verify: bool = True):
    """Load a weights folder → ``(model in eval mode on device, validated manifest)``.

    Raises CheckpointError for a missing folder/file, invalid manifest, sha256 mismatch, or weights that
    do not match the manifest's task / variant / num_classes (with what the weights look like instead).
    """
    import torch

    from model.registry import build_model

    folder = Path(folder)
    manifest = read_manifest(folder)
    wpath = folder / WEIGHTS_FILE
    if not wpath.is_file():
        raise CheckpointError(f"{str(folder)!r} has no {WEIGHTS_FILE}")
    if verify:
        digest = sha256_file(wpath)
        if digest != manifest["sha256"]:
            raise CheckpointError(
                f"{wpath}: sha256 {digest[:12]}… does not match the manifest's {manifest['sha256'][:12]}… "
                f"(file corrupt, truncated or replaced)"
            )
    tensors = load_state_dict_file(wpath)
    arch = manifest["arch"]
    kw = _arch_kwargs(arch, manifest["task"])
    try:
        model = build_model(manifest["task"], arch["variant"], arch["num_classes"], **kw)
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"{folder}: cannot build the manifest's architecture: {exc}") from None
    msg = _mismatch_message(manifest, tensors, _shapes(model))
    if msg:
        raise CheckpointError(f"{folder}: {msg}")
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:  # pragma: no cover - shapes were checked above
        raise CheckpointError(f"{folder}: {exc}") from None
    model.pretrained_cfg = {
        **getattr(model, "pretrained_cfg", {}),
        "input_size": tuple(arch["input_size"]),
        "mean": tuple(manifest["mean"]),
        "std": tuple(manifest["std"]),
    }
    model.eval()
    return model.to(torch.device(device)), manifest


def find_weights(root: str | os.PathLike) -> list[Path]:
    """Model folders (containing a manifest.json) directly under ``root``, sorted by name."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and (p / MANIFEST_FILE).is_file())


# ----------------------------------------------------------------------------------------------------
# backbone transfer (D6)


def _source_tensors(source) -> dict:
    import torch

    if isinstance(source, torch.nn.Module):
        return dict(source.state_dict())
    if isinstance(source, Mapping):
        return dict(source)
    path = Path(source)
    if path.is_dir():
        read_manifest(path)  # a clear error when it is not a weights folder
        path = path / WEIGHTS_FILE
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {str(source)!r}")
    return load_state_dict_file(path)


def load_backbone_from(model, source, *, strict: bool = True) -> dict:
    """Copy the ``backbone.*`` tensors of ``source`` (weights folder, .safetensors file, state dict or
    module) into ``model.backbone``; head/neck/decoder tensors are ignored (D6).

    Layer scale: a source without gamma vectors into a target with them sets the target's gammas to 1
    (exact: the same function). A source with gammas into a target without them raises CheckpointError
    (gamma1 cannot be folded through SAMM's gating product) — build the target with ``layer_scale`` on.
    With ``strict=True`` every target backbone tensor must be provided with the same shape.
    Returns ``{"loaded": [...], "ignored": [...], "filled": [...]}`` (target key lists).
    """
    import torch

    src = _source_tensors(source)
    if src and all(k.startswith("backbone.") is False for k in src):
        # a bare backbone state dict (SSAMNet.state_dict()): add the prefix
        src = {f"backbone.{k}": v for k, v in src.items()}
    target = model.state_dict()
    tgt_bb = {k: v for k, v in target.items() if k.startswith("backbone.")}
    if not tgt_bb:
        raise CheckpointError(f"{type(model).__name__} has no backbone.* parameters")
    new: dict[str, torch.Tensor] = {}
    filled: list[str] = []
    src_bb = {k: v for k, v in src.items() if k.startswith("backbone.")}
    # layer scale present in the source but not in the target cannot be absorbed exactly: gamma1 scales
    # SAMM's output, which is a product GELU(proj(z(u))) ⊙ u — no weight can take the factor.
    extra_gamma = [k for k in src_bb if k.endswith(("gamma1", "gamma2")) and k not in tgt_bb]
    if extra_gamma:
        raise CheckpointError(
            "the source backbone has layer scale (gamma1/gamma2 vectors) but the target has none, and "
            "gamma1 cannot be folded into other weights exactly; build the target with layer scale on, "
            "e.g. build_model(task, variant, num_classes, layer_scale=1e-5) (the value is overwritten)"
        )
    for k, v in tgt_bb.items():
        if k in src_bb:
            if tuple(src_bb[k].shape) != tuple(v.shape):
                raise CheckpointError(
                    f"backbone tensor {k} has shape {tuple(src_bb[k].shape)} in the source but "
                    f"{tuple(v.shape)} in the target (different variant?)"
                )
            new[k] = src_bb[k]
        elif k.endswith(("gamma1", "gamma2")):
            new[k] = torch.ones_like(v)
            filled.append(k)
        elif strict:
            missing = [m for m in tgt_bb if m not in src_bb and not m.endswith(("gamma1", "gamma2"))]
            raise CheckpointError(
                f"source has no tensor for {len(missing)} backbone parameter(s), e.g. {missing[:3]} "
                f"(not an SSAMNet checkpoint, or a different variant)"
            )
    ignored = sorted(set(src) - set(new))
    model.load_state_dict({**target, **new}, strict=True)
    return {"loaded": sorted(new), "ignored": ignored, "filled": filled}
