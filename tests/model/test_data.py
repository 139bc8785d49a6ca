"""Readers (synthetic miniature datasets in every layout + the real data in place) and torch datasets."""

from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from support.data import dataset

from model.data import (
    CRACK_CLASSES,
    MT_CLASSIFY_CLASSES,
    MT_SEGMENT_CLASSES,
    NEU_CLASSES,
    ClassifyDataset,
    DatasetFormatError,
    DetectDataset,
    SegmentDataset,
    balanced_sampler,
    collate,
    collate_detect,
    detect_format,
    load_records,
    sample_weights,
    split_records,
    unletterbox_boxes,
)
from model.data.readers import is_val_stem, parse_voc_xml

# ----------------------------------------------------------------------------------------------------
# synthetic miniature datasets


def _save_img(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def _gray(h, w, v=90):
    return np.full((h, w), v, np.uint8)


@pytest.fixture
def mt_dir(tmp_path):
    root = tmp_path / "mt"
    h, w = 60, 40
    m = np.zeros((h, w), np.uint8)
    m[5:15, 4:12] = 255  # component 1
    m[30:40, 20:30] = 255  # component 2
    m[30, 30] = 200  # 8-connected to component 2 (diagonal neighbour of (29,29)? no: touches (30,29))
    m[50, 35] = 255  # 1-pixel speck: dropped (< 4 px)
    m[55:58, 2:5] = 100  # anti-aliased, below 128: background
    img = _gray(h, w)
    img[m >= 128] = 250
    _save_img(root / "MT_Crack/Imgs/exp1_num_1.jpg", img)
    _save_img(root / "MT_Crack/Imgs/exp1_num_1.png", m)
    _save_img(root / "MT_Free/Imgs/exp1_num_2.jpg", _gray(50, 70))
    _save_img(root / "MT_Free/Imgs/exp1_num_2.png", np.zeros((50, 70), np.uint8))
    _save_img(root / "MT_Blowhole/Imgs/exp1_num_3.jpg", _gray(30, 30))
    m3 = np.zeros((30, 30), np.uint8)
    m3[10:14, 10:14] = 255
    _save_img(root / "MT_Blowhole/Imgs/exp1_num_3.png", m3)
    return root


def test_magnetic_tile_reader(mt_dir):
    info = load_records(mt_dir)
    assert info.format == "magnetic-tile"
    assert set(info.tasks) == {"classify", "segment", "detect"}
    assert info.class_names("classify") == MT_CLASSIFY_CLASSES
    assert info.class_names("segment") == MT_SEGMENT_CLASSES
    assert info.class_names("detect") == MT_CLASSIFY_CLASSES[:5]
    assert info.pass_classes == ["MT_Free"]
    recs = {r.stem: r for r in info.records}
    assert len(recs) == 3  # the png masks are not images
    crack = recs["exp1_num_1"]
    assert crack.label == MT_CLASSIFY_CLASSES.index("MT_Crack")
    mask = crack.load_mask()
    assert mask.shape == (60, 40)
    assert set(np.unique(mask)) == {0, MT_SEGMENT_CLASSES.index("MT_Crack")}
    assert mask[56, 3] == 0  # 100 < 128
    boxes = crack.boxes
    assert boxes.tolist() == [[4, 5, 12, 15], [20, 30, 31, 40]]  # speck dropped, diagonal pixel joined
    assert crack.box_classes.tolist() == [MT_CLASSIFY_CLASSES.index("MT_Crack")] * 2
    free = recs["exp1_num_2"]
    assert free.label == 5 and len(free.boxes) == 0
    assert free.load_mask().max() == 0
    assert recs["exp1_num_3"].load_mask().max() == 1  # Blowhole = segment class 1


NEU_XML = """<annotation>
  <folder>cr</folder><filename>{fname}</filename>
  <size><width>200</width><height>200</height><depth>1</depth></size>
  {objects}
</annotation>"""
OBJ = ("<object><name>{n}</name><difficult>{d}</difficult><bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin>"
       "<xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>")


def _neu(root: Path, stem: str, objs, fname=None):
    _save_img(root / "IMAGES" / f"{stem}.jpg", np.full((200, 200, 3), 120, np.uint8))
    xml = NEU_XML.format(fname=fname if fname is not None else stem,
                         objects="".join(OBJ.format(n=n, d=d, b=b) for n, d, b in objs))
    (root / "ANNOTATIONS").mkdir(parents=True, exist_ok=True)
    (root / "ANNOTATIONS" / f"{stem}.xml").write_text(xml)


@pytest.fixture
def neu_dir(tmp_path):
    root = tmp_path / "neu"
    _neu(root, "crazing_1", [("crazing", 0, (1, 1, 200, 100)), ("crazing", 0, (1, 1, 200, 100)),
                             (" inclusion ", 1, (10, 20, 30, 40))], fname="wrong_name.jpg")
    _neu(root, "rolled-in_scale_12", [("rolled-in_scale", 0, (50, 60, 70, 90))], fname="rolled-in_scale_12")
    return root


def test_neu_reader(neu_dir):
    info = load_records(neu_dir)
    assert info.format == "neu-det"
    assert info.class_names("detect") == NEU_CLASSES == info.class_names("classify")
    recs = {r.stem: r for r in info.records}
    r = recs["crazing_1"]
    assert r.label == 0
    # duplicate dropped, 1-based -> 0-based, <name> stripped and used (inclusion in a crazing image)
    assert r.boxes.tolist() == [[0, 0, 200, 100], [9, 19, 30, 40]]
    assert r.box_classes.tolist() == [0, 1]
    assert r.difficult.tolist() == [False, True]
    r2 = recs["rolled-in_scale_12"]
    assert r2.label == NEU_CLASSES.index("rolled-in_scale")
    assert r2.box_classes.tolist() == [4]
    assert r2.width == 200 and r2.height == 200
    with pytest.raises(DatasetFormatError):
        info.records_for("segment")


def test_parse_voc_clips_and_drops_degenerate(tmp_path):
    p = tmp_path / "a.xml"
    p.write_text(NEU_XML.format(fname="a", objects=OBJ.format(n="x", d=0, b=(5, 5, 250, 50))
                                + OBJ.format(n="x", d=0, b=(5, 5, 5, 50))
                                + OBJ.format(n="x", d=0, b=(230, 5, 260, 50))))
    a = parse_voc_xml(p)
    # 1-based inclusive: xmin == xmax is a 1-pixel wide box; a box outside the image is dropped
    assert a["boxes"].tolist() == [[4, 4, 200, 50], [4, 4, 5, 50]]


@pytest.fixture
def crackforest_dir(tmp_path):
    from scipy.io import savemat

    root = tmp_path / "cfd"
    seg = np.ones((32, 48), np.uint8)
    seg[10:12, :] = 2
    seg[20, 5:9] = 3
    _save_img(root / "image/001.jpg", np.full((32, 48, 3), 100, np.uint8))
    (root / "groundTruth").mkdir(parents=True)
    savemat(root / "groundTruth/001.mat", {"groundTruth": {"Segmentation": seg,
                                                            "Boundaries": np.zeros_like(seg)}})
    _save_img(root / "image/201.jpg", np.full((32, 48, 3), 100, np.uint8))  # unannotated: skipped
    return root


def test_crackforest_reader(crackforest_dir):
    info = load_records(crackforest_dir)
    assert info.format == "crackforest" and info.tasks == ("segment",)
    assert info.class_names("segment") == CRACK_CLASSES
    assert [r.stem for r in info.records] == ["001"]
    m = info.records[0].load_mask()
    assert m.shape == (32, 48) and m.dtype == np.uint8
    assert m.sum() == 2 * 48 + 4 and set(np.unique(m)) == {0, 1}


@pytest.fixture
def deepcrack_dir(tmp_path):
    root = tmp_path / "dc"
    lab = np.zeros((24, 34), np.uint8)
    lab[5:8, :] = 255
    _save_img(root / "train_img/11289-1.jpg", np.full((24, 34, 3), 80, np.uint8))
    _save_img(root / "train_lab/11289-1.png", lab)
    _save_img(root / "test_img/11289-1.jpg", np.full((24, 34, 3), 80, np.uint8))
    root.joinpath("test_lab").mkdir()
    Image.fromarray(lab > 0).save(root / "test_lab/11289-1.png")  # 1-bit PNG
    return root


def test_deepcrack_reader(deepcrack_dir):
    info = load_records(deepcrack_dir)
    assert info.format == "deepcrack"
    assert sorted(r.key for r in info.records) == ["test/11289-1", "train/11289-1"]
    for r in info.records:
        m = r.load_mask()
        assert m.dtype == np.uint8 and set(np.unique(m)) == {0, 1} and m.sum() == 3 * 34
    # same stem -> same split side
    assert len({is_val_stem(r.stem) for r in info.records}) == 1


def test_own_layouts(tmp_path):
    # classify: class folders
    c = tmp_path / "cls"
    for name, n in (("ok", 3), ("scratch", 2)):
        for i in range(n):
            _save_img(c / name / f"{name}{i}.png", _gray(16, 16))
    info = load_records(c)
    assert info.format == "folder-classify" and info.class_names("classify") == ["ok", "scratch"]
    assert Counter(r.label for r in info.records) == {0: 3, 1: 2}
    (c / "classes.txt").write_text("scratch\nok\n")
    assert load_records(c).class_names("classify") == ["scratch", "ok"]

    # segment: images/ + masks/ (binary 0/255)
    s = tmp_path / "seg"
    m = np.zeros((10, 12), np.uint8)
    m[2:4, 3:9] = 255
    _save_img(s / "images/a.jpg", _gray(10, 12))
    _save_img(s / "masks/a.png", m)
    _save_img(s / "images/b.jpg", _gray(10, 12))  # no mask: skipped
    info = load_records(s)
    assert info.format == "folder-segment" and len(info.records) == 1
    assert info.records[0].load_mask().sum() == 12
    # multi-class index masks with classes.txt
    (s / "classes.txt").write_text("background\npit\nscratch\n")
    m2 = np.zeros((10, 12), np.uint8)
    m2[0, 0], m2[1, 1] = 2, 255
    _save_img(s / "masks/a.png", m2)
    info = load_records(s)
    assert info.class_names("segment") == ["background", "pit", "scratch"]
    mm = info.records[0].load_mask()
    assert mm[0, 0] == 2 and mm[1, 1] == 255

    # detect: YOLO
    y = tmp_path / "yolo"
    _save_img(y / "images/a.jpg", _gray(100, 200))
    (y / "labels").mkdir()
    (y / "labels/a.txt").write_text("1 0.5 0.5 0.2 0.4\n")
    (y / "classes.txt").write_text("dent\nscratch\n")
    info = load_records(y)
    assert info.format == "yolo" and info.class_names("detect") == ["dent", "scratch"]
    np.testing.assert_allclose(info.records[0].boxes, [[80, 30, 120, 70]])
    assert info.records[0].box_classes.tolist() == [1]

    # detect: VOC, xml beside the images, plus a negative image
    v = tmp_path / "voc"
    _save_img(v / "images/p1.jpg", _gray(200, 200))
    (v / "images/p1.xml").write_text(NEU_XML.format(fname="x", objects=OBJ.format(n="dent", d=0,
                                                                                  b=(11, 21, 50, 60))))
    _save_img(v / "images/p2.jpg", _gray(200, 200))
    info = load_records(v)
    assert info.format == "voc" and info.class_names("detect") == ["dent"]
    recs = {r.stem: r for r in info.records}
    assert recs["p1"].boxes.tolist() == [[10, 20, 50, 60]] and len(recs["p2"].boxes) == 0

    with pytest.raises(DatasetFormatError):
        detect_format(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetFormatError):
        load_records(tmp_path / "empty")


def test_split_rule():
    stems = [f"s{i}" for i in range(400)]
    from model.data.readers import Record

    recs = [Record(stem=s, key=s, image=Path(s)) for s in stems]
    tr, va, te, ho, al = (split_records(recs, k) for k in ("train", "val", "test", "heldout", "all"))
    assert len(al) == 400 and len(tr) + len(va) + len(te) == 400
    assert not {r.stem for r in tr} & ({r.stem for r in va} | {r.stem for r in te})
    assert not {r.stem for r in va} & {r.stem for r in te}
    assert {r.stem for r in ho} == {r.stem for r in va} | {r.stem for r in te}
    assert 0.12 < len(ho) / 400 < 0.28 and 0.3 < len(te) / len(ho) < 0.7
    held = {s for s in stems if int(hashlib.sha1(("val:" + s).encode()).hexdigest(), 16) % 5 == 0}
    test = {s for s in held if int(hashlib.sha1(("test:" + s).encode()).hexdigest(), 16) % 2 == 0}
    assert {r.stem for r in ho} == held and {r.stem for r in te} == test
    assert [r.stem for r in split_records(recs, "val")] == [r.stem for r in va]  # deterministic
    with pytest.raises(ValueError):
        split_records(recs, "holdout")


# ----------------------------------------------------------------------------------------------------
# datasets on the synthetic data


def test_classify_dataset(mt_dir):
    info = load_records(mt_dir, task="classify")
    torch.manual_seed(0)
    ds = ClassifyDataset(info.records, imgsz=32, train=True, with_mask=True).preload()
    batch = collate([ds[i] for i in range(len(ds))])
    assert batch["image"].shape == (3, 3, 32, 32) and batch["image"].dtype == torch.uint8
    assert batch["label"].dtype == torch.int64 and batch["mask"].shape == (3, 32, 32)
    assert torch.equal(batch["image"][:, 0], batch["image"][:, 1])  # gray replicated
    ev = ClassifyDataset(info.records, imgsz=32)
    item = ev[0]
    assert item["image"].shape == (3, 32, 32) and "meta" in item and "mask" not in item


def test_segment_dataset(deepcrack_dir):
    info = load_records(deepcrack_dir, task="segment")
    ds = SegmentDataset(info.records, imgsz=64, crop=32, train=True)
    item = ds[0]
    assert item["image"].shape == (3, 32, 32) and item["mask"].shape == (32, 32)
    assert set(torch.unique(item["mask"]).tolist()) <= {0, 1, 255}
    ev = SegmentDataset(info.records, imgsz=64)[0]
    assert ev["image"].shape == (3, 64, 64)
    m = ev["mask"]
    # letterbox 34x24 -> 64x45 (pad 9 top / 10 bottom): pad rows are ignore
    assert (m[:9] == 255).all() and (m[-10:] == 255).all() and (m[9:-10] != 255).all()


def test_detect_dataset_eval_roundtrip(neu_dir):
    info = load_records(neu_dir, task="detect")
    ds = DetectDataset(info.records, imgsz=100, train=False)
    b = collate_detect([ds[i] for i in range(len(ds))])
    assert b["image"].shape == (2, 3, 100, 100)
    assert b["targets"].shape == (3, 6)
    for j, meta in enumerate(b["meta"]):
        back = unletterbox_boxes(b["boxes"][j].numpy(), meta["scale"], meta["pad"],
                                 (meta["orig_w"], meta["orig_h"]))
        rec = ds.records[b["index"][j]]
        np.testing.assert_allclose(back, rec.boxes, atol=1e-4)
    torch.manual_seed(1)
    tr = DetectDataset(info.records, imgsz=64, train=True, mosaic=1.0)
    b = collate_detect([tr[i] for i in range(2)])
    assert b["image"].shape == (2, 3, 64, 64)
    t = b["targets"]
    assert ((t[:, 2:] >= 0) & (t[:, 2:] <= 64)).all()
    assert (t[:, 4] > t[:, 2]).all() and (t[:, 5] > t[:, 3]).all()


def test_sample_weights():
    from model.data.readers import Record

    recs = [Record(stem=str(i), key=str(i), image=Path("x"), label=0 if i < 7 else 1) for i in range(10)]
    w = sample_weights(recs, power=1.0)
    assert w.shape == (10,) and w.mean() == pytest.approx(1.0)
    assert w[:7].sum() == pytest.approx(w[7:].sum())  # full balance: equal mass per class
    w_sqrt = sample_weights(recs)
    assert w_sqrt[7] / w_sqrt[0] == pytest.approx(np.sqrt(7 / 3))
    assert np.allclose(sample_weights(recs, power=0.0), 1.0)
    s = balanced_sampler(recs, power=1.0, generator=torch.Generator().manual_seed(0), num_samples=2000)
    picked = np.array(list(s))
    frac1 = (picked >= 7).mean()
    assert 0.4 < frac1 < 0.6
    # detect: rarest class of the image, empty images as their own group
    det = []
    for i, cl in enumerate([[0], [0], [0], [0, 1], []]):
        r = Record(stem=str(i), key=str(i), image=Path("x"))
        r._boxes = np.zeros((len(cl), 4), np.float32)
        r._box_classes = np.asarray(cl, np.int64)
        det.append(r)
    wd = sample_weights(det, "detect", power=1.0)
    assert wd[3] > wd[0] and wd[4] == pytest.approx(wd[3])


# ----------------------------------------------------------------------------------------------------
# real data, read in place (skips when the data folder lacks it)



def _holdout(stem):
    return int(hashlib.sha1(stem.encode("utf-8")).hexdigest(), 16) % 4 == 0


@pytest.mark.data
def test_real_magnetic_tile():
    info = load_records(dataset("magnetic-tile"))
    assert info.format == "magnetic-tile"
    counts = Counter(info.class_names("classify")[r.label] for r in info.records)
    assert counts == {"MT_Blowhole": 77, "MT_Break": 66, "MT_Crack": 48, "MT_Fray": 24, "MT_Free": 693,
                      "MT_Uneven": 82}
    assert len({r.stem for r in info.records}) == 990
    assert not any(_holdout(r.stem) for r in info.records)
    n_boxes = 0
    for r in info.records:
        if r.label == 5:
            assert len(r.boxes) == 0
            continue
        w, h = r.size()
        b = r.boxes
        n_boxes += len(b)
        assert ((b[:, 0] >= 0) & (b[:, 1] >= 0) & (b[:, 2] <= w) & (b[:, 3] <= h)).all()
        assert ((b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])).all()
        assert (r.box_classes == r.label).all()
    assert n_boxes > 297  # at least one box per defect image but the 4 empty MT_Uneven masks
    for r in info.records[::60]:
        m = r.load_mask()
        img = r.load_image()
        assert m.shape == img.shape[:2] and img.shape[2] == 3
        assert set(np.unique(m).tolist()) <= {0, r.label + 1 if r.label < 5 else 0}
    _check_split(info, "classify")
    _check_split(info, "detect")


@pytest.mark.data
def test_real_neu_det():
    info = load_records(dataset("neu-det"))
    assert info.format == "neu-det"
    assert info.class_names("detect") == NEU_CLASSES
    assert Counter(NEU_CLASSES[r.label] for r in info.records) == {
        "crazing": 208, "inclusion": 225, "patches": 224, "pitted_surface": 224, "rolled-in_scale": 232,
        "scratches": 240}
    all_cls = np.concatenate([r.box_classes for r in info.records])
    # SOURCE.md: 3172 <object>s (475/780/664/323/495/435); 3 are exact duplicates (crazing_120,
    # inclusion_62, patches_198), dropped by the reader
    assert len(all_cls) == 3172 - 3
    assert {NEU_CLASSES[k]: v for k, v in Counter(all_cls.tolist()).items()} == {
        "crazing": 474, "inclusion": 779, "patches": 663, "pitted_surface": 323, "rolled-in_scale": 495,
        "scratches": 435}
    for r in info.records:
        b = r.boxes
        assert 1 <= len(b) <= 9
        assert (b >= 0).all() and (b <= 200).all()
        assert ((b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])).all()
    assert sum(int(r.difficult.sum()) for r in info.records) == 67
    img = info.records[0].load_image()
    assert img.shape == (200, 200, 3)
    _check_split(info, "classify")
    _check_split(info, "detect")


@pytest.mark.data
def test_real_crackforest():
    info = load_records(dataset("crackforest"))
    assert info.format == "crackforest" and len(info.records) == 89
    for r in info.records[::15]:
        m = r.load_mask()
        img = r.load_image()
        assert m.shape == img.shape[:2] == (320, 480)
        assert set(np.unique(m).tolist()) == {0, 1}
    _check_split(info, "segment")


@pytest.mark.data
def test_real_deepcrack():
    info = load_records(dataset("deepcrack"))
    assert info.format == "deepcrack"
    assert Counter(r.subset for r in info.records) == {"train": 216, "test": 181}
    assert len({r.key for r in info.records}) == 397
    one_bit = [r for r in info.records if Image.open(r.mask_path).mode == "1"]
    assert len(one_bit) == 32
    for r in one_bit[:3] + info.records[::50]:
        m = r.load_mask()
        assert m.shape == (384, 544) and set(np.unique(m).tolist()) == {0, 1}
    _check_split(info, "segment")


def _check_split(info, task):
    recs = info.records_for(task)
    tr, va = split_records(recs, "train"), split_records(recs, "heldout")
    assert len(tr) + len(va) == len(recs)
    assert not {r.key for r in tr} & {r.key for r in va}
    assert not {r.stem for r in tr} & {r.stem for r in va}
    assert [r.key for r in split_records(recs, "heldout")] == [r.key for r in va]
    assert 0.12 < len(va) / len(recs) < 0.30
    n = info.num_classes(task)
    if task == "classify":
        for part in (tr, va):
            assert {r.label for r in part} == set(range(n))
    elif task == "detect":
        for part in (tr, va):
            assert {int(c) for r in part for c in r.box_classes} == set(range(n))
    else:
        for part in (tr, va):
            assert any(part[i].load_mask().any() for i in range(min(5, len(part))))


def test_load_image_grey_and_colour(tmp_path: Path):
    """`load_image` decodes as the service does: mode L keeps a grey file's pixels as they are (8- or 16-bit,
    the latter scaled from its full range) and takes the luma of a colour one; mode RGB copies grey into three
    channels."""
    from model.data.readers import load_image

    rng = np.random.default_rng(5)
    grey = rng.integers(0, 256, (30, 40), dtype=np.uint8)
    colour = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
    Image.fromarray(grey).save(tmp_path / "grey.png")
    Image.fromarray(colour).save(tmp_path / "colour.png")
    Image.fromarray(grey.astype(np.uint16) * 257).save(tmp_path / "grey16.png")
    assert np.array_equal(load_image(tmp_path / "grey.png", "L"), grey)
    assert np.array_equal(load_image(tmp_path / "grey16.png", "L"), grey)
    assert np.array_equal(load_image(tmp_path / "grey.png"), np.repeat(grey[:, :, None], 3, axis=2))
    luma = np.asarray(Image.fromarray(colour).convert("L"))
    assert np.array_equal(load_image(tmp_path / "colour.png", "L"), luma)
    assert np.array_equal(load_image(tmp_path / "colour.png"), colour)
    with pytest.raises(ValueError, match="RGB or L"):
        load_image(tmp_path / "grey.png", "CMYK")


# ----------------------------------------------------------------------------------------------------
# files that cannot be read: DatasetFormatError naming the file, at read time where cheap


def test_a_voc_xml_that_does_not_parse_is_named(tmp_path):
    v = tmp_path / "voc"
    _save_img(v / "images/a.jpg", _gray(64, 64))
    (v / "annotations").mkdir()
    (v / "annotations/a.xml").write_text("<annotation><object>")  # cut short
    with pytest.raises(DatasetFormatError, match=r"annotations/a.xml: not a readable VOC annotation"):
        load_records(v)
    (v / "annotations/a.xml").write_text(NEU_XML.format(fname="a", objects=OBJ.format(n="dent", d=0,
                                                                                      b=(1, 2, "x", 9))))
    with pytest.raises(DatasetFormatError, match=r"a.xml: object 'dent' has no box of four numbers"):
        load_records(v)


def test_a_voc_box_is_clipped_to_the_image_when_the_xml_has_no_size(tmp_path):
    v = tmp_path / "voc"
    (v / "annotations").mkdir(parents=True)
    for stem, box in (("a", (31, 31, 200, 200)), ("b", (100, 100, 200, 200))):
        _save_img(v / f"images/{stem}.jpg", _gray(64, 64))
        (v / f"annotations/{stem}.xml").write_text(
            f"<annotation><object><name>dent</name><bndbox><xmin>{box[0]}</xmin><ymin>{box[1]}</ymin>"
            f"<xmax>{box[2]}</xmax><ymax>{box[3]}</ymax></bndbox></object></annotation>")
    recs = {r.stem: r for r in load_records(v).records}
    # the image header gives the size: the box ends at the image border, as training sees it
    assert recs["a"].boxes.tolist() == [[30, 30, 64, 64]] and (recs["a"].width, recs["a"].height) == (64, 64)
    # entirely outside the image: dropped, as for an xml with a <size>
    assert len(recs["b"].boxes) == 0 and recs["b"].is_defect_free("detect")
    ds = DetectDataset(list(recs.values()), imgsz=64, train=False)
    assert ds[0]["boxes"].tolist() == [[30, 30, 64, 64]]


def test_a_yolo_line_that_is_not_numbers_is_named(tmp_path):
    y = tmp_path / "yolo"
    _save_img(y / "images/a.jpg", _gray(64, 64))
    (y / "labels").mkdir()
    for line in ("dent 0.5 0.5 0.2 0.2", "0 0.5 0.5 0.2", "1.5 0.5 0.5 0.2 0.2"):
        (y / "labels/a.txt").write_text(f"0 0.5 0.5 0.1 0.1\n\n{line}\n")
        with pytest.raises(DatasetFormatError, match=rf"labels/a.txt line 3: expected .*got '{line}'"):
            load_records(y)


def test_a_file_that_is_not_an_image_is_named_when_the_records_are_read(tmp_path):
    c = tmp_path / "cls"
    _save_img(c / "ok/a.png", _gray(16, 16))
    _save_img(c / "bad/b.png", _gray(16, 16))
    (c / "bad/c.png").write_text("not a picture")
    with pytest.raises(DatasetFormatError, match=r"bad/c.png: not an image"):
        load_records(c, "classify")
    # a file whose header reads but whose pixels do not: named when decoded (training caches them first)
    _save_img(c / "bad/c.png", np.random.default_rng(0).integers(0, 256, (64, 64), np.uint8))
    (c / "bad/c.png").write_bytes((c / "bad/c.png").read_bytes()[:2000])
    info = load_records(c, "classify")
    with pytest.raises(DatasetFormatError, match=r"bad/c.png: not a readable image"):
        ClassifyDataset(info.records, imgsz=16, train=True).preload()


def test_a_classifier_needs_two_classes(tmp_path):
    c = tmp_path / "cls"
    for i in range(3):
        _save_img(c / "ok" / f"ok{i}.png", _gray(16, 16))
    with pytest.raises(DatasetFormatError, match=r"a classifier needs at least two classes .*found only 'ok'"):
        load_records(c)
    (c / "classes.txt").write_text("ok\nscratch\n")  # a class without images yet: its name is known
    assert load_records(c).class_names("classify") == ["ok", "scratch"]


def test_an_index_mask_value_that_names_no_class_is_named_when_loaded(tmp_path):
    s = tmp_path / "seg"
    m = np.zeros((10, 12), np.uint8)
    m[2, 3], m[4, 5] = 7, 255
    _save_img(s / "images/a.jpg", _gray(10, 12))
    _save_img(s / "masks/a.png", m)
    (s / "classes.txt").write_text("background\npit\nscratch\n")
    info = load_records(s, "segment")
    with pytest.raises(DatasetFormatError, match=r"masks/a.png: mask value 7 is not a class index \(0..2"):
        info.records[0].load_mask()
    with pytest.raises(DatasetFormatError, match="mask value 7"):
        SegmentDataset(info.records, imgsz=16, train=True).preload()
    # 16-bit masks are checked before they are narrowed to 8 bits (256 would otherwise read as 0)
    m16 = m.astype(np.uint16)
    m16[2, 3] = 256
    Image.fromarray(m16).save(s / "masks/a.png")
    with pytest.raises(DatasetFormatError, match="mask value 256"):
        load_records(s, "segment").records[0].load_mask()
    m[2, 3] = 2
    _save_img(s / "masks/a.png", m)
    assert load_records(s, "segment").records[0].load_mask()[2, 3] == 2
