"""Augmentations for classify / segment / detect, in numpy + PIL (no torchvision, no opencv).

Conventions
-----------
- Images are uint8 arrays, H×W (grayscale, kept single-channel for speed) or H×W×C.
- Masks are uint8 H×W label maps (0 = background, k = class k, 255 = ignore). Geometric transforms move
  them with nearest-neighbour sampling; pixels that come from outside the image become 255 (ignore).
- Boxes are float32 N×4 ``x1, y1, x2, y2`` in continuous pixel coordinates (0..W, 0..H) with int64 class
  ids N; every geometric op transforms boxes exactly (no rotation other than multiples of 90 degrees).
- Randomness comes from an explicit ``np.random.Generator`` passed to each call.

Letterbox geometry (shared with the predictor)
----------------------------------------------
``letterbox(img, size, pad_value=114) -> (out, scale, (pad_x, pad_y))``: resize keeping the aspect ratio so
the image fits ``size`` (int or (h, w)), then pad centred. A point maps as ``x_out = x * scale + pad_x``
and back as ``x = (x_out - pad_x) / scale`` (`unletterbox_boxes`).
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter, ImageOps

from .readers import IGNORE_INDEX, defect_pixels

__all__ = [
    "IGNORE_INDEX",
    "PAD_VALUE",
    "letterbox",
    "letterbox_geometry",
    "letterbox_boxes",
    "unletterbox_boxes",
    "resize",
    "hflip",
    "vflip",
    "rot90",
    "rotate",
    "clip_boxes",
    "filter_boxes",
    "photometric",
    "hsv_augment",
    "randaugment_lite",
    "random_crop_box",
    "paste_defect",
    "paste_segment",
    "mosaic4",
    "ClassifyAugment",
    "SegmentAugment",
    "DetectAugment",
]

PAD_VALUE = 114
DEFECT_KEEP = 0.5  # ClassifyAugment: least fraction of the defect pixels a random training crop keeps


def _size_hw(size) -> tuple[int, int]:
    if isinstance(size, (int, np.integer)):
        return int(size), int(size)
    h, w = size
    return int(h), int(w)


def _pil(img: np.ndarray) -> Image.Image:
    return Image.fromarray(np.ascontiguousarray(img))


def _fill(img: np.ndarray, value):
    """PIL fillcolor matching the image mode."""
    if img.ndim == 3:
        return tuple([int(value)] * img.shape[2])
    return int(value)


def resize(img: np.ndarray, wh: tuple[int, int], nearest: bool = False) -> np.ndarray:
    """Resize to (width, height); bilinear for images, nearest for masks."""
    w, h = int(wh[0]), int(wh[1])
    if img.shape[1] == w and img.shape[0] == h:
        return img
    return np.asarray(_pil(img).resize((w, h), Image.NEAREST if nearest else Image.BILINEAR))


# ----------------------------------------------------------------------------------------------------
# letterbox


def letterbox_geometry(w: int, h: int, size) -> tuple[float, tuple[int, int], tuple[int, int]]:
    """(scale, (new_w, new_h), (pad_x, pad_y)) for fitting a w×h image into ``size`` (int or (h, w))."""
    oh, ow = _size_hw(size)
    scale = min(oh / h, ow / w)
    nw, nh = max(1, min(ow, int(round(w * scale)))), max(1, min(oh, int(round(h * scale))))
    return scale, (nw, nh), ((ow - nw) // 2, (oh - nh) // 2)


def letterbox(img, size, pad_value: int = PAD_VALUE, nearest: bool = False):
    """Resize ``img`` (np.ndarray H×W[×C] or PIL image) keeping aspect ratio and pad it centred to ``size``.

    Returns ``(out: np.ndarray uint8 of shape size[+C], scale: float, (pad_x, pad_y): ints)``; a point maps
    as ``x_out = x * scale + pad_x``, ``y_out = y * scale + pad_y``. Use ``nearest=True, pad_value=255``
    for label masks.
    """
    if isinstance(img, Image.Image):
        img = np.asarray(img)
    h, w = img.shape[:2]
    oh, ow = _size_hw(size)
    scale, (nw, nh), (px, py) = letterbox_geometry(w, h, (oh, ow))
    small = resize(img, (nw, nh), nearest=nearest)
    out = np.full((oh, ow) + img.shape[2:], pad_value, dtype=img.dtype)
    out[py:py + nh, px:px + nw] = small
    return out, scale, (px, py)


def letterbox_boxes(boxes: np.ndarray, scale: float, pad: tuple[int, int]) -> np.ndarray:
    """Original-pixel boxes → letterboxed-image boxes."""
    b = np.asarray(boxes, np.float32).reshape(-1, 4) * scale
    b[:, [0, 2]] += pad[0]
    b[:, [1, 3]] += pad[1]
    return b


def unletterbox_boxes(boxes, scale: float, pad: tuple[int, int], orig_wh: tuple[int, int] | None = None):
    """Letterboxed-image boxes → original-pixel boxes (clipped to ``orig_wh`` = (w, h) if given)."""
    b = np.asarray(boxes, np.float32).reshape(-1, 4).copy()
    b[:, [0, 2]] -= pad[0]
    b[:, [1, 3]] -= pad[1]
    b /= scale
    if orig_wh is not None:
        b = clip_boxes(b, orig_wh[0], orig_wh[1])
    return b


# ----------------------------------------------------------------------------------------------------
# geometric primitives on (img, mask, boxes)


def _empty_boxes() -> np.ndarray:
    return np.zeros((0, 4), np.float32)


def hflip(img, mask=None, boxes=None):
    w = img.shape[1]
    img = img[:, ::-1]
    mask = mask[:, ::-1] if mask is not None else None
    if boxes is not None and len(boxes):
        boxes = boxes.copy()
        boxes[:, [0, 2]] = w - boxes[:, [2, 0]]
    return img, mask, boxes


def vflip(img, mask=None, boxes=None):
    h = img.shape[0]
    img = img[::-1]
    mask = mask[::-1] if mask is not None else None
    if boxes is not None and len(boxes):
        boxes = boxes.copy()
        boxes[:, [1, 3]] = h - boxes[:, [3, 1]]
    return img, mask, boxes


def rot90(img, mask=None, boxes=None, k: int = 1):
    """Rotate by k×90 degrees counter-clockwise (as ``np.rot90``)."""
    k %= 4
    for _ in range(k):
        w = img.shape[1]
        img = np.rot90(img)
        mask = np.rot90(mask) if mask is not None else None
        if boxes is not None and len(boxes):
            x1, y1, x2, y2 = boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3]
            boxes = np.stack([y1, w - x2, y2, w - x1], 1).astype(np.float32)
    return img, mask, boxes


def rotate(img: np.ndarray, mask: np.ndarray | None, degrees: float, pad_value: int = PAD_VALUE,
           mask_fill: int = IGNORE_INDEX):
    """Rotate by ``degrees`` counter-clockwise about the centre, the canvas grown to hold the whole
    image (bilinear; new corners ``pad_value``); the mask alike with nearest sampling, new corners
    ``mask_fill`` (the ignore value). Returns ``(img, mask)``."""
    img = np.asarray(_pil(img).rotate(degrees, Image.BILINEAR, expand=True, fillcolor=_fill(img, pad_value)))
    if mask is not None:
        mask = np.asarray(_pil(mask).rotate(degrees, Image.NEAREST, expand=True, fillcolor=int(mask_fill)))
    return img, mask


def clip_boxes(boxes: np.ndarray, w: float, h: float) -> np.ndarray:
    b = np.asarray(boxes, np.float32).reshape(-1, 4).copy()
    b[:, [0, 2]] = b[:, [0, 2]].clip(0, w)
    b[:, [1, 3]] = b[:, [1, 3]].clip(0, h)
    return b


def filter_boxes(boxes: np.ndarray, w: float, h: float, min_size: float = 2.0,
                 min_visibility: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """Clip boxes to the image; return (clipped boxes, keep mask). A box is kept if both sides are at least
    ``min_size`` pixels and at least ``min_visibility`` of its (transformed) area is inside the image."""
    b = np.asarray(boxes, np.float32).reshape(-1, 4)
    c = clip_boxes(b, w, h)
    area0 = (b[:, 2] - b[:, 0]).clip(0) * (b[:, 3] - b[:, 1]).clip(0)
    cw, ch = c[:, 2] - c[:, 0], c[:, 3] - c[:, 1]
    keep = (cw >= min_size) & (ch >= min_size) & (cw * ch >= min_visibility * area0 - 1e-6)
    return c, keep


def _affine(img: np.ndarray, s: float, tx: float, ty: float, out_wh: tuple[int, int], fill,
            nearest: bool = False) -> np.ndarray:
    """Output pixel (x, y) samples input at ((x - tx) / s, (y - ty) / s), i.e. x_out = s * x_in + tx."""
    data = (1.0 / s, 0.0, -tx / s, 0.0, 1.0 / s, -ty / s)
    out = _pil(img).transform(tuple(int(v) for v in out_wh), Image.AFFINE, data,
                              resample=Image.NEAREST if nearest else Image.BILINEAR, fillcolor=fill)
    return np.asarray(out)


# ----------------------------------------------------------------------------------------------------
# photometric


def photometric(img: np.ndarray, rng: np.random.Generator, brightness: float = 0.2, contrast: float = 0.2,
                gamma: float = 0.2, exposure: float = 0.0) -> np.ndarray:
    """Random exposure (a gain drawn log-uniformly from [e^-exposure, e^exposure], applied first and clipped
    at white), gamma, contrast (around mid-grey) and brightness (additive, fraction of 255), as one LUT."""
    x = np.arange(256, dtype=np.float32) / 255.0
    if exposure:
        x = np.minimum(x * float(np.exp(rng.uniform(-exposure, exposure))), 1.0)
    if gamma:
        x = x ** float(np.exp(rng.uniform(-gamma, gamma)))
    c = 1.0 + rng.uniform(-contrast, contrast) if contrast else 1.0
    b = rng.uniform(-brightness, brightness) if brightness else 0.0
    x = (x - 0.5) * c + 0.5 + b
    lut = np.clip(np.round(x * 255.0), 0, 255).astype(np.uint8)
    return lut[img]


def hsv_augment(img: np.ndarray, rng: np.random.Generator, hgain: float = 0.015, sgain: float = 0.7,
                vgain: float = 0.4) -> np.ndarray:
    """YOLO-style random HSV gains. Grayscale (2-D) images only get the value gain."""
    r = rng.uniform(-1, 1, 3) * np.array([hgain, sgain, vgain]) + 1.0
    x = np.arange(256, dtype=np.float32)
    lut_v = np.clip(x * r[2], 0, 255).astype(np.uint8)
    if img.ndim == 2 or img.shape[2] == 1:
        return lut_v[img]
    if img.shape[2] == 3 and np.array_equal(img[..., 0], img[..., 1]) and np.array_equal(img[..., 1],
                                                                                          img[..., 2]):
        return lut_v[img]  # gray content stored as RGB: hue/saturation do nothing
    hsv = np.asarray(_pil(img[..., :3]).convert("HSV")).copy()
    lut_h = ((x * r[0]) % 256).astype(np.uint8)
    lut_s = np.clip(x * r[1], 0, 255).astype(np.uint8)
    hsv[..., 0] = lut_h[hsv[..., 0]]
    hsv[..., 1] = lut_s[hsv[..., 1]]
    hsv[..., 2] = lut_v[hsv[..., 2]]
    return np.asarray(Image.fromarray(hsv, "HSV").convert("RGB"))


def _ra_ops():
    # each op takes (PIL image, magnitude m in 0..1, sign +1/-1)
    return {
        "autocontrast": lambda im, m, sg: ImageOps.autocontrast(im),
        "equalize": lambda im, m, sg: ImageOps.equalize(im),
        "solarize": lambda im, m, sg: ImageOps.solarize(im, int(256 - 128 * m)),
        "posterize": lambda im, m, sg: ImageOps.posterize(im, max(2, int(round(8 - 4 * m)))),
        "sharpness": lambda im, m, sg: ImageEnhance.Sharpness(im).enhance(1 + sg * 0.9 * m),
        "brightness": lambda im, m, sg: ImageEnhance.Brightness(im).enhance(1 + sg * 0.5 * m),
        "contrast": lambda im, m, sg: ImageEnhance.Contrast(im).enhance(1 + sg * 0.5 * m),
        "blur": lambda im, m, sg: im.filter(ImageFilter.GaussianBlur(radius=0.3 + 1.2 * m)),
    }


_RA_OPS = _ra_ops()


def randaugment_lite(img: np.ndarray, rng: np.random.Generator, num_ops: int = 2,
                     magnitude: float = 0.5) -> np.ndarray:
    """RandAugment restricted to photometric ops (geometry is done separately so masks/boxes stay aligned).
    ``magnitude`` in 0..1 (torchvision's magnitude 15 of 30 ≈ 0.5), jittered per op. Ops: autocontrast,
    equalize, solarize, posterize, sharpness, brightness, contrast, blur, gaussian noise, identity."""
    names = list(_RA_OPS) + ["noise", "identity"]
    for _ in range(int(num_ops)):
        name = names[int(rng.integers(len(names)))]
        m = float(np.clip(rng.normal(magnitude, 0.1), 0.0, 1.0))
        sign = 1.0 if rng.random() < 0.5 else -1.0
        if name == "identity":
            continue
        if name == "noise":
            noise = rng.normal(0.0, 3.0 + 9.0 * m, img.shape)
            img = np.clip(img.astype(np.float32) + noise, 0, 255).astype(np.uint8)
            continue
        img = np.asarray(_RA_OPS[name](_pil(img), m, sign))
    return img


# ----------------------------------------------------------------------------------------------------
# crops


def random_crop_box(w: int, h: int, rng: np.random.Generator, scale=(0.6, 1.0),
                    ratio=(3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """A RandomResizedCrop-style window (x0, y0, x1, y1) covering ``scale`` of the area."""
    area = w * h
    for _ in range(10):
        a = area * rng.uniform(*scale)
        r = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        cw, ch = int(round(math.sqrt(a * r))), int(round(math.sqrt(a / r)))
        if 0 < cw <= w and 0 < ch <= h:
            x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            return x0, y0, x0 + cw, y0 + ch
    return 0, 0, w, h


def _fg_window(mask: np.ndarray, cw: int, ch: int, rng) -> tuple[int, int] | None:
    """Top-left of a cw×ch window that contains a random foreground pixel, or None if no foreground."""
    fg = defect_pixels(mask)
    ys, xs = np.nonzero(fg)
    if len(ys) == 0:
        return None
    i = int(rng.integers(len(ys)))
    cy, cx = int(ys[i]), int(xs[i])
    h, w = mask.shape
    x0 = int(np.clip(cx - rng.integers(0, cw), min(0, w - cw), max(0, w - cw)))
    y0 = int(np.clip(cy - rng.integers(0, ch), min(0, h - ch), max(0, h - ch)))
    return x0, y0


def _blend_patch(patch: np.ndarray, pmask: np.ndarray, pfg: np.ndarray, dst_img: np.ndarray,
                 rng: np.random.Generator, margin: int, feather: float):
    """The shared core of the copy-paste augmentations: ``patch`` (its labels ``pmask``, defect pixels
    ``pfg``), randomly h/v-flipped, blended into ``dst_img`` at a random position where it fits.

    The pasted pixels are shifted so that the mean of the patch's non-defect part matches the part of
    ``dst`` they cover (images differ in brightness), and blended through the defect mask dilated by
    ``margin`` and blurred by ``feather`` (no rectangular seam to learn as a cue); the defect pixels
    themselves are opaque. Returns ``(image, (ty, tx), pmask, pfg, alpha)``: the blended copy of ``dst_img``,
    the patch's top-left corner in it, the (flipped) labels and defect pixels, and the H×W blend weight."""
    for axis in (0, 1):
        if rng.random() < 0.5:
            patch, pmask, pfg = np.flip(patch, axis), np.flip(pmask, axis), np.flip(pfg, axis)
    dh, dw = dst_img.shape[:2]
    ph, pw = pfg.shape
    ty = int(rng.integers(0, dh - ph + 1))
    tx = int(rng.integers(0, dw - pw + 1))
    region = dst_img[ty:ty + ph, tx:tx + pw]
    patch = patch.astype(np.float32)
    if patch.ndim != region.ndim:  # grayscale source onto a colour image or the reverse
        patch = np.repeat(patch[..., None], region.shape[2], 2) if region.ndim == 3 else patch.mean(2)
    out = dst_img.copy()
    out[ty:ty + ph, tx:tx + pw], alpha = _blend(region, patch, pfg, margin, feather)
    return out, (ty, tx), pmask, pfg, alpha


def _blend(region: np.ndarray, patch: np.ndarray, pfg: np.ndarray, margin: int, feather: float):
    """``patch`` over ``region`` (same shape) through the mask ``pfg`` dilated by ``margin`` and blurred by
    ``feather`` (``pfg`` itself opaque), the patch's pixels outside ``pfg`` mean-matched to the region's.
    Returns the blended uint8 region and the blend weight."""
    region, patch = region.astype(np.float32), patch.astype(np.float32)
    alpha_img = Image.fromarray(pfg.astype(np.uint8) * 255)
    if margin > 0:
        alpha_img = alpha_img.filter(ImageFilter.MaxFilter(2 * (margin // 2) + 1))
    if feather > 0:
        alpha_img = alpha_img.filter(ImageFilter.GaussianBlur(feather))
    alpha = np.maximum(np.asarray(alpha_img, np.float32) / 255.0, pfg)
    ring = ~pfg
    if ring.any():
        patch = patch + (region[ring].mean(0) - patch[ring].mean(0))
    a = alpha[..., None] if region.ndim == 3 else alpha
    return np.clip(region * (1 - a) + patch * a, 0, 255).astype(np.uint8), alpha


def _defect_box(fg: np.ndarray, margin: int) -> tuple[int, int, int, int] | None:
    """``(y0, y1, x0, x1)``: the bounding box of the defect pixels ``fg`` grown by ``margin`` and clipped to
    the image (end-exclusive), or None without defect pixels."""
    ys, xs = np.nonzero(fg)
    if len(ys) == 0:
        return None
    h, w = fg.shape
    return (max(int(ys.min()) - margin, 0), min(int(ys.max()) + margin + 1, h),
            max(int(xs.min()) - margin, 0), min(int(xs.max()) + margin + 1, w))


def paste_defect(src_img: np.ndarray, src_mask: np.ndarray, dst_img: np.ndarray, rng: np.random.Generator,
                 margin: int = 6, feather: float = 2.0):
    """Copy-paste for mask-supervised classification: the defect of ``src`` (mask > 0, ignore excluded) with
    a ``margin`` of its surroundings blended into the defect-free ``dst`` at a random position
    (`_blend_patch`).

    Returns ``(img, mask)`` at ``dst``'s size (mask: the pasted defect's class ids, 0 elsewhere), or None
    when ``src`` has no defect pixels or its defect region does not fit into ``dst``.
    """
    fg = defect_pixels(src_mask)
    box = _defect_box(fg, margin)
    if box is None:
        return None
    y0, y1, x0, x1 = box
    dh, dw = dst_img.shape[:2]
    patch, pmask, pfg = src_img[y0:y1, x0:x1], src_mask[y0:y1, x0:x1], fg[y0:y1, x0:x1]
    if pfg.shape[0] > dh or pfg.shape[1] > dw:
        return None
    out, (ty, tx), pmask, pfg, _ = _blend_patch(patch, pmask, pfg, dst_img, rng, margin, feather)
    mask = np.zeros((dh, dw), np.uint8)
    mask[ty:ty + pfg.shape[0], tx:tx + pfg.shape[1]][pfg] = pmask[pfg]
    return out, mask


def paste_segment(src_img: np.ndarray, src_mask: np.ndarray, dst_img: np.ndarray, dst_mask: np.ndarray,
                  rng: np.random.Generator, size=(0.3, 0.6), margin: int = 6, feather: float = 2.0):
    """Copy-paste for segmentation: the defect pixels of a square window of ``src`` (side: a fraction drawn
    from ``size`` of the shorter side of ``dst`` and ``src``) that holds a random defect pixel, with a
    ``margin`` of their surroundings, blended into ``dst`` at a random position (`_blend_patch`).

    Returns ``(img, mask)`` at ``dst``'s size, or None when ``src`` has no defect pixels. The mask is
    ``dst_mask`` with the pasted defect pixels set to their class; where the blended margin covers a defect
    of ``dst`` (partly hidden now) or brings in pixels that ``src`` ignores, those pixels become ignore (255).
    """
    fg = defect_pixels(src_mask)
    if not fg.any():
        return None
    dh, dw = dst_img.shape[:2]
    side = max(1, int(round(rng.uniform(*size) * min(dh, dw, *src_mask.shape))))
    x0, y0 = _fg_window(src_mask, side, side, rng)  # inside src: side is at most its shorter side
    win = np.s_[y0:y0 + side, x0:x0 + side]
    out, (ty, tx), pmask, pfg, alpha = _blend_patch(src_img[win], src_mask[win], fg[win], dst_img, rng,
                                                     margin, feather)
    mask = dst_mask.copy()
    region = mask[ty:ty + pfg.shape[0], tx:tx + pfg.shape[1]]
    margin_px = (alpha > 0) & ~pfg
    region[margin_px & (defect_pixels(region) | (pmask == IGNORE_INDEX))] = IGNORE_INDEX
    region[pfg] = pmask[pfg]
    return out, mask


# ----------------------------------------------------------------------------------------------------
# task pipelines


def _flip_rotate_photometric(aug, img: np.ndarray, mask, rng: np.random.Generator):
    """The tail shared by the classify and segment training pipelines: random h/v flips and rot90 (mask
    transformed alike), then exposure/brightness/contrast/gamma on the image. `aug` carries the settings."""
    if rng.random() < aug.hflip:
        img, mask, _ = hflip(img, mask)
    if rng.random() < aug.vflip:
        img, mask, _ = vflip(img, mask)
    if aug.rot90:
        img, mask, _ = rot90(img, mask, k=int(rng.integers(4)))
    return photometric(img, rng, aug.brightness, aug.contrast, aug.gamma, aug.exposure), mask


class ClassifyAugment:
    """Classification transform → uint8 image of ``imgsz``×``imgsz`` (and the mask, if one is given).

    train: defect-aware random resized crop (``crop_scale`` of the area; if a mask is given, a crop must keep
    ``min_defect_keep`` of the defect pixels, else the full image is used), letterbox to imgsz
    (``resize_mode="letterbox"`` keeps the aspect ratio like the eval path; ``"stretch"`` resizes),
    h/v flips, rot90, exposure (off by default)/brightness/contrast/gamma, optional RandAugment-lite
    (``randaugment`` ops, ``magnitude``).
    eval (``train=False``): letterbox (or stretch) only.
    """

    def __init__(self, imgsz: int = 224, train: bool = True, hflip: float = 0.5, vflip: float = 0.5,
                 rot90: bool = True, crop_scale=(0.6, 1.0), crop_ratio=(3 / 4, 4 / 3), crop_prob: float = 0.8,
                 min_defect_keep: float = DEFECT_KEEP, brightness: float = 0.2, contrast: float = 0.2,
                 gamma: float = 0.2, randaugment: int = 0, magnitude: float = 0.5,
                 resize_mode: str = "letterbox", pad_value: int = PAD_VALUE, exposure: float = 0.0):
        self.imgsz, self.train = int(imgsz), train
        self.hflip, self.vflip, self.rot90 = hflip, vflip, rot90
        self.crop_scale, self.crop_ratio, self.crop_prob = crop_scale, crop_ratio, crop_prob
        if not 0.0 <= min_defect_keep <= 1.0:
            raise ValueError(f"min_defect_keep must be a fraction in [0, 1], got {min_defect_keep}")
        self.min_defect_keep = float(min_defect_keep)
        self.brightness, self.contrast, self.gamma, self.exposure = brightness, contrast, gamma, exposure
        self.randaugment, self.magnitude = randaugment, magnitude
        if resize_mode not in ("letterbox", "stretch"):
            raise ValueError("resize_mode must be letterbox or stretch")
        self.resize_mode, self.pad_value = resize_mode, pad_value

    def _fit(self, img, mask):
        s = self.imgsz
        if self.resize_mode == "stretch":
            img = resize(img, (s, s))
            mask = resize(mask, (s, s), nearest=True) if mask is not None else None
            return img, mask
        img, _, _ = letterbox(img, s, self.pad_value)
        if mask is not None:
            mask, _, _ = letterbox(mask, s, IGNORE_INDEX, nearest=True)
        return img, mask

    def crop_box(self, w: int, h: int, mask: np.ndarray | None, rng: np.random.Generator):
        """A random crop box ``(x0, y0, x1, y1)`` of a ``w``×``h`` image that keeps at least
        ``min_defect_keep`` of the mask's defect pixels (any box without a mask or defect), or None when
        10 draws found none (the whole image is used)."""
        fg_total = int(defect_pixels(mask).sum()) if mask is not None else 0
        for _ in range(10):
            x0, y0, x1, y1 = random_crop_box(w, h, rng, self.crop_scale, self.crop_ratio)
            if fg_total == 0 or defect_pixels(mask[y0:y1, x0:x1]).sum() >= self.min_defect_keep * fg_total:
                return x0, y0, x1, y1
        return None

    def __call__(self, img: np.ndarray, rng: np.random.Generator, mask: np.ndarray | None = None):
        """Returns ``(img, mask)`` (mask None when not given)."""
        if not self.train:
            return self._fit(img, mask)
        if self.crop_prob and rng.random() < self.crop_prob:
            box = self.crop_box(img.shape[1], img.shape[0], mask, rng)
            if box is not None:
                x0, y0, x1, y1 = box
                img = img[y0:y1, x0:x1]
                mask = mask[y0:y1, x0:x1] if mask is not None else None
        img, mask = self._fit(img, mask)
        img, mask = _flip_rotate_photometric(self, img, mask, rng)
        if self.randaugment:
            img = randaugment_lite(img, rng, self.randaugment, self.magnitude)
        return np.ascontiguousarray(img), (np.ascontiguousarray(mask) if mask is not None else None)


class SegmentAugment:
    """Segmentation transform → (image crop×crop, mask crop×crop; 255 = ignore).

    The reference scale is the letterbox fit into ``imgsz`` (the inference size), so training sees objects
    at the size the predictor shows them. train: random scale ``scale`` × fit; with ``rotate`` > 0 a
    rotation by an angle drawn from [-rotate, rotate] degrees (new corners: pad value, mask ignored);
    random crop of ``crop`` (default imgsz; pads image with ``pad_value`` and mask with 255), with
    probability ``fg_crop`` the crop is centred on a random defect pixel; h/v flips, rot90, exposure (off by
    default)/brightness/contrast/gamma.
    eval: letterbox to imgsz (mask padded with 255).
    """

    def __init__(self, imgsz: int = 512, crop: int | None = None, train: bool = True, scale=(0.75, 1.5),
                 hflip: float = 0.5, vflip: float = 0.5, rot90: bool = True, fg_crop: float = 0.0,
                 brightness: float = 0.2, contrast: float = 0.2, gamma: float = 0.2,
                 pad_value: int = PAD_VALUE, rotate: float = 0.0, exposure: float = 0.0):
        self.imgsz, self.crop, self.train, self.rotate = int(imgsz), int(crop or imgsz), train, float(rotate)
        self.scale, self.hflip, self.vflip, self.rot90, self.fg_crop = scale, hflip, vflip, rot90, fg_crop
        self.brightness, self.contrast, self.gamma, self.pad_value = brightness, contrast, gamma, pad_value
        self.exposure = exposure

    def __call__(self, img: np.ndarray, mask: np.ndarray, rng: np.random.Generator):
        if not self.train:
            im, _, _ = letterbox(img, self.imgsz, self.pad_value)
            mk, _, _ = letterbox(mask, self.imgsz, IGNORE_INDEX, nearest=True)
            return im, mk
        h, w = img.shape[:2]
        s = self.imgsz / max(h, w) * rng.uniform(*self.scale)
        nw, nh = max(1, int(round(w * s))), max(1, int(round(h * s)))
        img = resize(img, (nw, nh))
        mask = resize(mask, (nw, nh), nearest=True)
        if self.rotate:
            img, mask = rotate(img, mask, float(rng.uniform(-self.rotate, self.rotate)), self.pad_value, IGNORE_INDEX)
            nh, nw = mask.shape[:2]
        c = self.crop
        pos = _fg_window(mask, c, c, rng) if (self.fg_crop and rng.random() < self.fg_crop) else None
        if pos is None:
            x0 = int(rng.integers(min(0, nw - c), max(0, nw - c) + 1))
            y0 = int(rng.integers(min(0, nh - c), max(0, nh - c) + 1))
        else:
            x0, y0 = pos
        img = _crop_pad(img, x0, y0, c, c, self.pad_value)
        mask = _crop_pad(mask, x0, y0, c, c, IGNORE_INDEX)
        img, mask = _flip_rotate_photometric(self, img, mask, rng)
        return np.ascontiguousarray(img), np.ascontiguousarray(mask)


def _crop_pad(a: np.ndarray, x0: int, y0: int, cw: int, ch: int, fill) -> np.ndarray:
    """Window [x0, x0+cw) × [y0, y0+ch) of ``a``; parts outside are ``fill`` (x0/y0 may be negative)."""
    h, w = a.shape[:2]
    out = np.full((ch, cw) + a.shape[2:], fill, a.dtype)
    sx0, sy0 = max(x0, 0), max(y0, 0)
    sx1, sy1 = min(x0 + cw, w), min(y0 + ch, h)
    if sx1 > sx0 and sy1 > sy0:
        out[sy0 - y0:sy1 - y0, sx0 - x0:sx1 - x0] = a[sy0:sy1, sx0:sx1]
    return out


def mosaic4(samples, imgsz: int, rng: np.random.Generator, scale: float = 0.5, translate: float = 0.1,
            pad_value: int = PAD_VALUE):
    """YOLO-style mosaic of 4 ``(img, boxes, classes)`` samples → ``(img imgsz×imgsz, boxes, classes)``.

    Each image is resized so its long side is ``imgsz`` and placed around a random centre on a 2·imgsz
    canvas; the canvas is then scaled by U(1-scale, 1+scale) about its centre, shifted by up to
    ``translate``·imgsz and cropped to imgsz×imgsz. Boxes are transformed, clipped and filtered.
    """
    s = int(imgsz)
    img0 = samples[0][0]
    canvas = np.full((2 * s, 2 * s) + img0.shape[2:], pad_value, np.uint8)
    xc, yc = (int(rng.uniform(0.5 * s, 1.5 * s)) for _ in range(2))
    all_boxes, all_cls = [], []
    for i, (img, boxes, cls) in enumerate(samples[:4]):
        if img.ndim != canvas.ndim:  # mixed gray / colour: promote to the canvas layout
            img = np.repeat(img[..., None], canvas.shape[2], 2) if canvas.ndim == 3 else img[..., 0]
        h0, w0 = img.shape[:2]
        r = s / max(h0, w0)
        w, h = max(1, int(round(w0 * r))), max(1, int(round(h0 * r)))
        img = resize(img, (w, h))
        if i == 0:  # top-left
            x1a, y1a, x2a, y2a = max(xc - w, 0), max(yc - h, 0), xc, yc
            x1b, y1b, x2b, y2b = w - (x2a - x1a), h - (y2a - y1a), w, h
        elif i == 1:  # top-right
            x1a, y1a, x2a, y2a = xc, max(yc - h, 0), min(xc + w, 2 * s), yc
            x1b, y1b, x2b, y2b = 0, h - (y2a - y1a), min(w, x2a - x1a), h
        elif i == 2:  # bottom-left
            x1a, y1a, x2a, y2a = max(xc - w, 0), yc, xc, min(2 * s, yc + h)
            x1b, y1b, x2b, y2b = w - (x2a - x1a), 0, w, min(y2a - y1a, h)
        else:  # bottom-right
            x1a, y1a, x2a, y2a = xc, yc, min(xc + w, 2 * s), min(2 * s, yc + h)
            x1b, y1b, x2b, y2b = 0, 0, min(w, x2a - x1a), min(y2a - y1a, h)
        canvas[y1a:y2a, x1a:x2a] = img[y1b:y2b, x1b:x2b]
        b = np.asarray(boxes, np.float32).reshape(-1, 4) * r
        b[:, [0, 2]] += x1a - x1b
        b[:, [1, 3]] += y1a - y1b
        # keep only the part inside this tile's pasted region
        b, keep = filter_boxes(b - [x1a, y1a, x1a, y1a], x2a - x1a, y2a - y1a, min_size=1.0)
        b = b + [x1a, y1a, x1a, y1a]
        all_boxes.append(b[keep])
        all_cls.append(np.asarray(cls, np.int64).reshape(-1)[keep])
    boxes = np.concatenate(all_boxes, 0).astype(np.float32) if all_boxes else _empty_boxes()
    cls = np.concatenate(all_cls, 0) if all_cls else np.zeros(0, np.int64)
    # random scale about the canvas centre + translation, output s×s
    sc = rng.uniform(1 - scale, 1 + scale)
    tx = s / 2 - sc * s + rng.uniform(-translate, translate) * s
    ty = s / 2 - sc * s + rng.uniform(-translate, translate) * s
    out = _affine(canvas, sc, tx, ty, (s, s), _fill(canvas, pad_value))
    boxes = boxes * sc + np.array([tx, ty, tx, ty], np.float32)
    boxes, keep = filter_boxes(boxes, s, s)
    return out, boxes[keep].astype(np.float32), cls[keep]


class DetectAugment:
    """Detection transform → (image imgsz×imgsz, boxes xyxy in output pixels, classes).

    train: with probability ``mosaic`` a 4-image mosaic (`mosaic4`; the dataset supplies 3 other samples,
    see `wants_mosaic`), else the image fitted (letterbox geometry) with random scale U(1-scale, 1+scale)
    and translation ±translate·imgsz; then h/v flips, rot90 (``rot90`` probability), HSV gains.
    Boxes are clipped; boxes thinner than ``min_size`` px or with less than ``min_visibility`` of their
    area left in the image are dropped. eval: `letterbox` only.
    """

    def __init__(self, imgsz: int = 512, train: bool = True, mosaic: float = 1.0, scale: float = 0.5,
                 translate: float = 0.1, hflip: float = 0.5, vflip: float = 0.0, rot90: float = 0.0,
                 hsv=(0.015, 0.7, 0.4), min_size: float = 2.0, min_visibility: float = 0.1,
                 pad_value: int = PAD_VALUE):
        self.imgsz, self.train, self.mosaic = int(imgsz), train, mosaic
        self.scale, self.translate = scale, translate
        self.hflip, self.vflip, self.rot90, self.hsv = hflip, vflip, rot90, hsv
        self.min_size, self.min_visibility, self.pad_value = min_size, min_visibility, pad_value

    def wants_mosaic(self, rng: np.random.Generator) -> bool:
        return bool(self.train and self.mosaic and rng.random() < self.mosaic)

    def __call__(self, img: np.ndarray, boxes: np.ndarray, classes: np.ndarray, rng: np.random.Generator,
                 others=None):
        """``others``: 3 more ``(img, boxes, classes)`` samples for a mosaic (ignored when None)."""
        s = self.imgsz
        boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
        classes = np.asarray(classes, np.int64).reshape(-1)
        if not self.train:
            out, sc, pad = letterbox(img, s, self.pad_value)
            b, keep = filter_boxes(letterbox_boxes(boxes, sc, pad), s, s, min_size=0.0, min_visibility=0.0)
            return out, b[keep], classes[keep]
        if others:
            img, boxes, classes = mosaic4([(img, boxes, classes)] + list(others)[:3], s, rng, self.scale,
                                          self.translate, self.pad_value)
        else:
            h, w = img.shape[:2]
            sc = s / max(h, w) * rng.uniform(1 - self.scale, 1 + self.scale)
            tx = s / 2 - sc * w / 2 + rng.uniform(-self.translate, self.translate) * s
            ty = s / 2 - sc * h / 2 + rng.uniform(-self.translate, self.translate) * s
            img = _affine(img, sc, tx, ty, (s, s), _fill(img, self.pad_value))
            boxes = boxes * sc + np.array([tx, ty, tx, ty], np.float32)
            boxes, keep = filter_boxes(boxes, s, s, self.min_size, self.min_visibility)
            boxes, classes = boxes[keep], classes[keep]
        if rng.random() < self.hflip:
            img, _, boxes = hflip(img, None, boxes)
        if rng.random() < self.vflip:
            img, _, boxes = vflip(img, None, boxes)
        if self.rot90 and rng.random() < self.rot90:
            img, _, boxes = rot90(img, None, boxes, k=int(rng.integers(1, 4)))
        if self.hsv:
            img = hsv_augment(img, rng, *self.hsv)
        boxes, keep = filter_boxes(boxes, s, s, self.min_size, 0.0)
        return np.ascontiguousarray(img), boxes[keep].astype(np.float32), classes[keep]
