"""Synthesised test images: structured RGB patterns, encoded, EXIF-rotated, or decompression bombs."""

from __future__ import annotations

import io
import struct
import zlib
from typing import Any

import numpy as np
from PIL import Image


def pattern(w: int, h: int, seed: int = 0) -> np.ndarray:
    """An RGB uint8 image with structure (gradients + blocks), different for every seed."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    img = np.stack([(x * 255 // max(w - 1, 1)), (y * 255 // max(h - 1, 1)), ((x + y) * 3) % 256], -1)
    img = img.astype(np.uint8)
    for _ in range(4):
        x0, y0 = rng.integers(0, max(w - 8, 1)), rng.integers(0, max(h - 8, 1))
        img[y0 : y0 + h // 4, x0 : x0 + w // 4] = rng.integers(0, 255, 3)
    return img


def encode(img: Image.Image | np.ndarray, fmt: str = "PNG", **save: Any) -> bytes:
    if isinstance(img, np.ndarray):
        img = Image.fromarray(img)
    buf = io.BytesIO()
    img.save(buf, fmt, **save)
    return buf.getvalue()


def png(w: int = 96, h: int = 64, seed: int = 0) -> bytes:
    return encode(pattern(w, h, seed), "PNG")


def jpeg(w: int = 96, h: int = 64, seed: int = 0, **save: Any) -> bytes:
    return encode(pattern(w, h, seed), "JPEG", quality=95, **save)


def exif_rotated(upright: np.ndarray, fmt: str = "JPEG") -> bytes:
    """Pixel data stored rotated, with EXIF Orientation=6 ("rotate 90 CW to display"): a viewer that
    honours EXIF shows `upright`."""
    stored = Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90)  # 90 CCW
    exif = Image.Exif()
    exif[0x0112] = 6
    save: dict[str, Any] = {"exif": exif}
    if fmt == "JPEG":
        save.update(quality=100, subsampling=0)
    return encode(stored, fmt, **save)


def png_bomb_header(width: int = 100_000, height: int = 100_000) -> bytes:
    """A tiny PNG whose header claims width x height 8-bit grey pixels (a decompression bomb's header;
    decoding it would need width*height bytes)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 1024, 9)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def real_png_bomb(side: int = 6000) -> bytes:
    """A real all-black PNG of side x side pixels: a few KB that decode to side*side bytes."""
    return encode(Image.new("L", (side, side)), "PNG", optimize=True)
