"""Dataset readers: the four shipped datasets in their native layouts plus simple "own data" layouts.

`load_records(data_dir)` detects the layout of a folder and returns a `DatasetInfo` with the format name,
the tasks the data supports, the class names per task and one `Record` per image. Nothing is converted
or copied: records point at the files in place, and masks/images are decoded on demand.

Native layouts of the public datasets
------------------------------------

``magnetic-tile``  ``MT_<Class>/Imgs/<stem>.jpg`` + ``<stem>.png`` (mask 0/255 with anti-aliased edges,
    binarised at 128). Tasks: classify, segment, detect.

    - classify classes (index order fixed): ``MT_Blowhole, MT_Break, MT_Crack, MT_Fray, MT_Uneven, MT_Free``
      (``MT_Free`` = defect-free = the pass class, index 5).
    - segment classes: ``background, MT_Blowhole, MT_Break, MT_Crack, MT_Fray, MT_Uneven``; every defect
      pixel of an image gets the class of the image's folder (MT_Free masks are all background).
    - detect classes: the 5 defect classes (index = classify index); boxes are the bounding boxes of the
      8-connected components of the binarised mask, components under ``MT_MIN_COMPONENT_AREA`` pixels
      (isolated anti-aliasing specks) are dropped. MT_Free images have no boxes (negatives).
    - quirk: 4 ``MT_Uneven`` images in the shared half have an all-zero mask (no box, no defect pixel).

``neu-det``  ``IMAGES/<class>_<n>.jpg`` (200x200, R=G=B) + ``ANNOTATIONS/<class>_<n>.xml`` (Pascal VOC).
    Tasks: detect, classify (image label = file-name prefix).
    Classes (both tasks): ``crazing, inclusion, patches, pitted_surface, rolled-in_scale, scratches``.

    - image and xml are paired by file stem; ``<filename>`` and ``<folder>`` are ignored (inconsistent).
    - boxes use the object's ``<name>`` (some images hold objects of another class than their prefix).
    - VOC coordinates are 1-based inclusive pixel indices: box = (xmin-1, ymin-1, xmax, ymax) in continuous
      pixel coordinates (0..W), clipped to the image (its ``<size>``, else the image file's size); a box
      entirely outside the image is dropped. Exact duplicate objects (3 in the shared half) are dropped;
      ``<difficult>`` (67 boxes) is kept and exposed as ``Record.difficult``.

``crackforest``  ``image/<NNN>.jpg`` + ``groundTruth/<NNN>.mat`` (``Segmentation``: 1 = background,
    >= 2 = crack). Task: segment, classes ``background, crack``. Images without a .mat are skipped.

``deepcrack``  ``<subset>_img/<stem>.jpg`` + ``<subset>_lab/<stem>.png`` (0/255 8-bit or 0/1 1-bit PNG).
    Task: segment, classes ``background, crack``. ``Record.subset`` keeps ``train``/``test``; the same stem
    may appear in both subsets (different pictures), so ``Record.key`` (``train/11289-1``) is the unique id.

Own data (for users; ``classes.txt`` = optional file, one class name per line, fixes names and order)
-----------------------------------------------------------------------------------------------------

``folder-classify``  ``<root>/<class_name>/*.{jpg,png,bmp,tif}`` — one folder per class (class order =
    ``classes.txt`` or sorted folder names), at least two classes. Task: classify.
``folder-segment``  ``<root>/images/<stem>.<ext>`` + ``<root>/masks/<stem>.png``. Without ``classes.txt``
    (or with two names) a mask is binary: pixel is defect if value >= 128 (or > 0 when the mask only holds
    0/1). With ``classes.txt`` of more than two names (first = background) mask values are class indices,
    255 = ignore; any other value is an error when the mask is loaded. Task: segment.
``voc``  ``<root>/images/*.jpg`` + ``<root>/annotations/<stem>.xml`` (or the xml beside each image, or
    ``IMAGES/`` + ``ANNOTATIONS/``). Class names from ``classes.txt`` or the sorted set of ``<name>`` values.
    Images without an xml are negatives. Task: detect.
``yolo``  ``<root>/images/<stem>.<ext>`` + ``<root>/labels/<stem>.txt`` with lines
    ``<class> <cx> <cy> <w> <h>`` normalised to 0..1; class names from ``classes.txt`` (else ``class0``...).
    Task: detect.

Files that cannot be read (an image or mask PIL cannot identify, an xml that does not parse, a YOLO line
that is not five numbers, ...) raise `DatasetFormatError` naming the file: a dataset is never read in
part. Image headers are checked when the records are read; pixels when they are decoded.

Split
-----
`split_records(records, "train" | "val" | "test" | "heldout" | "all")`, deterministic, by stem, and
independent of the datasets' own shared/holdout rule (``sha1(stem) % 4``):

- *heldout* (about 20 %): ``int(sha1(("val:" + stem).encode()).hexdigest(), 16) % 5 == 0``; never trained on.
- *test* (about 10 %): the held-out stems with ``sha1("test:" + stem) % 2 == 0``. Used only to report
  figures: never to pick an epoch or a threshold.
- *val* (about 10 %): the other held-out stems. Picks the epoch during training and the thresholds in
  ``s2amnet calibrate``.
- *train*: the rest (about 80 %).
"""

from __future__ import annotations

import hashlib
import os
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from model.transforms import turned_by_exif

__all__ = [
    "IMAGE_EXTS",
    "MT_CLASSIFY_CLASSES",
    "MT_DEFECT_CLASSES",
    "MT_SEGMENT_CLASSES",
    "MT_PASS_CLASS",
    "NEU_CLASSES",
    "CRACK_CLASSES",
    "TASKS",
    "Record",
    "DatasetInfo",
    "DatasetFormatError",
    "default_data_root",
    "detect_format",
    "load_records",
    "split_records",
    "is_val_stem",
    "is_test_stem",
    "split_of",
    "SPLITS",
    "load_image",
    "parse_voc_xml",
]

TASKS = ("classify", "segment", "detect")
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")

MT_DEFECT_CLASSES = ["MT_Blowhole", "MT_Break", "MT_Crack", "MT_Fray", "MT_Uneven"]
MT_PASS_CLASS = "MT_Free"
MT_CLASSIFY_CLASSES = MT_DEFECT_CLASSES + [MT_PASS_CLASS]
MT_SEGMENT_CLASSES = ["background"] + MT_DEFECT_CLASSES
MT_MIN_COMPONENT_AREA = 4  # pixels; smaller mask components are anti-aliasing specks, not defects
NEU_CLASSES = ["crazing", "inclusion", "patches", "pitted_surface", "rolled-in_scale", "scratches"]
CRACK_CLASSES = ["background", "crack"]

VAL_MODULUS = 5
SPLITS = ("train", "val", "test", "heldout")
IGNORE_INDEX = 255


def defect_pixels(mask: np.ndarray) -> np.ndarray:
    """Bool H×W: the defect pixels of a label mask (value > 0; the ignore value 255 is not a defect)."""
    return (mask > 0) & (mask != IGNORE_INDEX)


class DatasetFormatError(ValueError):
    """The folder does not match any known layout, or does not support the requested task."""


# ----------------------------------------------------------------------------------------------------
# paths


def _project_root() -> Path:
    return Path(__file__).resolve().parents[2]


def default_data_root() -> Path:
    """``$S2AMNET_DATA_DIR`` if set, else the folder ``shared/data`` beside the project folder."""
    env = os.environ.get("S2AMNET_DATA_DIR")
    if env:
        return Path(env).expanduser()
    return (_project_root() / ".." / "shared" / "data").resolve()


# ----------------------------------------------------------------------------------------------------
# image / mask decoding


# what PIL raises for a file that is not an image it can decode (truncated, another format, text, ...)
UNREADABLE = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def _unreadable(path: str | os.PathLike, exc: BaseException) -> Exception:
    """The error for an image or mask file that cannot be decoded (a missing file stays FileNotFoundError)."""
    if isinstance(exc, FileNotFoundError):
        return exc
    if isinstance(exc, UnidentifiedImageError):
        return DatasetFormatError(f"{path}: not an image (no image format recognised in the file)")
    return DatasetFormatError(f"{path}: not a readable image ({type(exc).__name__}: {exc})")


def load_image(path: str | os.PathLike, mode: str = "RGB") -> np.ndarray:
    """Decode an image file to a uint8 array (H×W×3 for RGB, H×W for L) by the service's own conversion
    (`model.transforms.to_rgb_uint8`: EXIF orientation applied, 16-bit scaled from its full range), so that
    training and evaluation see an image exactly as the service does."""
    from model.transforms import to_rgb_uint8, to_uint8

    if mode not in ("RGB", "L"):
        raise ValueError(f"mode must be RGB or L, not {mode!r}")
    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)
            if mode == "RGB":
                return to_rgb_uint8(im)
            pixels = to_uint8(im)  # grey images stay grey; colour ones are converted to luma below
    except UNREADABLE as exc:
        raise _unreadable(path, exc) from None
    if pixels.ndim == 2:
        return pixels
    return np.asarray(Image.fromarray(pixels, "RGB").convert("L"), dtype=np.uint8).copy()


def _image_size(path: str | os.PathLike, *, exif: bool = True) -> tuple[int, int]:
    """(width, height) of an image file as decoded (EXIF rotation applied; ``exif=False``: as stored, from
    the header alone — a PNG's EXIF may sit after its pixels)."""
    try:
        with Image.open(path) as im:
            w, h = im.size
            if exif and turned_by_exif(im):
                w, h = h, w
    except UNREADABLE as exc:
        raise _unreadable(path, exc) from None
    return w, h


def _read_mask_png(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as im:
            if im.mode == "1":
                return np.asarray(im, dtype=np.uint8)  # 0/1
            if im.mode not in ("L", "P", "I", "I;16"):
                im = im.convert("L")
            return np.asarray(im).copy()
    except UNREADABLE as exc:
        raise _unreadable(path, exc) from None


def _binarise(m: np.ndarray) -> np.ndarray:
    """Binary mask from 0/255 (anti-aliased, threshold 128) or 0/1 data."""
    if m.size and int(m.max()) <= 1:
        return m > 0
    return m >= 128


def _fit_mask(mask: np.ndarray, hw: tuple[int, int] | None) -> np.ndarray:
    """Resize a label mask (nearest) to (H, W) when it does not match the image (defensive)."""
    if hw is None or mask.shape[:2] == tuple(hw):
        return mask
    if mask.shape[:2] == tuple(hw)[::-1]:  # transposed (portrait/landscape swap)
        return np.ascontiguousarray(mask.T)
    im = Image.fromarray(mask)
    return np.asarray(im.resize((hw[1], hw[0]), Image.NEAREST)).copy()


# ----------------------------------------------------------------------------------------------------
# records


@dataclass(eq=False)
class Record:
    """One image and its annotations.

    Attributes:
        stem: file name without extension (used by the split).
        key: unique id inside the dataset (``<subfolder>/<stem>``).
        image: path of the image file.
        label: image-level class index for classify (None when the dataset has none).
        width, height: image size in pixels when known without decoding (else None).
        subset: original subset (DeepCrack ``train``/``test``), else "".
        mask_path, mask_kind, mask_value: how `load_mask` builds the label mask (None = no mask).
        mask_classes: the number of segment classes an ``index`` mask may name (values 0..n-1, 255 = ignore).
        difficult: bool array per box (VOC ``<difficult>``), same length as the boxes.
        defect_free: True / False where the dataset says so (magnetic-tile: the ``MT_Free`` folder), None
            where it follows from the annotations (see `is_defect_free`).
    Use `boxes` / `box_classes` (float32 N×4 xyxy in image pixels / int64 N) for detection; for
    magnetic-tile they are derived lazily from the mask.
    """

    stem: str
    key: str
    image: Path
    label: int | None = None
    width: int | None = None
    height: int | None = None
    subset: str = ""
    mask_path: Path | None = None
    mask_kind: str | None = None  # "mt" | "mat" | "binary" | "index"
    mask_value: int = 1
    mask_classes: int | None = None
    difficult: np.ndarray | None = None
    defect_free: bool | None = None
    _boxes: np.ndarray | None = field(default=None, repr=False)
    _box_classes: np.ndarray | None = field(default=None, repr=False)
    _box_source: str | None = field(default=None, repr=False)  # "mask" = from mask components

    # --- detection targets
    @property
    def has_boxes(self) -> bool:
        return self._boxes is not None or self._box_source is not None

    def _ensure_boxes(self) -> None:
        if self._boxes is None:
            if self._box_source == "mask":
                self._boxes, self._box_classes = _boxes_from_mask(self)
            else:
                self._boxes = np.zeros((0, 4), np.float32)
                self._box_classes = np.zeros((0,), np.int64)
            if self.difficult is None:
                self.difficult = np.zeros(len(self._boxes), bool)

    @property
    def boxes(self) -> np.ndarray:
        self._ensure_boxes()
        return self._boxes

    @property
    def box_classes(self) -> np.ndarray:
        self._ensure_boxes()
        return self._box_classes

    def is_defect_free(self, task: str) -> bool | None:
        """Whether the image shows a good part: the dataset's own mark where it has one, else no box
        (detect) / no defect pixel (segment); None where the annotations cannot tell (classify labels of
        a dataset without a pass class)."""
        if self.defect_free is not None:
            return self.defect_free
        if task == "detect" and self.has_boxes:
            return len(self.boxes) == 0
        if task == "segment" and self.has_mask:
            return not defect_pixels(self.load_mask()).any()
        return None

    # --- decoding
    @property
    def has_mask(self) -> bool:
        return self.mask_kind is not None

    def load_image(self, mode: str = "RGB") -> np.ndarray:
        """uint8 H×W×3 (RGB; grayscale files replicated to 3 channels) or H×W for ``mode="L"``."""
        return load_image(self.image, mode)

    def load_mask(self, hw: tuple[int, int] | None = None) -> np.ndarray:
        """uint8 H×W label mask: 0 = background, k = segment class k, 255 = ignore.

        ``hw`` (image height, width) resizes a mask whose size differs from the image (nearest).
        """
        if self.mask_kind is None:
            raise ValueError(f"record {self.key} has no mask")
        if self.mask_kind == "mt":
            m = _read_mask_png(self.mask_path)
            out = np.where(m >= 128, np.uint8(self.mask_value), np.uint8(0)).astype(np.uint8)
        elif self.mask_kind == "mat":
            out = _load_crackforest_mat(self.mask_path)
        elif self.mask_kind == "binary":
            out = _binarise(_read_mask_png(self.mask_path)).astype(np.uint8) * np.uint8(self.mask_value)
        elif self.mask_kind == "index":
            out = _index_mask(self.mask_path, self.mask_classes)
        else:  # pragma: no cover
            raise ValueError(f"unknown mask kind {self.mask_kind}")
        if hw is None and self.height is not None and self.width is not None:
            hw = (self.height, self.width)
        return _fit_mask(out, hw)

    def size(self) -> tuple[int, int]:
        """(width, height), reading only the image header when unknown."""
        if self.width is None or self.height is None:
            self.width, self.height = _image_size(self.image)
        return self.width, self.height

    def check_files(self) -> None:
        """Raise DatasetFormatError when the image (or mask picture) is not an image PIL can identify; reads
        the headers only."""
        _image_size(self.image, exif=False)
        if self.mask_path is not None and self.mask_kind != "mat":
            _image_size(self.mask_path, exif=False)


@dataclass
class DatasetInfo:
    """What `load_records` found: format, supported tasks, class names per task and the records.

    ``classes[task]`` lists class names in index order; for segment index 0 is ``background``.
    ``pass_classes`` lists classify classes that mean "no defect" (magnetic-tile: ``["MT_Free"]``).
    """

    format: str
    root: Path
    tasks: tuple[str, ...]
    classes: dict[str, list[str]]
    records: list[Record]
    pass_classes: list[str] = field(default_factory=list)

    def class_names(self, task: str) -> list[str]:
        self._check_task(task)
        return list(self.classes[task])

    def num_classes(self, task: str) -> int:
        return len(self.class_names(task))

    def records_for(self, task: str) -> list[Record]:
        """Records that carry labels for ``task`` (segment: has a mask; classify: has a label)."""
        self._check_task(task)
        if task == "classify":
            return [r for r in self.records if r.label is not None]
        if task == "segment":
            return [r for r in self.records if r.has_mask]
        return [r for r in self.records if r.has_boxes]

    def _check_task(self, task: str) -> None:
        if task not in self.tasks:
            raise DatasetFormatError(
                f"dataset {self.root} ({self.format}) supports {', '.join(self.tasks)}, not {task!r}"
            )

    def summary(self) -> dict:
        out = {"format": self.format, "root": str(self.root), "tasks": list(self.tasks),
               "images": len(self.records), "classes": self.classes}
        if "classify" in self.tasks:
            names = self.classes["classify"]
            cnt = Counter(r.label for r in self.records if r.label is not None)
            out["images_per_class"] = {names[k]: cnt.get(k, 0) for k in range(len(names))}
        return out


# ----------------------------------------------------------------------------------------------------
# split


def is_val_stem(stem: str, modulus: int = VAL_MODULUS) -> bool:
    """True if ``stem`` belongs to the validation part: ``sha1("val:" + stem) % modulus == 0``."""
    return int(hashlib.sha1(("val:" + stem).encode("utf-8")).hexdigest(), 16) % modulus == 0


def is_test_stem(stem: str) -> bool:
    """True if a held-out ``stem`` belongs to the test half: ``sha1("test:" + stem) % 2 == 0``."""
    return int(hashlib.sha1(("test:" + stem).encode("utf-8")).hexdigest(), 16) % 2 == 0


def split_of(stem: str, modulus: int = VAL_MODULUS) -> str:
    """The split of one stem: ``train``, ``val`` or ``test`` (see module docstring)."""
    if not is_val_stem(stem, modulus):
        return "train"
    return "test" if is_test_stem(stem) else "val"


def split_records(records: list[Record], split: str = "all", modulus: int = VAL_MODULUS) -> list[Record]:
    """Deterministic split by stem hash (see module docstring). ``split`` in train|val|test|heldout|all."""
    if split == "all":
        return list(records)
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)} or all, not {split!r}")
    if split == "heldout":
        return [r for r in records if is_val_stem(r.stem, modulus)]
    return [r for r in records if split_of(r.stem, modulus) == split]


# ----------------------------------------------------------------------------------------------------
# helpers


def _images_in(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTS
                  and not p.name.startswith("."))


def _subdir(root: Path, *names: str) -> Path | None:
    """First existing child folder whose name matches one of ``names`` case-insensitively."""
    if not root.is_dir():
        return None
    children = {p.name.lower(): p for p in root.iterdir() if p.is_dir()}
    for n in names:
        if n.lower() in children:
            return children[n.lower()]
    return None


def _read_classes_txt(root: Path) -> list[str] | None:
    p = root / "classes.txt"
    if not p.is_file():
        return None
    names = [ln.strip() for ln in p.read_text(encoding="utf-8").splitlines()]
    return [n for n in names if n and not n.startswith("#")]


def parse_voc_xml(path: str | os.PathLike, image: str | os.PathLike | None = None) -> dict:
    """Parse a Pascal VOC annotation.

    Returns ``{"width", "height", "names": [str], "boxes": float32 N×4, "difficult": bool N}`` with boxes
    converted from 1-based inclusive pixel indices to continuous 0-based xyxy (xmin-1, ymin-1, xmax, ymax),
    clipped to the image, degenerate boxes (those entirely outside the image among them) and exact
    duplicates dropped. The image size is the ``<size>`` block's; when it is missing or zero, the header of
    ``image`` (the picture the xml annotates) gives it. Width/height are None when neither is known (boxes
    are then clipped at 0 only). DatasetFormatError when the file is not well-formed XML or an object's box
    is not four numbers.
    """
    try:
        root = ET.parse(path).getroot()
    except (ET.ParseError, UnicodeDecodeError) as exc:
        raise DatasetFormatError(f"{path}: not a readable VOC annotation ({exc})") from None

    def _num(node, tag):
        t = node.findtext(tag) if node is not None else None
        try:
            return float(t.strip()) if t is not None and t.strip() else None
        except ValueError:
            return None

    size = root.find("size")
    w, h = _num(size, "width"), _num(size, "height")
    w = int(w) if w else None
    h = int(h) if h else None
    if (w is None or h is None) and image is not None:
        w, h = _image_size(image)
    names, boxes, diff, seen = [], [], [], set()
    for obj in root.iter("object"):
        name = (obj.findtext("name") or "").strip()
        if not name:
            continue
        bb = obj.find("bndbox")
        vals = [_num(bb, k) for k in ("xmin", "ymin", "xmax", "ymax")]
        if any(v is None or not np.isfinite(v) for v in vals):
            raise DatasetFormatError(f"{path}: object {name!r} has no box of four numbers "
                                     "(bndbox xmin, ymin, xmax, ymax)")
        x1, y1, x2, y2 = vals
        x1, x2 = min(x1, x2), max(x1, x2)
        y1, y2 = min(y1, y2), max(y1, y2)
        x1, y1 = x1 - 1.0, y1 - 1.0
        x1, y1 = max(x1, 0.0), max(y1, 0.0)
        if w:
            x1, x2 = min(x1, w), min(x2, w)
        if h:
            y1, y2 = min(y1, h), min(y2, h)
        if x2 - x1 < 1 or y2 - y1 < 1:
            continue
        key = (name, x1, y1, x2, y2)
        if key in seen:
            continue
        seen.add(key)
        d = (obj.findtext("difficult") or "0").strip()
        names.append(name)
        boxes.append((x1, y1, x2, y2))
        diff.append(d not in ("0", "", "false", "False"))
    return {
        "width": w,
        "height": h,
        "names": names,
        "boxes": np.asarray(boxes, np.float32).reshape(-1, 4),
        "difficult": np.asarray(diff, bool),
    }


def _index_mask(path: Path, num_classes: int | None) -> np.ndarray:
    """uint8 class-index mask; DatasetFormatError for a value that names no class (255 = ignore)."""
    m = _read_mask_png(path)
    if num_classes is not None and m.size:
        bad = m[((m < 0) | (m >= num_classes)) & (m != IGNORE_INDEX)]
        if bad.size:
            raise DatasetFormatError(
                f"{path}: mask value {int(bad.max())} is not a class index (0..{num_classes - 1} for the "
                f"{num_classes} classes of classes.txt, or {IGNORE_INDEX} = ignore)"
            )
    return m.astype(np.uint8)


def _boxes_from_mask(rec: Record) -> tuple[np.ndarray, np.ndarray]:
    """Boxes of the 8-connected components of a binarised mask (xyxy, continuous pixel coordinates)."""
    from scipy import ndimage

    m = rec.load_mask()
    fg = defect_pixels(m)
    if not fg.any():
        return np.zeros((0, 4), np.float32), np.zeros((0,), np.int64)
    lab, n = ndimage.label(fg, structure=np.ones((3, 3), bool))
    boxes, classes = [], []
    areas = ndimage.sum_labels(fg, lab, index=np.arange(1, n + 1))
    for i, sl in enumerate(ndimage.find_objects(lab)):
        if sl is None or areas[i] < MT_MIN_COMPONENT_AREA:
            continue
        ys, xs = sl
        boxes.append((xs.start, ys.start, xs.stop, ys.stop))
        cls_vals = m[sl][lab[sl] == i + 1]
        classes.append(int(np.bincount(cls_vals).argmax()) - 1)  # segment class k -> detect class k-1
    return np.asarray(boxes, np.float32).reshape(-1, 4), np.asarray(classes, np.int64)


def _load_crackforest_mat(path: Path) -> np.ndarray:
    from scipy.io import loadmat

    try:
        gt = loadmat(str(path))["groundTruth"]
        s = gt[0, 0]["Segmentation"] if gt.dtype.names else gt
        s = np.asarray(s, dtype=np.float64)
    except FileNotFoundError:
        raise
    except (OSError, ValueError, TypeError, KeyError, IndexError) as exc:
        raise DatasetFormatError(f"{path}: not a CrackForest groundTruth .mat ({type(exc).__name__}: {exc})") from None
    return (s >= 2).astype(np.uint8)


# ----------------------------------------------------------------------------------------------------
# format readers


def _read_magnetic_tile(root: Path) -> DatasetInfo:
    records: list[Record] = []
    for ci, cname in enumerate(MT_CLASSIFY_CLASSES):
        folder = root / cname / "Imgs"
        if not folder.is_dir():
            folder = root / cname
        files = {}
        for p in _images_in(folder):
            files.setdefault(p.stem, []).append(p)
        for stem, paths in sorted(files.items()):
            imgs = [p for p in paths if p.suffix.lower() in (".jpg", ".jpeg", ".bmp")]
            masks = [p for p in paths if p.suffix.lower() == ".png"]
            if not imgs:  # only a png: it is the mask, not an image
                continue
            is_free = cname == MT_PASS_CLASS
            rec = Record(
                stem=stem,
                key=f"{cname}/{stem}",
                image=imgs[0],
                label=ci,
                mask_path=masks[0] if masks else None,
                mask_kind="mt" if masks else None,
                mask_value=0 if is_free else ci + 1,
                defect_free=is_free,
            )
            if masks:
                if is_free:  # defect-free: no boxes, no need to read the mask
                    rec._boxes = np.zeros((0, 4), np.float32)
                    rec._box_classes = np.zeros((0,), np.int64)
                    rec.difficult = np.zeros(0, bool)
                else:
                    rec._box_source = "mask"
            records.append(rec)
    return DatasetInfo(
        format="magnetic-tile",
        root=root,
        tasks=("classify", "segment", "detect"),
        classes={"classify": list(MT_CLASSIFY_CLASSES), "segment": list(MT_SEGMENT_CLASSES),
                 "detect": list(MT_DEFECT_CLASSES)},
        records=records,
        pass_classes=[MT_PASS_CLASS],
    )


def _read_voc(root: Path, img_dir: Path, ann_dir: Path | None, fmt: str,
              classes: list[str] | None) -> DatasetInfo:
    images = _images_in(img_dir)
    by_stem: dict[str, Path] = {}
    for p in images:
        by_stem.setdefault(p.stem, p)
    parsed: dict[str, dict] = {}
    ann_dir = ann_dir or img_dir
    for p in sorted(ann_dir.glob("*.xml")) + sorted(ann_dir.glob("*.XML")):
        # an xml without <size> is clipped to its image's real size: training and evaluation see one box
        parsed[p.stem] = parse_voc_xml(p, by_stem.get(p.stem))
    if classes is None:
        classes = sorted({n for a in parsed.values() for n in a["names"]})
    index = {n: i for i, n in enumerate(classes)}
    prefix_classes = fmt == "neu-det"
    records = []
    for p in images:
        stem = p.stem
        a = parsed.get(stem)
        rec = Record(stem=stem, key=f"{img_dir.name}/{stem}", image=p)
        if a is None:
            if fmt == "neu-det":
                continue  # NEU-DET: every image has an xml; an image without one is not part of the data
            boxes, cls, diff = np.zeros((0, 4), np.float32), np.zeros((0,), np.int64), np.zeros(0, bool)
        else:
            keep = [i for i, n in enumerate(a["names"]) if n in index]
            boxes = a["boxes"][keep]
            cls = np.asarray([index[a["names"][i]] for i in keep], np.int64)
            diff = a["difficult"][keep]
            rec.width, rec.height = a["width"], a["height"]
        rec._boxes, rec._box_classes, rec.difficult = boxes, cls, diff
        if prefix_classes:
            prefix = stem.rsplit("_", 1)[0]
            rec.label = index.get(prefix)
        records.append(rec)
    tasks = ("detect", "classify") if prefix_classes else ("detect",)
    cl = {"detect": list(classes)}
    if prefix_classes:
        cl["classify"] = list(classes)
    return DatasetInfo(format=fmt, root=root, tasks=tasks, classes=cl, records=records)


def _read_crackforest(root: Path) -> DatasetInfo:
    img_dir, gt_dir = _subdir(root, "image"), _subdir(root, "groundTruth")
    mats = {p.stem: p for p in gt_dir.glob("*.mat")}
    records = []
    for p in _images_in(img_dir):
        mat = mats.get(p.stem)
        if mat is None:  # unannotated (201-208, 301-329): usable for demos only
            continue
        records.append(Record(stem=p.stem, key=f"image/{p.stem}", image=p, mask_path=mat, mask_kind="mat"))
    return DatasetInfo(format="crackforest", root=root, tasks=("segment",),
                       classes={"segment": list(CRACK_CLASSES)}, records=records)


def _read_deepcrack(root: Path) -> DatasetInfo:
    records = []
    for img_dir in sorted(d for d in root.iterdir() if d.is_dir() and d.name.endswith("_img")):
        subset = img_dir.name[: -len("_img")]
        lab_dir = root / f"{subset}_lab"
        if not lab_dir.is_dir():
            continue
        labs = {p.stem: p for p in _images_in(lab_dir)}
        for p in _images_in(img_dir):
            lab = labs.get(p.stem)
            if lab is None:
                continue
            records.append(Record(stem=p.stem, key=f"{subset}/{p.stem}", image=p, subset=subset,
                                  mask_path=lab, mask_kind="binary", mask_value=1))
    return DatasetInfo(format="deepcrack", root=root, tasks=("segment",),
                       classes={"segment": list(CRACK_CLASSES)}, records=records)


def _read_folder_classify(root: Path) -> DatasetInfo:
    names = _read_classes_txt(root)
    dirs = {d.name: d for d in root.iterdir() if d.is_dir() and _images_in(d)}
    if names is None:
        names = sorted(dirs)
    if len(names) < 2:
        found = f"only {names[0]!r}" if names else "none"
        raise DatasetFormatError(
            f"{root}: a classifier needs at least two classes (one folder of images per class, e.g. ok/ and "
            f"defect/, or their names in classes.txt), found {found}"
        )
    records = []
    for ci, n in enumerate(names):
        if n not in dirs:
            continue
        for p in _images_in(dirs[n]):
            records.append(Record(stem=p.stem, key=f"{n}/{p.stem}", image=p, label=ci))
    return DatasetInfo(format="folder-classify", root=root, tasks=("classify",),
                       classes={"classify": list(names)}, records=records)


def _read_folder_segment(root: Path, img_dir: Path, mask_dir: Path) -> DatasetInfo:
    names = _read_classes_txt(root)
    if names is None or len(names) <= 2:
        kind, names = "binary", names or ["background", "defect"]
    else:
        kind = "index"
    masks = {p.stem: p for p in _images_in(mask_dir)}
    records = []
    for p in _images_in(img_dir):
        m = masks.get(p.stem)
        if m is None:
            continue
        records.append(Record(stem=p.stem, key=f"{img_dir.name}/{p.stem}", image=p, mask_path=m,
                              mask_kind=kind, mask_value=1,
                              mask_classes=len(names) if kind == "index" else None))
    return DatasetInfo(format="folder-segment", root=root, tasks=("segment",),
                       classes={"segment": list(names)}, records=records)


def _read_yolo_labels(path: Path) -> np.ndarray:
    """float32 N×5 rows ``class cx cy w h`` of a YOLO label file (values after the fifth are ignored);
    DatasetFormatError naming the file and line for one that is not an integer class and four numbers."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DatasetFormatError(f"{path}: not a text file of YOLO labels ({exc})") from None
    rows = []
    for n, ln in enumerate(text.splitlines(), 1):
        parts = ln.split()
        if not parts:
            continue
        try:
            row = [float(v) for v in parts[:5]]
        except ValueError:
            row = []
        if len(row) < 5 or not all(np.isfinite(row)) or row[0] != int(row[0]):
            raise DatasetFormatError(f"{path} line {n}: expected '<class index> <cx> <cy> <w> <h>' (numbers, "
                                     f"0..1), got {ln.strip()!r}")
        rows.append(row)
    return np.asarray(rows, np.float32).reshape(-1, 5)


def _read_yolo(root: Path, img_dir: Path, lab_dir: Path) -> DatasetInfo:
    names = _read_classes_txt(root)
    records, rows_per_record, max_cls = [], [], -1
    for p in _images_in(img_dir):
        rec = Record(stem=p.stem, key=f"{img_dir.name}/{p.stem}", image=p)
        lp = lab_dir / f"{p.stem}.txt"
        arr = _read_yolo_labels(lp) if lp.is_file() else np.zeros((0, 5), np.float32)
        if len(arr):
            max_cls = max(max_cls, int(arr[:, 0].max()))
        records.append(rec)
        rows_per_record.append(arr)
    if names is None:
        names = [f"class{i}" for i in range(max_cls + 1)]
    for rec, rows in zip(records, rows_per_record, strict=True):
        w, h = rec.size()
        keep = (rows[:, 0] >= 0) & (rows[:, 0] < len(names))
        rows = rows[keep]
        cx, cy, bw, bh = rows[:, 1] * w, rows[:, 2] * h, rows[:, 3] * w, rows[:, 4] * h
        b = np.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], 1) if len(rows) else \
            np.zeros((0, 4), np.float32)
        b = np.clip(b, 0, [w, h, w, h]).astype(np.float32)
        ok = ((b[:, 2] - b[:, 0]) >= 1) & ((b[:, 3] - b[:, 1]) >= 1)
        rec._boxes, rec._box_classes = b[ok], rows[ok, 0].astype(np.int64)
        rec.difficult = np.zeros(int(ok.sum()), bool)
    return DatasetInfo(format="yolo", root=root, tasks=("detect",), classes={"detect": names},
                       records=records)


# ----------------------------------------------------------------------------------------------------
# detection of the layout


def detect_format(data_dir: str | os.PathLike) -> str:
    """Name of the layout of ``data_dir`` (see module docstring); raises DatasetFormatError if unknown."""
    root = Path(data_dir)
    if not root.is_dir():
        raise DatasetFormatError(f"data folder not found: {root}")
    children = {p.name for p in root.iterdir() if p.is_dir()}
    if any(c in children and ((root / c / "Imgs").is_dir()) for c in MT_CLASSIFY_CLASSES):
        return "magnetic-tile"
    if "IMAGES" in children and "ANNOTATIONS" in children:
        stems = [p.stem for p in _images_in(root / "IMAGES")[:50]]
        if stems and all(s.rsplit("_", 1)[0] in NEU_CLASSES for s in stems):
            return "neu-det"
        return "voc"
    if _subdir(root, "image") is not None and _subdir(root, "groundTruth") is not None:
        return "crackforest"
    if any(c.endswith("_img") and f"{c[:-4]}_lab" in children for c in children):
        return "deepcrack"
    img_dir = _subdir(root, "images", "JPEGImages")
    if img_dir is not None:
        if _subdir(root, "masks", "SegmentationClass") is not None:
            return "folder-segment"
        if _subdir(root, "labels") is not None:
            return "yolo"
        ann = _subdir(root, "annotations", "Annotations")
        if ann is not None or any(img_dir.glob("*.xml")):
            return "voc"
    if any(root.glob("*.xml")) and _images_in(root):
        return "voc"
    if any(_images_in(root / c) for c in children):
        return "folder-classify"
    raise DatasetFormatError(
        f"unrecognised dataset layout in {root}: expected magnetic-tile (MT_*/Imgs), NEU-DET (IMAGES/ + "
        "ANNOTATIONS/), CrackForest (image/ + groundTruth/), DeepCrack (*_img/ + *_lab/), or own data: "
        "<class>/ folders, images/ + masks/, images/ + labels/ (YOLO), images/ + annotations/ (VOC)"
    )


def load_records(data_dir: str | os.PathLike, task: str | None = None) -> DatasetInfo:
    """Read a dataset folder in its native layout. With ``task``, keep only records labelled for it
    (and raise DatasetFormatError if the dataset does not support that task)."""
    root = Path(data_dir).expanduser().resolve()
    fmt = detect_format(root)
    if fmt == "magnetic-tile":
        info = _read_magnetic_tile(root)
    elif fmt == "neu-det":
        info = _read_voc(root, root / "IMAGES", root / "ANNOTATIONS", "neu-det", list(NEU_CLASSES))
    elif fmt == "crackforest":
        info = _read_crackforest(root)
    elif fmt == "deepcrack":
        info = _read_deepcrack(root)
    elif fmt == "folder-segment":
        info = _read_folder_segment(root, _subdir(root, "images", "JPEGImages"),
                                    _subdir(root, "masks", "SegmentationClass"))
    elif fmt == "yolo":
        info = _read_yolo(root, _subdir(root, "images"), _subdir(root, "labels"))
    elif fmt == "voc":
        img_dir = _subdir(root, "images", "JPEGImages") or root
        ann_dir = _subdir(root, "annotations", "Annotations") or img_dir
        info = _read_voc(root, img_dir, ann_dir, "voc", _read_classes_txt(root))
    else:
        info = _read_folder_classify(root)
    if task is not None:
        info.records = info.records_for(task)
    for rec in info.records:  # headers only: a file that is not an image fails here, not mid-training
        rec.check_files()
    return info
