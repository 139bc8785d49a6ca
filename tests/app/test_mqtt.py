"""Results on the plant bus, MQTT: a real mosquitto broker (tests/support/mosquitto.py), real subscribers,
and for the end-to-end test a real API process publishing to it."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from prometheus_client import REGISTRY
from support.harness import free_port, running_server
from support.images import png
from support.metrics import metric
from support.mosquitto import Mosquitto, Subscriber, require_mosquitto, tls_files

from app.line.mqtt import Broker, MqttOutlet, Topics

STATIONS = ("ST-01", "ST-02", "ST-03")


def result(part_id: str, station: str | None = "ST-01", verdict: str = "pass") -> dict:
    """An InspectionResult dict as the pipeline offers it."""
    return {"result_id": str(uuid.uuid4()), "request_id": "r", "model": {"name": "det", "version": "1"},
            "task": "detect", "image": {"width": 8, "height": 8}, "verdict": verdict, "decided_by": "model",
            "recipe": None, "defects": [], "timing_ms": {"queue": 0.0, "inference": 0.0, "total": 0.0},
            "station_id": station, "part_id": part_id, "meas_id": None, "recipe_id": None}


# ------------------------------------------------------------------------------------------- settings
def test_broker_url_parts():
    b = Broker.parse("mqtts://line%40a:p%3Ass@broker.plant:8884?protocol=3.1.1&client_id=cam-7&ca=/etc/ca.pem")
    assert (b.host, b.port, b.tls, b.ca, b.username, b.password, b.client_id) == \
        ("broker.plant", 8884, True, "/etc/ca.pem", "line@a", "p:ss", "cam-7")
    d = Broker.parse("mqtt://10.0.0.5")
    assert (d.port, d.tls, d.username, d.protocol) == (1883, False, None, 5)
    assert d.client_id.startswith("s2amnet-") and d.client_id == Broker.parse("mqtt://10.0.0.5").client_id
    assert Broker.parse("mqtts://h").port == 8883
    for bad in ("http://h", "mqtt://", "mqtt://h?protocol=4", "mqtt://h?qos=2"):
        with pytest.raises(ValueError):
            Broker.parse(bad)
    assert Broker.redact("mqtt://u:secret@h") == "mqtt://u:***@h"


def test_topics_fill_and_sanitise_placeholders():
    t = Topics("s2amnet/{station_id}/result")
    assert t.render(result("p", "ST-01")) == "s2amnet/ST-01/result"
    assert t.render(result("p", None)) == "s2amnet/none/result"
    assert t.render(result("p", "a/b+c#d")) == "s2amnet/a_b_c_d/result"
    assert Topics.verdict_of("s2amnet/ST-01/result") == "s2amnet/ST-01/verdict"
    assert Topics("plant/{model}/{verdict}/{station_id}").render(result("p", "S", "fail")) == "plant/det/fail/S"
    assert Topics.verdict_of("results") == "verdict"
    for bad in ("s2amnet/{station}/result", "s2amnet/+/result", "s2amnet/#"):
        with pytest.raises(ValueError):
            Topics(bad)


# ------------------------------------------------------------------------------------------- the outbox
def _dropped_full() -> float:
    return REGISTRY.get_sample_value("s2amnet_bus_dropped_total", {"bus": "mqtt", "reason": "outbox_full"}) or 0.0


def test_outbox_drops_the_oldest_while_the_broker_is_down_then_delivers_the_rest(tmp_path: Path):
    broker = Mosquitto(tmp_path / "broker").start()
    try:
        # a persistent session subscribed before the outage: the broker keeps its subscription across restarts
        Subscriber(broker.port, "s2amnet/#", client_id="outbox-sub", persistent=True).close()
        broker.stop()
        asyncio.run(_offer_while_down_then_recover(broker))
    finally:
        broker.stop()


async def _offer_while_down_then_recover(broker: Mosquitto) -> None:
    outlet = MqttOutlet(Broker.parse(broker.url(protocol="3.1.1", client_id="outbox-pub")),
                        Topics("s2amnet/{station_id}/result"), outbox=10)
    before = _dropped_full()
    await outlet.start()
    try:
        for i in range(25):
            outlet.offer(result(f"P-{i}"), None)
        await asyncio.sleep(0.3)
        health = outlet.health()
        assert health["ok"] is False and health["queued"] == 10 and health["dropped"] == 15
        assert health["last_error"]
        assert _dropped_full() - before == 15
        assert [json.loads(m.payload)["part_id"] for m in outlet.outbox] == [f"P-{i}" for i in range(15, 25)]

        await asyncio.to_thread(broker.start)
        with Subscriber(broker.port, "s2amnet/#", client_id="outbox-sub", persistent=True) as sub:
            end = time.monotonic() + 20
            while outlet.outbox and time.monotonic() < end:
                await asyncio.sleep(0.05)
            assert outlet.health() | {"last_error": None} == {
                "ok": True, "broker": broker.url(), "queued": 0, "published": 10,
                "dropped": 15, "last_error": None}
            got = await asyncio.to_thread(sub.wait_for, lambda s: len(s.json("/result")) >= 10, 10)
            assert got, sub.received()
            assert [p["part_id"] for _, p in sub.json("/result")] == [f"P-{i}" for i in range(15, 25)]
            # the ten results share a station: its verdict is published once, by the newest, and retained
            verdicts = [p for _, p in sub.json("/verdict")]
            assert [v["part_id"] for v in verdicts] == ["P-24"]
    finally:
        await outlet.stop(5)


def test_results_arrive_in_order_within_the_brokers_receive_maximum(tmp_path: Path):
    with Mosquitto(tmp_path / "broker") as broker, Subscriber(broker.port, "s2amnet/+/result") as sub:
        asyncio.run(_publish_many(broker))
        assert sub.wait_for(lambda s: len(s.received()) >= 300, 20)
        assert [p["part_id"] for _, p in sub.json()] == [f"P-{i}" for i in range(300)]


async def _publish_many(broker: Mosquitto) -> None:
    outlet = MqttOutlet(Broker.parse(broker.url()), Topics("s2amnet/{station_id}/result"))
    await outlet.start()
    try:
        end = time.monotonic() + 10
        while not outlet.connected and time.monotonic() < end:
            await asyncio.sleep(0.02)
        assert outlet.limit == 20  # mosquitto's Receive Maximum (MQTT 5 CONNACK), below INFLIGHT
        peak = 0
        for i in range(300):
            outlet.offer(result(f"P-{i}", STATIONS[i % 3]), None)
            if i % 10 == 9:
                await asyncio.sleep(0)  # let the outlet publish and take acknowledgements
                peak = max(peak, len(outlet.inflight))
        while outlet.outbox and time.monotonic() < end:
            peak = max(peak, len(outlet.inflight))
            await asyncio.sleep(0)
        assert not outlet.outbox and outlet.published == 300 and 0 < peak <= 20
    finally:
        await outlet.stop(5)


def test_tls_with_a_plant_ca_and_a_login(tmp_path: Path):
    """mqtts:// with ?ca= and user:password from the URL: the broker's TLS listener takes the publishes, a
    subscriber on its plain listener sees them."""
    require_mosquitto()
    ca, cert, key = tls_files(tmp_path / "tls")
    tls_port = free_port()
    extra = f"listener {tls_port} 127.0.0.1\ncafile {ca}\ncertfile {cert}\nkeyfile {key}\n"
    with Mosquitto(tmp_path / "broker", extra=extra) as broker, Subscriber(broker.port, "line/#") as sub:
        url = f"mqtts://line%2F3:s%40cret@127.0.0.1:{tls_port}?ca={ca}&client_id=tls-pub"
        asyncio.run(_publish_one(url, Topics("line/{model}/{station_id}")))
        assert sub.wait_for(lambda s: len(s.received()) >= 2, 10), broker.log()[-2000:]
        assert [t for t, _, _ in sub.received()] == ["line/det/ST-09", "line/det/verdict"]
        assert "as tls-pub (p5, c1, k30, u'line/3')" in broker.log()  # MQTT 5, the login from the URL


async def _publish_one(url: str, topics: Topics) -> None:
    outlet = MqttOutlet(Broker.parse(url), topics)
    await outlet.start()
    try:
        outlet.offer(result("P-1", "ST-09"), None)
        end = time.monotonic() + 10
        while outlet.outbox and time.monotonic() < end:
            await asyncio.sleep(0.02)
        assert outlet.health()["published"] == 1, outlet.health()
    finally:
        await outlet.stop(5)


# ------------------------------------------------------------------------------------------- end to end
N_REQUESTS = 500


def test_every_result_reaches_a_persistent_subscriber_across_a_broker_restart(tmp_path: Path,
                                                                              weights_dir: Path):
    require_mosquitto()
    broker = Mosquitto(tmp_path / "broker").start()
    sub = Subscriber(broker.port, "s2amnet/+/result", client_id="e2e-sub", persistent=True)
    try:
        with running_server("embedded", weights_dir, S2AMNET_MODELS="cls", S2AMNET_MQTT_URL=broker.url(),
                            S2AMNET_MAX_DELAY_MS="1") as server:
            statuses, last, down = _inspect_while_restarting(server.url, broker)
            assert statuses == {200: N_REQUESTS}
            # answers went on while the broker was down; their results waited in the outbox
            assert down["ok"] is False and down["queued"] > 0, down
            assert sub.wait_for(lambda s: len({p["part_id"] for _, p in s.json()}) >= N_REQUESTS, 40), \
                f"received {len({p['part_id'] for _, p in sub.json()})} of {N_REQUESTS}\n{broker.log()[-2000:]}"
            assert {p["part_id"] for _, p in sub.json()} == {f"P-{i}" for i in range(N_REQUESTS)}
            assert sub.connects >= 2  # the subscriber itself went through the restart
            health = _wait_flushed(server.url)
            assert health["ok"] is True and health["queued"] == 0 and health["published"] >= N_REQUESTS
            _check_retained_verdicts(broker, last)
            assert metric(server.metrics(), "s2amnet_bus_published_total", bus="mqtt") >= N_REQUESTS
    finally:
        sub.close()
        broker.stop()


def _inspect_while_restarting(url: str, broker: Mosquitto) -> tuple[dict[int, int], dict[str, dict], dict]:
    """N_REQUESTS classify requests with distinct part_ids from 4 threads; the broker restarts (SIGTERM,
    start again) once a third of them are answered. Then one last request per station, in order.
    (status counts, the last answer per station, the MQTT health while the broker was down)."""
    image = png(32, 32)
    answered = threading.Semaphore(0)
    statuses: dict[int, int] = {}
    lock = threading.Lock()

    def inspect(client: httpx.Client, i: int) -> httpx.Response:
        resp = client.post("/classify", files=[("file", ("p.png", image, "image/png"))],
                           data={"station_id": STATIONS[i % 3], "part_id": f"P-{i}"})
        with lock:
            statuses[resp.status_code] = statuses.get(resp.status_code, 0) + 1
        answered.release()
        return resp

    with httpx.Client(base_url=url, timeout=30, limits=httpx.Limits(max_connections=4)) as client:
        body = N_REQUESTS - len(STATIONS)
        with ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(inspect, client, i) for i in range(body)]
            for _ in range(body // 3):
                answered.acquire()
            broker.stop()
            down = _health_while_down(url)
            broker.start()
            for f in futures:
                f.result()
        last = {STATIONS[i % 3]: inspect(client, i).json() for i in range(body, N_REQUESTS)}
    return statuses, last, down


def _health_while_down(url: str) -> dict:
    """The MQTT health once the API has seen the broker go and answered a few more requests (at most 5 s)."""
    end = time.monotonic() + 5
    while True:
        health = httpx.get(url + "/readyz", timeout=10).json()["integrations"]["mqtt"]
        if (not health["ok"] and health["queued"] >= 10) or time.monotonic() > end:
            return health
        time.sleep(0.05)


def _wait_flushed(url: str, timeout: float = 10.0) -> dict:
    """The MQTT outlet's health once its outbox is empty (every publish acknowledged)."""
    end = time.monotonic() + timeout
    while True:
        health = httpx.get(url + "/readyz", timeout=10).json()["integrations"]["mqtt"]
        if health["queued"] == 0 or time.monotonic() > end:
            return health
        time.sleep(0.05)


def _check_retained_verdicts(broker: Mosquitto, last: dict[str, dict]) -> None:
    """A new subscriber gets the retained verdict of every station: that of the station's last result."""
    with Subscriber(broker.port, "s2amnet/+/verdict") as fresh:
        assert fresh.wait_for(lambda s: len(s.received()) >= len(STATIONS), 10), fresh.received()
        retained = {t: (json.loads(p), r) for t, p, r in fresh.received()}
    for station, answer in last.items():
        message, flag = retained[f"s2amnet/{station}/verdict"]
        assert flag is True
        assert message["result_id"] == answer["result_id"] and message["part_id"] == answer["part_id"]
        assert (message["verdict"], message["model"], message["version"]) == (answer["verdict"], "cls", "1")
        assert message["time"].endswith("Z")
