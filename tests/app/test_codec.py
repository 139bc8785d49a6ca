"""app.codec: every input mode becomes upright 8-bit grey (L) or RGB; bad input becomes the right problem."""

from __future__ import annotations

import base64
import functools

import numpy as np
import pytest
from PIL import Image
from support.images import encode, exif_rotated, jpeg, pattern, png, png_bomb_header, real_png_bomb

from app.codec import decode_base64, decode_image, upright_size
from app.errors import Problem

LIMIT = 40_000_000


def decode(data: bytes, **kw) -> Image.Image:
    return decode_image(data, max_pixels=kw.pop("max_pixels", LIMIT), min_side=kw.pop("min_side", 8), **kw)


def problem_of(data: bytes, **kw) -> Problem:
    with pytest.raises(Problem) as info:
        decode(data, **kw)
    return info.value


def test_rgb_png_roundtrip_is_exact():
    arr = pattern(50, 30)
    out = decode(encode(arr, "PNG"))
    assert out.mode == "RGB" and out.size == (50, 30)
    assert np.array_equal(np.asarray(out), arr)


@pytest.mark.parametrize(
    "mode, fmt, decoded",
    [
        ("L", "PNG", "L"),
        ("L", "JPEG", "L"),
        ("1", "PNG", "L"),
        ("P", "PNG", "RGB"),
        ("RGBA", "PNG", "RGB"),
        ("LA", "PNG", "L"),
        ("CMYK", "JPEG", "RGB"),
        ("CMYK", "TIFF", "RGB"),
        ("I;16", "PNG", "L"),
        ("I", "TIFF", "L"),
        ("F", "TIFF", "L"),
        ("RGB", "BMP", "RGB"),
        ("RGB", "WEBP", "RGB"),
        ("RGB", "GIF", "RGB"),  # GIF keeps a palette: colour
        ("YCbCr", "JPEG", "RGB"),
    ],
)
def test_every_mode_becomes_8_bit_grey_or_rgb(mode, fmt, decoded):
    base = Image.fromarray(pattern(40, 24))
    if mode == "I;16":
        img = Image.fromarray(np.asarray(base.convert("L")).astype(np.uint16) * 257)
    elif mode == "I":
        img = Image.fromarray(np.asarray(base.convert("L")).astype(np.int32) * 257)
    elif mode == "F":
        img = Image.fromarray(np.asarray(base.convert("L")).astype(np.float32) / 255.0)
    else:
        img = base.convert(mode)
    out = decode(encode(img, fmt))
    assert out.mode == decoded and out.size == (40, 24)
    arr = np.asarray(out)
    assert arr.dtype == np.uint8 and arr.std() > 10  # real content, not a blank/saturated image


def test_16_bit_grey_is_scaled_not_clipped():
    grey = np.linspace(0, 65535, 32 * 16).reshape(16, 32).astype(np.uint16)
    out = np.asarray(decode(encode(Image.fromarray(grey), "PNG")))
    assert np.array_equal(out, ((grey.astype(np.uint32) + 128) // 257).astype(np.uint8))
    assert out.min() == 0 and out.max() == 255  # a naive convert("RGB") saturates everything > 255


def test_a_16_bit_image_is_seen_alike_by_the_api_the_dataset_readers_and_eval(tmp_path):
    """One decoding rule: a 16-bit image that does not span the full range (a 12-bit camera, 0..4000) gives
    identical pixels through the API's decoding, the dataset readers (training) and `s2amnet eval`'s
    preprocessing — full-range scaling everywhere, not each image's own maximum in training."""
    from model.data import load_records
    from model.data.datasets import decode_image as dataset_decode
    from model.transforms import prepare

    grey = np.linspace(0, 4000, 48 * 40).reshape(40, 48).astype(np.uint16)
    folder = tmp_path / "data" / "scratch"
    folder.mkdir(parents=True)
    Image.fromarray(grey).save(folder / "part.png")
    (tmp_path / "data" / "ok").mkdir()
    Image.fromarray(grey).save(tmp_path / "data" / "ok" / "good.png")
    expected = ((grey.astype(np.uint32) + 128) // 257).astype(np.uint8)

    api = np.asarray(decode((folder / "part.png").read_bytes()))
    rec = next(r for r in load_records(tmp_path / "data").records if r.stem == "part")
    reader = rec.load_image()
    training = dataset_decode(rec.image)  # grey content: one channel
    assert np.array_equal(api, expected) and expected.max() == 16
    assert np.array_equal(reader, np.dstack([api] * 3)) and np.array_equal(training, api)
    # eval preprocesses what the reader decoded, the service what the API decoded: the same model input
    a, _ = prepare(Image.fromarray(api), (32, 32), "letterbox", 114)
    b, _ = prepare(reader, (32, 32), "letterbox", 114)
    assert np.array_equal(a, b)


def test_32_bit_integer_grey_keeps_8_bit_values():
    """A 32-bit integer image (TIFF mode "I") holding 0..255 is 8-bit data: kept, not shifted to black;
    the same rule as model.transforms.to_uint8 (training, eval, `s2amnet predict`)."""
    from model.transforms import to_uint8

    grey = pattern(32, 16)[..., 0]
    img = Image.fromarray(grey.astype(np.int32))
    assert img.mode == "I"
    out = np.asarray(decode(encode(img, "TIFF")))
    assert np.array_equal(out, grey) and np.array_equal(out, to_uint8(img))


def test_palette_with_transparency_and_rgba_keep_colours():
    arr = pattern(20, 20)
    rgba = np.dstack([arr, np.full((20, 20), 7, np.uint8)])  # almost transparent
    out = np.asarray(decode(encode(Image.fromarray(rgba, "RGBA"), "PNG")))
    assert np.array_equal(out, arr)  # alpha dropped, colours as captured
    p = Image.fromarray(arr).convert("P")
    p.info["transparency"] = 0
    out = decode(encode(p, "PNG", transparency=0))
    assert out.mode == "RGB" and out.size == (20, 20)


def test_cmyk_jpeg_colours_are_converted():
    cmyk = Image.new("CMYK", (16, 16), (0, 255, 255, 0))  # pure red in CMYK
    r, g, b = np.asarray(decode(encode(cmyk, "JPEG", quality=100))).reshape(-1, 3).mean(0)
    assert r > 200 and g < 60 and b < 60


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_exif_orientation_gives_the_upright_image(fmt):
    upright = pattern(64, 40, seed=3)  # W=64, H=40
    out = decode(exif_rotated(upright, fmt))
    assert out.size == (64, 40)  # not the stored 40x64
    diff = np.abs(np.asarray(out).astype(int) - upright.astype(int))
    assert diff.mean() < (4 if fmt == "JPEG" else 1e-9)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_the_upright_size_comes_from_the_header(fmt):
    upright = pattern(64, 40, seed=3)
    size = functools.partial(upright_size, max_pixels=LIMIT, min_side=8)
    assert size(exif_rotated(upright, fmt)) == (64, 40)  # stored 40x64, turned by its EXIF orientation
    assert size(encode(Image.fromarray(upright), fmt)) == (64, 40)
    assert size(png_bomb_header(3000, 2000)) == (3000, 2000)  # no pixel decoded
    truncated = encode(Image.fromarray(upright), fmt)[:-40]
    assert size(truncated) == (64, 40)  # only the header is read
    # what decode_image refuses from the header alone, refused alike
    for data in (b"not an image", b"", png_bomb_header(100_000, 100_000), png(4, 40)):
        expected = problem_of(data)
        with pytest.raises(Problem) as raised:
            size(data)
        assert (raised.value.status, raised.value.code) == (expected.status, expected.code)


def test_decompression_bomb_header_is_refused_before_decoding():
    p = problem_of(png_bomb_header(100_000, 100_000))
    assert p.status == 413 and p.code == "too_many_pixels"


def test_real_bomb_over_the_limit_is_refused():
    data = real_png_bomb(3000)  # 9 Mpx in a few KB
    assert len(data) < 100_000
    p = problem_of(data, max_pixels=4_000_000)
    assert p.status == 413


@pytest.mark.parametrize(
    "data, status, code",
    [
        (b"", 400, "bad_image"),
        (b"hello, this is not an image at all", 415, "unsupported_media_type"),
        (b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj", 415, "unsupported_media_type"),
        (b"\x89PNG\r\n\x1a\n" + b"\x00garbage" * 20, 400, "bad_image"),
        (b"\xff\xd8\xff\xe0" + b"\x00" * 50, 400, "bad_image"),
    ],
)
def test_bad_bytes(data, status, code):
    p = problem_of(data)
    assert (p.status, p.code) == (status, code)


@pytest.mark.parametrize("fmt", ["ICO", "EPS"])
def test_undocumented_formats_are_415_without_their_parser(fmt, monkeypatch):
    """Only the documented formats are opened: EPS would go through Ghostscript, ICO is not promised."""
    if fmt == "ICO":
        data = encode(pattern(32, 32), "ICO")
    else:
        data = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 32 32\n0 0 moveto 32 32 lineto stroke\n%%EOF\n"
    from PIL import EpsImagePlugin

    monkeypatch.setattr(EpsImagePlugin, "gs_windows_binary", None, raising=False)
    calls = []
    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", lambda *a, **k: calls.append(a), raising=False)
    p = problem_of(data)
    assert (p.status, p.code) == (415, "unsupported_media_type") and not calls


def test_truncated_jpeg_and_png():
    for full in (jpeg(200, 150), png(200, 150)):
        p = problem_of(full[: len(full) // 2])
        assert p.status == 400 and p.code == "bad_image"


def test_tiny_images_are_refused():
    for w, h in [(1, 1), (1, 50), (50, 7)]:
        p = problem_of(encode(pattern(w, h), "PNG"))
        assert p.status == 400 and "smaller than" in p.detail
    assert decode(encode(pattern(8, 8), "PNG")).size == (8, 8)


def test_base64_variants():
    raw = png(16, 16)
    std = base64.b64encode(raw).decode()
    assert decode_base64(std) == raw
    assert decode_base64(base64.urlsafe_b64encode(raw).decode().rstrip("=")) == raw
    assert decode_base64("data:image/png;base64," + std) == raw
    assert decode_base64(std[:40] + "\n" + std[40:]) == raw
    for bad in ["!!!!", "abc$", "data:image/png,xyz", "a"]:
        with pytest.raises(Problem) as info:
            decode_base64(bad)
        assert info.value.status == 400 and "base64" in info.value.detail
