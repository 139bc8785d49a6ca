"""Image decoding with limits: bytes -> upright RGB PIL image, or a Problem (400/413/415).

- The pixel limit is checked from the header (`Image.open` reads only the header) before any pixel is
  decoded, so a decompression bomb (a small file claiming a huge size) costs nothing.
- EXIF orientation is applied (`ImageOps.exif_transpose`): width/height and all coordinates of a result
  refer to the upright image.
- Any mode becomes 8-bit RGB: grayscale, 1-bit, palette (with or without transparency), RGBA/LA (alpha
  dropped), CMYK, YCbCr/LAB/HSV, 16-bit integer (scaled from the full 16-bit range) and float images (0..1 and
  0..255 kept, other ranges stretched) — the same conversion as the dataset readers (`model.transforms`).
- Errors: empty, truncated, corrupt data of a known image format, or an image smaller than
  `min_image_side` -> 400 (`bad_image`); data that is not an image format PIL reads -> 415; too many pixels
  -> 413.
"""

from __future__ import annotations

import base64
import binascii
import io
import warnings

from PIL import Image, ImageOps, UnidentifiedImageError

from app.errors import Problem, bad_image, too_large, unsupported_media
from model.transforms import turned_by_exif

# Leading bytes of image formats PIL can decode: data starting like this but failing to decode is a
# corrupt image (400), anything else is not an image (415).
_MAGIC = (
    b"\xff\xd8\xff",  # JPEG
    b"\x89PNG\r\n\x1a\n",
    b"GIF87a",
    b"GIF89a",
    b"BM",  # BMP
    b"II*\x00",
    b"MM\x00*",  # TIFF
    b"RIFF",  # WEBP (RIFF....WEBP)
    b"P1",
    b"P2",
    b"P3",
    b"P4",
    b"P5",
    b"P6",  # PNM
    b"\x00\x00\x00\x0cjP  ",  # JPEG 2000
)

# The only formats PIL may open: the documented ones (PIL's JPEG opener also takes the multi-picture
# JPEGs some cameras write). Others (EPS, which PIL renders through Ghostscript, ICO, PSD, ...) are
# refused before any of their parsers sees the bytes.
FORMATS = ("JPEG", "PNG", "GIF", "BMP", "TIFF", "WEBP", "PPM", "JPEG2000")

# PIL refuses images above 2*MAX_IMAGE_PIXELS on its own; our limit (checked first) is the real one.
Image.MAX_IMAGE_PIXELS = None


def looks_like_image(data: bytes) -> bool:
    return any(data.startswith(m) for m in _MAGIC)


def decode_base64(text: str, index: int = 0) -> bytes:
    """Standard or URL-safe base64, optionally as a `data:image/...;base64,` URL -> bytes, or 400."""
    if not isinstance(text, str):
        raise bad_image(f"image {index}: expected a base64 string")
    payload = text.strip()
    if payload.startswith("data:"):
        head, sep, rest = payload.partition(",")
        if not sep or ";base64" not in head:
            raise bad_image(f"image {index}: data URL must be base64-encoded")
        payload = rest
    payload = "".join(payload.split())  # tolerate line breaks
    if "-" in payload or "_" in payload:
        payload = payload.replace("-", "+").replace("_", "/")
    payload += "=" * (-len(payload) % 4)
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise bad_image(f"image {index}: invalid base64 ({exc})") from None


def _to_8bit(img: Image.Image) -> Image.Image:
    """Any mode → 8-bit grey (L) or RGB by the conversion that training and evaluation use too
    (`model.transforms.to_uint8`)."""
    if img.mode in ("L", "RGB"):
        return img
    from model.transforms import to_uint8

    return Image.fromarray(to_uint8(img))


def decode_image(data: bytes, *, max_pixels: int, min_side: int = 1, index: int = 0) -> Image.Image:
    """Bytes -> upright 8-bit image, grey (L) or RGB, fully loaded; or raise a Problem."""
    img = _open(data, max_pixels=max_pixels, min_side=min_side, index=index)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img.load()  # truncated / corrupt data fails here (LOAD_TRUNCATED_IMAGES stays False)
            img = ImageOps.exif_transpose(img) or img
            img = _to_8bit(img)
            img.load()
    except Problem:
        raise
    except MemoryError:
        raise too_large("too_many_pixels", f"image {index}: too large to decode") from None
    except Exception as exc:
        raise bad_image(
            f"image {index}: corrupt or truncated image data ({type(exc).__name__}: {exc})"
        ) from None
    return img


def upright_size(data: bytes, *, max_pixels: int, min_side: int = 1, index: int = 0) -> tuple[int, int]:
    """(width, height) of the upright image from its header alone, no pixel decoded (EXIF orientations that
    turn it by 90 degrees swap the two); raises the Problem `decode_image` raises for that header."""
    with _open(data, max_pixels=max_pixels, min_side=min_side, index=index) as img:
        width, height = img.size
        try:  # a PNG's EXIF may follow its pixel data: truncated or corrupt data ends the search
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                turned = turned_by_exif(img)
        except Exception:  # noqa: BLE001
            turned = False
    return (height, width) if turned else (width, height)


def _open(data: bytes, *, max_pixels: int, min_side: int, index: int) -> Image.Image:
    """The image of ``data`` opened from its header (format, size) and checked against the limits; or raise a
    Problem."""
    if not data:
        raise bad_image(f"image {index}: empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img = Image.open(io.BytesIO(data), formats=FORMATS)
    except UnidentifiedImageError:
        if looks_like_image(data):
            raise bad_image(f"image {index}: corrupt image data") from None
        raise unsupported_media(
            f"image {index}: not a supported image format (JPEG, PNG, BMP, TIFF, WEBP, GIF, PNM, JPEG 2000)"
        ) from None
    except Image.DecompressionBombError as exc:  # pragma: no cover - MAX_IMAGE_PIXELS is disabled
        raise too_large("too_many_pixels", f"image {index}: {exc}") from None
    except Exception as exc:  # any other parser failure on the header
        raise bad_image(f"image {index}: unreadable image header ({type(exc).__name__})") from None

    width, height = img.size
    if width * height > max_pixels:
        raise too_large(
            "too_many_pixels",
            f"image {index}: {width}x{height} = {width * height} pixels exceeds the limit of {max_pixels}",
        )
    if width < min_side or height < min_side:
        raise bad_image(f"image {index}: {width}x{height} is smaller than {min_side} px on a side")
    return img
