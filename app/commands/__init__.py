"""The `s2amnet` subcommands, one module each (see app/cli.py)."""

from __future__ import annotations

import argparse


def add_service_flags(parser: argparse.ArgumentParser, command: str) -> None:
    """The setting flags of `s2amnet serve` / `s2amnet worker` (generated from app.settings). Where the
    service's dependencies (pydantic) are not installed, e.g. on a machine set up for training only, the
    command gets no flags and fails with the missing import when run; the other commands still work."""
    try:
        from app.settings import SERVE_FLAGS, WORKER_FLAGS, add_setting_flags  # noqa: PLC0415
    except ImportError:
        return
    add_setting_flags(parser, SERVE_FLAGS if command == "serve" else WORKER_FLAGS)
