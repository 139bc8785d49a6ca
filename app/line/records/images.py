"""The recorded input images: one file per kept image under ``<records_dir>/images/YYYY/MM/DD/``.

The record stores the path relative to the images folder (the folder may be mounted elsewhere on another
replica), the content type sniffed from the file's first bytes and its size (for the disk budget).
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

OCTET_STREAM = "application/octet-stream"
_SAFE_ID = re.compile(r"[^A-Za-z0-9_.-]")

# content type -> file extension
EXTENSIONS = {
    "image/jpeg": ".jpg",
    "image/png": ".png",
    "image/bmp": ".bmp",
    "image/tiff": ".tif",
    "image/webp": ".webp",
    OCTET_STREAM: ".bin",
}


def sniff(data: bytes) -> str:
    """The content type of an image from its magic bytes; application/octet-stream when none matches."""
    if data.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if data.startswith(b"BM"):
        return "image/bmp"
    if data.startswith((b"II*\x00", b"MM\x00*")):
        return "image/tiff"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return OCTET_STREAM


@dataclass(frozen=True)
class StoredImage:
    path: str  # relative to the images folder, '/'-separated
    content_type: str
    size: int


class ImageFolder:
    """Writes, reads and removes recorded images under ``root``."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def write(self, result_id: str, recorded_at: datetime, data: bytes) -> StoredImage:
        """Write ``data`` atomically (a temporary file renamed into place); OSError when it cannot."""
        content_type = sniff(data)
        name = _SAFE_ID.sub("_", result_id) + EXTENSIONS[content_type]
        rel = f"{recorded_at:%Y/%m/%d}/{name}"
        target = self.root / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        return StoredImage(rel, content_type, len(data))

    def resolve(self, rel: str) -> Path | None:
        """The file of a stored relative path, None when it would leave the images folder."""
        root = self.root.resolve()
        path = (root / rel).resolve()
        return path if path.is_relative_to(root) else None

    def read(self, rel: str) -> bytes | None:
        path = self.resolve(rel)
        if path is None:
            return None
        try:
            return path.read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return None

    def remove(self, rel: str) -> None:
        """Remove one image (already gone: nothing to do)."""
        path = self.resolve(rel)
        if path is not None:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
