"""Binary-mask utilities: COCO compressed RLE, connected components, polygons, PNG.

Everything here is numpy (+ Pillow for PNG); no pycocotools or OpenCV at run time.

COCO RLE, as pycocotools writes it: the mask is read in **column-major** (Fortran) order, the run
lengths alternate background/foreground starting with a (possibly empty) background run, and the
counts are packed into an ASCII string: each count (from the third on, as the difference to the count
two places before) is written as a signed little-endian base-32 varint, 5 bits per character, bit 0x20
= "more follows", bit 0x10 of the last character = sign, each character offset by 48 ('0').
"""

from __future__ import annotations

import base64
import io

import numpy as np

__all__ = [
    "encode_rle",
    "encode_rle_at",
    "decode_rle",
    "rle_area",
    "rle_to_string",
    "rle_from_string",
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


def _runs(mask: np.ndarray) -> np.ndarray:
    """Run lengths of the column-major flattening, starting with a background run (may be 0)."""
    flat = mask.ravel(order="F")
    n = flat.size
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    # positions where the value changes
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate(([0], change, [n]))
    counts = np.diff(bounds)
    if flat[0]:
        counts = np.concatenate(([0], counts))
    return counts.astype(np.int64)


def rle_to_string(counts) -> str:
    """Pack run lengths into the COCO compressed string (pycocotools `rleToString`)."""
    out: list[str] = []
    cnts = [int(c) for c in counts]
    for i, x in enumerate(cnts):
        if i > 2:
            x -= cnts[i - 2]
        more = True
        while more:
            c = x & 0x1F
            x >>= 5  # arithmetic shift, as the C code on a signed long
            more = (x != -1) if (c & 0x10) else (x != 0)
            if more:
                c |= 0x20
            out.append(chr(c + 48))
    return "".join(out)


def rle_from_string(s: str | bytes) -> list[int]:
    """Unpack a COCO compressed string into run lengths (pycocotools `rleFrString`)."""
    if isinstance(s, bytes):
        s = s.decode("ascii")
    cnts: list[int] = []
    p = 0
    n = len(s)
    while p < n:
        x = 0
        k = 0
        more = True
        while more:
            if p >= n:
                raise ValueError("truncated RLE string")
            c = ord(s[p]) - 48
            if c < 0 or c > 63:
                raise ValueError(f"invalid character {s[p]!r} in RLE string")
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and (c & 0x10):
                x |= -1 << (5 * k)
        if len(cnts) > 2:
            x += cnts[-2]
        cnts.append(x)
    return cnts


def encode_rle(mask) -> dict:
    """Binary H×W mask → ``{"size": [h, w], "counts": str}`` (COCO compressed RLE, pycocotools-compatible)."""
    m = _as_bool_mask(mask)
    h, w = m.shape
    return {"size": [int(h), int(w)], "counts": rle_to_string(_runs(m))}


def encode_rle_at(crop, corner, size) -> dict:
    """`encode_rle` of the ``size`` = (h, w) mask that is ``crop`` with its top-left pixel at ``corner`` =
    (x1, y1) and background elsewhere, without building that full-size mask (a defect's box is usually
    a small part of a large image): only the crop's pixels are visited."""
    c = _as_bool_mask(crop)
    h, w = (int(v) for v in size)
    x1, y1 = (int(v) for v in corner)
    ch, cw = c.shape
    if x1 < 0 or y1 < 0 or x1 + cw > w or y1 + ch > h:
        raise ValueError(f"a {ch}x{cw} crop at ({x1}, {y1}) does not fit a {h}x{w} mask")
    if c.size == 0:
        return {"size": [h, w], "counts": rle_to_string([h * w] if h * w else [])}
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
    return {"size": [h, w], "counts": rle_to_string(runs.astype(np.int64))}


def decode_rle(rle: dict) -> np.ndarray:
    """COCO RLE (compressed string, bytes, or uncompressed list of counts) → bool H×W mask."""
    h, w = (int(v) for v in rle["size"])
    counts = rle["counts"]
    cnts = rle_from_string(counts) if isinstance(counts, (str, bytes)) else [int(c) for c in counts]
    cnts_arr = np.asarray(cnts, dtype=np.int64)
    if (cnts_arr < 0).any() or cnts_arr.sum() != h * w:
        raise ValueError(f"RLE counts sum to {int(cnts_arr.sum())}, expected h*w = {h * w}")
    values = np.zeros(len(cnts_arr), dtype=bool)
    values[1::2] = True
    flat = np.repeat(values, cnts_arr)
    return flat.reshape((w, h)).T.copy()  # column-major → H×W


def rle_area(rle: dict) -> int:
    counts = rle["counts"]
    cnts = rle_from_string(counts) if isinstance(counts, (str, bytes)) else list(counts)
    return int(sum(cnts[1::2]))


# ----------------------------------------------------------------------------------------------------
# connected components


def _label_numpy(mask: np.ndarray, connectivity: int) -> tuple[np.ndarray, int]:
    """Run-based two-pass labelling: runs of each row, unions with overlapping runs of the row above."""
    h, w = mask.shape
    padded = np.zeros((h, w + 2), dtype=np.int8)
    padded[:, 1:-1] = mask
    d = np.diff(padded, axis=1)  # +1 at run start, -1 one past run end (in unpadded coords)
    rs, cs = np.nonzero(d == 1)
    _, ce = np.nonzero(d == -1)
    # np.nonzero is row-major, so starts and ends pair up in order
    starts, ends, rows = cs, ce, rs  # run covers columns [start, end)
    n = len(starts)
    labels = np.zeros((h, w), dtype=np.int32)
    if n == 0:
        return labels, 0
    parent = np.arange(n)

    def find(a: int) -> int:
        root = a
        while parent[root] != root:
            root = parent[root]
        while parent[a] != root:
            parent[a], a = root, parent[a]
        return root

    row_first = np.searchsorted(rows, np.arange(h + 1))
    ext = 1 if connectivity == 8 else 0
    for r in range(1, h):
        a0, a1 = row_first[r - 1], row_first[r]
        b0, b1 = row_first[r], row_first[r + 1]
        if a0 == a1 or b0 == b1:
            continue
        ps, pe = starts[a0:a1], ends[a0:a1]
        # for each run in row r, the runs of row r-1 it touches: prev.start < cur.end + ext and
        # prev.end > cur.start - ext
        lo = np.searchsorted(pe, starts[b0:b1] - ext, side="right")
        hi = np.searchsorted(ps, ends[b0:b1] + ext, side="left")
        for j in np.flatnonzero(hi > lo):
            cur = b0 + j
            for i in range(a0 + lo[j], a0 + hi[j]):
                ra, rb = find(cur), find(i)
                if ra != rb:
                    if ra < rb:
                        parent[rb] = ra
                    else:
                        parent[ra] = rb
    roots = np.array([find(i) for i in range(n)])
    uniq, comp = np.unique(roots, return_inverse=True)  # components numbered in raster order of first run
    lengths = ends - starts
    run_offset = np.cumsum(lengths) - lengths  # position of each run's first pixel in the output
    flat_idx = np.repeat(rows * w + starts - run_offset, lengths) + np.arange(int(lengths.sum()))
    labels.ravel()[flat_idx] = np.repeat(comp + 1, lengths)
    return labels, len(uniq)


def label_components(mask, connectivity: int = 8) -> tuple[np.ndarray, int]:
    """Connected components of a binary mask → (int32 label map with 0 = background, count).

    Components are numbered 1..n in raster order of their first pixel. 8-connectivity by default (thin
    diagonal cracks stay one defect). Uses scipy.ndimage when it is installed (faster), numpy otherwise;
    both give identical labels.
    """
    m = _as_bool_mask(mask)
    if connectivity not in (4, 8):
        raise ValueError("connectivity must be 4 or 8")
    try:
        from scipy import ndimage
    except ImportError:  # pragma: no cover - scipy is optional
        return _label_numpy(m, connectivity)
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
