"""Augmentations keep boxes and masks consistent with the image."""

from __future__ import annotations

import numpy as np
import pytest

from model.data.augment import (
    IGNORE_INDEX,
    ClassifyAugment,
    DetectAugment,
    SegmentAugment,
    filter_boxes,
    hflip,
    hsv_augment,
    letterbox,
    letterbox_boxes,
    mosaic4,
    paste_defect,
    paste_segment,
    photometric,
    randaugment_lite,
    rot90,
    rotate,
    unletterbox_boxes,
    vflip,
)


def _square_image(h=60, w=80, box=(30, 10, 45, 20), value=255, channels=None):
    """Dark image with a bright rectangle; box = x1, y1, x2, y2 (pixel edges)."""
    shape = (h, w) if channels is None else (h, w, channels)
    img = np.zeros(shape, np.uint8)
    x1, y1, x2, y2 = box
    img[y1:y2, x1:x2] = value
    return img, np.array([box], np.float32)


def _bright_bbox(img, thr=128):
    g = img if img.ndim == 2 else img[..., 0]
    ys, xs = np.nonzero(g > thr)
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float32)


def test_letterbox_geometry():
    img = np.full((50, 100, 3), 7, np.uint8)
    out, scale, pad = letterbox(img, 64)
    assert out.shape == (64, 64, 3) and scale == pytest.approx(0.64) and pad == (0, 16)
    assert (out[:16] == 114).all() and (out[16:48] == 7).all() and (out[48:] == 114).all()
    out2, s2, p2 = letterbox(img, (32, 100))  # (h, w)
    assert out2.shape == (32, 100, 3) and s2 == pytest.approx(0.64) and p2 == (18, 0)
    b = np.array([[10, 5, 60, 45]], np.float32)
    lb = letterbox_boxes(b, scale, pad)
    np.testing.assert_allclose(lb, [[6.4, 19.2, 38.4, 44.8]], rtol=1e-6)
    np.testing.assert_allclose(unletterbox_boxes(lb, scale, pad, (100, 50)), b, rtol=1e-6)
    m = np.ones((50, 100), np.uint8)
    mo, _, _ = letterbox(m, 64, IGNORE_INDEX, nearest=True)
    assert set(np.unique(mo)) == {1, IGNORE_INDEX}
    # upscaling a small image
    up, s3, p3 = letterbox(np.zeros((20, 10), np.uint8), 40)
    assert up.shape == (40, 40) and s3 == 2.0 and p3 == (10, 0)


@pytest.mark.parametrize("op", ["hflip", "vflip", "rot1", "rot2", "rot3"])
def test_geometric_ops_move_box_with_square(op):
    img, boxes = _square_image()
    mask = (img > 0).astype(np.uint8)
    if op == "hflip":
        o, m, b = hflip(img, mask, boxes)
    elif op == "vflip":
        o, m, b = vflip(img, mask, boxes)
    else:
        o, m, b = rot90(img, mask, boxes, k=int(op[-1]))
    np.testing.assert_array_equal(b[0], _bright_bbox(o))
    np.testing.assert_array_equal((o > 0).astype(np.uint8), m)


def test_filter_boxes():
    b = np.array([[-10, -10, 5, 5], [10, 10, 11, 30], [90, 90, 200, 200], [0, 0, 50, 50]], np.float32)
    c, keep = filter_boxes(b, 100, 100, min_size=2, min_visibility=0.1)
    assert keep.tolist() == [True, False, False, True]  # 25% visible; 1px wide; 100/12100 visible; inside
    np.testing.assert_array_equal(c[0], [0, 0, 5, 5])


def test_photometric_and_randaugment():
    rng = np.random.default_rng(0)
    for img in (np.random.default_rng(1).integers(0, 256, (40, 30), dtype=np.uint8),
                np.random.default_rng(2).integers(0, 256, (40, 30, 3), dtype=np.uint8)):
        for _ in range(20):
            o = photometric(img, rng)
            assert o.shape == img.shape and o.dtype == np.uint8
            o = randaugment_lite(img, rng, num_ops=2, magnitude=0.5)
            assert o.shape == img.shape and o.dtype == np.uint8
            o = hsv_augment(img, rng)
            assert o.shape == img.shape and o.dtype == np.uint8
    # monotone LUT: order of intensities is preserved
    ramp = np.arange(256, dtype=np.uint8).reshape(16, 16)
    o = photometric(ramp, np.random.default_rng(3)).reshape(-1).astype(int)
    assert (np.diff(o) >= 0).all()


def test_exposure_multiplies_intensities_by_one_gain_within_its_range_and_clips_at_white():
    """Magnetic tile shows one tile at up to seven exposures (mean grey 65 → 153 for one of them): --exposure G
    scales every intensity by the same gain in [e^-G, e^G] (off: the image is unchanged)."""
    ramp = np.arange(256, dtype=np.uint8).reshape(16, 16)
    off = photometric(ramp, np.random.default_rng(0), brightness=0, contrast=0, gamma=0)
    assert np.array_equal(off, ramp)
    gains = []
    for seed in range(40):
        o = photometric(ramp, np.random.default_rng(seed), brightness=0, contrast=0, gamma=0,
                        exposure=0.7).reshape(-1).astype(float)
        unclipped = o < 255
        g = o[100:][unclipped[100:]] / np.arange(100, 256)[unclipped[100:]]
        assert g.size and np.ptp(g) < 0.02  # one gain for the whole image (up to rounding)
        assert (o[~unclipped] == 255).all() and np.all(np.diff(o) >= 0)
        gains.append(g.mean())
    assert np.exp(-0.7) - 0.01 <= min(gains) < 0.75 and 1.4 < max(gains) <= np.exp(0.7) + 0.01
    # both training pipelines carry the setting (default off)
    assert ClassifyAugment(32).exposure == 0.0 and SegmentAugment(32).exposure == 0.0
    assert ClassifyAugment(32, exposure=0.5).exposure == 0.5 and SegmentAugment(32, exposure=0.5).exposure == 0.5
    dark = np.full((40, 40), 60, np.uint8)
    seen = {int(ClassifyAugment(32, crop_prob=0, brightness=0, contrast=0, gamma=0, exposure=1.0)(
        dark, np.random.default_rng(s))[0][16, 16]) for s in range(20)}
    assert min(seen) < 45 and max(seen) > 90  # the pipeline applies it (gain 1 would leave 60)


def test_detect_augment_single_keeps_box_on_square():
    img, boxes = _square_image(h=120, w=160, box=(60, 40, 100, 70))
    aug = DetectAugment(imgsz=96, train=True, mosaic=0.0, hflip=0.5, vflip=0.5, rot90=0.5, hsv=None,
                       translate=0.1, scale=0.3)
    for seed in range(25):
        rng = np.random.default_rng(seed)
        o, b, c = aug(img, boxes, np.array([3]), rng)
        assert o.shape == (96, 96) and o.dtype == np.uint8
        assert len(b) == 1 and c.tolist() == [3]
        np.testing.assert_allclose(b[0], _bright_bbox(o), atol=1.5)


def test_detect_augment_eval_is_letterbox():
    img, boxes = _square_image(h=50, w=100, box=(10, 5, 60, 45), channels=3)
    o, b, c = DetectAugment(imgsz=64, train=False)(img, boxes, np.array([0]), np.random.default_rng(0))
    ref, s, p = letterbox(img, 64)
    np.testing.assert_array_equal(o, ref)
    np.testing.assert_allclose(b, letterbox_boxes(boxes, s, p))


def test_mosaic_shape_and_box_content():
    samples = []
    for k in range(4):
        h, w = (90, 120) if k % 2 else (150, 100)
        img = np.full((h, w), 20, np.uint8)
        x1, y1 = 15 + 5 * k, 20 + 3 * k
        img[y1:y1 + 40, x1:x1 + 50] = 60 * (k + 1)  # class k ↔ intensity 60(k+1)
        samples.append((img, np.array([[x1, y1, x1 + 50, y1 + 40]], np.float32), np.array([k])))
    n_boxes = 0
    for seed in range(20):
        out, b, c = mosaic4(samples, 128, np.random.default_rng(seed), scale=0.4, translate=0.1)
        assert out.shape == (128, 128) and out.dtype == np.uint8
        assert b.shape == (len(c), 4) and b.dtype == np.float32
        assert (b >= 0).all() and (b <= 128).all()
        assert ((b[:, 2] - b[:, 0]) >= 2).all() and ((b[:, 3] - b[:, 1]) >= 2).all()
        for box, k in zip(b, c, strict=True):
            x1, y1, x2, y2 = box
            inner = out[int(np.ceil(y1)) + 1:int(y2) - 1, int(np.ceil(x1)) + 1:int(x2) - 1]
            if inner.size:
                assert abs(float(np.median(inner)) - 60 * (k + 1)) <= 3
        n_boxes += len(b)
    assert n_boxes > 20  # mosaics do contain the objects
    # RGB + DetectAugment path with mosaic partners
    rgb = [(np.repeat(s[0][..., None], 3, 2), s[1], s[2]) for s in samples]
    aug = DetectAugment(imgsz=64, train=True, mosaic=1.0)
    rng = np.random.default_rng(0)
    assert aug.wants_mosaic(rng)
    o, b, c = aug(*rgb[0], rng, others=rgb[1:])
    assert o.shape == (64, 64, 3) and ((b >= 0) & (b <= 64)).all() and len(b) == len(c)


def test_segment_augment_consistent():
    h, w = 90, 130
    mask = np.zeros((h, w), np.uint8)
    mask[20:50, 30:90] = 1
    img = np.where(mask == 1, 200, 10).astype(np.uint8)
    aug = SegmentAugment(imgsz=96, crop=64, train=True, scale=(0.5, 2.0), fg_crop=0.5, brightness=0,
                         contrast=0, gamma=0, pad_value=0)
    seen_fg = 0
    for seed in range(20):
        o, m = aug(img, mask, np.random.default_rng(seed))
        assert o.shape == (64, 64) and m.shape == (64, 64) and m.dtype == np.uint8
        assert set(np.unique(m).tolist()) <= {0, 1, IGNORE_INDEX}
        assert (o[m == IGNORE_INDEX] == 0).all()  # padded pixels are ignore
        fg = m == 1
        if fg.sum():
            seen_fg += 1
            assert (o[fg] > 100).mean() > 0.9
            assert (o[m == 0] < 100).mean() > 0.9
    assert seen_fg >= 8
    o, m = SegmentAugment(imgsz=96, train=False)(img, mask, np.random.default_rng(0))
    assert o.shape == (96, 96) and (m[:, :] == IGNORE_INDEX).sum() > 0 and m.max() == IGNORE_INDEX


def test_rotate_turns_image_and_mask_together_and_ignores_the_new_corners():
    img, mask = np.full((40, 80), 10, np.uint8), np.zeros((40, 80), np.uint8)
    img[15:25, 10:70], mask[15:25, 10:70] = 200, 1  # a horizontal bar
    o, m = rotate(img, mask, 90, pad_value=0)
    assert o.shape == m.shape == (80, 40)  # the canvas grows to hold the turned image
    assert np.array_equal(m, np.rot90(mask)) and np.array_equal(o, np.rot90(img))  # 90°: exact
    o, m = rotate(img, mask, 30, pad_value=0)
    assert o.shape == m.shape and o.shape[0] > 40 and o.shape[1] > 80
    assert set(np.unique(m).tolist()) == {0, 1, IGNORE_INDEX}  # nearest: no new label values
    assert (o[m == IGNORE_INDEX] == 0).mean() > 0.95  # the new corners: pad value, ignored in the mask
    assert abs(int((m == 1).sum()) - 600) < 60  # the bar keeps its area
    assert (o[m == 1] > 100).mean() > 0.9 and (o[m == 0] < 100).mean() > 0.9
    rgb = np.repeat(img[..., None], 3, 2)
    o3, m3 = rotate(rgb, mask, 30, pad_value=0)
    assert o3.shape[:2] == m3.shape and np.array_equal(m3, m)
    # the segment pipeline with rotate: still consistent crops, and angles other than multiples of 90°
    aug = SegmentAugment(imgsz=96, crop=64, train=True, scale=(1.0, 1.0), brightness=0, contrast=0, gamma=0,
                         pad_value=0, rotate=45, hflip=0, vflip=0, rot90=False)
    shapes = set()
    for seed in range(10):
        o, m = aug(img, mask, np.random.default_rng(seed))
        assert o.shape == m.shape == (64, 64)
        assert (o[m == 1] > 100).mean() > 0.9
        shapes.add(int((m == IGNORE_INDEX).sum()))
    assert len(shapes) > 3  # the ignored corners differ from angle to angle


def test_classify_augment_keeps_defect():
    img = np.full((200, 120), 50, np.uint8)
    mask = np.zeros((200, 120), np.uint8)
    img[170:180, 100:110] = 250
    mask[170:180, 100:110] = 3
    aug = ClassifyAugment(imgsz=48, train=True, crop_prob=1.0, crop_scale=(0.2, 0.5), brightness=0,
                          contrast=0, gamma=0)
    for seed in range(20):
        o, m = aug(img, np.random.default_rng(seed), mask)
        assert o.shape == (48, 48) and m.shape == (48, 48)
        assert (m == 3).any()  # the small defect survives the crop
        assert (o[m == 3] > 150).mean() > 0.8
    o, m = ClassifyAugment(imgsz=48, train=True, randaugment=2)(img, np.random.default_rng(0))
    assert o.shape == (48, 48) and m is None
    o, _ = ClassifyAugment(imgsz=48, train=False, resize_mode="stretch")(np.zeros((10, 30, 3), np.uint8),
                                                                           np.random.default_rng(0))
    assert o.shape == (48, 48, 3)


def test_classify_crop_box_keeps_at_least_min_defect_keep_of_the_defect():
    """The random training crop keeps ``min_defect_keep`` of the defect pixels: at 0.5 (the default) a
    chip on the border is never cut below half; lower, crops that cut it to a sliver at the frame also occur."""
    mask = np.zeros((100, 160), np.uint8)
    mask[0:12, 60:100] = 2  # a chip off the top edge
    total = int((mask > 0).sum())
    kept_by = {}
    for keep in (0.5, 0.15):
        aug = ClassifyAugment(imgsz=64, train=True, min_defect_keep=keep)
        kept = []
        for seed in range(300):
            box = aug.crop_box(160, 100, mask, np.random.default_rng(seed))
            if box is not None:
                x0, y0, x1, y1 = box
                assert 0 <= x0 < x1 <= 160 and 0 <= y0 < y1 <= 100
                kept.append(int((mask[y0:y1, x0:x1] > 0).sum()) / total)
        assert len(kept) > 200 and min(kept) >= keep
        kept_by[keep] = np.array(kept)
    assert (kept_by[0.15] < 0.5).sum() >= 10  # slivers: only the lower setting makes them
    assert ClassifyAugment(imgsz=64).crop_box(160, 100, None, np.random.default_rng(0)) is not None
    with pytest.raises(ValueError, match="min_defect_keep"):
        ClassifyAugment(imgsz=64, min_defect_keep=1.5)


def test_paste_defect_moves_the_defect_and_its_mask_onto_the_other_image():
    src = np.full((40, 50), 200, np.uint8)  # a bright tile with a dark 4x6 defect
    src_mask = np.zeros((40, 50), np.uint8)
    src[10:14, 20:26] = 20
    src_mask[10:14, 20:26] = 3
    dst = np.full((60, 70), 80, np.uint8)  # a darker defect-free tile
    corners = set()
    for seed in range(10):
        img, mask = paste_defect(src, src_mask, dst, np.random.default_rng(seed), margin=4, feather=1.0)
        assert img.shape == dst.shape and mask.shape == dst.shape and img.dtype == np.uint8
        assert set(np.unique(mask)) == {0, 3} and (mask == 3).sum() == 24  # one 4x6 defect, class kept
        ys, xs = np.nonzero(mask == 3)
        assert ys.max() - ys.min() == 3 and xs.max() - xs.min() == 5
        corners.add((int(ys.min()), int(xs.min())))
        # brightness matched: the defect is 180 darker than its tile, so 80 - 180 clips to 0 here
        assert (img[mask == 3] == 0).all()
        far = np.ones_like(mask, bool)
        far[max(ys.min() - 5, 0):ys.max() + 6, max(xs.min() - 5, 0):xs.max() + 6] = False
        assert (img[far] == 80).all()  # nothing outside the pasted region changes
        assert not (img[mask == 0] < 60).any()  # no seam: the margin blends into the tile's level
    assert len(corners) > 5  # pasted at a random position
    # colour destination, grayscale source
    img, mask = paste_defect(src, src_mask, np.full((30, 30, 3), 90, np.uint8), np.random.default_rng(0))
    assert img.shape == (30, 30, 3) and (mask == 3).sum() == 24
    # no defect, or a defect region larger than the destination: None
    assert paste_defect(src, np.zeros_like(src_mask), dst, np.random.default_rng(0)) is None
    assert paste_defect(src, src_mask, np.zeros((8, 8), np.uint8), np.random.default_rng(0)) is None


def test_paste_segment_adds_a_window_of_the_donors_defects_and_keeps_the_images_own():
    src = np.full((40, 50), 200, np.uint8)  # a bright donor with a dark 30x30 defect area
    src_mask = np.zeros((40, 50), np.uint8)
    src[5:35, 10:40] = 20
    src_mask[5:35, 10:40] = 1
    dst = np.full((60, 70), 80, np.uint8)
    dst_mask = np.zeros((60, 70), np.uint8)
    dst_mask[50] = 1  # the image's own crack along a row
    dst_mask[:2] = 255  # and a strip of ignored pixels
    for seed in range(20):
        img, mask = paste_segment(src, src_mask, dst, dst_mask, np.random.default_rng(seed), size=(0.3, 0.5),
                                  margin=2, feather=1.0)
        assert img.shape == dst.shape and mask.shape == dst.shape and img.dtype == np.uint8
        assert set(np.unique(mask)) <= {0, 1, 255}
        new = (mask == 1) & (dst_mask != 1)
        assert new.any()  # some of the donor's defect arrived
        changed = (img != dst) | (mask != dst_mask)
        ys, xs = np.nonzero(changed)
        assert ys.max() - ys.min() < 20 and xs.max() - xs.min() < 20  # one window, side <= 0.5 x 40
        assert (img[new] <= 20).all()  # the donor's dark defect, shifted to the darker image (or clipped)
        assert (mask[dst_mask == 1] != 0).all()  # the own crack stays a crack, or ignore where blended over
    # a donor that is all defect: the window's every pixel is pasted (side = 0.2 x 40 = 8)
    img, mask = paste_segment(src, np.ones_like(src_mask), dst, np.zeros_like(dst_mask),
                              np.random.default_rng(0), size=(0.2, 0.2))
    assert (mask == 1).sum() == 64
    # grayscale donor into a colour image; a donor without defects gives None
    img, mask = paste_segment(src, src_mask, np.full((30, 30, 3), 90, np.uint8), np.zeros((30, 30), np.uint8),
                              np.random.default_rng(0))
    assert img.shape == (30, 30, 3) and (mask == 1).any()
    assert paste_segment(src, np.zeros_like(src_mask), dst, dst_mask, np.random.default_rng(0)) is None
    # pixels the donor ignores (255) that the blended margin brings in are ignored, not background
    ring = np.full((40, 50), 255, np.uint8)
    ring[15:25, 20:30] = 1
    img, mask = paste_segment(src, ring, dst, np.zeros_like(dst_mask), np.random.default_rng(0), size=(0.5, 0.5),
                              margin=4, feather=1.0)
    assert (mask == 1).sum() == 100 and (mask == 255).any()
    ys, xs = np.nonzero(mask == 1)
    around = mask[max(ys.min() - 1, 0):ys.max() + 2, max(xs.min() - 1, 0):xs.max() + 2]
    assert set(np.unique(around)) == {1, 255}  # the margin right around the defect: ignore
