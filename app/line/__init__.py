"""Line integration: what happens to each answered result besides the answer.

An *outlet* takes every result the API answers (recorded by `app.line.records`, published on the plant bus
by `app.line.mqtt` and `app.line.opcua`). Outlets work off the request path:

- `offer(result, image)` is called on the event loop once the answer is assembled, before it is sent. It
  must return at once and never raise: an outlet puts the result in its own bounded queue and a task or
  thread of its own does the slow part. What an outlet cannot take (queue full, store down) it counts in
  its metrics and logs; the answer goes out regardless.
- `health()` is shown in `/readyz` (``integrations``) but never makes the service unready.
- `stop(timeout)` flushes what is queued, for at most ``timeout`` seconds, at shutdown.

`Outlets` fans each result out to every configured outlet; `create_outlets(settings)` builds them from the
settings (records on by default; MQTT and OPC UA when their URL / endpoint is set).
"""

from __future__ import annotations

import abc
import asyncio
import logging
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from app.settings import Settings

log = logging.getLogger("s2amnet.line")

__all__ = ["Outlet", "Outlets", "create_outlets"]


class Outlet(abc.ABC):
    """One destination of answered results."""

    name: str = "outlet"

    def wants_image(self) -> bool:
        """Whether `offer` may need the request's image bytes (e.g. the records keep failed parts' images)."""
        return False

    async def start(self) -> None:  # noqa: B027 - optional
        """Open connections, start the outlet's task or thread. Must not raise for an unreachable peer:
        the outlet retries in the background and says so in `health()`."""

    @abc.abstractmethod
    def offer(self, result: dict[str, Any], image: bytes | None) -> None:
        """Take one answered InspectionResult dict (and, when `wants_image`, the image bytes it was computed
        from). Non-blocking, never raises."""

    async def stop(self, timeout: float) -> None:  # noqa: B027 - optional
        """Flush what is queued (at most ``timeout`` seconds), then close."""

    def health(self) -> dict[str, Any]:
        """``{"ok": bool, ...}``: e.g. connected, queued, last error."""
        return {"ok": True}


class Outlets:
    """Every configured outlet; each result is offered to all of them."""

    def __init__(self, outlets: list[Outlet] | None = None):
        self.outlets = list(outlets or [])

    def __bool__(self) -> bool:
        return bool(self.outlets)

    def wants_images(self) -> bool:
        return any(o.wants_image() for o in self.outlets)

    async def start(self) -> None:
        for outlet in self.outlets:
            try:
                await outlet.start()
            except Exception:  # noqa: BLE001 - an outlet never stops the service
                log.exception("%s could not start; answers go out without it", outlet.name)

    def offer(self, result: dict[str, Any], image: bytes | None = None) -> None:
        for outlet in self.outlets:
            try:
                outlet.offer(result, image)
            except Exception:  # noqa: BLE001 - never an error to the client
                log.exception("%s refused a result", outlet.name)

    async def stop(self, timeout: float) -> None:
        if self.outlets:
            await asyncio.gather(*(self._stop(o, timeout) for o in self.outlets))

    @staticmethod
    async def _stop(outlet: Outlet, timeout: float) -> None:
        try:
            await asyncio.wait_for(outlet.stop(timeout), timeout + 1.0)
        except Exception:  # noqa: BLE001
            log.exception("%s did not stop cleanly", outlet.name)

    def health(self) -> dict[str, dict[str, Any]]:
        out = {}
        for outlet in self.outlets:
            try:
                out[outlet.name] = outlet.health()
            except Exception as exc:  # noqa: BLE001
                out[outlet.name] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        return out


def create_outlets(settings: Settings) -> Outlets:
    """The outlets ``settings`` ask for: records (unless ``records`` is off), MQTT (``mqtt_url``), OPC UA
    (``opcua_endpoint``). Each is imported only when configured."""
    outlets: list[Outlet] = []
    if settings.records:
        from app.line.records import RecordOutlet  # noqa: PLC0415

        outlets.append(RecordOutlet.from_settings(settings))
    if settings.mqtt_url:
        from app.line.mqtt import MqttOutlet  # noqa: PLC0415

        outlets.append(MqttOutlet.from_settings(settings))
    if settings.opcua_endpoint:
        from app.line.opcua import OpcUaOutlet  # noqa: PLC0415

        outlets.append(OpcUaOutlet.from_settings(settings))
    return Outlets(outlets)
