"""The `s2amnet` subcommands, one module each (see app/cli.py)."""

from __future__ import annotations

import argparse


def positive_int(text: str) -> int:
    """argparse type: a whole number >= 1 (argparse answers anything else with its usage and exit 2)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a whole number >= 1, not {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def add_service_flags(parser: argparse.ArgumentParser, command: str) -> None:
    """The setting flags of `s2amnet serve` / `s2amnet worker` (generated from app.settings). Where the
    service's dependencies (pydantic) are not installed, e.g. on a machine set up for training only, the
    command gets no flags and fails with the missing import when run; the other commands still work."""
    try:
        from app.settings import SERVE_FLAGS, WORKER_FLAGS, add_setting_flags  # noqa: PLC0415
    except ImportError:
        return
    add_setting_flags(parser, SERVE_FLAGS if command == "serve" else WORKER_FLAGS)
