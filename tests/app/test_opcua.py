"""Results on the plant bus, OPC UA: a real API process serves its results over OPC UA, and an asyncua
client browses the address space and subscribes to a station's nodes."""

from __future__ import annotations

import asyncio
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from asyncua import Client, ua
from prometheus_client import REGISTRY
from support.harness import free_port, running_server
from support.images import png
from support.metrics import metric

from app.line.opcua import NAMESPACE, OpcUaOutlet

N_RESULTS = 20
STATION = "ST-07"


class Changes:
    """asyncua subscription handler: every data change, as (node id string, value)."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, Any]] = []

    def datachange_notification(self, node: Any, value: Any, data: Any) -> None:
        self.seen.append((node.nodeid.Identifier, value))

    def values(self, name: str) -> list[Any]:
        return [v for n, v in self.seen if n == f"Stations/{STATION}/{name}"]


def test_endpoint_is_checked():
    for bad in ("http://h:4840/", "opc.tcp://h/", "opc.tcp://:4840/"):
        with pytest.raises(ValueError):
            OpcUaOutlet(bad)


def test_a_full_queue_drops_the_oldest_and_counts():
    asyncio.run(_burst())


async def _burst() -> None:
    outlet = OpcUaOutlet(f"opc.tcp://127.0.0.1:{free_port()}/s2amnet/", queue=5)
    outlet.offer({"result_id": "early"}, None)  # before start: not running, counted
    before = REGISTRY.get_sample_value("s2amnet_bus_dropped_total", {"bus": "opcua", "reason": "outbox_full"})
    await outlet.start()
    try:
        for i in range(20):  # no await in between: the writer cannot keep up
            outlet.offer({"result_id": f"R-{i}", "station_id": "ST-01", "verdict": "pass",
                          "model": {"name": "det", "version": "1"}, "defects": []}, None)
        assert outlet.queue.qsize() == 5
        await asyncio.wait_for(outlet.queue.join(), 10)
        after = REGISTRY.get_sample_value("s2amnet_bus_dropped_total", {"bus": "opcua", "reason": "outbox_full"})
        assert after - before == 15
        assert outlet.health() | {"last_error": None} == {
            "ok": True, "endpoint": outlet.endpoint, "stations": 1, "queued": 0, "published": 5, "dropped": 16,
            "last_error": None}
        assert outlet.server is not None
        node = outlet.server.get_node(ua.NodeId("Stations/ST-01/ResultId", outlet.idx))
        assert await node.read_value() == "R-19"
    finally:
        await outlet.stop(5)
    assert outlet.health()["ok"] is False


def test_a_subscribed_client_sees_every_result(weights_dir: Path):
    port = free_port()
    endpoint = f"opc.tcp://127.0.0.1:{port}/s2amnet/"
    with running_server("embedded", weights_dir, S2AMNET_MODELS="cls", S2AMNET_OPCUA_ENDPOINT=endpoint,
                        S2AMNET_MAX_DELAY_MS="1") as server:
        answers = asyncio.run(_subscribe_and_inspect(server.url, endpoint))
        health = httpx.get(server.url + "/readyz", timeout=10).json()["integrations"]["opcua"]
        assert health["ok"] is True and health["published"] == N_RESULTS + 1 and health["dropped"] == 0
        text = server.metrics()
        assert metric(text, "s2amnet_bus_published_total", bus="opcua") == N_RESULTS + 1
        assert metric(text, "s2amnet_bus_connected", bus="opcua") == 1
    assert len({a["result_id"] for a in answers}) == N_RESULTS


async def _inspect(http: httpx.AsyncClient, i: int) -> dict:
    resp = await http.post("/classify", files=[("file", ("p.png", png(32, 32, seed=i), "image/png"))],
                           data={"station_id": STATION, "part_id": f"P-{i}"})
    assert resp.status_code == 200, resp.text
    return resp.json()


async def _subscribe_and_inspect(url: str, endpoint: str) -> list[dict]:
    async with httpx.AsyncClient(base_url=url, timeout=30) as http, Client(endpoint, timeout=10) as ua_client:
        idx = await ua_client.get_namespace_index(NAMESPACE)
        service = await ua_client.nodes.objects.get_child([f"{idx}:S2AMNet"])
        assert await (await service.get_child([f"{idx}:State"])).read_value() == "Ready"
        first = await _inspect(http, N_RESULTS)  # the station's nodes appear with its first result
        station = await ua_client.nodes.objects.get_child([f"{idx}:Stations", f"{idx}:{STATION}"])
        names = {(await c.read_browse_name()).Name for c in await station.get_children()}
        assert {"ResultId", "PartId", "Verdict", "DefectCount", "DefectLabels", "Timestamp", "ModelName",
                "ModelVersion", "RecipeId"} <= names

        changes = Changes()
        subscription = await ua_client.create_subscription(20, changes)
        nodes = [ua_client.get_node(ua.NodeId(f"Stations/{STATION}/{n}", idx)) for n in ("ResultId", "Verdict")]
        await subscription.subscribe_data_change(nodes, queuesize=100)
        answers = [await _inspect(http, i) for i in range(N_RESULTS)]
        end = asyncio.get_running_loop().time() + 10
        while len(changes.values("ResultId")) < N_RESULTS + 1 and asyncio.get_running_loop().time() < end:
            await asyncio.sleep(0.05)

        # the first notification is the value at subscription time, then one per result, in order
        assert changes.values("ResultId") == [first["result_id"]] + [a["result_id"] for a in answers]
        assert len(changes.values("Verdict")) >= 1
        assert set(changes.values("Verdict")) <= {"pass", "fail"}
        await _check_latest(ua_client, idx, answers[-1])
        return answers


async def _check_latest(ua_client: Client, idx: int, last: dict) -> None:
    """Every variable of the station holds the last result; the service object counts the results."""

    async def read(path: str) -> Any:
        return await ua_client.get_node(ua.NodeId(path, idx)).read_value()

    base = f"Stations/{STATION}/"
    assert await read(base + "ResultId") == last["result_id"]
    assert await read(base + "PartId") == last["part_id"]
    assert await read(base + "Verdict") == last["verdict"]
    assert await read(base + "DefectCount") == len(last["defects"])
    assert await read(base + "DefectLabels") == [d["label"] for d in last["defects"]]
    assert (await read(base + "ModelName"), await read(base + "ModelVersion")) == ("cls", "1")
    assert await read(base + "RecipeId") == ""
    assert isinstance(await read(base + "Timestamp"), datetime)
    assert await read("S2AMNet/ResultCount") == N_RESULTS + 1
    assert await read("S2AMNet/ModelVersions") == ["cls=1"]
