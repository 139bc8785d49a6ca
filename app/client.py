"""A small typed Python client of the S2-AMNet inspection API, for MES / line integrations.

    from app.client import S2AMNetClient

    with S2AMNetClient("http://inspection:8000", api_key="...") as client:
        result = client.detect("part.jpg", station_id="ST-01", part_id="P-4711")
        if result.verdict == "fail":
            for d in result.defects:
                print(d.label, d.score, d.box)

Images may be file paths, bytes, binary file objects, PIL images or numpy arrays (H×W or H×W×3 uint8).
Results are the pydantic models of `app.schemas` (`InspectionResult`, `ModelInfo`). Errors raise
`S2AMNetError` carrying the RFC 9457 problem. 503 (overloaded / not ready) and connection failures are
retried (`retries`, honouring Retry-After); each call sends an Idempotency-Key (yours or a generated one),
so a retry never computes or counts an image twice.
"""

from __future__ import annotations

import io
import os
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any, BinaryIO

import httpx

from app.schemas import InspectionResult, ModelInfo, ModelsResponse

ImageInput = str | os.PathLike | bytes | bytearray | BinaryIO | Any  # Any: PIL.Image / numpy array

__all__ = ["S2AMNetClient", "S2AMNetError", "InspectionResult", "ModelInfo"]


class S2AMNetError(Exception):
    """An error answer of the API (problem+json) or a transport failure (status 0)."""

    def __init__(self, status: int, problem: dict[str, Any], retry_after: float | None = None):
        self.status = status
        self.problem = problem
        self.code: str | None = problem.get("code")
        self.detail: str = str(problem.get("detail") or problem.get("title") or "")
        self.retry_after = retry_after
        super().__init__(f"{status} {problem.get('title', '')}: {self.detail}".strip())


def _image_bytes(image: ImageInput) -> tuple[str, bytes, str]:
    """(filename, bytes, content type) of one image input."""
    if isinstance(image, (bytes, bytearray)):
        return "image", bytes(image), "application/octet-stream"
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        return path.name, path.read_bytes(), "application/octet-stream"
    if hasattr(image, "read"):
        return getattr(image, "name", "image") or "image", image.read(), "application/octet-stream"
    try:  # PIL image or numpy array: send lossless PNG
        from PIL import Image

        if not isinstance(image, Image.Image):
            import numpy as np

            image = Image.fromarray(np.asarray(image))
        buf = io.BytesIO()
        image.save(buf, "PNG")
        return "image.png", buf.getvalue(), "image/png"
    except Exception as exc:
        raise TypeError(f"cannot send {type(image).__name__} as an image") from exc


class S2AMNetClient:
    """Synchronous client. Thread-safe (one httpx connection pool); use as a context manager or close()."""

    def __init__(
        self,
        base_url: str = "http://localhost:8000",
        api_key: str | None = None,
        *,
        timeout: float = 30.0,
        retries: int = 2,
        backoff_s: float = 0.5,
        transport: httpx.BaseTransport | None = None,
    ):
        headers = {"User-Agent": "s2amnet-client/0.1"}
        if api_key:
            headers["X-API-Key"] = api_key
        self._http = httpx.Client(
            base_url=base_url.rstrip("/"), headers=headers, timeout=timeout, transport=transport
        )
        self.retries = max(0, int(retries))
        self.backoff_s = backoff_s

    # -------------------------------------------------------------------------------- lifecycle
    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> S2AMNetClient:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -------------------------------------------------------------------------------- inspection
    def classify(self, image: ImageInput, **options: Any) -> InspectionResult:
        return self._one("classify", image, options)

    def detect(self, image: ImageInput, **options: Any) -> InspectionResult:
        return self._one("detect", image, options)

    def segment(self, image: ImageInput, **options: Any) -> InspectionResult:
        return self._one("segment", image, options)

    def inspect(self, task: str, image: ImageInput, **options: Any) -> InspectionResult:
        """One image. Options: model, conf, iou, max_det, top_k, mask_format, station_id, part_id, meas_id,
        recipe_id, and `timeout_s` (X-Request-Timeout), `idempotency_key`, `request_id`."""
        return self._one(task, image, options)

    def inspect_many(self, task: str, images: Sequence[ImageInput], **options: Any) -> list[InspectionResult]:
        """Several images in one request (they share a batch); results in the same order."""
        data = self._post(task, list(images), options, many=True)
        return [InspectionResult.model_validate(item) for item in data]

    def _one(self, task: str, image: ImageInput, options: dict[str, Any]) -> InspectionResult:
        return InspectionResult.model_validate(self._post(task, [image], options, many=False))

    # -------------------------------------------------------------------------------- service
    def models(self) -> list[ModelInfo]:
        return ModelsResponse.model_validate(self._request("GET", "/models").json()).models

    def ready(self) -> bool:
        try:
            return self._http.get("/readyz").status_code == 200
        except httpx.HTTPError:
            return False

    def wait_ready(self, timeout: float = 120.0, interval: float = 0.5) -> None:
        deadline = time.monotonic() + timeout
        while not self.ready():
            if time.monotonic() > deadline:
                raise S2AMNetError(0, {"title": "not ready", "detail": f"not ready after {timeout} s"})
            time.sleep(interval)

    # -------------------------------------------------------------------------------- transport
    def _post(self, task: str, images: list[ImageInput], options: dict[str, Any], many: bool) -> Any:
        if task not in ("classify", "detect", "segment"):
            raise ValueError(f"unknown task {task!r}")
        options = dict(options)
        headers = {"Idempotency-Key": str(options.pop("idempotency_key", None) or uuid.uuid4())}
        if options.get("timeout_s") is not None:
            headers["X-Request-Timeout"] = str(options.pop("timeout_s"))
        options.pop("timeout_s", None)
        if options.get("request_id"):
            headers["X-Request-ID"] = str(options.pop("request_id"))
        options.pop("request_id", None)
        fields = {k: str(v) for k, v in options.items() if v is not None}
        parts = [("file", _image_bytes(im)) for im in images]
        if many and len(parts) == 1:
            # one `file` part is answered with an object; ask for a list through JSON instead
            import base64

            payload = {
                "images": [base64.b64encode(parts[0][1][1]).decode()],
                **{k: v for k, v in options.items() if v is not None},
            }
            return self._request("POST", f"/{task}", json=payload, headers=headers).json()
        return self._request("POST", f"/{task}", data=fields, files=parts, headers=headers).json()

    def _request(self, method: str, url: str, **kw: Any) -> httpx.Response:
        attempt = 0
        while True:
            try:
                resp = self._http.request(method, url, **kw)
            except httpx.TransportError as exc:
                if attempt >= self.retries:
                    raise S2AMNetError(0, {"title": "transport error", "detail": str(exc)}) from exc
                delay = self.backoff_s * (2**attempt)
            else:
                if resp.status_code < 400:
                    return resp
                retry_after = _retry_after(resp)
                if resp.status_code != 503 or attempt >= self.retries:
                    raise S2AMNetError(resp.status_code, _problem(resp), retry_after)
                delay = retry_after if retry_after is not None else self.backoff_s * (2**attempt)
            attempt += 1
            time.sleep(min(delay, 30.0))


def _retry_after(resp: httpx.Response) -> float | None:
    value = resp.headers.get("retry-after")
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def _problem(resp: httpx.Response) -> dict[str, Any]:
    try:
        body = resp.json()
        if isinstance(body, dict):
            return body
    except ValueError:
        pass
    return {"title": resp.reason_phrase, "status": resp.status_code, "detail": resp.text[:500]}
