"""Binary-mask utilities: COCO compressed RLE, connected components, polygons, PNG.

RLE strings are written and read by pycocotools (the reference implementation of COCO RLE: column-major
runs, alternating background / foreground, packed into an ASCII string); connected components come from
scipy.ndimage. Both are base dependencies, so the service, the Docker images and the tests run the same
code.
"""

from __future__ import annotations

import base64
import io

import numpy as np
from pycocotools import mask as coco_mask
from scipy import ndimage

__all__ = [
    "encode_rle",
    "encode_rle_at",
    "decode_rle",
    "rle_area",
    "label_components",
    "component_stats",
    "mask_to_polygons",
    "polygon_area",
    "mask_to_png_b64",
    "png_b64_to_mask",
]


# ----------------------------------------------------------------------------------------------------
# RLE


def _as_bool_mask(mask) -> np.ndarray:
    m = np.asarray(mask)
    if m.ndim != 2:
        raise ValueError(f"expected a 2-D mask (H×W), got shape {m.shape}")
    return m.astype(bool, copy=False)


def _compress(runs, h: int, w: int) -> dict:
    """Run lengths (column-major, starting with background) → ``{"size", "counts": str}`` via pycocotools."""
    rle = coco_mask.frPyObjects({"size": [h, w], "counts": [int(r) for r in runs]}, h, w)
    return {"size": [h, w], "counts": rle["counts"].decode("ascii")}


def encode_rle(mask) -> dict:
    """Binary H×W mask → ``{"size": [h, w], "counts": str}`` (COCO compressed RLE, by pycocotools)."""
    m = _as_bool_mask(mask)
    h, w = (int(v) for v in m.shape)
    if m.size == 0:
        return _compress([], h, w)
    rle = coco_mask.encode(np.asfortranarray(m, dtype=np.uint8))
    return {"size": [h, w], "counts": rle["counts"].decode("ascii")}


def encode_rle_at(crop, corner, size) -> dict:
    """`encode_rle` of the ``size`` = (h, w) mask that is ``crop`` with its top-left pixel at ``corner`` =
    (x1, y1) and background elsewhere, without building that full-size mask (a defect's box is usually
    a small part of a large image): the runs come from the crop's pixels only, pycocotools packs them."""
    c = _as_bool_mask(crop)
    h, w = (int(v) for v in size)
    x1, y1 = (int(v) for v in corner)
    ch, cw = c.shape
    if x1 < 0 or y1 < 0 or x1 + cw > w or y1 + ch > h:
        raise ValueError(f"a {ch}x{cw} crop at ({x1}, {y1}) does not fit a {h}x{w} mask")
    if c.size == 0:
        return _compress([h * w] if h * w else [], h, w)
    gap = h - ch  # background between the crop's part of one column and its part of the next
    if gap:
        # column-major, each crop column followed by one separator pixel that stands for the gap
        sep = np.zeros((ch + 1, cw), bool)
        sep[:ch] = c
        flat = sep.ravel(order="F")
    else:  # the crop is as tall as the image: its columns follow each other directly
        flat = c.ravel(order="F")
    bounds = np.concatenate(([0], np.flatnonzero(flat[1:] != flat[:-1]) + 1, [flat.size]))
    runs = np.diff(bounds)
    tail = (w - x1 - cw) * h  # the columns after the crop
    if gap:
        runs += np.diff(bounds // (ch + 1)) * (gap - 1)  # separator pixels inside each run, widened
        runs[-1] += tail - y1  # the last separator is only the rest of the crop's last column
    elif flat[-1]:
        runs = np.append(runs, tail)
    else:
        runs[-1] += tail
    lead = x1 * h + y1  # everything before the crop's first pixel
    if flat[0]:
        runs = np.concatenate(([lead], runs))
    else:
        runs[0] += lead
    if len(runs) > 1 and runs[-1] == 0:  # the mask ends with the crop's last pixel
        runs = runs[:-1]
    return _compress(runs, h, w)


def _coco(rle: dict) -> dict:
    """Any COCO RLE (compressed str / bytes counts, or an uncompressed list) → pycocotools' form, checked."""
    h, w = (int(v) for v in rle["size"])
    counts = rle["counts"]
    if isinstance(counts, str):
        counts = counts.encode("ascii")
    if isinstance(counts, bytes):
        out = {"size": [h, w], "counts": counts}
    else:
        cnts = [int(c) for c in counts]
        if any(c < 0 for c in cnts) or sum(cnts) != h * w:
            raise ValueError(f"RLE counts sum to {sum(cnts)}, expected h*w = {h * w}")
        out = coco_mask.frPyObjects({"size": [h, w], "counts": cnts}, h, w)
    return out


def decode_rle(rle: dict) -> np.ndarray:
    """COCO RLE (compressed string, bytes, or uncompressed list of counts) → bool H×W mask."""
    h, w = (int(v) for v in rle["size"])
    if h * w == 0:
        return np.zeros((h, w), bool)
    return coco_mask.decode(_coco(rle)).astype(bool)


def rle_area(rle: dict) -> int:
    """Foreground pixels of a COCO RLE."""
    return int(coco_mask.area(_coco(rle)))


# ----------------------------------------------------------------------------------------------------
# connected components


def label_components(mask, connectivity: int = 8) -> tuple[np.ndarray, int]:
    """Connected components of a binary mask → (int32 label map with 0 = background, count).

    Components are numbered 1..n in raster order of their first pixel (scipy.ndimage.label). 8-connectivity
    by default (thin diagonal cracks stay one defect).
    """
    m = _as_bool_mask(mask)
    if connectivity not in (4, 8):
        raise ValueError("connectivity must be 4 or 8")
    structure = np.ones((3, 3), bool) if connectivity == 8 else None
    labels, n = ndimage.label(m, structure=structure)
    return labels.astype(np.int32, copy=False), int(n)


# ----------------------------------------------------------------------------------------------------
# polygons


_DIRS = {(1, 0), (0, 1), (-1, 0), (0, -1)}


def polygon_area(poly) -> float:
    """Signed shoelace area of a flat [x0, y0, x1, y1, ...] polygon (positive = clockwise on screen)."""
    p = np.asarray(poly, dtype=np.float64).reshape(-1, 2)
    x, y = p[:, 0], p[:, 1]
    return float((x * np.roll(y, -1) - np.roll(x, -1) * y).sum() / 2.0)


def mask_to_polygons(mask, include_holes: bool = False, connectivity: int = 8) -> list[list[float]]:
    """Trace the pixel-edge boundaries of a binary mask into polygons.

    Each polygon is a flat list ``[x0, y0, x1, y1, ...]`` of pixel-**corner** coordinates (pixel (r, c)
    spans x ∈ [c, c+1], y ∈ [r, r+1]), collinear vertices removed. The outline is exact: the area of an
    outer polygon minus the areas of its holes equals the pixel count. Outer boundaries run clockwise on
    screen (positive `polygon_area`), holes anticlockwise. By default only outer boundaries are returned
    (the COCO polygon convention, which has no holes); ``include_holes=True`` returns holes as well.
    Diagonal pixel contacts join (8-connectivity) unless ``connectivity=4``.
    """
    m = _as_bool_mask(mask)
    h, w = m.shape
    p = np.zeros((h + 2, w + 2), dtype=bool)
    p[1:-1, 1:-1] = m
    fg = p[1:-1, 1:-1]
    # directed edges, clockwise around each foreground pixel (screen coords, y down), only where the
    # neighbour on that side is background. Vertex coords (x, y) = (col, row) of pixel corners.
    out: dict[tuple[int, int], list[tuple[int, int]]] = {}

    def add(ys, xs, dx, dy):
        for y, x in zip(ys.tolist(), xs.tolist(), strict=True):
            out.setdefault((x, y), []).append((dx, dy))

    r, c = np.nonzero(fg & ~p[:-2, 1:-1])  # top edge: (c, r) → (c+1, r)
    add(r, c, 1, 0)
    r, c = np.nonzero(fg & ~p[1:-1, 2:])  # right edge: (c+1, r) → (c+1, r+1)
    add(r, c + 1, 0, 1)
    r, c = np.nonzero(fg & ~p[2:, 1:-1])  # bottom edge: (c+1, r+1) → (c, r+1)
    add(r + 1, c + 1, -1, 0)
    r, c = np.nonzero(fg & ~p[1:-1, :-2])  # left edge: (c, r+1) → (c, r)
    add(r + 1, c, 0, -1)

    polys: list[list[float]] = []
    # start only at vertices with a single outgoing edge (every loop has one: its top-left corner)
    for start in sorted(out, key=lambda v: (v[1], v[0])):
        while len(out.get(start, ())) == 1:
            d0 = d = out[start].pop()
            pts = [start]
            v = (start[0] + d[0], start[1] + d[1])
            while v != start:
                choices = out[v]
                if len(choices) == 1:
                    nd = choices.pop()
                else:  # saddle: 8-conn takes the anticlockwise turn (away from the pixel), 4-conn the other
                    want_neg = connectivity == 8
                    nd = next(e for e in choices if ((d[0] * e[1] - d[1] * e[0]) < 0) == want_neg)
                    choices.remove(nd)
                if nd != d:
                    pts.append(v)
                d = nd
                v = (v[0] + d[0], v[1] + d[1])
            if d == d0:  # the start vertex lies on a straight side: not a corner
                pts = pts[1:]
            arr = np.asarray(pts, dtype=np.float64)
            flat = arr.ravel().tolist()
            area = polygon_area(flat)
            if area > 0 or include_holes:
                polys.append(flat)
            if not out[start]:
                del out[start]
    return polys


# ----------------------------------------------------------------------------------------------------
# PNG


def mask_to_png_b64(mask) -> str:
    """Binary mask → base64 of a 1-bit PNG (decodes to 0/255 grey in most viewers)."""
    from PIL import Image

    m = _as_bool_mask(mask)
    img = Image.fromarray(np.ascontiguousarray(m))  # bool array → mode "1"
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def png_b64_to_mask(data: str) -> np.ndarray:
    from PIL import Image

    img = Image.open(io.BytesIO(base64.b64decode(data)))
    return np.asarray(img.convert("L")) > 127


def component_stats(labels: np.ndarray, n: int, weights: np.ndarray | None = None):
    """Per-component statistics of a label map from :func:`label_components`.

    Returns ``(areas int64 n, boxes int64 n×4 [x1, y1, x2, y2) with exclusive x2/y2 (pixel-corner
    coordinates), weight_sums float64 n or None)``; component k is row k-1.
    """
    lab = np.asarray(labels).ravel()
    w = labels.shape[1]
    if n == 0:
        return (
            np.zeros(0, np.int64),
            np.zeros((0, 4), np.int64),
            (np.zeros(0) if weights is not None else None),
        )
    # only the labelled pixels are visited after this one pass (a defect is usually a small part of a
    # large image: no full-size float64 copy of the weights)
    nz = np.flatnonzero(lab)
    lv = lab[nz]
    areas = np.bincount(lv, minlength=n + 1)[1:].astype(np.int64)
    sums = None
    if weights is not None:
        sums = np.bincount(lv, weights=np.asarray(weights).ravel()[nz].astype(np.float64), minlength=n + 1)[1:]
    order = np.argsort(lv, kind="stable")
    lv, nz = lv[order], nz[order]
    ys, xs = nz // w, nz % w
    starts = np.searchsorted(lv, np.arange(1, n + 1))
    boxes = np.stack(
        [
            np.minimum.reduceat(xs, starts),
            np.minimum.reduceat(ys, starts),
            np.maximum.reduceat(xs, starts) + 1,
            np.maximum.reduceat(ys, starts) + 1,
        ],
        axis=1,
    ).astype(np.int64)
    return areas, boxes, sums
