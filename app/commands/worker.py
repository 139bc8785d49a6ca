"""`s2amnet worker`: a Redis Streams worker (see app/worker.py). Flags override S2AMNET_* settings."""

from __future__ import annotations

import argparse
import logging

from app.commands import add_service_flags


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "worker",
        help="consume inference jobs from Redis Streams (Redis mode)",
        description="Run a Redis Streams worker: batch the API's jobs onto a model (GPU or CPU), reply, "
        "then ack. SIGTERM finishes the jobs in hand and exits. Defaults come from S2AMNET_* settings.",
    )
    add_service_flags(p, "worker")
    p.add_argument("--name", help="consumer name in the group (default: host-pid-random); a restarted "
                   "worker with the same name takes its unacked jobs back at once")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from app.settings import WORKER_FLAGS, settings_from_args  # noqa: PLC0415

    settings = settings_from_args(args, WORKER_FLAGS)
    logging.basicConfig(level=str(settings.log_level).upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not settings.redis_url:
        raise SystemExit("s2amnet worker: no Redis URL (--redis-url or S2AMNET_REDIS_URL)")
    from app.worker import serve_worker  # noqa: PLC0415 - torch import only when the command runs

    return serve_worker(settings, visibility_timeout_s=settings.visibility_timeout_s,
                        max_deliveries=settings.max_deliveries,
                        consumer=args.name)
