"""Data: dataset readers (native layouts + own data), augmentation, torch datasets.

Typical training use::

    from model.data import load_records, split_records, SegmentDataset, collate
    info = load_records("datasets/deepcrack", task="segment")
    train = SegmentDataset(split_records(info.records, "train"), imgsz=512, crop=256, train=True)
    val = SegmentDataset(split_records(info.records, "val"), imgsz=512)
"""

from .augment import (
    DEFECT_KEEP,
    IGNORE_INDEX,
    PAD_VALUE,
    ClassifyAugment,
    DetectAugment,
    SegmentAugment,
    letterbox,
    letterbox_boxes,
    letterbox_geometry,
    mosaic4,
    unletterbox_boxes,
)
from .datasets import (
    ClassifyDataset,
    DetectDataset,
    SegmentDataset,
    balanced_sampler,
    collate,
    collate_detect,
    decode_image,
    defect_fractions,
    sample_weights,
    to_chw_tensor,
)
from .readers import (
    CRACK_CLASSES,
    MT_CLASSIFY_CLASSES,
    MT_DEFECT_CLASSES,
    MT_PASS_CLASS,
    MT_SEGMENT_CLASSES,
    NEU_CLASSES,
    DatasetFormatError,
    DatasetInfo,
    Record,
    default_data_root,
    defect_pixels,
    detect_format,
    is_test_stem,
    is_val_stem,
    load_records,
    split_of,
    split_records,
)

__all__ = [
    "DEFECT_KEEP", "IGNORE_INDEX", "PAD_VALUE", "ClassifyAugment", "DetectAugment", "SegmentAugment", "letterbox",
    "letterbox_boxes", "letterbox_geometry", "mosaic4", "unletterbox_boxes",
    "ClassifyDataset", "DetectDataset", "SegmentDataset", "balanced_sampler", "collate", "collate_detect",
    "decode_image", "defect_fractions", "sample_weights", "to_chw_tensor",
    "CRACK_CLASSES", "MT_CLASSIFY_CLASSES", "MT_DEFECT_CLASSES", "MT_PASS_CLASS", "MT_SEGMENT_CLASSES",
    "NEU_CLASSES", "DatasetFormatError", "DatasetInfo", "Record", "default_data_root", "defect_pixels",
    "detect_format", "is_test_stem", "is_val_stem", "load_records", "split_records", "split_of",
]
