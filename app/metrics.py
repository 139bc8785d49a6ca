"""Every Prometheus metric of the service, defined once (names per docs/ARCHITECTURE.md).

Naming: prefix `s2amnet_`, base units (seconds), `_total` for counters (prometheus-client appends it).

Multiprocess mode: when `PROMETHEUS_MULTIPROC_DIR` is set in the environment *before* this module is
first imported, prometheus-client keeps every value in mmap files in that folder, and `render()` merges
the files of all processes (several API processes, or a worker's processes). Each gauge declares how its
values from several processes combine (`multiprocess_mode`). A supervisor that restarts children calls
`prometheus_client.multiprocess.mark_process_dead(pid)` for a child that exited, so that its live gauges
disappear.
"""

from __future__ import annotations

import os

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client import multiprocess as _mp

PREFIX = "s2amnet"

# Latency buckets from 1 ms to 60 s (inspection answers are expected in tens of milliseconds).
LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)
# Batch size buckets 1, 2, 4, ..., 64.
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


def multiprocess_enabled() -> bool:
    return bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR") or os.environ.get("prometheus_multiproc_dir"))


# ---------------------------------------------------------------- HTTP API
REQUESTS = Counter(
    "requests",
    "HTTP requests by endpoint (route template) and status code.",
    ["endpoint", "status"],
    namespace=PREFIX,
)
REQUEST_DURATION = Histogram(
    "request_duration_seconds",
    "HTTP request latency, from request start to response start.",
    ["endpoint"],
    namespace=PREFIX,
    buckets=LATENCY_BUCKETS,
)
INFLIGHT = Gauge(
    "inflight_requests",
    "Inference requests being processed now.",
    namespace=PREFIX,
    multiprocess_mode="livesum",
)
REJECTED = Counter(
    "rejected",
    "Requests refused, by reason (queue_full, timeout, unauthorized, body_too_large, ...).",
    ["reason"],
    namespace=PREFIX,
)

# ---------------------------------------------------------------- queue / batching / inference
QUEUE_WAIT = Histogram(
    "queue_wait_seconds",
    "Time a job waited between submission and the start of its batch.",
    ["model"],
    namespace=PREFIX,
    buckets=LATENCY_BUCKETS,
)
INFERENCE_DURATION = Histogram(
    "inference_duration_seconds",
    "Duration of the forward pass of one batch.",
    ["model"],
    namespace=PREFIX,
    buckets=LATENCY_BUCKETS,
)
POSTPROCESS_DURATION = Histogram(
    "postprocess_duration_seconds",
    "Postprocessing of one image's raw output at its original size (boxes, masks, verdict, JSON).",
    ["model"],
    namespace=PREFIX,
    buckets=LATENCY_BUCKETS,
)
WORKER_STAGE = Histogram(
    "worker_stage_seconds",
    "A worker's time per batch beside its forward passes and postprocessing, by stage: decode (uploaded "
    "images back into arrays), commit (replies written and jobs acked in Redis, one MULTI).",
    ["model", "stage"],
    namespace=PREFIX,
    buckets=LATENCY_BUCKETS,
)
BATCH_SIZE = Histogram(
    "batch_size",
    "Images per forward pass.",
    ["model"],
    namespace=PREFIX,
    buckets=BATCH_SIZE_BUCKETS,
)
BATCHES = Counter("batches", "Batches run (one forward pass each, or several of at most forward_batch_size images).",
                  ["model"], namespace=PREFIX)
# How the API processes' values combine depends on what they measure. Embedded mode: each process
# batches its own queue, so the service's backlog is the sum. Redis mode: every process reads the same
# stream backlog, so a sum would count it once per process; the max is the backlog. (Several processes
# exist only under `s2amnet serve --workers N`, which exports the settings as S2AMNET_* variables
# before the processes import this module.)
QUEUE_DEPTH = Gauge(
    "queue_depth",
    "Jobs waiting for a batch.",
    ["model"],
    namespace=PREFIX,
    multiprocess_mode="livemax" if os.environ.get("S2AMNET_REDIS_URL") else "livesum",
)
JOBS_REDELIVERED = Counter(
    "jobs_redelivered",
    "Jobs delivered again after a worker failed to acknowledge them.",
    ["model"],
    namespace=PREFIX,
)
JOBS_EXPIRED = Counter(
    "jobs_expired",
    "Jobs dropped without computing because their deadline had passed.",
    ["model"],
    namespace=PREFIX,
)
JOBS_CANCELLED = Counter(
    "jobs_cancelled",
    "Jobs dropped without computing because their request went away (the client hung up).",
    ["model"],
    namespace=PREFIX,
)
JOBS_DEAD_LETTERED = Counter(
    "jobs_dead_lettered",
    "Jobs moved to the dead-letter stream after too many deliveries.",
    ["model"],
    namespace=PREFIX,
)

# ---------------------------------------------------------------- models
MODEL_INFO = Gauge(
    "model_info",
    "Loaded model (value 1), with its task, version and variant.",
    ["model", "task", "version", "variant"],
    namespace=PREFIX,
    multiprocess_mode="livemax",
)
MODEL_LOAD_SECONDS = Gauge(
    "model_load_seconds",
    "Time taken to load (and warm up) a model.",
    ["model"],
    namespace=PREFIX,
    multiprocess_mode="livemax",
)
FAIL_SAFE = Counter(
    "fail_safe_answers",
    "Parts answered verdict fail without being inspected (on_timeout=fail), by reason (timeout, unavailable).",
    ["model", "reason"],
    namespace=PREFIX,
)
MODEL_BACKEND = Gauge(
    "model_backend",
    "1 for the backend that runs the model's forwards (eager, onnxruntime; S2AMNET_BACKEND).",
    ["model", "backend"],
    namespace=PREFIX,
    multiprocess_mode="livemax",
)
FORWARD_BATCH = Gauge(
    "forward_batch_size",
    "Most images per forward pass of the model within a batch (S2AMNET_FORWARD_BATCH; 'auto' measures it "
    "at warm-up on a CPU).",
    ["model"],
    namespace=PREFIX,
    multiprocess_mode="livemax",
)
CPU_STREAMS = Gauge(
    "cpu_streams",
    "Forwards the embedded service or a worker runs at once, each on its share of the torch threads "
    "(S2AMNET_CPU_STREAMS; 1 with a GPU or a backend with threads of its own).",
    namespace=PREFIX,
    multiprocess_mode="livemax",
)

# ---------------------------------------------------------------- what was inspected
IMAGES = Counter("images", "Images inspected.", ["model", "task"], namespace=PREFIX)
DEFECTS = Counter("defects", "Defects reported, by model and label.", ["model", "label"], namespace=PREFIX)
VERDICTS = Counter(
    "verdicts", "Verdicts given, by model and verdict (pass/fail).", ["model", "verdict"], namespace=PREFIX
)

# ---------------------------------------------------------------- line integration (app.line)
RECIPE_RELOADS = Counter(
    "recipe_reloads",
    "Recipe file loads, by outcome (ok, invalid: the file was rejected and the previous recipes kept).",
    ["outcome"],
    namespace=PREFIX,
)
RECORDS_WRITTEN = Counter(
    "records_written", "Inspection results recorded, by store (sqlite, postgresql).", ["store"], namespace=PREFIX
)
RECORDS_DROPPED = Counter(
    "records_dropped",
    "Inspection results that could not be recorded, by reason (queue_full, store_error, image_error).",
    ["reason"],
    namespace=PREFIX,
)
RECORD_STORE_UP = Gauge(
    "record_store_up",
    "1 while the last write to the record store succeeded, 0 after a failed one.",
    ["store"],
    namespace=PREFIX,
    multiprocess_mode="livemin",
)
BUS_PUBLISHED = Counter(
    "bus_published",
    "Results delivered to the plant bus (mqtt: acknowledged by the broker; opcua: written to the server's nodes).",
    ["bus"],
    namespace=PREFIX,
)
BUS_DROPPED = Counter(
    "bus_dropped",
    "Results not delivered to the plant bus, by bus and reason (outbox_full, error, shutdown).",
    ["bus", "reason"],
    namespace=PREFIX,
)
BUS_CONNECTED = Gauge(
    "bus_connected",
    "1 while the bus connection is up (mqtt: connected to the broker; opcua: the server is running).",
    ["bus"],
    namespace=PREFIX,
    multiprocess_mode="livemin",
)
BUS_OUTBOX = Gauge(
    "bus_outbox",
    "Results waiting to be published on the bus.",
    ["bus"],
    namespace=PREFIX,
    multiprocess_mode="livesum",
)

# ---------------------------------------------------------------- workers (Redis mode)
WORKER_HEARTBEAT = Gauge(
    "worker_heartbeat_timestamp_seconds",
    "Unix time of the worker's last heartbeat.",
    ["worker"],
    namespace=PREFIX,
    multiprocess_mode="mostrecent",
)
WORKER_UP = Gauge(
    "worker_up",
    "1 while the worker is running and connected.",
    ["worker"],
    namespace=PREFIX,
    multiprocess_mode="livemax",
)


def registry() -> CollectorRegistry:
    """The registry to expose: the merged multiprocess view, or the default process registry."""
    if multiprocess_enabled():
        merged = CollectorRegistry()
        _mp.MultiProcessCollector(merged)
        return merged
    return REGISTRY


def render() -> tuple[bytes, str]:
    """Prometheus text exposition of every metric: (body, content type)."""
    return generate_latest(registry()), CONTENT_TYPE_LATEST


def start_metrics_server(port: int, addr: str = "0.0.0.0"):
    """Serve /metrics on its own port (used by workers); multiprocess-aware."""
    from prometheus_client import start_http_server

    return start_http_server(port, addr=addr, registry=registry())


def record_rejection(reason: str) -> None:
    REJECTED.labels(reason=reason).inc()


def init_model_series(model: str, task: str) -> None:
    """Create a model's labelled series at 0 where it is computed (embedded dispatcher, worker), so
    rate()/increase() see its first event and panels show 0 instead of "No data" before anything happened."""
    IMAGES.labels(model=model, task=task)
    for verdict in ("pass", "fail"):
        VERDICTS.labels(model=model, verdict=verdict)
    for reason in ("timeout", "unavailable"):
        FAIL_SAFE.labels(model=model, reason=reason)
    for counter in (BATCHES, JOBS_EXPIRED, JOBS_CANCELLED, JOBS_REDELIVERED, JOBS_DEAD_LETTERED):
        counter.labels(model=model)
    for histogram in (QUEUE_WAIT, INFERENCE_DURATION, POSTPROCESS_DURATION, BATCH_SIZE):
        histogram.labels(model=model)


def init_bus_series(bus: str) -> None:
    """A plant-bus outlet's series at 0 (disconnected, empty outbox, nothing published or dropped yet)."""
    BUS_CONNECTED.labels(bus=bus).set(0)
    BUS_OUTBOX.labels(bus=bus).set(0)
    BUS_PUBLISHED.labels(bus=bus)
    for reason in ("outbox_full", "error", "shutdown"):
        BUS_DROPPED.labels(bus=bus, reason=reason)
