"""`s2amnet worker`: a Redis Streams worker (see app/worker.py). Flags override S2AMNET_* settings."""

from __future__ import annotations

import argparse
import logging


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "worker",
        help="consume inference jobs from Redis Streams (Redis mode)",
        description="Run a Redis Streams worker: batch the API's jobs onto a model (GPU or CPU), reply, "
        "then ack. SIGTERM finishes the jobs in hand and exits. Defaults come from S2AMNET_* settings.",
    )
    p.add_argument("--redis-url", help="Redis URL (default: S2AMNET_REDIS_URL)")
    p.add_argument("--device", help="torch device, e.g. cuda:0 or cpu (default: S2AMNET_DEVICE, "
                   "else cuda if available)")
    p.add_argument("--models", help="comma-separated model names (default: S2AMNET_MODELS, else all "
                   "in the weights dir)")
    p.add_argument("--weights-dir", help="folder of model folders (default: S2AMNET_WEIGHTS_DIR, weights)")
    p.add_argument("--max-batch-size", type=int, help="most jobs per forward (S2AMNET_MAX_BATCH_SIZE, 16)")
    p.add_argument("--model-max-batch-size", help="per-model caps below --max-batch-size, name=N,name=N "
                   "(S2AMNET_MODEL_MAX_BATCH_SIZE)")
    p.add_argument("--forward-batch", help="most jobs per forward within a batch: N, or auto (measured per "
                   "model at warm-up on a CPU; S2AMNET_FORWARD_BATCH, auto)")
    p.add_argument("--max-delay-ms", type=float,
                   help="longest wait for a batch to fill once a job is in hand (S2AMNET_MAX_DELAY_MS, 5)")
    p.add_argument("--metrics-port", type=int, help="Prometheus metrics port, 0 = off "
                   "(S2AMNET_METRICS_PORT, 9100)")
    p.add_argument("--torch-threads", type=int, help="torch intra-op threads (S2AMNET_TORCH_THREADS)")
    p.add_argument("--visibility-timeout", dest="visibility_timeout_s", type=float,
                   help="seconds a job may stay unacked before another worker takes it over "
                   "(S2AMNET_VISIBILITY_TIMEOUT_S, 30)")
    p.add_argument("--max-deliveries", dest="max_deliveries", type=int,
                   help="deliveries (or failures) before a job goes to the dead-letter stream "
                   "(S2AMNET_MAX_DELIVERIES, 3)")
    p.add_argument("--name", help="consumer name in the group (default: host-pid-random); a restarted "
                   "worker with the same name takes its unacked jobs back at once")
    p.add_argument("--log-level", help="log level (S2AMNET_LOG_LEVEL, info)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from app.settings import settings_from_args  # noqa: PLC0415

    settings = settings_from_args(args)
    logging.basicConfig(level=str(settings.log_level).upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not settings.redis_url:
        raise SystemExit("s2amnet worker: no Redis URL (--redis-url or S2AMNET_REDIS_URL)")
    from app.worker import serve_worker  # noqa: PLC0415 - torch import only when the command runs

    return serve_worker(settings, visibility_timeout_s=settings.visibility_timeout_s,
                        max_deliveries=settings.max_deliveries,
                        consumer=args.name)
