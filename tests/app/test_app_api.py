"""The HTTP API against a real server (see conftest.server), in every dispatcher mode."""

from __future__ import annotations

import base64
import uuid

import httpx
import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as coco_mask
from support.harness import API_KEY, OTHER_API_KEY
from support.images import encode, exif_rotated, jpeg, pattern, png, png_bomb_header, real_png_bomb
from support.metrics import metric, metric_delta
from support.problems import assert_problem
from support.weights import DET_NMS_IOU, TEST_MODELS

from model.masks import png_b64_to_mask

# pycocotools (C extension) warns about numpy 2's copy keyword when decoding; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

RESULT_KEYS = {
    "result_id",
    "request_id",
    "model",
    "task",
    "image",
    "verdict",
    "decided_by",
    "recipe",
    "defects",
    "timing_ms",
    "station_id",
    "part_id",
    "meas_id",
    "recipe_id",
}


def files(*images: bytes, name: str = "file") -> list[tuple[str, tuple[str, bytes, str]]]:
    return [(name, (f"img{i}.png", data, "image/png")) for i, data in enumerate(images)]


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def check_result(r: dict, task: str, w: int, h: int) -> None:
    expected = RESULT_KEYS | ({"top_k"} if task == "classify" else set())
    assert set(r) == expected, set(r) ^ expected
    uuid.UUID(r["result_id"])
    assert r["task"] == task and r["decided_by"] == "model"
    assert r["model"] == {
        "name": {"classify": "cls", "detect": "det", "segment": "seg"}[task],
        "version": "1",
    }
    assert r["image"] == {"width": w, "height": h}
    assert r["verdict"] in ("pass", "fail")
    t = r["timing_ms"]
    assert set(t) == {"queue", "inference", "total"}
    assert 0 <= t["queue"] and 0 < t["inference"] <= t["total"]
    classes = TEST_MODELS[r["model"]["name"]][1]
    for d in r["defects"]:
        assert classes[d["class_id"]] == d["label"] and 0 <= d["score"] <= 1
        if task != "classify":
            b = d["box"]
            assert 0 <= b["x1"] <= b["x2"] <= w and 0 <= b["y1"] <= b["y2"] <= h, b
            assert d["area"] > 0


# --------------------------------------------------------------------------------------- happy paths
def test_detect_one_file(client: httpx.Client):
    resp = client.post("/detect", files=files(png(120, 80)), params={"conf": 0.0, "max_det": 7})
    assert resp.status_code == 200, resp.text
    r = resp.json()
    check_result(r, "detect", 120, 80)
    assert 0 < len(r["defects"]) <= 7  # conf=0 keeps every candidate, max_det caps them
    scores = [d["score"] for d in r["defects"]]
    assert scores == sorted(scores, reverse=True)
    assert resp.headers["x-request-id"] == r["request_id"]
    assert all(v is None for k, v in r.items() if k in ("station_id", "part_id", "meas_id", "recipe_id"))


def test_conf_filters_defects(client: httpx.Client):
    data = png(120, 80, seed=1)
    everything = client.post("/detect", files=files(data), params={"conf": 0.0}).json()["defects"]
    nothing = client.post("/detect", files=files(data), params={"conf": 1.0}).json()["defects"]
    cut = sorted(d["score"] for d in everything)[len(everything) // 2]
    some = client.post("/detect", files=files(data), params={"conf": cut}).json()["defects"]
    assert nothing == [] and len(everything) > 0
    assert {(d["label"], d["score"]) for d in some} == {
        (d["label"], d["score"]) for d in everything if d["score"] >= cut
    }


def test_classify_top_k(client: httpx.Client):
    resp = client.post("/classify", files=files(jpeg(90, 70)), data={"top_k": "2"})
    r = resp.json()
    check_result(r, "classify", 90, 70)
    assert len(r["top_k"]) == 2
    assert r["top_k"][0]["score"] >= r["top_k"][1]["score"]
    if r["verdict"] == "fail":
        assert len(r["defects"]) == 1 and r["defects"][0]["label"] != "good"
    else:
        assert r["defects"] == []


def test_segment_masks_decode_with_pycocotools(client: httpx.Client):
    w, h = 100, 70
    resp = client.post("/segment", files=files(png(w, h, seed=2)), params={"conf": 0.0})
    r = resp.json()
    check_result(r, "segment", w, h)
    assert r["defects"], "random weights at conf=0 always give some component"
    for d in r["defects"]:
        rle = d["mask"]
        assert rle["size"] == [h, w]
        m = coco_mask.decode({"size": rle["size"], "counts": rle["counts"].encode()})
        assert m.shape == (h, w)
        assert (
            int(m.sum()) == d["area"] == int(coco_mask.area({"size": rle["size"], "counts": rle["counts"]}))
        )
        ys, xs = np.nonzero(m)
        b = d["box"]
        assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (b["x1"], b["y1"], b["x2"], b["y2"])


def test_segment_mask_formats_agree(client: httpx.Client):
    data = png(80, 60, seed=4)
    by_format = {
        fmt: client.post("/segment", files=files(data), params={"conf": 0.0, "mask_format": fmt}).json()
        for fmt in ("rle", "polygon", "png")
    }
    n = len(by_format["rle"]["defects"])
    assert n > 0 and all(len(r["defects"]) == n for r in by_format.values())
    for rle_d, poly_d, png_d in zip(
        *(by_format[f]["defects"] for f in ("rle", "polygon", "png")), strict=True
    ):
        m = coco_mask.decode({"size": rle_d["mask"]["size"], "counts": rle_d["mask"]["counts"].encode()})
        assert np.array_equal(png_b64_to_mask(png_d["mask"]["png"]).astype(bool), m.astype(bool))
        assert poly_d["mask"]["size"] == [60, 80] and poly_d["mask"]["polygons"]
        for poly in poly_d["mask"]["polygons"]:
            xs, ys = poly[0::2], poly[1::2]
            assert len(poly) % 2 == 0 and 0 <= min(xs) and max(xs) <= 80 and 0 <= min(ys) and max(ys) <= 60


def test_several_files_answer_a_list_in_order(client: httpx.Client):
    sizes = [(64, 48), (150, 40), (33, 90)]
    resp = client.post("/detect", files=files(*(png(w, h, seed=i) for i, (w, h) in enumerate(sizes))))
    results = resp.json()
    assert isinstance(results, list) and len(results) == 3
    assert [(r["image"]["width"], r["image"]["height"]) for r in results] == sizes
    assert len({r["result_id"] for r in results}) == 3 and len({r["request_id"] for r in results}) == 1
    for r, (w, h) in zip(results, sizes, strict=True):
        check_result(r, "detect", w, h)


def test_same_image_same_answer_alone_or_in_a_request_of_several(client: httpx.Client):
    a, b = png(70, 50, seed=5), png(50, 70, seed=6)
    alone = client.post("/detect", files=files(b), params={"conf": 0.0}).json()
    together = client.post("/detect", files=files(a, b), params={"conf": 0.0}).json()[1]
    assert alone["defects"] == together["defects"]


def test_json_single_and_list(client: httpx.Client):
    one = client.post("/detect", json={"image": b64(png(40, 30)), "part_id": "P-1"})
    assert one.status_code == 200, one.text
    assert isinstance(one.json(), dict) and one.json()["part_id"] == "P-1"
    many = client.post("/detect", json={"images": [b64(png(40, 30)), b64(jpeg(30, 40))], "conf": 0.5})
    assert [r["image"] for r in many.json()] == [{"width": 40, "height": 30}, {"width": 30, "height": 40}]
    data_url = client.post("/classify", json={"image": "data:image/png;base64," + b64(png(20, 20))})
    assert data_url.status_code == 200
    listed_one = client.post("/classify", json={"images": [b64(png(20, 20))]})
    assert isinstance(listed_one.json(), list) and len(listed_one.json()) == 1


def test_raw_image_body(client: httpx.Client):
    resp = client.post(
        "/detect", content=jpeg(50, 40), headers={"Content-Type": "image/jpeg"}, params={"station_id": "S9"}
    )
    assert resp.status_code == 200 and resp.json()["station_id"] == "S9"


MES = {"station_id": "ST-01", "part_id": "PART-42", "meas_id": "M-7", "recipe_id": "R-3"}


@pytest.mark.parametrize("where", ["query", "form", "json"])
def test_mes_fields_echoed_from_query_form_and_json(client: httpx.Client, where: str):
    data = png(40, 40)
    if where == "query":
        resp = client.post("/classify", files=files(data, data), params=MES)
    elif where == "form":
        resp = client.post("/classify", files=files(data, data), data=MES)
    else:
        resp = client.post("/classify", json={"images": [b64(data)] * 2, **MES})
    assert resp.status_code == 200, resp.text
    for r in resp.json():
        assert {k: r[k] for k in MES} == MES


@pytest.mark.parametrize("where", ["query", "form", "json"])
def test_options_from_query_form_and_json(client: httpx.Client, where: str):
    data = png(60, 60, seed=8)
    opts = {"max_det": 2, "conf": 0.0}
    if where == "query":
        resp = client.post("/detect", files=files(data), params=opts)
    elif where == "form":
        resp = client.post("/detect", files=files(data), data={k: str(v) for k, v in opts.items()})
    else:
        resp = client.post("/detect", json={"image": b64(data), **opts})
    assert resp.status_code == 200, resp.text
    assert len(resp.json()["defects"]) == 2


def test_body_field_overrides_query(client: httpx.Client):
    resp = client.post("/detect", files=files(png(40, 40)), params={"part_id": "q"}, data={"part_id": "form"})
    assert resp.json()["part_id"] == "form"


def test_named_model(client: httpx.Client):
    assert (
        client.post("/segment", files=files(png()), params={"model": "seg"}).json()["model"]["name"] == "seg"
    )


# --------------------------------------------------------------------------------------- 4xx
@pytest.mark.parametrize(
    "params",
    [
        {"conf": 1.5},
        {"conf": -0.1},
        {"iou": 2},
        {"max_det": 0},
        {"max_det": 100000},
        {"top_k": 0},
        {"mask_format": "bitmap"},
        {"conf": "abc"},
        {"station_id": "x" * 300},
    ],
)
def test_out_of_range_options_422_in_query(client: httpx.Client, params):
    body = assert_problem(client.post("/detect", files=files(png()), params=params), 422, "invalid_request")
    assert [e["loc"] for e in body["errors"]] == [["query", *params]]


def test_options_are_documented_as_query_parameters(client: httpx.Client):
    """Every option and MES field is an optional query parameter of each inspection route in the OpenAPI
    document, beside the deadline and idempotency headers."""
    from app.schemas import MES_FIELDS, OPTION_FIELDS

    spec = client.get("/openapi.json").json()
    for task in ("classify", "detect", "segment"):
        params = {(p["in"], p["name"]): p for p in spec["paths"][f"/{task}"]["post"]["parameters"]}
        assert {name for where, name in params if where == "query"} == set(OPTION_FIELDS) | set(MES_FIELDS)
        assert {name for where, name in params if where == "header"} == {"x-request-timeout", "idempotency-key"}
        conf = params[("query", "conf")]
        assert not conf["required"] and conf["schema"]["maximum"] == 1.0 and conf["description"]


@pytest.mark.parametrize("fields", [{"conf": "7"}, {"top_k": "-1"}, {"mask_format": "svg"}, {"bogus": "1"}])
def test_invalid_form_fields_422(client: httpx.Client, fields):
    assert_problem(client.post("/segment", files=files(png()), data=fields), 422, "invalid_request")


@pytest.mark.parametrize(
    "payload",
    [
        {"image": b64(png()), "iou": -1},
        {"image": b64(png()), "max_det": 1.5},
        {"image": b64(png()), "x": 1},
        {"image": b64(png()), "images": [b64(png())]},
        {},
        {"images": []},
        {"image": 12},
        [1, 2],
    ],
)
def test_invalid_json_422(client: httpx.Client, payload):
    assert_problem(client.post("/detect", json=payload), 422, "invalid_request")


def test_malformed_json_422(client: httpx.Client):
    resp = client.post("/detect", content=b'{"image": ', headers={"Content-Type": "application/json"})
    assert_problem(resp, 422, "invalid_request")
    nested = b'{"a":' * 5000 + b"1" + b"}" * 5000  # deeper than the JSON parser goes
    resp = client.post("/detect", content=nested, headers={"Content-Type": "application/json"})
    assert "malformed JSON" in assert_problem(resp, 422, "invalid_request")["detail"]


def test_invalid_headers_422(client: httpx.Client):
    assert_problem(client.post("/detect", files=files(png()), headers={"X-Request-Timeout": "soon"}), 422)
    assert_problem(client.post("/detect", files=files(png()), headers={"X-Request-Timeout": "-1"}), 422)
    assert_problem(client.post("/detect", files=files(png()), headers={"Idempotency-Key": "x" * 300}), 422)


def test_no_image_422(client: httpx.Client):
    assert_problem(
        client.post("/detect", data={"conf": "0.5"}, files=[("other", ("a", b"1", "text/plain"))]), 422
    )
    assert_problem(client.post("/detect", content=b"", headers={"Content-Type": "image/png"}), 422)


def test_file_sent_as_text_field_422(client: httpx.Client):
    resp = client.post("/detect", data={"file": "not a file"}, files=[("part_id", (None, b"x"))])
    assert_problem(resp, 422)


def test_unknown_model_404(client: httpx.Client):
    body = assert_problem(
        client.post("/detect", files=files(png()), params={"model": "nope"}), 404, "unknown_model"
    )
    assert "det" in body["detail"]
    body = assert_problem(client.post("/detect", files=files(png()), params={"model": "seg"}), 404)
    assert "/segment" in body["detail"]


def test_unknown_path_and_method_are_problems(client: httpx.Client):
    assert_problem(client.get("/nope"), 404)
    resp = client.get("/detect")
    assert_problem(resp, 405)
    assert "POST" in resp.headers["allow"]


@pytest.mark.parametrize(
    "name, data, status, code",
    [
        ("zero bytes", b"", 400, "bad_image"),
        ("truncated jpeg", jpeg(300, 200)[:1500], 400, "bad_image"),
        ("truncated png", png(300, 200)[:-300], 400, "bad_image"),
        ("corrupt png", b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4, 400, "bad_image"),
        ("1x1", encode(pattern(1, 1)), 400, "bad_image"),
        ("text", b"just some text, certainly not an image\n" * 10, 415, "unsupported_media_type"),
        ("pdf", b"%PDF-1.7\n1 0 obj << /Type /Catalog >> endobj\n", 415, "unsupported_media_type"),
        ("bomb header", png_bomb_header(100_000, 100_000), 413, "too_many_pixels"),
        ("real bomb", real_png_bomb(2000), 413, "too_many_pixels"),  # 4 Mpx > the 1 Mpx limit, 8 KB
        ("just over the pixel limit", encode(pattern(1001, 1000)), 413, "too_many_pixels"),
    ],
)
def test_bad_images(client: httpx.Client, name, data, status, code):
    body = assert_problem(client.post("/detect", files=files(data)), status, code)
    assert body["instance"] == "/detect" and body["request_id"]


def test_bad_image_among_good_ones_names_its_index(client: httpx.Client):
    body = assert_problem(client.post("/detect", files=files(png(), png(), b"garbage-bytes")), 415)
    assert "image 2" in body["detail"]


def test_invalid_base64_400(client: httpx.Client):
    assert_problem(client.post("/detect", json={"image": "not*base64!"}), 400, "bad_image")
    assert_problem(client.post("/detect", json={"images": [b64(png()), "@@@"]}), 400, "bad_image")
    assert_problem(client.post("/detect", json={"image": b64(b"plain text, valid base64")}), 415)


@pytest.mark.parametrize(
    "name, img, fmt",
    [
        ("16-bit png", Image.fromarray(pattern(64, 48)[..., 0].astype(np.uint16) * 257), "PNG"),
        ("rgba png", Image.fromarray(pattern(64, 48)).convert("RGBA"), "PNG"),
        ("grayscale jpeg", Image.fromarray(pattern(64, 48)).convert("L"), "JPEG"),
        ("cmyk jpeg", Image.fromarray(pattern(64, 48)).convert("CMYK"), "JPEG"),
        ("palette png", Image.fromarray(pattern(64, 48)).convert("P"), "PNG"),
        ("1-bit png", Image.fromarray(pattern(64, 48)).convert("1"), "PNG"),
    ],
)
def test_image_modes_are_accepted(client: httpx.Client, name, img, fmt):
    resp = client.post("/detect", files=files(encode(img, fmt)))
    assert resp.status_code == 200, resp.text
    check_result(resp.json(), "detect", 64, 48)


def test_exif_rotation_results_refer_to_the_upright_image(client: httpx.Client):
    upright = pattern(96, 48, seed=11)
    params = {"conf": 0.0}
    plain = client.post("/detect", files=files(encode(upright, "PNG")), params=params).json()
    rotated = client.post("/detect", files=files(exif_rotated(upright, "PNG")), params=params).json()
    assert rotated["image"] == {"width": 96, "height": 48}
    assert rotated["defects"] == plain["defects"]  # lossless: exactly the same boxes
    seg_plain = client.post("/segment", files=files(encode(upright, "PNG")), params=params).json()
    seg_rot = client.post("/segment", files=files(exif_rotated(upright, "PNG")), params=params).json()
    assert seg_rot["defects"] == seg_plain["defects"]
    jpg = client.post("/detect", files=files(exif_rotated(upright, "JPEG")), params=params).json()
    check_result(jpg, "detect", 96, 48)  # boxes inside the upright 96x48 frame


# --------------------------------------------------------------------------------------- limits
def test_body_over_limit_by_content_length_413(client: httpx.Client, server):
    big = b"\x89PNG\r\n\x1a\n" + b"\x00" * (1024 * 1024 + 10)
    before = server.metrics()
    body = assert_problem(
        client.post("/detect", content=big, headers={"Content-Type": "image/png"}), 413, "body_too_large"
    )
    assert "limit" in body["detail"]
    # refused before routing, still counted under its route (not "other")
    labels = {"endpoint": "/detect", "status": "413"}
    assert metric(server.metrics(), "s2amnet_requests_total", **labels) - metric(
        before, "s2amnet_requests_total", **labels) == 1


def test_body_over_limit_while_streaming_413(client: httpx.Client):
    def chunks():  # no Content-Length: chunked transfer encoding, 1.5 MiB in 64 KiB pieces
        for _ in range(24):
            yield b"\x00" * 65536

    resp = client.post("/detect", content=chunks(), headers={"Content-Type": "application/octet-stream"})
    assert_problem(resp, 413, "body_too_large")


def test_multipart_over_limit_413(client: httpx.Client):
    noise = np.random.default_rng(0).integers(0, 255, (700, 700, 3), dtype=np.uint8)
    big = encode(noise, "PNG")  # ~1.4 MB incompressible
    assert len(big) > 1024 * 1024
    assert_problem(client.post("/detect", files=files(big)), 413, "body_too_large")


def test_too_many_images_413(client: httpx.Client):
    small = png(16, 16)
    assert_problem(client.post("/detect", files=files(*[small] * 5)), 413, "too_many_images")
    assert_problem(client.post("/detect", json={"images": [b64(small)] * 5}), 413, "too_many_images")
    assert client.post("/detect", files=files(*[small] * 4)).status_code == 200


def test_unsupported_content_type_415(client: httpx.Client):
    assert_problem(client.post("/detect", content=b"a=1", headers={"Content-Type": "text/plain"}), 415)
    assert_problem(client.post("/detect", data={"a": "1"}), 415)  # application/x-www-form-urlencoded


def test_malformed_multipart_400(client: httpx.Client):
    resp = client.post(
        "/detect",
        content=b'--xyz\r\nContent-Disposition: form-data; name="file"\r\n\r\nabc',
        headers={"Content-Type": "multipart/form-data; boundary=xyz"},
    )
    assert "no closing boundary" in assert_problem(resp, 400, "bad_request")["detail"]


def test_truncated_multipart_upload_400_not_no_image(client: httpx.Client):
    """An upload cut inside its file part: 400 malformed multipart (the parser alone saw an empty form)."""
    head = b'--xyz\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n\r\n'
    for body in (head + png(), head + png()[:50]):
        resp = client.post("/detect", content=body, headers={"Content-Type": 'multipart/form-data; boundary="xyz"'})
        assert "truncated" in assert_problem(resp, 400, "bad_request")["detail"]
    whole = client.post("/detect", content=head + png() + b"\r\n--xyz--\r\n",
                        headers={"Content-Type": 'multipart/form-data; boundary="xyz"'})
    assert whole.status_code == 200, whole.text  # the same part, closed, is a normal request


# --------------------------------------------------------------------------------------- auth
def test_api_key_required(anon: httpx.Client):
    body = assert_problem(anon.post("/detect", files=files(png())), 401, "unauthorized")
    assert "API key" in body["detail"]
    assert_problem(anon.post("/detect", files=files(png()), headers={"X-API-Key": "wrong"}), 401)
    assert_problem(anon.post("/detect", files=files(png()), headers={"Authorization": "Bearer wrong"}), 401)
    assert_problem(
        anon.post("/detect", files=files(png()), headers={"Authorization": f"Basic {API_KEY}"}), 401
    )
    assert_problem(anon.get("/models"), 401)
    assert anon.post("/detect", files=files(png()), headers={"X-API-Key": OTHER_API_KEY}).status_code == 200
    assert (
        anon.post("/detect", files=files(png()), headers={"Authorization": f"Bearer {API_KEY}"}).status_code
        == 200
    )
    # every key a request carries must be valid: a wrong or unreadable second one is refused, not ignored
    for auth in ("Bearer wrong", f"Basic {API_KEY}", "Bearer", "garbage"):
        body = assert_problem(anon.get("/models", headers={"X-API-Key": API_KEY, "Authorization": auth}), 401)
        assert "Authorization" in body["detail"] or "invalid API key" in body["detail"], auth
    both = anon.get("/models", headers={"X-API-Key": API_KEY, "Authorization": f"Bearer {OTHER_API_KEY}"})
    assert both.status_code == 200
    # a header sent twice: every value counts, whatever its order
    for name, good, bad in (("X-API-Key", API_KEY, "wrong"), ("Authorization", f"Bearer {API_KEY}", "Bearer wrong"),
                            ("Authorization", f"Bearer {API_KEY}", f"Basic {API_KEY}")):
        for values in ((good, bad), (bad, good)):
            assert_problem(anon.get("/models", headers=[(name, v) for v in values]), 401)
        assert anon.get("/models", headers=[(name, good), (name, good)]).status_code == 200


def test_auth_is_checked_before_the_body(anon: httpx.Client):
    # An unauthenticated client learns nothing about its body (no 413/415/422 before 401).
    assert_problem(anon.post("/detect", content=b"junk", headers={"Content-Type": "text/plain"}), 401)
    assert_problem(anon.post("/detect", json={"image": "!!"}, params={"conf": 9}), 401)


def test_health_metrics_docs_are_open(anon: httpx.Client):
    assert anon.get("/livez").json() == {"status": "alive", "models": None, "integrations": None}
    ready = anon.get("/readyz")
    assert ready.status_code == 200 and sorted(ready.json()["models"]) == ["cls", "det", "seg"]
    assert anon.get("/metrics").status_code == 200
    assert "swagger" in anon.get("/docs").text.lower()
    assert anon.get("/openapi.json").status_code == 200
    for path in ("/livez", "/readyz"):  # load balancers that probe with HEAD
        head = anon.head(path)
        assert head.status_code == 200 and head.content == b"", (path, head.status_code)


def test_docs_page_needs_no_internet(anon: httpx.Client):
    """Factory networks are often offline: every script and style of /docs comes from this server."""
    import re

    page = anon.get("/docs")
    assert page.status_code == 200
    refs = re.findall(r'(?:src|href)=["\']([^"\']+)["\']', page.text)
    refs += re.findall(r"url: ?['\"]([^'\"]+)['\"]", page.text)
    assert refs and all(not r.startswith(("http:", "https:", "//")) for r in refs), refs
    for ref in {r for r in refs if r.endswith((".js", ".css"))}:
        asset = anon.get(ref)
        assert asset.status_code == 200 and len(asset.content) > 10_000, ref
    assert any(r.endswith("swagger-ui-bundle.js") for r in refs)


# --------------------------------------------------------------------------------------- idempotency
def test_idempotency_key_replays_without_computing(client: httpx.Client, server):
    key = uuid.uuid4().hex
    data = png(50, 50, seed=21)
    first = client.post(
        "/detect", files=files(data), headers={"Idempotency-Key": key}, params={"part_id": "A"}
    )
    assert first.status_code == 200 and "idempotent-replayed" not in first.headers
    before = metric(server.metrics(), "s2amnet_images_total", model="det")
    again = client.post(
        "/detect", files=files(data), headers={"Idempotency-Key": key}, params={"part_id": "A"}
    )
    assert again.status_code == 200 and again.headers["idempotent-replayed"] == "true"
    assert again.json() == first.json()  # same result_id, same result
    assert metric(server.metrics(), "s2amnet_images_total", model="det") == before  # nothing computed
    other = client.post(
        "/detect", files=files(data), headers={"Idempotency-Key": key + "-2"}, params={"part_id": "A"}
    )
    assert other.json()["result_id"] != first.json()["result_id"]
    assert metric(server.metrics(), "s2amnet_images_total", model="det") == before + 1


def test_idempotency_key_with_a_different_request_422(client: httpx.Client):
    key = uuid.uuid4().hex
    assert (
        client.post("/detect", files=files(png(seed=1)), headers={"Idempotency-Key": key}).status_code == 200
    )
    assert_problem(
        client.post("/detect", files=files(png(seed=2)), headers={"Idempotency-Key": key}),
        422,
        "idempotency_key_reused",
    )


def test_idempotency_key_is_scoped_by_api_key(anon: httpx.Client):
    key = uuid.uuid4().hex
    data = png(seed=3)
    a = anon.post("/detect", files=files(data), headers={"Idempotency-Key": key, "X-API-Key": API_KEY})
    b = anon.post("/detect", files=files(data), headers={"Idempotency-Key": key, "X-API-Key": OTHER_API_KEY})
    assert a.json()["result_id"] != b.json()["result_id"]


def test_concurrent_requests_with_one_idempotency_key_compute_once(server):
    import asyncio

    key = uuid.uuid4().hex
    data = png(50, 50, seed=22)

    async def go():
        async with httpx.AsyncClient(base_url=server.url, headers={"X-API-Key": API_KEY}, timeout=60) as c:
            return await asyncio.gather(
                *(c.post("/classify", files=files(data), headers={"Idempotency-Key": key}) for _ in range(4))
            )

    responses = asyncio.run(go())
    assert all(r.status_code == 200 for r in responses)
    assert len({r.json()["result_id"] for r in responses}) == 1
    assert sum(r.headers.get("idempotent-replayed") == "true" for r in responses) == 3


# --------------------------------------------------------------------------------------- service
def test_models(client: httpx.Client):
    models = {m["name"]: m for m in client.get("/models").json()["models"]}
    assert set(models) == {"cls", "det", "seg"}
    for name, (task, classes, verdict) in TEST_MODELS.items():
        m = models[name]
        assert (m["task"], m["classes"], m["input_size"], m["default"], m["variant"], m["version"]) == (
            task,
            classes,
            [64, 64],
            True,
            "tiny",
            "1",
        )
        assert m["verdict"]["type"] == verdict["type"]
        assert m["tta"] == []
        assert m["nms_iou"] == (DET_NMS_IOU if task == "detect" else None)


def test_detect_uses_the_models_nms_threshold_unless_asked(client: httpx.Client):
    def boxes(**params):
        r = client.post("/detect", files=files(png(seed=31)), params={"conf": 0.0, **params})
        assert r.status_code == 200, r.text
        return [(d["label"], d["score"], d["box"]) for d in r.json()["defects"]]

    own = boxes()
    assert own == boxes(iou=DET_NMS_IOU)
    assert len(boxes(iou=1.0)) > len(own) > len(boxes(iou=0.1))  # the threshold reaches the NMS


def test_model_cards(client: httpx.Client, anon: httpx.Client, weights_dir):
    card = weights_dir / "det" / "MODEL_CARD.md"
    card.write_text("# det — model card\n\nFinds scratches and dents.\n", encoding="utf-8")
    try:
        models = {m["name"]: m for m in client.get("/models").json()["models"]}
        assert models["det"]["card"] == "/models/det/card" and models["cls"]["card"] is None
        r = client.get("/models/det/card")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/markdown")
        assert r.text.startswith("# det — model card")
        assert_problem(client.get("/models/cls/card"), 404, "not_found")  # no card in its folder
        assert_problem(client.get("/models/nope/card"), 404, "not_found")
        assert_problem(anon.get("/models/det/card"), 401)
    finally:
        card.unlink()


def test_openapi_documents_the_contract(client: httpx.Client):
    spec = client.get("/openapi.json").json()
    for task in ("classify", "detect", "segment"):
        op = spec["paths"][f"/{task}"]["post"]
        assert {"multipart/form-data", "application/json"} <= set(op["requestBody"]["content"])
        ok = op["responses"]["200"]["content"]["application/json"]["schema"]
        assert "anyOf" in ok  # one result object, or a list of them
        for status in ("400", "401", "404", "413", "415", "422", "503", "504"):
            assert "application/problem+json" in op["responses"][status]["content"], status
        names = {p["name"] for p in op["parameters"]}
        assert {
            "conf",
            "iou",
            "max_det",
            "top_k",
            "mask_format",
            "model",
            "station_id",
            "part_id",
            "meas_id",
            "recipe_id",
            "x-request-timeout",
            "idempotency-key",
        } <= names
    assert {"InspectionResult", "ProblemDetails"} <= set(spec["components"]["schemas"])


def test_request_id_is_taken_from_the_client(client: httpx.Client):
    resp = client.post("/classify", files=files(png()), headers={"X-Request-ID": "mes-123.4"})
    assert resp.json()["request_id"] == "mes-123.4" == resp.headers["x-request-id"]
    resp = client.post("/classify", files=files(png()), headers={"X-Request-ID": "bad id with spaces"})
    assert resp.json()["request_id"] != "bad id with spaces"


def test_metrics_count_requests_defects_and_verdicts(client: httpx.Client, server):
    before = server.metrics()
    r = client.post("/detect", files=files(png(seed=30)), params={"conf": 0.0}).json()
    client.post("/detect", files=files(b"garbage"))
    after = server.metrics()
    delta = metric_delta(before, after)

    assert delta("s2amnet_requests_total", endpoint="/detect", status="200") == 1
    assert delta("s2amnet_requests_total", endpoint="/detect", status="415") == 1
    assert delta("s2amnet_rejected_total", reason="unsupported_media_type") == 1
    assert delta("s2amnet_request_duration_seconds_count", endpoint="/detect") == 2
    assert delta("s2amnet_verdicts_total", model="det", verdict=r["verdict"]) == 1
    for label in {d["label"] for d in r["defects"]}:
        assert delta("s2amnet_defects_total", model="det", label=label) == sum(
            d["label"] == label for d in r["defects"]
        )
    assert metric(after, "s2amnet_model_info", model="det", task="detect", version="1", variant="tiny") == 1
    assert metric(after, "s2amnet_queue_depth", model="det") == 0


def test_an_idle_keep_alive_connection_is_still_open_after_six_seconds(server):
    """A client pool (httpx keeps idle connections 5 s, urllib3 indefinitely) reuses a connection after
    an idle pause: the server must not have closed it (uvicorn's default closes after 5 s, which races
    httpx's expiry and shows up as dropped requests under load)."""
    import http.client
    import time
    from urllib.parse import urlsplit

    u = urlsplit(server.url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=10)
    try:
        conn.request("GET", "/livez")
        first = conn.getresponse()
        first.read()
        assert first.status == 200 and first.getheader("connection", "").lower() != "close"
        sock = conn.sock
        time.sleep(6.0)
        conn.request("GET", "/livez")  # http.client does not reconnect on its own: same socket
        again = conn.getresponse()
        again.read()
        assert again.status == 200 and conn.sock is sock
    finally:
        conn.close()
