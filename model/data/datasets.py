"""torch Datasets for training and evaluation: ClassifyDataset, SegmentDataset, DetectDataset.

Every item is a dict; images are uint8 tensors 3×S×S (grayscale data replicated to 3 channels; normalise on
the device, as the predictor does). Use the matching collate function in the DataLoader:

=================  ===============================================================================
ClassifyDataset    ``{"image": u8 3×S×S, "label": int64, "index": int64[, "mask": int64 S×S]}``
SegmentDataset     ``{"image": u8 3×C×C, "mask": int64 C×C (255 = ignore), "index"}``
DetectDataset      ``{"image": u8 3×S×S, "boxes": f32 N×4 xyxy (pixels of the S×S input),
                   "classes": int64 N, "index"}``; `collate_detect` adds ``targets`` (M×6:
                   batch index, class, x1, y1, x2, y2)
=================  ===============================================================================

Eval items (``train=False``) also carry ``meta`` = ``{"orig_w", "orig_h", "scale", "pad": [x, y]}`` of the
letterbox, so outputs can be mapped back to original pixels (`augment.unletterbox_boxes`).

Decoded images are kept in memory (``cache=True``; grayscale content is stored single-channel). Call
``dataset.preload()`` before building a DataLoader with workers so the forked workers share the cache.
Augmentation randomness is drawn from torch's RNG (seeded per DataLoader worker by torch), so
``torch.manual_seed`` makes an epoch reproducible and workers never repeat each other.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, WeightedRandomSampler

from .augment import (
    IGNORE_INDEX,
    ClassifyAugment,
    DetectAugment,
    SegmentAugment,
    letterbox_geometry,
    paste_defect,
    paste_segment,
)
from .readers import Record, defect_pixels, load_image

__all__ = [
    "IGNORE_INDEX",
    "ClassifyDataset",
    "SegmentDataset",
    "DetectDataset",
    "collate",
    "collate_detect",
    "sample_weights",
    "balanced_sampler",
    "decode_image",
    "defect_fractions",
    "to_chw_tensor",
]


def decode_image(path, grayscale: bool = False, max_side: int | None = None) -> np.ndarray:
    """Decode to uint8: H×W if the content is grayscale (or ``grayscale=True``), else H×W×3.

    Pixels as the service decodes them (`readers.load_image`); with ``max_side`` images larger than that are
    downscaled (bilinear).
    """
    a = load_image(path, "L" if grayscale else "RGB")
    if max_side and max(a.shape[:2]) > max_side:
        im = Image.fromarray(a)
        r = max_side / max(im.size)
        a = np.asarray(im.resize((max(1, round(im.size[0] * r)), max(1, round(im.size[1] * r))), Image.BILINEAR))
    if a.ndim == 3:
        g = a[..., 0]
        if np.array_equal(g, a[..., 1]) and np.array_equal(g, a[..., 2]):
            a = g  # RGB file with R=G=B (NEU-DET): keep one channel
    return np.ascontiguousarray(a)


def to_chw_tensor(img: np.ndarray) -> torch.Tensor:
    """uint8 H×W or H×W×C → uint8 tensor 3×H×W (gray replicated)."""
    if img.ndim == 2:
        t = torch.from_numpy(np.ascontiguousarray(img))
        return t.unsqueeze(0).expand(3, -1, -1).contiguous()
    if img.shape[2] == 1:
        return to_chw_tensor(img[..., 0])
    return torch.from_numpy(np.ascontiguousarray(img[..., :3].transpose(2, 0, 1)))


class _Base(Dataset):
    task = ""

    def __init__(self, records: Sequence[Record], imgsz: int, train: bool, cache: bool = True,
                 grayscale: bool = False, cache_max_side: int | None = None):
        self.records = list(records)
        self.imgsz = int(imgsz)
        self.train = train
        self.cache = cache
        self.grayscale = grayscale
        self.cache_max_side = cache_max_side
        self._images: dict[int, np.ndarray] = {}
        self._masks: dict[int, np.ndarray] = {}
        self._defect_fractions: np.ndarray | None = None  # `defect_fractions`, once computed

    def __len__(self) -> int:
        return len(self.records)

    # --- decoding with cache
    def load_image(self, i: int) -> np.ndarray:
        img = self._images.get(i)
        if img is None:
            img = decode_image(self.records[i].image, self.grayscale, self.cache_max_side)
            if self.cache:
                self._images[i] = img
        return img

    def load_mask(self, i: int) -> np.ndarray:
        m = self._masks.get(i)
        if m is None:
            img = self.load_image(i)
            rec = self.records[i]
            m = rec.load_mask()
            if m.shape != img.shape[:2]:
                if self.cache_max_side and rec.width and m.shape == (rec.height, rec.width):
                    m = np.asarray(Image.fromarray(m).resize(img.shape[1::-1], Image.NEAREST))
                else:
                    m = rec.load_mask(hw=img.shape[:2])
            if self.cache:
                self._masks[i] = m
        return m

    def _uses_mask(self) -> bool:
        return False

    def preload(self, progress: bool = False) -> _Base:
        """Decode every image (and mask, when used) into the cache now."""
        it = range(len(self))
        if progress:
            try:
                from tqdm import tqdm

                it = tqdm(it, desc=f"caching {self.task}", leave=False)
            except ImportError:  # pragma: no cover
                pass
        for i in it:
            self.load_image(i)
            if self._uses_mask():
                self.load_mask(i)
        return self

    @staticmethod
    def _rng() -> np.random.Generator:
        return np.random.default_rng(int(torch.randint(0, 2**62, (1,)).item()))

    def _meta(self, img: np.ndarray, i: int) -> dict:
        h, w = img.shape[:2]
        rec = self.records[i]
        ow, oh = (rec.width or w), (rec.height or h)
        scale, _, pad = letterbox_geometry(w, h, self.imgsz)
        # scale refers to original pixels (the cache may hold a downscaled copy)
        return {"orig_w": int(ow), "orig_h": int(oh), "scale": float(scale * w / ow), "pad": [pad[0], pad[1]],
                "key": rec.key}


class ClassifyDataset(_Base):
    """Image-level classification. ``with_mask=True`` also returns the segment mask (magnetic-tile),
    transformed like the image (for a mask-supervised classifier). In training, masks (when the records
    have them) steer the random crop so that it keeps the defect. ``paste`` (training with masks): the
    probability that a defect image is replaced by its defect pasted onto a random defect-free image of the
    set (`paste_defect`; same label, the pasted mask) — new surroundings for classes with few images.
    Extra kwargs go to `ClassifyAugment`."""

    task = "classify"

    def __init__(self, records: Sequence[Record], imgsz: int = 224, train: bool = False,
                 augment: ClassifyAugment | None = None, cache: bool = True, with_mask: bool = False,
                 grayscale: bool = False, cache_max_side: int | None = None, paste: float = 0.0,
                 **aug_kwargs):
        super().__init__(records, imgsz, train, cache, grayscale, cache_max_side)
        if any(r.label is None for r in self.records):
            raise ValueError("ClassifyDataset needs records with a classify label")
        self.augment = augment or ClassifyAugment(imgsz, train=train, **aug_kwargs)
        self.with_mask = with_mask
        self._have_masks = all(r.has_mask for r in self.records)
        if with_mask and not self._have_masks:
            raise ValueError("with_mask=True needs records with masks")
        if not 0.0 <= paste <= 1.0:
            raise ValueError(f"paste must be a probability in [0, 1], got {paste}")
        if paste and not (train and self._have_masks):
            raise ValueError("paste needs a training set whose records have masks")
        self.paste = float(paste)
        self._free: list[int] | None = None  # indices of the images without defect pixels (lazily)

    def _uses_mask(self) -> bool:
        return self.with_mask or self.paste > 0 or (self.train and self._have_masks
                                                    and self.augment.min_defect_keep > 0)

    def _has_defect(self, i: int) -> bool:
        m = self.load_mask(i)
        return bool(defect_pixels(m).any())

    def _pasted(self, i: int, img: np.ndarray, mask: np.ndarray, rng: np.random.Generator):
        """`paste_defect` of image i onto a random defect-free image, or None (no defect-free image, or
        the defect does not fit)."""
        if self._free is None:
            self._free = [j for j in range(len(self)) if not self._has_defect(j)]
        if not self._free:
            return None
        j = self._free[int(rng.integers(len(self._free)))]
        return paste_defect(img, mask, self.load_image(j), rng)

    @property
    def labels(self) -> np.ndarray:
        return np.asarray([r.label for r in self.records], np.int64)

    def __getitem__(self, i: int) -> dict:
        img = self.load_image(i)
        mask = self.load_mask(i) if self._uses_mask() else None
        rng = self._rng()
        if self.paste and rng.random() < self.paste and self._has_defect(i):
            pasted = self._pasted(i, img, mask, rng)
            if pasted is not None:
                img, mask = pasted
        out_img, out_mask = self.augment(img, rng, mask)
        item = {"image": to_chw_tensor(out_img), "label": torch.tensor(self.records[i].label, dtype=torch.int64),
                "index": torch.tensor(i, dtype=torch.int64)}
        if self.with_mask:
            item["mask"] = torch.from_numpy(out_mask.astype(np.int64))
        if not self.train:
            item["meta"] = self._meta(img, i)
        return item


def defect_fractions(ds: _Base) -> np.ndarray:
    """Per image of a dataset with masks: the fraction of its pixels labelled as a defect (mask value > 0,
    the ignore value 255 not counted). Computed once per dataset (read-only array): `--fg-sampling` and the
    segment copy-paste donors both use it, and DataLoader workers forked after the first call inherit it."""
    if ds._defect_fractions is not None:
        return ds._defect_fractions
    out = np.empty(len(ds))
    for i in range(len(ds)):
        m = ds.load_mask(i)
        out[i] = float(np.count_nonzero(defect_pixels(m))) / max(m.size, 1)
    out.setflags(write=False)
    ds._defect_fractions = out
    return out


class SegmentDataset(_Base):
    """Semantic segmentation; ``imgsz`` = inference (letterbox) size, ``crop`` = training crop size
    (default imgsz). Extra kwargs go to `SegmentAugment`.

    ``paste`` (training): the probability that an image first gets a piece of a donor image's defects
    pasted in (`paste_segment`, before the augmentation). The donor is drawn from the images of the same
    ``paste_groups`` entry (e.g. the data folder of each record; default: one group), the image itself
    included, in proportion to its defect-pixel fraction: images with much defect area (CrackForest's
    filled alligator-crack areas) give most, images without defects none."""

    task = "segment"

    def __init__(self, records: Sequence[Record], imgsz: int = 512, crop: int | None = None,
                 train: bool = False, augment: SegmentAugment | None = None, cache: bool = True,
                 grayscale: bool = False, cache_max_side: int | None = None, paste: float = 0.0,
                 paste_groups: Sequence | None = None, **aug_kwargs):
        super().__init__(records, imgsz, train, cache, grayscale, cache_max_side)
        if any(not r.has_mask for r in self.records):
            raise ValueError("SegmentDataset needs records with masks")
        if not 0.0 <= paste <= 1.0:
            raise ValueError(f"paste must be a probability in [0, 1], got {paste}")
        if paste and not train:
            raise ValueError("paste is a training augmentation (train=True)")
        if paste_groups is not None and len(paste_groups) != len(self.records):
            raise ValueError(f"paste_groups has {len(paste_groups)} entries for {len(self.records)} records")
        self.paste = float(paste)
        self.paste_groups = list(paste_groups) if paste_groups is not None else [0] * len(self.records)
        self._donors: dict | None = None  # group -> (indices, probabilities), built on first use
        self.augment = augment or SegmentAugment(imgsz, crop=crop, train=train, **aug_kwargs)

    def donor_table(self) -> dict:
        """``{group: (indices, probabilities)}``: each group's images with defects, drawn as paste donors
        in proportion to their defect-pixel fraction."""
        if self._donors is None:
            frac = defect_fractions(self)
            table = {}
            for g in dict.fromkeys(self.paste_groups):
                idx = np.array([i for i, x in enumerate(self.paste_groups) if x == g and frac[i] > 0], np.int64)
                if len(idx):
                    table[g] = (idx, frac[idx] / frac[idx].sum())
            self._donors = table
        return self._donors

    def _pasted(self, i: int, img: np.ndarray, mask: np.ndarray, rng: np.random.Generator):
        donors = self.donor_table().get(self.paste_groups[i])
        if donors is None:
            return None
        j = int(rng.choice(donors[0], p=donors[1]))
        return paste_segment(self.load_image(j), self.load_mask(j), img, mask, rng)

    def _uses_mask(self) -> bool:
        return True

    def __getitem__(self, i: int) -> dict:
        img = self.load_image(i)
        mask = self.load_mask(i)
        rng = self._rng()
        if self.paste and rng.random() < self.paste:
            pasted = self._pasted(i, img, mask, rng)
            if pasted is not None:
                img, mask = pasted
        out_img, out_mask = self.augment(img, mask, rng)
        item = {"image": to_chw_tensor(out_img), "mask": torch.from_numpy(out_mask.astype(np.int64)),
                "index": torch.tensor(i, dtype=torch.int64)}
        if not self.train:
            item["meta"] = self._meta(img, i)
        return item


class DetectDataset(_Base):
    """Object detection at a fixed ``imgsz``. In training, mosaic partners are drawn uniformly from the
    dataset. ``include_difficult=False`` drops VOC difficult boxes. Extra kwargs go to `DetectAugment`."""

    task = "detect"

    def __init__(self, records: Sequence[Record], imgsz: int = 512, train: bool = False,
                 augment: DetectAugment | None = None, cache: bool = True, include_difficult: bool = True,
                 grayscale: bool = False, cache_max_side: int | None = None, **aug_kwargs):
        super().__init__(records, imgsz, train, cache, grayscale, cache_max_side)
        self.augment = augment or DetectAugment(imgsz, train=train, **aug_kwargs)
        self.include_difficult = include_difficult

    def targets(self, i: int, img: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(boxes float32 N×4 in pixels of the (cached) image, classes int64 N)."""
        rec = self.records[i]
        boxes, cls = rec.boxes, rec.box_classes
        if not self.include_difficult and rec.difficult is not None and len(rec.difficult) == len(boxes):
            boxes, cls = boxes[~rec.difficult], cls[~rec.difficult]
        boxes = boxes.astype(np.float32)
        if img is not None and rec.width and img.shape[1] != rec.width:
            boxes = boxes * np.float32(img.shape[1] / rec.width)
        return boxes, cls.astype(np.int64)

    def _sample(self, i: int):
        img = self.load_image(i)
        b, c = self.targets(i, img)
        return img, b, c

    def __getitem__(self, i: int) -> dict:
        img, boxes, cls = self._sample(i)
        rng = self._rng()
        others = None
        if self.augment.wants_mosaic(rng) and len(self) > 1:
            others = [self._sample(int(j)) for j in rng.integers(0, len(self), 3)]
        out_img, out_boxes, out_cls = self.augment(img, boxes, cls, rng, others=others)
        item = {"image": to_chw_tensor(out_img), "boxes": torch.from_numpy(out_boxes.reshape(-1, 4)),
                "classes": torch.from_numpy(out_cls.reshape(-1)), "index": torch.tensor(i, dtype=torch.int64)}
        if not self.train:
            item["meta"] = self._meta(img, i)
        return item


# ----------------------------------------------------------------------------------------------------
# collate


def collate(batch: list[dict]) -> dict:
    """Stack tensors of equal shape, keep everything else (and ragged tensors) as lists."""
    out = {}
    for k in batch[0]:
        vals = [b[k] for b in batch]
        if isinstance(vals[0], torch.Tensor) and all(v.shape == vals[0].shape for v in vals):
            out[k] = torch.stack(vals)
        else:
            out[k] = vals
    return out


def collate_detect(batch: list[dict]) -> dict:
    """Like `collate`, with ``boxes``/``classes`` as lists and ``targets`` = float32 M×6
    ``[batch_index, class, x1, y1, x2, y2]``."""
    out = collate([{k: v for k, v in b.items() if k not in ("boxes", "classes")} for b in batch])
    out["boxes"] = [b["boxes"] for b in batch]
    out["classes"] = [b["classes"] for b in batch]
    rows = []
    for j, b in enumerate(batch):
        n = len(b["classes"])
        if n:
            rows.append(torch.cat([torch.full((n, 1), float(j)), b["classes"].float().reshape(n, 1),
                                   b["boxes"].float().reshape(n, 4)], 1))
    out["targets"] = torch.cat(rows, 0) if rows else torch.zeros((0, 6), dtype=torch.float32)
    return out


# ----------------------------------------------------------------------------------------------------
# class balance


def sample_weights(records: Sequence[Record], task: str = "classify", power: float = 0.5) -> np.ndarray:
    """Per-record sampling weights (mean 1) that rebalance skewed classes: ``w = count(class) ** -power``.

    ``power=1`` is full inverse-frequency balance, ``0.5`` (default) square-root balance (full balance
    over-corrects on magnetic-tile, 70 % MT_Free), ``0`` uniform. classify/segment use the image label
    (segment without labels → uniform); detect uses the rarest box class of the image, images without
    boxes form their own group.
    """
    n = len(records)
    if n == 0:
        return np.zeros(0)
    if task == "detect":
        box_cnt = Counter(int(c) for r in records for c in r.box_classes.tolist())
        n_empty = sum(1 for r in records if len(r.box_classes) == 0)
        w = np.empty(n)
        for i, r in enumerate(records):
            cls = r.box_classes.tolist()
            w[i] = max(box_cnt[int(c)] ** -power for c in cls) if cls else n_empty ** -power
    else:
        labels = [r.label for r in records]
        if any(lab is None for lab in labels):
            return np.ones(n)
        cnt = Counter(labels)
        w = np.array([cnt[lab] ** -power for lab in labels], np.float64)
    return w * (n / w.sum())


def balanced_sampler(records: Sequence[Record], task: str = "classify", power: float = 0.5,
                     num_samples: int | None = None, generator: torch.Generator | None = None
                     ) -> WeightedRandomSampler:
    """A `WeightedRandomSampler` (with replacement) over `sample_weights`; pass as ``sampler=``."""
    w = sample_weights(records, task, power)
    return WeightedRandomSampler(torch.as_tensor(w, dtype=torch.double), num_samples or len(w),
                                 replacement=True, generator=generator)

