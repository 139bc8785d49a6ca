"""Results on the plant bus: every answered result published to an MQTT broker (QoS 1, at least once).

`MqttOutlet.offer` puts each result in a bounded outbox (``mqtt_outbox``; when full, the oldest is dropped
and counted) and returns at once. paho-mqtt's network thread connects and reconnects (backoff up to 5 s);
the outlet publishes from the outbox in order, at most `INFLIGHT` publishes unacknowledged (fewer when an
MQTT 5 broker's Receive Maximum says so), and removes a result only once the broker acknowledged it
(PUBACK). After a lost connection everything unacknowledged is published again from the oldest on: a
broker restart loses nothing, and a subscriber may see a result twice.

Topics: each result on ``mqtt_topic`` with {station_id}, {model}, {verdict} filled in (wildcards and '/'
in a value become '_'; a missing station reads "none"); the last verdict per topic prefix is retained on
the same prefix with "verdict" as the last level (``s2amnet/ST-01/verdict``).
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import json
import logging
import os
import socket
import string
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, unquote, urlsplit

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode

from app import metrics
from app.line import Outlet

if TYPE_CHECKING:
    from app.settings import Settings

log = logging.getLogger("s2amnet.line.mqtt")

BUS = "mqtt"
INFLIGHT = 200  # publishes not yet acknowledged, at most
RECONNECT_MIN_S = 0.5
RECONNECT_MAX_S = 5.0
STOP_WHILE_DOWN_S = 5.0  # stop() gives up flushing after the broker has been unreachable this long
PLACEHOLDERS = ("station_id", "model", "verdict")
_UNSAFE = str.maketrans({"+": "_", "#": "_", "/": "_"})


# ------------------------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class Broker:
    """Where and how to connect, from ``mqtt[s]://user:pass@host:port?protocol=5|3.1.1&client_id=..&ca=..``."""

    host: str
    port: int
    tls: bool = False
    ca: str | None = None
    username: str | None = None
    password: str | None = None
    client_id: str = ""
    protocol: int = paho.MQTTv5

    @classmethod
    def parse(cls, url: str) -> Broker:
        parts = urlsplit(url)
        if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
            raise ValueError(f"MQTT URL must be mqtt://host[:port] or mqtts://host[:port], got {cls.redact(url)!r}")
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        unknown = set(query) - {"protocol", "client_id", "ca"}
        if unknown:
            raise ValueError(f"MQTT URL: unknown parameter(s) {', '.join(sorted(unknown))}")
        versions = {"5": paho.MQTTv5, "3.1.1": paho.MQTTv311}
        protocol = query.get("protocol", "5")
        if protocol not in versions:
            raise ValueError(f"MQTT URL: protocol must be 5 or 3.1.1, got {protocol!r}")
        tls = parts.scheme == "mqtts"
        return cls(
            host=parts.hostname, port=parts.port or (8883 if tls else 1883), tls=tls, ca=query.get("ca"),
            username=unquote(parts.username) if parts.username is not None else None,
            password=unquote(parts.password) if parts.password is not None else None,
            client_id=query.get("client_id") or f"s2amnet-{socket.gethostname()}-{os.getpid()}",
            protocol=versions[protocol],
        )

    @staticmethod
    def redact(url: str) -> str:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        return parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@", 1)).geturl()

    def describe(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"


class Topics:
    """The result topic of a result, and the retained verdict topic beside it."""

    def __init__(self, template: str):
        names = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
        unknown = names - set(PLACEHOLDERS)
        if unknown:
            raise ValueError(f"MQTT topic {template!r}: unknown placeholder(s) {', '.join(sorted(unknown))} "
                             f"(known: {', '.join(PLACEHOLDERS)})")
        self.template = template
        sample = self.render({})
        if not sample or "+" in sample or "#" in sample:
            raise ValueError(f"MQTT topic {template!r}: empty, or wildcards outside the placeholders")

    def render(self, result: dict[str, Any]) -> str:
        model = result.get("model") or {}
        values = {"station_id": result.get("station_id") or "none", "model": model.get("name") or "none",
                  "verdict": result.get("verdict") or "none"}
        return self.template.format(**{k: str(v).translate(_UNSAFE) for k, v in values.items()})

    @staticmethod
    def verdict_of(topic: str) -> str:
        prefix, sep, _ = topic.rpartition("/")
        return f"{prefix}{sep}verdict"


def _compact(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


def verdict_message(result: dict[str, Any], at: datetime) -> dict[str, Any]:
    """The small retained message: which result gave the station's last verdict."""
    model = result.get("model") or {}
    return {"result_id": result.get("result_id"), "part_id": result.get("part_id"), "verdict": result.get("verdict"),
            "model": model.get("name"), "version": model.get("version"), "recipe": result.get("recipe"),
            "time": at.isoformat(timespec="milliseconds").replace("+00:00", "Z")}


@dataclass(eq=False)
class Message:
    """One result in the outbox: its publish and the retained verdict it may update."""

    topic: str
    payload: bytes
    verdict_topic: str
    verdict: bytes
    parts: list[tuple[str, bytes, bool]] | None = None  # (topic, payload, retain): fixed when sending starts
    next: int = 0  # parts handed to paho
    sent: bool = False  # every part handed to paho
    pending: set[int] = field(default_factory=set)  # message ids not yet acknowledged
    error: str | None = None  # the broker refused it (MQTT 5 reason code), or it could not be published


# ------------------------------------------------------------------------------------------- the outlet
class MqttOutlet(Outlet):
    name = "mqtt"

    def __init__(self, broker: Broker, topics: Topics, outbox: int = 10_000, inflight: int = INFLIGHT):
        self.broker = broker
        self.topics = topics
        self.capacity = outbox
        self.max_inflight = inflight
        self.limit = inflight  # lowered to the broker's Receive Maximum (MQTT 5)
        self.outbox: collections.deque[Message] = collections.deque()
        self.sent = 0  # the first `sent` messages of the outbox are published, waiting for their PUBACKs
        self.inflight: dict[int, Message] = {}
        self.latest: dict[str, Message] = {}  # verdict topic -> the newest message in the outbox for it
        self.connected = False
        self.down_since: float | None = time.monotonic()
        self.published = 0
        self.dropped = 0
        self.last_error: str | None = None
        self._client: paho.Client | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pump_scheduled = False
        self._lock = threading.Lock()  # paho's thread reads `_loop` while stop() clears it
        metrics.init_bus_series(BUS)

    @classmethod
    def from_settings(cls, settings: Settings) -> MqttOutlet:
        if not settings.mqtt_url:
            raise ValueError("mqtt_url is not set")
        return cls(Broker.parse(settings.mqtt_url), Topics(settings.mqtt_topic), outbox=settings.mqtt_outbox)

    # -------------------------------------------------------------------- the request path
    def offer(self, result: dict[str, Any], image: bytes | None = None) -> None:
        try:
            topic = self.topics.render(result)
            message = Message(topic, _compact(result), Topics.verdict_of(topic),
                              _compact(verdict_message(result, datetime.now(UTC))))
        except Exception as exc:  # noqa: BLE001 - never an error to the client
            self._drop("error", f"could not encode a result: {type(exc).__name__}: {exc}")
            return
        if len(self.outbox) >= self.capacity:
            self._drop_oldest()
        self.outbox.append(message)
        self.latest[message.verdict_topic] = message
        metrics.BUS_OUTBOX.labels(bus=BUS).set(len(self.outbox))
        self._schedule_pump()

    def _drop_oldest(self) -> None:
        old = self.outbox.popleft()
        if old.sent:
            self.sent -= 1
        for mid in old.pending:
            self.inflight.pop(mid, None)
        if self.latest.get(old.verdict_topic) is old:
            del self.latest[old.verdict_topic]
        self._drop("outbox_full", None)

    def _drop(self, reason: str, error: str | None) -> None:
        self.dropped += 1
        metrics.BUS_DROPPED.labels(bus=BUS, reason=reason).inc()
        if error:
            self.last_error = error
            log.warning("result not published: %s", error)
        elif self.dropped == 1 or self.dropped % 1000 == 0:
            log.warning("MQTT outbox full (%d): dropping the oldest results (%d so far)", self.capacity, self.dropped)

    def _schedule_pump(self) -> None:
        if self._loop is not None and not self._pump_scheduled:
            self._pump_scheduled = True
            self._loop.call_soon(self._pump)

    # -------------------------------------------------------------------- publishing (event loop)
    def _pump(self) -> None:
        """Publish the next parts of the outbox while connected, at most `limit` unacknowledged."""
        self._pump_scheduled = False
        while self.connected and self.sent < len(self.outbox) and len(self.inflight) < self.limit:
            message = self.outbox[self.sent]
            if message.parts is None:
                message.parts = [(message.topic, message.payload, False)]
                if self.latest.get(message.verdict_topic) is message:  # else a newer result updates it
                    message.parts.append((message.verdict_topic, message.verdict, True))
            if not self._publish(message, *message.parts[message.next]):
                break
            message.next += 1
            if message.next >= len(message.parts) or message.error:
                message.sent = True
                self.sent += 1
        self._settle()

    def _publish(self, message: Message, topic: str, payload: bytes, retain: bool) -> bool:
        """Hand one part of a message to paho; False when the connection is gone (the message is published
        again after the reconnect)."""
        assert self._client is not None
        try:
            info = self._client.publish(topic, payload, qos=1, retain=retain)
        except ValueError as exc:  # an invalid topic or payload: it never will be published
            message.error = f"{type(exc).__name__}: {exc}"
            return True
        if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            return False
        message.pending.add(info.mid)
        self.inflight[info.mid] = message
        return True

    def _settle(self) -> None:
        """Remove the acknowledged messages at the head of the outbox; count them."""
        while self.outbox and self.outbox[0].sent and not self.outbox[0].pending:
            message = self.outbox.popleft()
            self.sent -= 1
            if self.latest.get(message.verdict_topic) is message:
                del self.latest[message.verdict_topic]
            if message.error:
                self._drop("error", f"{message.topic}: {message.error}")
            else:
                self.published += 1
                metrics.BUS_PUBLISHED.labels(bus=BUS).inc()
        metrics.BUS_OUTBOX.labels(bus=BUS).set(len(self.outbox))

    def _acked(self, mid: int, refused: str | None) -> None:
        message = self.inflight.pop(mid, None)
        if message is None:  # from before a reconnect, or of a dropped message
            return
        message.pending.discard(mid)
        if refused:
            message.error = refused
        self._settle()
        self._schedule_pump()

    def _connection(self, up: bool, error: str | None, receive_maximum: int | None = None) -> None:
        """Connected or lost: what was in flight is unacknowledged and is published again from the oldest."""
        was = self.connected
        self.connected = up
        self.down_since = None if up else (self.down_since or time.monotonic())
        metrics.BUS_CONNECTED.labels(bus=BUS).set(1 if up else 0)
        self.limit = min(self.max_inflight, receive_maximum or self.max_inflight)
        self.inflight.clear()
        for message in itertools.islice(self.outbox, self.sent + 1):  # the sent ones, and one partly sent
            message.parts, message.next, message.sent = None, 0, False
            message.pending.clear()
        self.sent = 0
        if error:
            self.last_error = error
        if up:
            log.info("MQTT connected to %s as %s", self.broker.describe(), self.broker.client_id)
            self._schedule_pump()
        elif was:
            log.warning("MQTT connection to %s lost (%s); %d result(s) kept in the outbox",
                        self.broker.describe(), error, len(self.outbox))

    # -------------------------------------------------------------------- paho's network thread
    def _post(self, callback: Any, *args: Any) -> None:
        with self._lock:
            loop = self._loop
        if loop is not None:
            try:
                loop.call_soon_threadsafe(callback, *args)
            except RuntimeError:  # the event loop closed while paho's thread was still running
                pass

    def _on_connect(self, client: paho.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        # Called before paho resends its own unacknowledged messages: the outbox resends them instead.
        client.drop_out_messages()
        if getattr(reason, "is_failure", False):
            self._post(self._connection, False, f"connection refused: {reason}")
        else:
            self._post(self._connection, True, None, getattr(properties, "ReceiveMaximum", None))

    def _on_disconnect(self, client: paho.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        self._post(self._connection, False, f"disconnected: {reason}")

    def _on_connect_fail(self, client: paho.Client, userdata: Any) -> None:
        self._post(self._connection, False, f"cannot connect to {self.broker.describe()}")

    def _on_publish(self, client: paho.Client, userdata: Any, mid: int, reason: Any, properties: Any) -> None:
        refused = f"refused by the broker: {reason}" if getattr(reason, "is_failure", False) else None
        self._post(self._acked, mid, refused)

    def _make_client(self) -> paho.Client:
        b = self.broker
        kwargs: dict[str, Any] = {} if b.protocol == paho.MQTTv5 else {"clean_session": True}
        client = paho.Client(CallbackAPIVersion.VERSION2, client_id=b.client_id, protocol=b.protocol, **kwargs)
        if b.username is not None:
            client.username_pw_set(b.username, b.password)
        if b.tls:
            client.tls_set(ca_certs=b.ca)  # None: the system's CA certificates
        client.max_inflight_messages_set(65535)  # the outlet keeps to `limit` itself
        client.reconnect_delay_set(RECONNECT_MIN_S, RECONNECT_MAX_S)  # type: ignore[arg-type]
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_connect_fail = self._on_connect_fail
        client.on_publish = self._on_publish
        return client

    # -------------------------------------------------------------------- lifecycle
    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        client = self._make_client()
        if self.broker.protocol == paho.MQTTv5:
            client.connect_async(self.broker.host, self.broker.port, keepalive=30, clean_start=True)
        else:
            client.connect_async(self.broker.host, self.broker.port, keepalive=30)
        self._client = client
        client.loop_start()  # paho's thread: connect, retry with backoff, read and write the socket
        log.info("MQTT: publishing results to %s (topic %s, outbox %d)", self.broker.describe(),
                 self.topics.template, self.capacity)

    async def stop(self, timeout: float) -> None:
        """Flush the outbox for at most ``timeout`` seconds (less once the broker has been unreachable for
        `STOP_WHILE_DOWN_S`), then disconnect. What is left is counted as dropped (reason ``shutdown``)."""
        deadline = time.monotonic() + timeout
        while self.outbox and time.monotonic() < deadline:
            if self.down_since is not None and time.monotonic() - self.down_since > STOP_WHILE_DOWN_S:
                break
            await asyncio.sleep(0.02)
        left = len(self.outbox)
        if left:
            self.dropped += left
            metrics.BUS_DROPPED.labels(bus=BUS, reason="shutdown").inc(left)
            log.warning("MQTT: %d result(s) not acknowledged by %s at shutdown", left, self.broker.describe())
        self.outbox.clear()
        self.latest.clear()
        self.inflight.clear()
        self.sent = 0
        with self._lock:
            self._loop = None
        if self._client is not None:
            await asyncio.to_thread(self._close, self._client)
        self.connected = False
        metrics.BUS_CONNECTED.labels(bus=BUS).set(0)
        metrics.BUS_OUTBOX.labels(bus=BUS).set(0)

    @staticmethod
    def _close(client: paho.Client) -> None:
        client.disconnect()
        client.drop_out_messages()
        client.loop_stop()

    def health(self) -> dict[str, Any]:
        return {"ok": self.connected, "broker": self.broker.describe(), "queued": len(self.outbox),
                "published": self.published, "dropped": self.dropped, "last_error": self.last_error}
