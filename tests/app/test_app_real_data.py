"""Real images from the data folder (S2AMNET_DATA_DIR; read in place, never copied) through the API; and,
once the shipped detector exists in weights/, the README's promise: `curl -F file=@some.jpg localhost:8000/detect` gives
boxes. Skipped cleanly when the data or the shipped weights are absent."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import httpx
import pytest
from support.data import dataset
from support.harness import MODES, ROOT, running_server

SHIPPED_DETECTOR = ROOT / "weights" / "neu-det-detect"
NEU_IMAGES = [
    "crazing_10.jpg",
    "inclusion_10.jpg",
    "patches_10.jpg",
    "scratches_10.jpg",
    "pitted_surface_10.jpg",
]


def multipart(path: Path):
    return [("file", (path.name, path.read_bytes(), "image/jpeg"))]


def test_real_images_of_every_dataset(client: httpx.Client):
    """Grayscale and colour JPEGs of varied sizes, one request per dataset with several images."""
    picks = {
        "neu-det": sorted((dataset("neu-det") / "IMAGES").glob("*.jpg"))[:3],
        "magnetic-tile": sorted((dataset("magnetic-tile") / "MT_Crack" / "Imgs").glob("*.jpg"))[:3],
        "crackforest": sorted((dataset("crackforest") / "image").glob("*.jpg"))[:2],
        "deepcrack": sorted((dataset("deepcrack") / "test_img").glob("*.jpg"))[:2],
    }
    from PIL import Image

    for name, paths in picks.items():
        assert paths, name
        files = [("file", (p.name, p.read_bytes(), "image/jpeg")) for p in paths]
        resp = client.post("/segment", files=files, params={"conf": 0.0})
        assert resp.status_code == 200, (name, resp.text[:300])
        for path, result in zip(paths, resp.json(), strict=True):
            with Image.open(path) as im:
                assert result["image"] == {"width": im.width, "height": im.height}
            for d in result["defects"]:
                assert d["mask"]["size"] == [im.height, im.width]


def _gt_boxes(stem: str) -> list[tuple[float, float, float, float]]:
    root = ET.parse(dataset("neu-det") / "ANNOTATIONS" / f"{stem}.xml").getroot()
    out = []
    for obj in root.iter("object"):
        b = obj.find("bndbox")
        out.append(tuple(float(b.find(k).text) for k in ("xmin", "ymin", "xmax", "ymax")))
    return out


def _iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


@pytest.mark.parametrize("mode", MODES)
def test_shipped_detector_finds_boxes_on_neu_det(mode):
    if not (SHIPPED_DETECTOR / "manifest.json").is_file():
        pytest.skip("shipped weights/neu-det-detect not present yet")
    images = dataset("neu-det") / "IMAGES"
    with running_server(mode, ROOT / "weights", S2AMNET_MODELS="neu-det-detect") as server:
        hits = 0
        for name in NEU_IMAGES:
            resp = httpx.post(server.url + "/detect", files=multipart(images / name), timeout=60)
            assert resp.status_code == 200, resp.text
            result = resp.json()
            assert result["model"]["name"] == "neu-det-detect"
            assert result["image"] == {"width": 200, "height": 200}
            boxes = [
                (d["box"]["x1"], d["box"]["y1"], d["box"]["x2"], d["box"]["y2"]) for d in result["defects"]
            ]
            gt = _gt_boxes(Path(name).stem)
            if boxes and max(_iou(b, g) for b in boxes for g in gt) >= 0.3:
                hits += 1
        assert hits >= 3, f"only {hits} of {len(NEU_IMAGES)} images had a box overlapping a labelled defect"
