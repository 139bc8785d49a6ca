"""All service settings, in one place.

Every field reads the environment variable `S2AMNET_<FIELD>` (case-insensitive; set to nothing, it counts as
unset); command-line flags of `s2amnet serve` / `s2amnet worker` override them by passing init arguments
(init > environment > default).
List settings (`models`, `api_keys`) are comma-separated in the environment; `model_max_batch_size` is
``name=N,name=N``.
"""

from __future__ import annotations

import argparse
import types
import typing
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


def _split_csv(value: Any) -> Any:
    if value is None:
        return []
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


# what can run a model's forward: "auto" or one of model.backends.BACKENDS (a test keeps the two equal)
BackendName = Literal["auto", "eager", "eager-channels-last", "eager-bf16", "compile", "compile-bf16", "onnxruntime",
                      "openvino", "openvino-bf16"]


LOG_LEVELS = ("debug", "info", "warning", "error", "critical")

class Settings(BaseSettings):
    # an empty variable counts as unset (`S2AMNET_RECORDS_DIR=` in an env file, `${VAR:-}` in compose)
    model_config = SettingsConfigDict(env_prefix="S2AMNET_", extra="ignore", validate_default=True,
                                      env_ignore_empty=True)

    # --- where the API listens
    host: str = Field("0.0.0.0", description="Interface the HTTP API binds to.")
    port: int = Field(8000, ge=0, le=65535, description="TCP port of the HTTP API.")
    log_level: str = Field("info", description="Log level: debug, info, warning, error, critical.")

    # --- models
    weights_dir: Path = Field(Path("weights"), description="Folder of model folders to load.")
    models: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Comma-separated model names to load; empty = all in weights_dir."
    )
    device: str | None = Field(None, description="torch device: 'cpu', 'cuda', 'cuda:1'...; unset = cuda if available.")
    warmup: bool = Field(True, description="Run one forward per model before reporting ready.")
    allocator_tuning: bool = Field(
        True,
        description="Linux/glibc: blocks below 32 MiB from the heap and up to 256 MiB of freed memory kept "
        "(mallopt), so that each forward's activations reuse memory instead of page-faulting anew (faster CPU "
        "forwards; resident memory nearer its peak). Skipped when MALLOC_MMAP_THRESHOLD_ or "
        "MALLOC_TRIM_THRESHOLD_ is set.",
    )
    torch_threads: int | None = Field(
        None, ge=1, description="torch intra-op threads of the thread that runs the forwards (other threads of "
        "the embedded service use one); unset = torch default."
    )

    # --- batching / queueing
    max_batch_size: int = Field(16, ge=1, le=1024, description="Most images (jobs) per batch.")
    model_max_batch_size: Annotated[dict[str, Annotated[int, Field(ge=1)]], NoDecode] = Field(
        default_factory=dict,
        description="Per-model caps below max_batch_size, 'name=N,name=N' (e.g. 'crack-segment=1' for lower "
        "latency under load).",
    )
    forward_batch: int | Literal["auto"] = Field(
        "auto",
        description="Most images per forward pass, and so per batch (each job is answered when its own forward "
        "ends). 'auto': on a CPU, measured per model at warm-up (the size with the fewest ms per image: large "
        "activations make some models slower per image in big batches), on a GPU the whole batch; N: at most N "
        "images per forward.",
    )
    cpu_streams: int | Literal["auto"] = Field(
        "auto",
        description="Forwards on a CPU (embedded service and each Redis worker): how many forwards may run at "
        "once, each on its share of the torch threads (a part alone gets them all). Small convolutions use few "
        "threads well, so under load two forwards on half the threads each serve more images per second than one "
        "on all of them. 'auto': 2 when every model runs on the CPU with an eager backend and there are at least "
        "2 threads, else 1 (compiled models, ONNX Runtime and OpenVINO run one forward at a time).",
    )
    max_delay_ms: float = Field(
        5.0, ge=0, le=10_000, description="Longest wait for a batch to fill once a job is waiting."
    )
    backend: BackendName | None = Field(
        None,
        description="What runs each model's forward; unset: 'eager-channels-last' on a CPU, 'eager' on a GPU. "
        "'eager' PyTorch; 'eager-channels-last' (the same with its weights and input in channels-last memory "
        "order: the same arithmetic, faster CPU convolutions); 'eager-bf16' (that under autocast to "
        "bfloat16: a GPU, or a CPU with bf16 units); 'compile' (TorchInductor native code for "
        "this CPU, compiled once, minutes, and cached); 'compile-bf16' (the same under autocast to bfloat16, on a "
        "CPU with bf16 units); 'onnxruntime', 'openvino' or 'openvino-bf16' (the model "
        "exported to ONNX once and cached; openvino: CPU only, the openvino extra; bf16 only on CPUs with bf16 "
        "units). Every backend is checked against eager before use. 'auto': at start-up the fastest of them "
        "whose outputs agree with eager. A backend that cannot run a model leaves it on eager, logged.",
    )
    model_backend: Annotated[dict[str, BackendName], NoDecode] = Field(
        default_factory=dict, description="Per-model backend overriding `backend`, 'name=auto,name=eager'."
    )
    cache_dir: str | None = Field(
        None, description="Folder of exported models (ONNX, compiled packages); unset = $XDG_CACHE_HOME/s2amnet "
        "or ~/.cache/s2amnet."
    )
    max_queue: int = Field(256, ge=1, description="Backlog per model above which new work gets 503.")
    request_timeout_s: float = Field(
        10.0, gt=0, description="Default deadline of a request; the X-Request-Timeout header lowers it."
    )
    retry_after_s: int = Field(1, ge=0, description="Retry-After seconds sent with 503 answers.")
    keep_alive_s: int = Field(
        75, ge=1, le=3600,
        description="Idle seconds before the server closes a keep-alive connection. Longer than client "
        "pools keep idle connections (httpx 5 s), so a client never reuses a connection the server is "
        "closing at that moment (uvicorn's own default, 5 s, races httpx's).",
    )

    # --- redis mode (another implementation of the dispatcher)
    redis_url: str | None = Field(None, description="Redis URL: set, Redis Streams mode; unset, embedded batching.")

    # --- security / input limits
    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Comma-separated API keys; empty = no auth (logged as a warning)."
    )
    max_body_mb: float = Field(20.0, gt=0, description="Largest request body, in MiB (multipart or JSON).")
    max_pixels: int = Field(40_000_000, ge=1, description="Largest width*height of one image.")
    max_images: int = Field(16, ge=1, description="Most images in one request.")
    min_image_side: int = Field(8, ge=1, description="Smallest accepted width or height, in pixels.")
    decode_threads: int = Field(4, ge=1, description="Images decoded/preprocessed at the same time.")

    # --- idempotency / shutdown
    idempotency_ttl_s: float = Field(
        3600.0, gt=0, description="How long a result is kept for a repeated Idempotency-Key."
    )
    idempotency_max_entries: int = Field(
        10_000, ge=1, description="Bound of the in-memory idempotency store (entries)."
    )
    idempotency_max_mb: float = Field(
        256.0, gt=0, description="Bound of the in-memory idempotency store (MiB of stored answers, as JSON)."
    )
    drain_timeout_s: float = Field(
        30.0, ge=0, description="On SIGTERM: longest wait for in-flight requests before exiting."
    )
    shutdown_delay_s: float = Field(
        0.0, ge=0, description="On SIGTERM: keep answering /readyz=503 at least this long before closing."
    )

    # --- line integration: recipes, inspection records, the plant bus (app.line)
    recipes: Path | None = Field(
        None, description="Recipe file (YAML or JSON): recipe_id -> per-model verdict thresholds and a version; "
        "reloaded on SIGHUP or when the file changes. Unset = requests naming a recipe_id get 422.",
    )
    records: bool = Field(True, description="Record every answered result (inspection records, GET /results).")
    records_url: str | None = Field(
        None, description="Database of the records: 'postgresql://user:pass@host/db' (several API replicas) or "
        "'sqlite:///path.sqlite3'; unset = SQLite (WAL) in records_dir.",
    )
    records_dir: Path = Field(
        Path("records"), description="Folder of the embedded SQLite database and of the recorded images (a shared "
        "volume when several replicas record).",
    )
    record_images: Literal["fail", "all", "none"] = Field(
        "fail", description="Which input images are stored with their record: 'fail' (plus record_pass_sample of "
        "the passes), 'all' or 'none'.",
    )
    record_pass_sample: float = Field(
        0.0, ge=0.0, le=1.0, description="With record_images=fail: the fraction of passed parts whose image is "
        "stored too (0.01 = one in a hundred, at random).",
    )
    records_retention_days: float = Field(
        90.0, gt=0, description="Records and images older than this are removed (checked every few minutes)."
    )
    records_max_image_mb: float = Field(
        2048.0, gt=0, description="Disk budget of the recorded images, MiB; the oldest are removed first above it."
    )
    records_queue: int = Field(
        10_000, ge=1, description="Results waiting to be recorded; above it new ones are dropped and counted "
        "(s2amnet_records_dropped_total), never an error to the client.",
    )
    mqtt_url: str | None = Field(
        None, description="MQTT broker, 'mqtt://user:pass@host:1883' or 'mqtts://...' (TLS): set, every result is "
        "published (QoS 1).",
    )
    mqtt_topic: str = Field(
        "s2amnet/{station_id}/result", description="Topic of each result; {station_id}, {model}, {verdict} are "
        "filled in (a missing station_id reads 'none'). The last verdict per station is retained on the same "
        "prefix with 'verdict' as the last level.",
    )
    mqtt_outbox: int = Field(
        10_000, ge=1, description="Results kept while the broker is unreachable; above it the oldest are dropped "
        "and counted.",
    )
    opcua_endpoint: str | None = Field(
        None, description="OPC UA server endpoint, e.g. 'opc.tcp://0.0.0.0:4840/s2amnet/': set, the latest "
        "result per station is served there.",
    )

    # --- worker
    metrics_port: int = Field(9100, ge=0, le=65535, description="Port of a worker's Prometheus metrics; 0 = off.")
    visibility_timeout_s: float = Field(
        30.0, gt=0, description="Redis mode: seconds a job may stay unacked under a live (stuck) worker before "
        "another worker takes it over; a killed worker's jobs are taken over once its heartbeat keys lapse (3 s)."
    )
    max_deliveries: int = Field(
        3, ge=1, description="Redis mode: deliveries (or failures) before a job goes to the dead-letter stream."
    )

    @field_validator("models", "api_keys", mode="before")
    @classmethod
    def _csv(cls, value: Any) -> Any:
        return _split_csv(value)

    @field_validator("log_level", mode="before")
    @classmethod
    def _log_level(cls, value: Any) -> Any:
        level = str(value).strip().lower()
        if level not in LOG_LEVELS:
            raise ValueError(f"expected one of {', '.join(LOG_LEVELS)}")
        return level

    @field_validator("redis_url", mode="before")
    @classmethod
    def _redis_url(cls, value: Any) -> Any:
        if value is None or (isinstance(value, str) and not value.strip()):
            return None  # S2AMNET_REDIS_URL= : embedded mode
        parts = urlsplit(str(value).strip())
        if parts.scheme not in ("redis", "rediss", "unix") or not (parts.hostname or parts.path):
            raise ValueError("expected redis://host:port/db, rediss://... (TLS) or unix:///path/to/redis.sock")
        return str(value).strip()

    @field_validator("backend", mode="before")
    @classmethod
    def _backend(cls, value: Any) -> Any:
        return None if isinstance(value, str) and not value.strip() else value  # S2AMNET_BACKEND= : unset

    @field_validator("forward_batch", "cpu_streams", mode="before")
    @classmethod
    def _auto_or_number(cls, value: Any) -> Any:
        number = value
        if isinstance(value, str):
            if value.strip().lower() == "auto":
                return "auto"
            try:
                number = int(value.strip())
            except ValueError:
                number = None
        if isinstance(number, bool) or not isinstance(number, int) or number < 1:
            raise ValueError("expected auto or a whole number >= 1")
        return number

    @field_validator("model_max_batch_size", "model_backend", mode="before")
    @classmethod
    def _per_model(cls, value: Any) -> Any:
        if value is None:
            return {}
        if not isinstance(value, str):
            return value
        per: dict[str, str] = {}
        for item in _split_csv(value):
            name, sep, v = item.partition("=")
            if not sep or not name.strip():
                raise ValueError(f"expected name=value, got {item!r}")
            per[name.strip()] = v.strip()
        return per

    def batch_sizes(self, models: Iterable[str], strict: bool = True) -> dict[str, int]:
        """Most images per forward for each of ``models``: ``max_batch_size``, lowered where
        ``model_max_batch_size`` caps the model. ``strict``: a cap naming none of ``models`` is a
        RuntimeError (a typo would otherwise change nothing, silently)."""
        models = list(models)
        unknown = sorted(set(self.model_max_batch_size) - set(models))
        if unknown and strict:
            raise RuntimeError(f"S2AMNET_MODEL_MAX_BATCH_SIZE names {', '.join(unknown)}, which is not a loaded "
                               f"model (loaded: {', '.join(sorted(models)) or 'none'})")
        return {m: min(self.max_batch_size, self.model_max_batch_size.get(m, self.max_batch_size)) for m in models}

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 1024 * 1024)

    def resolved_device(self) -> str:
        """The torch device to load models on: `device` if set (RuntimeError if it names CUDA and torch
        has no usable GPU), else cuda when torch sees a GPU, else cpu (`model.device.resolve_device`)."""
        from model.device import missing_gpu, resolve_device  # noqa: PLC0415 - imports torch

        device = resolve_device(self.device)
        if self.device and missing_gpu(device):
            import torch  # noqa: PLC0415

            raise RuntimeError(f"device {self.device!r}: torch sees no CUDA GPU here "
                               f"(torch {torch.__version__}); use --device cpu")
        return device


# The settings `s2amnet serve` and `s2amnet worker` also take as flags (--field-name); each flag's help is
# its field's description.
SERVE_FLAGS = ("host", "port", "weights_dir", "models", "device", "max_batch_size", "model_max_batch_size",
               "forward_batch", "backend", "cpu_streams", "max_delay_ms", "max_queue", "request_timeout_s", "redis_url",
               "api_keys", "torch_threads", "drain_timeout_s", "recipes", "records_url", "records_dir", "record_images",
               "mqtt_url", "opcua_endpoint", "log_level")
WORKER_FLAGS = ("redis_url", "device", "models", "weights_dir", "max_batch_size", "model_max_batch_size",
                "forward_batch", "backend", "cpu_streams", "max_delay_ms", "metrics_port", "torch_threads",
                "visibility_timeout_s", "max_deliveries", "log_level")
_FLAG_NAMES = {"visibility_timeout_s": "--visibility-timeout"}  # flags not named after their field


def _flag_type(annotation: Any) -> type:
    """int or float for numeric fields (optional ones included); str for the rest, which the field's
    validators parse (lists, name=N maps, paths, 'auto')."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        annotation = args[0] if len(args) == 1 else str
    return annotation if annotation in (int, float) else str


def add_setting_flags(parser: argparse.ArgumentParser, names: Sequence[str]) -> None:
    """One flag per setting in ``names``: its type and help come from the Settings field."""
    for name in names:
        field = Settings.model_fields[name]
        default = field.get_default(call_default_factory=True)
        shown = "none" if default in (None, [], {}) else str(default)
        parser.add_argument(_FLAG_NAMES.get(name, "--" + name.replace("_", "-")), dest=name,
                            type=_flag_type(field.annotation), default=None,
                            help=f"{field.description} (S2AMNET_{name.upper()}, default {shown})".replace("%", "%%"))


def settings_from_args(args: Any, names: Sequence[str] | None = None) -> Settings:
    """Settings from the environment, overridden by every argparse attribute that is not None."""
    fields = names or list(Settings.model_fields)
    overrides = {}
    for name in fields:
        value = getattr(args, name, None)
        if value is not None:
            overrides[name] = value
    return Settings(**overrides)
