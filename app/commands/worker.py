"""`s2amnet worker`: a Redis Streams worker (see app/worker.py). Flags override S2AMNET_* settings."""

from __future__ import annotations

import argparse
import logging
import os


def _settings():
    """The service settings (app/settings.py), or None when they cannot be built."""
    try:
        from app import settings as mod  # noqa: PLC0415
    except ImportError:
        return None
    for name in ("get_settings", "Settings"):
        factory = getattr(mod, name, None)
        if callable(factory):
            return factory()
    return None


def _get(settings, name: str, default):
    value = getattr(settings, name, None) if settings is not None else None
    if value is None:
        value = os.environ.get(f"S2AMNET_{name.upper()}", default)
    return value


def _split(value) -> list[str]:
    if value is None:
        return []
    if isinstance(value, list | tuple):
        return [str(v).strip() for v in value if str(v).strip()]
    return [v.strip() for v in str(value).split(",") if v.strip()]


def _default_device() -> str:
    try:
        import torch  # noqa: PLC0415

        return "cuda" if torch.cuda.is_available() else "cpu"
    except ImportError:
        return "cpu"


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "worker",
        help="consume inference jobs from Redis Streams (Redis mode)",
        description="Run a Redis Streams worker: batch jobs of the API onto a model (GPU or CPU), reply, "
        "then ack. SIGTERM finishes the batch in hand and exits. Defaults come from S2AMNET_* settings.",
    )
    p.add_argument("--redis-url", help="Redis URL (default: S2AMNET_REDIS_URL)")
    p.add_argument("--device", help="torch device, e.g. cuda:0 or cpu (default: S2AMNET_DEVICE, else cuda if available)")
    p.add_argument("--models", help="comma-separated model names (default: S2AMNET_MODELS, else all in weights dir)")
    p.add_argument("--weights-dir", help="folder of model folders (default: S2AMNET_WEIGHTS_DIR or weights)")
    p.add_argument("--max-batch-size", type=int, help="most jobs per forward (default: S2AMNET_MAX_BATCH_SIZE or 16)")
    p.add_argument("--max-delay-ms", type=float, help="longest wait for a batch to fill (default: S2AMNET_MAX_DELAY_MS or 5)")
    p.add_argument("--metrics-port", type=int,
                   help="Prometheus metrics port, 0 = off (default: S2AMNET_METRICS_PORT or 9100)")
    p.add_argument("--visibility-timeout", type=float,
                   help="seconds a job may stay unacked before another worker takes it over "
                   "(default: S2AMNET_VISIBILITY_TIMEOUT_S or 30)")
    p.add_argument("--max-deliveries", type=int,
                   help="deliveries before a job goes to the dead-letter stream "
                   "(default: S2AMNET_MAX_DELIVERIES or 3)")
    p.add_argument("--name", help="consumer name in the group (default: host-pid-random)")
    p.add_argument("--log-level", default=os.environ.get("S2AMNET_LOG_LEVEL", "INFO"))
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=str(args.log_level).upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    s = _settings()
    redis_url = args.redis_url or _get(s, "redis_url", None)
    if not redis_url:
        raise SystemExit("s2amnet worker: no Redis URL (--redis-url or S2AMNET_REDIS_URL)")
    from app.worker import serve_worker  # noqa: PLC0415 - torch import only when the command runs

    metrics_port = args.metrics_port if args.metrics_port is not None else int(_get(s, "metrics_port", 9100))
    return serve_worker(
        str(redis_url),
        weights_dir=str(args.weights_dir or _get(s, "weights_dir", "weights")),
        models=_split(args.models) or _split(_get(s, "models", None)),
        device=args.device or _get(s, "device", None) or _default_device(),
        max_batch_size=int(args.max_batch_size or _get(s, "max_batch_size", 16)),
        max_delay_ms=float(args.max_delay_ms if args.max_delay_ms is not None else _get(s, "max_delay_ms", 5)),
        metrics_port=metrics_port or None,
        visibility_timeout_s=float(args.visibility_timeout or _get(s, "visibility_timeout_s", 30)),
        max_deliveries=int(args.max_deliveries or _get(s, "max_deliveries", 3)),
        consumer=args.name,
    )
