"""COCO RLE (by pycocotools) as the service writes it, incl. crops placed in a large image; components;
polygons; PNG."""

from __future__ import annotations

import numpy as np
import pytest
from pycocotools import mask as cm

from model import masks as M

# pycocotools' C extension predates numpy 2's __array__(copy=) protocol
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def _random_masks(n=200, seed=0):
    rng = np.random.default_rng(seed)
    out = [np.zeros((1, 1), bool), np.ones((1, 1), bool), np.zeros((5, 7), bool), np.ones((6, 3), bool)]
    for _ in range(n):
        h, w = (int(v) for v in rng.integers(1, 40, 2))
        out.append(rng.random((h, w)) < rng.random())
    # large runs exercise multi-character varints and negative deltas
    big = np.zeros((300, 200), bool)
    big[10:250, 5:190] = True
    big[100:120, 50:60] = False
    out.append(big)
    return out


def test_rle_strings_and_areas():
    m = np.array([[0, 1], [1, 1]], bool)  # column-major 0,1,1,1: runs 1, 3
    assert M.encode_rle(m) == {"size": [2, 2], "counts": "13"}
    big = np.zeros((300, 200), bool)  # long runs: multi-character counts, negative deltas
    big[10:250, 5:190] = True
    big[100:120, 50:60] = False
    for mask in _random_masks():
        rle = M.encode_rle(mask)
        assert isinstance(rle["counts"], str) and rle["size"] == list(mask.shape)
        assert M.rle_area(rle) == int(mask.sum())
    assert M.rle_area(M.encode_rle(big)) == int(big.sum())
    assert M.encode_rle(np.zeros((0, 3), bool)) == {"size": [0, 3], "counts": ""}


def test_rle_of_a_crop_placed_in_the_image_equals_the_rle_of_the_full_mask():
    """encode_rle_at(crop, corner, size) never builds the full mask; it must give the same string for
    every placement: crops at the image's edges and corners, as tall as the image (columns join), empty,
    all set, and a mask that ends with the crop's last pixel."""
    rng = np.random.default_rng(0)
    for _ in range(3000):
        h, w = (int(v) for v in rng.integers(1, 12, 2))
        ch, cw = int(rng.integers(0, h + 1)), int(rng.integers(0, w + 1))
        y1, x1 = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        crop = rng.random((ch, cw)) < rng.choice([0.0, 0.3, 0.7, 1.0])
        full = np.zeros((h, w), bool)
        full[y1:y1 + ch, x1:x1 + cw] = crop
        got = M.encode_rle_at(crop, (x1, y1), (h, w))
        assert got == M.encode_rle(full), (h, w, ch, cw, y1, x1, crop.tolist())
    ref = cm.encode(np.asfortranarray(np.pad(np.ones((3, 2), np.uint8), ((2, 0), (4, 0)))))
    assert M.encode_rle_at(np.ones((3, 2), bool), (4, 2), (5, 6))["counts"] == ref["counts"].decode("ascii")
    with pytest.raises(ValueError, match="does not fit"):
        M.encode_rle_at(np.ones((3, 3), bool), (4, 0), (5, 6))


def test_rle_decode_of_pycocotools_output_and_back():
    for m in _random_masks(seed=1):
        ref = cm.encode(np.asfortranarray(m.astype(np.uint8)))
        assert (M.decode_rle(ref) == m).all()  # bytes counts
        ours = M.encode_rle(m)
        back = cm.decode({"size": ours["size"], "counts": ours["counts"].encode()})
        assert back.shape == m.shape and (back.astype(bool) == m).all()
        assert (M.decode_rle(ours) == m).all()


def test_rle_uncompressed_counts_and_errors():
    m = np.array([[0, 1], [1, 1]], bool)  # column-major: 0,1,1,1 → runs [1, 3]
    assert (M.decode_rle({"size": [2, 2], "counts": [1, 3]}) == m).all()
    with pytest.raises(ValueError):
        M.decode_rle({"size": [2, 2], "counts": [1, 2]})
    with pytest.raises(ValueError):
        M.encode_rle(np.zeros((2, 2, 2)))


def test_label_components_numbers_in_raster_order():
    m = np.array([[0, 0, 1, 1],
                  [1, 0, 0, 0],
                  [1, 0, 0, 1]], bool)
    labels, n = M.label_components(m)
    assert n == 3 and labels.dtype == np.int32
    assert labels.tolist() == [[0, 0, 1, 1], [2, 0, 0, 0], [2, 0, 0, 3]]
    with pytest.raises(ValueError, match="connectivity"):
        M.label_components(m, 6)


def test_label_components_diagonal():
    m = np.eye(4, dtype=bool)
    assert M.label_components(m, 8)[1] == 1
    assert M.label_components(m, 4)[1] == 4


def test_polygons_exact_area_and_holes():
    rng = np.random.default_rng(4)
    for _ in range(100):
        h, w = (int(v) for v in rng.integers(1, 25, 2))
        m = rng.random((h, w)) < rng.random()
        polys = M.mask_to_polygons(m, include_holes=True)
        assert sum(M.polygon_area(p) for p in polys) == pytest.approx(m.sum())
    ring = np.zeros((10, 10), bool)
    ring[2:8, 2:8] = True
    ring[4:6, 4:6] = False
    outer = M.mask_to_polygons(ring)
    assert outer == [[2.0, 2.0, 8.0, 2.0, 8.0, 8.0, 2.0, 8.0]]
    both = M.mask_to_polygons(ring, include_holes=True)
    assert len(both) == 2 and sorted(M.polygon_area(p) for p in both) == [-4.0, 36.0]


def test_polygons_connectivity_and_rasterise_back():
    m = np.zeros((6, 6), bool)
    m[1, 1] = m[2, 2] = True  # diagonal touch
    assert len(M.mask_to_polygons(m, connectivity=8)) == 1
    assert len(M.mask_to_polygons(m, connectivity=4)) == 2
    blob = np.zeros((40, 50), bool)
    yy, xx = np.mgrid[:40, :50]
    blob[(yy - 20) ** 2 + (xx - 25) ** 2 < 150] = True
    polys = M.mask_to_polygons(blob)
    rles = cm.frPyObjects(polys, 40, 50)
    raster = cm.decode(cm.merge(rles)).astype(bool)
    iou = (raster & blob).sum() / (raster | blob).sum()
    assert iou > 0.9
    assert M.mask_to_polygons(np.zeros((3, 3), bool)) == []


def test_png_roundtrip():
    rng = np.random.default_rng(5)
    m = rng.random((17, 23)) < 0.4
    b64 = M.mask_to_png_b64(m)
    assert isinstance(b64, str)
    assert (M.png_b64_to_mask(b64) == m).all()
