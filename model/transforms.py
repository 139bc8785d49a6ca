"""Inference-time preprocessing geometry and its inverse.

* :func:`to_uint8` — any decoded image (PIL in any mode, or a numpy array H×W / H×W×1/3/4 of
  uint8 / uint16 / bool / float) → H×W uint8 for a grey image, H×W×3 uint8 RGB otherwise;
  :func:`to_rgb_uint8` — the same, always H×W×3 (a grey image in all three channels).
* :func:`prepare` — letterbox or resize ("stretch") to the model input size → (C×H×W uint8 array,
  meta). Both are ``model.data.augment``'s own ``letterbox`` / ``resize`` (the functions training uses),
  so inference sees the same geometry and interpolation as training.
* The meta dict is plain JSON (it crosses Redis): ``mode``, ``orig_w``, ``orig_h``, ``input_w``,
  ``input_h``, ``scale_x``, ``scale_y`` (input pixels per original pixel), ``pad_x``, ``pad_y``.
  Input coordinates relate to original ones by ``x_in = x_orig · scale_x + pad_x`` (continuous pixel
  coordinates, pixel (c, r) spans [c, c+1) × [r, r+1)).
* :func:`boxes_to_original` and :func:`logits_to_original` map outputs back to original pixels.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "to_uint8",
    "to_rgb_uint8",
    "resize_rgb",
    "prepare",
    "boxes_to_original",
    "axis_interp",
    "logits_to_original",
]


# ----------------------------------------------------------------------------------------------------
# colour / dtype normalisation


def _float_to_uint8(a: np.ndarray) -> np.ndarray:
    """Float intensities → uint8: 0..1 and 0..255 data keep their scale; anything else is stretched from
    its finite minimum to its finite maximum (NaN → 0, +inf → 255, −inf → 0)."""
    f = a.astype(np.float64)
    finite = np.isfinite(f)
    lo = float(f[finite].min()) if finite.any() else 0.0
    hi = float(f[finite].max()) if finite.any() else 1.0
    if lo >= 0.0 and hi <= 1.0:
        lo, hi = 0.0, 1.0
    elif lo >= 0.0 and hi <= 255.0:
        lo, hi = 0.0, 255.0
    scaled = np.nan_to_num((f - lo) / max(hi - lo, 1e-12), nan=0.0, posinf=1.0, neginf=0.0)
    return (np.clip(scaled, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def _array_to_uint8(a: np.ndarray) -> np.ndarray:
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] not in (3, 4)):
        raise ValueError(
            f"unsupported image array shape {a.shape}: expected H×W, H×W×1, H×W×3 (RGB) or H×W×4 (RGBA)"
        )
    if a.shape[0] < 1 or a.shape[1] < 1:
        raise ValueError(f"empty image of shape {a.shape}")
    if a.dtype == np.uint8:
        pass
    elif a.dtype == bool:
        a = a.astype(np.uint8) * 255
    elif a.dtype == np.uint16:
        # full 16-bit range → 8 bit with rounding (65535 → 255); PIL's own convert would clip instead
        a = ((a.astype(np.uint32) + 128) // 257).astype(np.uint8)
    elif np.issubdtype(a.dtype, np.integer):
        hi = 65535 if a.max(initial=0) > 255 else 255
        a = np.clip(np.rint(a.astype(np.float64) * (255.0 / hi)), 0, 255).astype(np.uint8)
    elif np.issubdtype(a.dtype, np.floating):
        a = _float_to_uint8(a)
    else:
        raise ValueError(f"unsupported image dtype {a.dtype}")
    if a.ndim == 3 and a.shape[2] == 4:  # RGBA: alpha is ignored (inspection images are opaque)
        a = a[:, :, :3]
    return np.ascontiguousarray(a)


def turned_by_exif(image) -> bool:
    """Whether an opened PIL image's EXIF orientation (5-8) turns it by 90 degrees when shown upright: its
    width and height then swap. Reads the header (and, for a PNG, the chunks up to its EXIF)."""
    return image.getexif().get(0x0112, 1) in (5, 6, 7, 8)


def to_uint8(image) -> np.ndarray:
    """Decoded image → H×W uint8 (grey) or H×W×3 uint8 RGB: the one conversion that serving, training and
    evaluation share.

    PIL images: EXIF orientation is applied if the image still carries it (idempotent: an already
    transposed image has no orientation tag); 16-bit / 32-bit integer modes are scaled from their full
    range (65535 → 255), not clipped and not by each image's own maximum; float images as `_float_to_uint8`;
    grey modes (L, LA, 1, 16-bit, integer, float) stay grey; palette, RGBA, CMYK and YCbCr images become
    RGB; alpha is dropped.
    numpy arrays are taken as H×W×C (channels last) RGB(A) or H×W (×1) grey.
    """
    try:
        from PIL import Image, ImageOps
    except ImportError:  # pragma: no cover
        Image = None  # type: ignore[assignment]
    if Image is not None and isinstance(image, Image.Image):
        img = image
        try:
            if img.getexif().get(0x0112, 1) != 1:
                img = ImageOps.exif_transpose(img)
        except Exception:  # noqa: BLE001 - corrupt EXIF must not break inference
            pass
        mode = img.mode
        if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
            arr = np.asarray(img)
            if mode == "I":
                arr = arr.astype(np.int64)
                arr = (
                    np.clip(arr, 0, 65535).astype(np.uint16)
                    if arr.max(initial=0) > 255
                    else np.clip(arr, 0, 255).astype(np.uint8)
                )
            elif mode.startswith("I;16"):
                arr = arr.astype(np.uint16)
            return _array_to_uint8(arr)
        if mode in ("1", "LA"):
            img = img.convert("L")
        elif mode not in ("L", "RGB"):
            if mode == "P" and "transparency" in img.info:
                img = img.convert("RGBA")
            img = img.convert("RGB")
        return np.ascontiguousarray(np.asarray(img, dtype=np.uint8))
    if isinstance(image, np.ndarray):
        return _array_to_uint8(image)
    raise TypeError(f"expected a PIL.Image or a numpy array, got {type(image).__name__}")


def to_rgb_uint8(image) -> np.ndarray:
    """Decoded image → H×W×3 uint8 RGB (`to_uint8`, a grey image copied into all three channels)."""
    a = to_uint8(image)
    return np.ascontiguousarray(np.repeat(a[:, :, None], 3, axis=2)) if a.ndim == 2 else a


# ----------------------------------------------------------------------------------------------------
# forward geometry


def resize_rgb(rgb: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
    """Bilinear resize (aspect ratio not kept) of an H×W×3 or H×W image to (h, w) —
    ``model.data.augment.resize``, as in training."""
    from model.data.augment import resize

    return resize(rgb, (int(size_hw[1]), int(size_hw[0])))


RESIZE_MODES = {"resize": "resize", "stretch": "resize", "letterbox": "letterbox"}
_PROBE = (slice(None, None, 7), slice(None, None, 5))  # pixels compared first, to answer colour images early


def _one_channel_if_grey(pixels: np.ndarray) -> np.ndarray:
    """An H×W×3 image whose three channels are equal (a grey part saved as RGB, as many cameras' JPEGs
    are) → its one channel; anything else unchanged. Resizing and padding work per channel with the same
    arithmetic, so the grey channel prepared once and copied into three is exactly the RGB image prepared."""
    if pixels.ndim != 3:
        return pixels
    r, g, b = pixels[..., 0], pixels[..., 1], pixels[..., 2]
    if not (np.array_equal(r[_PROBE], g[_PROBE]) and np.array_equal(r[_PROBE], b[_PROBE])):
        return pixels  # a colour image differs somewhere in this sample at once
    if not (np.array_equal(r, g) and np.array_equal(r, b)):
        return pixels
    return np.ascontiguousarray(r)


def prepare(image, input_size, mode: str = "letterbox", pad_value: int = 114) -> tuple[np.ndarray, dict]:
    """Image → (C×H×W uint8 at ``input_size`` = (H, W), meta).

    ``mode``: "letterbox" (keep the aspect ratio, pad centred with ``pad_value``) or "resize" (alias
    "stretch": scale each axis independently). Both are the training pipeline's own functions.
    """
    pixels = _one_channel_if_grey(to_uint8(image))  # a grey image is resized once, not once per channel
    oh, ow = pixels.shape[:2]
    ih, iw = int(input_size[0]), int(input_size[1])
    kind = RESIZE_MODES.get(mode)
    if kind == "resize":
        out = resize_rgb(pixels, (ih, iw))
        meta = {"scale_x": iw / ow, "scale_y": ih / oh, "pad_x": 0.0, "pad_y": 0.0}
    elif kind == "letterbox":
        from model.data.augment import letterbox

        out, scale, (pad_x, pad_y) = letterbox(pixels, (ih, iw), pad_value=int(pad_value))
        meta = {
            "scale_x": float(scale),
            "scale_y": float(scale),
            "pad_x": float(pad_x),
            "pad_y": float(pad_y),
        }
    else:
        raise ValueError(f"unknown preprocessing mode {mode!r} (resize | letterbox)")
    out = np.asarray(out)
    if out.shape[:2] != (ih, iw):  # pragma: no cover - guards the contract with model.data.augment
        raise RuntimeError(f"preprocessing produced {out.shape}, expected {(ih, iw)}")
    meta = {"mode": kind, "orig_w": int(ow), "orig_h": int(oh), "input_w": iw, "input_h": ih, **meta}
    chw = np.broadcast_to(out, (3, ih, iw)) if out.ndim == 2 else out.transpose(2, 0, 1)
    return np.ascontiguousarray(chw), meta


# ----------------------------------------------------------------------------------------------------
# inverse geometry


def boxes_to_original(boxes: np.ndarray, meta: dict, clip: bool = True) -> np.ndarray:
    """N×4 xyxy boxes in input pixels → original pixels (float64), clipped to the image."""
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4).copy()
    b[:, [0, 2]] = (b[:, [0, 2]] - meta["pad_x"]) / meta["scale_x"]
    b[:, [1, 3]] = (b[:, [1, 3]] - meta["pad_y"]) / meta["scale_y"]
    if clip:
        b[:, [0, 2]] = b[:, [0, 2]].clip(0, meta["orig_w"])
        b[:, [1, 3]] = b[:, [1, 3]].clip(0, meta["orig_h"])
    return b


def axis_interp(n_out: int, n_in: int, scale: float, pad: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Bilinear sampling along one axis from an input grid to the original grid.

    Output pixel centre ``d + 0.5`` maps to input coordinate ``(d + 0.5)·scale + pad`` (continuous), i.e.
    the input sample index ``src = (d + 0.5)·scale + pad − 0.5``; returns (i0, i1, weight of i1) with
    PyTorch's ``align_corners=False`` clamping. For ``pad = 0`` and ``scale = n_in/n_out`` this equals
    ``F.interpolate(..., mode="bilinear", align_corners=False)``.
    """
    src = (np.arange(n_out, dtype=np.float64) + 0.5) * scale + pad - 0.5
    src = np.clip(src, 0.0, n_in - 1)
    i0 = np.floor(src).astype(np.int64)
    i1 = np.minimum(i0 + 1, n_in - 1)
    lam = (src - i0).astype(np.float32)
    return i0, i1, lam


def logits_to_original(logits, meta: dict, max_elems: int = 1 << 24) -> tuple[np.ndarray, np.ndarray]:
    """nc×h×w logits at input size → (label map uint8/int16 H×W, probability of that label float32 H×W).

    Logits are bilinearly resampled to the original image (inverting resize or letterbox, padding
    discarded), then softmax and argmax per pixel (for two classes the same from the resampled difference
    of the two logits: half the work). Processed in row bands so that memory stays at ``max_elems`` floats
    whatever the image size.
    """
    import torch

    t = torch.as_tensor(logits).float()
    nc, ih, iw = t.shape
    two = nc == 2  # two classes: resample only l1 - l0 (resampling is linear); argmax = (d > 0), p = sigmoid(|d|)
    if two:
        t = (t[1] - t[0])[None]
    oh, ow = int(meta["orig_h"]), int(meta["orig_w"])
    y0, y1, ly = axis_interp(oh, ih, meta["scale_y"], meta["pad_y"])
    x0, x1, lx = axis_interp(ow, iw, meta["scale_x"], meta["pad_x"])
    x0t, x1t = torch.from_numpy(x0), torch.from_numpy(x1)
    lxt = torch.from_numpy(lx)
    label_dtype = np.uint8 if nc <= 255 else np.int16
    labels = np.empty((oh, ow), dtype=label_dtype)
    probs = np.empty((oh, ow), dtype=np.float32)
    band = max(1, min(oh, max_elems // max(1, t.shape[0] * max(ow, iw))))
    for r in range(0, oh, band):
        sl = slice(r, min(oh, r + band))
        # a + (b - a) * w, computed in place (the same arithmetic); gathers along dim 1 of 2-D views (several
        # times faster than along the last dim of a 3-D tensor)
        a = t.index_select(1, torch.from_numpy(y0[sl]))
        rows = t.index_select(1, torch.from_numpy(y1[sl])).sub_(a).mul_(torch.from_numpy(ly[sl])[None, :, None])
        rows = rows.add_(a).reshape(-1, iw)  # (nc · band) × iw
        ra = rows.index_select(1, x0t)
        up = rows.index_select(1, x1t).sub_(ra).mul_(lxt).add_(ra).reshape(t.shape[0], -1, ow)  # nc × band × ow
        if two:
            idx, p = up[0] > 0, torch.sigmoid(up[0].abs())
        else:
            p, idx = torch.softmax(up, dim=0).max(dim=0)
        labels[sl] = idx.numpy().astype(label_dtype, copy=False)
        probs[sl] = p.numpy()
    return labels, probs
