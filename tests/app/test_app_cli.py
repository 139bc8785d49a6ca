"""`s2amnet predict` (local and remote) and the Python client."""

from __future__ import annotations

import json
import shutil

import httpx
import numpy as np
import pytest
from PIL import Image
from support.harness import API_KEY, Server
from support.images import jpeg, pattern, png

from app.cli import main
from app.client import S2AMNetClient, S2AMNetError
from app.schemas import InspectionResult


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def image_files(tmp_path):
    paths = []
    for i, (w, h) in enumerate([(80, 60), (50, 90)]):
        p = tmp_path / f"part{i}.png"
        p.write_bytes(png(w, h, seed=40 + i))
        paths.append(str(p))
    return paths


def test_predict_local_one_image(capsys, weights_dir, image_files):
    code, out, _ = run_cli(
        capsys,
        "predict",
        image_files[0],
        "--task",
        "segment",
        "--weights-dir",
        str(weights_dir),
        "--conf",
        "0",
        "--part-id",
        "P-1",
    )
    assert code == 0
    result = InspectionResult.model_validate_json(out)
    assert result.task == "segment" and result.model.name == "seg" and result.part_id == "P-1"
    assert (result.image.width, result.image.height) == (80, 60)
    assert result.defects and all(d.mask and d.mask.counts for d in result.defects)


def test_predict_local_applies_a_recipe(capsys, weights_dir, image_files):
    from support.harness import MAIN_SERVER_ENV

    base = ["predict", image_files[0], "--task", "detect", "--weights-dir", str(weights_dir),
            "--recipes", MAIN_SERVER_ENV["S2AMNET_RECIPES"]]
    for recipe, verdict, version in (("strict", "fail", "7"), ("lenient", "pass", "2026-12-01")):
        code, out, _ = run_cli(capsys, *base, "--recipe-id", recipe)
        assert code == 0
        result = json.loads(out)
        assert (result["verdict"], result["recipe"]) == (verdict, {"id": recipe, "version": version})
    code, _, err = run_cli(capsys, *base, "--recipe-id", "nope")
    assert code == 1 and json.loads(err)["status"] == 422


def test_predict_local_several_images_gives_a_list(capsys, weights_dir, image_files):
    code, out, _ = run_cli(
        capsys,
        "predict",
        *image_files,
        "--task",
        "classify",
        "--weights-dir",
        str(weights_dir),
        "--top-k",
        "3",
        "--indent",
        "0",
    )
    assert code == 0 and len(out.strip().splitlines()) == 1
    results = json.loads(out)
    assert [r["image"] for r in results] == [{"width": 80, "height": 60}, {"width": 50, "height": 90}]
    assert all(len(r["top_k"]) == 3 for r in results)


def test_predict_remote_equals_local(capsys, server: Server, weights_dir, image_files, monkeypatch):
    monkeypatch.setenv("S2AMNET_API_KEY", API_KEY)
    code, remote_out, err = run_cli(
        capsys,
        "predict",
        *image_files,
        "--task",
        "detect",
        "--url",
        server.url,
        "--conf",
        "0.0",
        "--station-id",
        "ST-2",
    )
    assert code == 0, err
    code, local_out, _ = run_cli(
        capsys,
        "predict",
        *image_files,
        "--task",
        "detect",
        "--weights-dir",
        str(weights_dir),
        "--conf",
        "0.0",
        "--station-id",
        "ST-2",
    )
    remote, local = json.loads(remote_out), json.loads(local_out)
    assert len(remote) == len(local) == 2
    for r, loc in zip(remote, local, strict=True):
        assert r["defects"] == loc["defects"] and r["defects"]  # same code, same weights, same answer
        assert r["station_id"] == loc["station_id"] == "ST-2" and r["verdict"] == loc["verdict"]


def test_predict_errors(capsys, weights_dir, tmp_path, server: Server):
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    code, out, err = run_cli(
        capsys, "predict", str(text), "--task", "detect", "--weights-dir", str(weights_dir)
    )
    assert code == 1 and out == "" and json.loads(err)["status"] == 415
    code, _, err = run_cli(
        capsys, "predict", str(text), "--task", "detect", "--weights-dir", str(weights_dir), "--model", "nope"
    )
    assert code == 1 and json.loads(err)["status"] == 404
    code, _, err = run_cli(capsys, "predict", str(text), "--task", "detect", "--url", server.url)
    assert code == 1 and json.loads(err)["status"] == 401  # no key
    code, _, err = run_cli(
        capsys, "predict", str(text), "--task", "detect", "--weights-dir", str(weights_dir), "--conf", "3"
    )
    assert code == 1 and json.loads(err)["status"] == 422
    # the model asked for is there, but its manifest cannot be read: the answer names the file
    broken = tmp_path / "weights"
    shutil.copytree(weights_dir, broken)
    (broken / "det" / "manifest.json").write_text("[1, 2]")
    code, _, err = run_cli(capsys, "predict", str(text), "--task", "detect", "--weights-dir", str(broken),
                           "--model", "det")
    problem = json.loads(err.strip().splitlines()[-1])
    assert code == 1 and problem["status"] == 404
    assert problem["detail"].endswith(f"{broken / 'det' / 'manifest.json'} is unreadable"), problem


# ------------------------------------------------------------------------------------------- client
def test_client_against_the_server(server: Server, tmp_path):
    path = tmp_path / "a.jpg"
    path.write_bytes(jpeg(70, 50))
    with S2AMNetClient(server.url, api_key=API_KEY) as client:
        assert client.ready()
        assert {m.name for m in client.models()} == {"cls", "det", "seg"}
        inputs = [
            str(path),
            path.read_bytes(),
            Image.fromarray(pattern(70, 50)),
            pattern(70, 50),
            open(path, "rb"),
        ]
        for image in inputs:
            r = client.detect(image, conf=0.0, max_det=3, part_id="P-9")
            assert isinstance(r, InspectionResult)
            assert (r.image.width, r.image.height, r.part_id) == (70, 50, "P-9") and len(r.defects) <= 3
        inputs[-1].close()
        cls = client.classify(str(path), top_k=2)
        assert cls.top_k is not None and len(cls.top_k) == 2
        seg = client.segment(str(path), conf=0.0, mask_format="png")
        assert all(d.mask.png for d in seg.defects)
        many = client.inspect_many("detect", [str(path), pattern(30, 40)])
        assert [(x.image.width, x.image.height) for x in many] == [(70, 50), (30, 40)]
        one_listed = client.inspect_many("classify", [str(path)])
        assert len(one_listed) == 1
        with pytest.raises(S2AMNetError) as info:
            client.detect(b"garbage")
        assert info.value.status == 415 and info.value.code == "unsupported_media_type"
        with pytest.raises(S2AMNetError) as info:
            client.detect(str(path), model="nope")
        assert info.value.status == 404
        same = [client.detect(str(path), idempotency_key="k-1") for _ in range(2)]
        assert same[0].result_id == same[1].result_id
    with S2AMNetClient(server.url) as anon, pytest.raises(S2AMNetError) as info:
        anon.models()
    assert info.value.status == 401


def test_client_retries_503_with_the_same_idempotency_key():
    seen: list[httpx.Request] = []
    body = {
        "result_id": "3f0b6c6e-5a8f-4b35-9d0e-7f0a0a0a0a0a",
        "request_id": "r",
        "task": "detect",
        "model": {"name": "det", "version": "1"},
        "image": {"width": 2, "height": 2},
        "verdict": "pass",
        "defects": [],
        "timing_ms": {"queue": 0, "inference": 1, "total": 2},
    }

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if len(seen) < 3:
            return httpx.Response(
                503,
                headers={"Retry-After": "0"},
                json={
                    "type": "x",
                    "title": "Overloaded",
                    "status": 503,
                    "detail": "full",
                    "code": "queue_full",
                },
            )
        return httpx.Response(200, json=body)

    with S2AMNetClient("http://mes", transport=httpx.MockTransport(handler), retries=2) as client:
        assert client.detect(np.zeros((8, 8, 3), np.uint8)).verdict == "pass"
    keys = {r.headers["idempotency-key"] for r in seen}
    assert len(seen) == 3 and len(keys) == 1

    seen.clear()
    with S2AMNetClient("http://mes", transport=httpx.MockTransport(handler), retries=1) as client:
        with pytest.raises(S2AMNetError) as info:
            client.detect(b"x")
    assert info.value.status == 503 and info.value.code == "queue_full" and info.value.retry_after == 0
