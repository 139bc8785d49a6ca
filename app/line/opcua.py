"""Results on the plant bus: an OPC UA server (asyncua) that shows the latest result of every station.

The server runs in the API process's event loop, at ``opcua_endpoint`` (``opc.tcp://0.0.0.0:4840/s2amnet/``),
without security (the None policy: a plant network, or a gateway in front; see docs/DEPLOY.md).

Address space, in the namespace ``urn:s2amnet:inspection`` (string node ids, so a client can address a node
without browsing: ``ns=<index of the namespace>;s=Stations/ST-01/Verdict``)::

    Objects/
      S2AMNet/                 State ("Ready", "Stopping"), ServiceVersion, ResultCount,
                               ModelVersions ("name=version" of every model that has answered)
      Stations/
        <station_id>/          one object per station, created with its first result ("none": no station_id)
          ResultId, PartId, MeasId, Verdict, DecidedBy, DefectCount, DefectLabels, Timestamp,
          ModelName, ModelVersion, RecipeId, RecipeVersion

`offer` puts the result in a bounded queue (`QUEUE`; when full the oldest waiting result is dropped and
counted) and returns; a task of its own writes the nodes, ResultId last, so that a client notified of a
new ResultId reads the rest of that result.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import logging
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from asyncua import Server, ua

from app import metrics
from app.line import Outlet

if TYPE_CHECKING:
    from app.settings import Settings

log = logging.getLogger("s2amnet.line.opcua")

BUS = "opcua"
NAMESPACE = "urn:s2amnet:inspection"
QUEUE = 1000  # results waiting to be written, at most
S = ua.VariantType

# (browse name, data type) of each station variable, in the order they are written: ResultId last
STATION_VARIABLES: tuple[tuple[str, ua.VariantType], ...] = (
    ("PartId", S.String), ("MeasId", S.String), ("Verdict", S.String), ("DecidedBy", S.String),
    ("DefectCount", S.UInt32), ("DefectLabels", S.String), ("Timestamp", S.DateTime), ("ModelName", S.String),
    ("ModelVersion", S.String), ("RecipeId", S.String), ("RecipeVersion", S.String), ("ResultId", S.String),
)
KINDS = dict(STATION_VARIABLES)
ARRAYS = {"DefectLabels", "ModelVersions"}


def service_version() -> str:
    try:
        return importlib.metadata.version("s2amnet")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def station_values(result: dict[str, Any], at: datetime) -> dict[str, Any]:
    """The value of every station variable for one InspectionResult dict ("" where the result has none)."""
    model = result.get("model") or {}
    recipe = result.get("recipe") or {}
    defects = result.get("defects") or []
    return {
        "PartId": result.get("part_id") or "", "MeasId": result.get("meas_id") or "",
        "Verdict": result.get("verdict") or "", "DecidedBy": result.get("decided_by") or "",
        "DefectCount": len(defects), "DefectLabels": [str(d.get("label", "")) for d in defects],
        "Timestamp": at, "ModelName": model.get("name") or "", "ModelVersion": model.get("version") or "",
        "RecipeId": result.get("recipe_id") or recipe.get("id") or "", "RecipeVersion": recipe.get("version") or "",
        "ResultId": result.get("result_id") or "",
    }


class OpcUaOutlet(Outlet):
    name = "opcua"

    def __init__(self, endpoint: str, queue: int = QUEUE):
        parts = urlsplit(endpoint)
        if parts.scheme != "opc.tcp" or not parts.hostname or not parts.port:
            raise ValueError(f"OPC UA endpoint must be opc.tcp://host:port/path, got {endpoint!r}")
        self.endpoint = endpoint
        self.queue: asyncio.Queue[tuple[dict[str, Any], datetime]] = asyncio.Queue(queue)
        self.server: Server | None = None
        self.idx = 0
        self.stations: dict[str, dict[str, ua.NodeId]] = {}
        self.service: dict[str, ua.NodeId] = {}
        self.models: list[str] = []
        self.running = False
        self.published = 0
        self.dropped = 0
        self.last_error: str | None = None
        self._writer: asyncio.Task[None] | None = None
        metrics.init_bus_series(BUS)

    @classmethod
    def from_settings(cls, settings: Settings) -> OpcUaOutlet:
        if not settings.opcua_endpoint:
            raise ValueError("opcua_endpoint is not set")
        return cls(settings.opcua_endpoint)

    # -------------------------------------------------------------------- the request path
    def offer(self, result: dict[str, Any], image: bytes | None = None) -> None:
        if not self.running:
            self._drop("error", "the OPC UA server is not running")
            return
        if self.queue.full():
            with contextlib.suppress(asyncio.QueueEmpty):
                self.queue.get_nowait()
                self.queue.task_done()
            self._drop("outbox_full", None)
        self.queue.put_nowait((result, datetime.now(UTC)))
        metrics.BUS_OUTBOX.labels(bus=BUS).set(self.queue.qsize())

    def _drop(self, reason: str, error: str | None) -> None:
        self.dropped += 1
        metrics.BUS_DROPPED.labels(bus=BUS, reason=reason).inc()
        if error:
            self.last_error = error
        if self.dropped == 1 or self.dropped % 1000 == 0:
            log.warning("OPC UA: result not written (%s; %d so far)", error or reason, self.dropped)

    # -------------------------------------------------------------------- writing the nodes
    async def _write_loop(self) -> None:
        while True:
            result, at = await self.queue.get()
            try:
                await self._write(result, at)
                self.published += 1
                metrics.BUS_PUBLISHED.labels(bus=BUS).inc()
            except Exception as exc:  # noqa: BLE001 - one bad result does not stop the writer
                self._drop("error", f"{type(exc).__name__}: {exc}")
            finally:
                self.queue.task_done()
                metrics.BUS_OUTBOX.labels(bus=BUS).set(self.queue.qsize())

    async def _write(self, result: dict[str, Any], at: datetime) -> None:
        nodes = await self._station(result.get("station_id") or "none")
        for name, value in station_values(result, at).items():
            await self._set(nodes[name], value, KINDS[name], at)
        model = result.get("model") or {}
        tag = f"{model.get('name')}={model.get('version')}"
        if tag not in self.models:
            self.models.append(tag)
            await self._set(self.service["ModelVersions"], list(self.models), S.String, at)
        await self._set(self.service["ResultCount"], self.published + 1, S.UInt64, at)

    async def _set(self, node: ua.NodeId, value: Any, kind: ua.VariantType, at: datetime) -> None:
        assert self.server is not None
        await self.server.write_attribute_value(
            node, ua.DataValue(ua.Variant(value, kind), SourceTimestamp=at, ServerTimestamp=datetime.now(UTC)))

    async def _station(self, station_id: str) -> dict[str, ua.NodeId]:
        """The node ids of a station's variables; its object is created on first use."""
        nodes = self.stations.get(station_id)
        if nodes is None:
            assert self.server is not None
            parent = self.server.get_node(ua.NodeId("Stations", self.idx))
            obj = await parent.add_object(ua.NodeId(f"Stations/{station_id}", self.idx),
                                          ua.QualifiedName(station_id, self.idx))
            nodes = {}
            for name, kind in STATION_VARIABLES:
                nodes[name] = await self._variable(obj, f"Stations/{station_id}/{name}", name, kind)
            self.stations[station_id] = nodes
        return nodes

    async def _variable(self, parent: Any, node_id: str, name: str, kind: ua.VariantType) -> ua.NodeId:
        initial: Any = {S.String: "", S.UInt32: 0, S.UInt64: 0, S.DateTime: datetime.now(UTC)}[kind]
        array = name in ARRAYS
        node = await parent.add_variable(ua.NodeId(node_id, self.idx), ua.QualifiedName(name, self.idx),
                                         ua.Variant([] if array else initial, kind), varianttype=kind)
        if array:
            await node.write_value_rank(ua.ValueRank.OneDimension)
        return node.nodeid

    # -------------------------------------------------------------------- lifecycle
    async def _build(self, server: Server) -> None:
        self.idx = await server.register_namespace(NAMESPACE)
        objects = server.nodes.objects
        service = await objects.add_object(ua.NodeId("S2AMNet", self.idx), ua.QualifiedName("S2AMNet", self.idx))
        for name, kind in (("State", S.String), ("ServiceVersion", S.String), ("ResultCount", S.UInt64),
                           ("ModelVersions", S.String)):
            self.service[name] = await self._variable(service, f"S2AMNet/{name}", name, kind)
        await objects.add_object(ua.NodeId("Stations", self.idx), ua.QualifiedName("Stations", self.idx))

    async def start(self) -> None:
        if logging.getLogger("asyncua").level == logging.NOTSET:
            logging.getLogger("asyncua").setLevel(logging.WARNING)  # its INFO lines are per request
        server = Server()
        await server.init()
        server.set_endpoint(self.endpoint)
        server.set_server_name("S2AMNet inspection")
        server.set_security_policy([ua.SecurityPolicyType.NoSecurity])
        await server.set_application_uri(f"{NAMESPACE}:server")
        self.server = server
        await self._build(server)
        await server.start()
        now = datetime.now(UTC)
        await self._set(self.service["ServiceVersion"], service_version(), S.String, now)
        await self._set(self.service["State"], "Ready", S.String, now)
        self.running = True
        metrics.BUS_CONNECTED.labels(bus=BUS).set(1)
        self._writer = asyncio.create_task(self._write_loop(), name="s2amnet-opcua-writer")
        log.info("OPC UA server at %s (namespace %s, no security: keep it on the plant network)",
                 self.endpoint, NAMESPACE)

    async def stop(self, timeout: float) -> None:
        """Write what is queued (at most ``timeout`` seconds), show State "Stopping", stop the server."""
        if self.server is None:
            return
        self.running = False
        with contextlib.suppress(Exception):
            await self._set(self.service["State"], "Stopping", S.String, datetime.now(UTC))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.queue.join(), timeout)
        if self._writer is not None:
            self._writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._writer
        try:
            await self.server.stop()
        finally:
            self.server = None
            metrics.BUS_CONNECTED.labels(bus=BUS).set(0)
            metrics.BUS_OUTBOX.labels(bus=BUS).set(0)

    def health(self) -> dict[str, Any]:
        return {"ok": self.running, "endpoint": self.endpoint, "stations": len(self.stations),
                "queued": self.queue.qsize(), "published": self.published, "dropped": self.dropped,
                "last_error": self.last_error}
