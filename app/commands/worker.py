"""`s2amnet worker`: a Redis Streams worker (see app/worker.py). Flags override S2AMNET_* settings."""

from __future__ import annotations

import argparse
import logging
import signal
import threading
from typing import TYPE_CHECKING

from app.commands import add_service_flags

if TYPE_CHECKING:
    from app.settings import Settings

log = logging.getLogger("app.worker")  # the worker's own logger: its start-up lines read like its others


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "worker",
        help="consume inference jobs from Redis Streams (Redis mode)",
        description="Run a Redis Streams worker: batch the API's jobs onto a model (GPU or CPU), reply, "
        "then ack. SIGTERM finishes the jobs in hand and exits. Defaults come from S2AMNET_* settings.",
    )
    add_service_flags(p, "worker")
    p.add_argument("--name", help="consumer name in the group (default: host-pid-random; further inference "
                   "streams are NAME-stream2, ...); a restarted worker with the same name takes its unacked jobs "
                   "back at once")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from app.settings import WORKER_FLAGS, settings_from_args  # noqa: PLC0415

    settings = settings_from_args(args, WORKER_FLAGS)
    logging.basicConfig(level=str(settings.log_level).upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not settings.redis_url:
        raise SystemExit("s2amnet worker: no Redis URL (--redis-url or S2AMNET_REDIS_URL)")
    return serve_worker(settings, consumer=args.name)


def serve_worker(settings: Settings, *, consumer: str | None = None) -> int:
    """Load and warm up the models, export metrics, consume until SIGTERM (``app.worker.Worker``: one per
    inference stream, `app.runtime.cpu_streams`)."""
    stop_early = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop_early.set())
    # torch-heavy imports only when the command runs
    from app import metrics  # noqa: PLC0415
    from app.models import load_predictors  # noqa: PLC0415
    from app.runtime import (  # noqa: PLC0415
        ThreadShares,
        configure_runtime,
        cpu_streams,
        freeze_startup_objects,
        one_forward_per_batch,
        prepare_predictors,
    )
    from app.worker import StreamGate, Worker, default_consumer, run_streams, stream_consumer  # noqa: PLC0415

    configure_runtime(settings)
    try:
        predictors = load_predictors(settings)
    except (RuntimeError, OSError, ValueError) as exc:  # missing models, unusable device, bad weights
        log.error("start-up failed: %s: %s", type(exc).__name__, exc)
        return 1
    for name, predictor in predictors.items():
        metrics.init_model_series(name, predictor.task)
    batch_sizes = settings.batch_sizes(predictors, strict=False)
    prepare_predictors(predictors, settings, batch_sizes)
    batch_sizes = one_forward_per_batch(predictors, batch_sizes)
    if settings.metrics_port:
        metrics.start_metrics_server(int(settings.metrics_port))
        log.info("worker metrics on :%d/metrics", settings.metrics_port)
    unknown = sorted(set(settings.model_max_batch_size) - set(predictors))
    if unknown:  # workers may each serve a part of the models; the same settings may name the others
        log.warning("S2AMNET_MODEL_MAX_BATCH_SIZE names %s, not served by this worker", ", ".join(unknown))
    import torch  # noqa: PLC0415

    threads = torch.get_num_threads()  # as configure_runtime set them for the forwards
    streams, why = cpu_streams(settings.cpu_streams, predictors, threads)
    log.info("inference streams: %d (%s)", streams, why)
    metrics.CPU_STREAMS.set(streams)
    gate = StreamGate(ThreadShares(threads, streams)) if streams > 1 else None
    name = consumer or default_consumer()
    workers = [Worker(settings.redis_url, predictors, consumer=stream_consumer(name, i),
                      max_batch_size=settings.max_batch_size, batch_sizes=batch_sizes,
                      max_delay_ms=settings.max_delay_ms, visibility_timeout_s=settings.visibility_timeout_s,
                      max_deliveries=settings.max_deliveries, stream=i, gate=gate)
               for i in range(streams)]
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: workers[0].request_stop())
    freeze_startup_objects()
    if stop_early.is_set():
        workers[0].request_stop()
    run_streams(workers)
    return 0
