"""`s2amnet` command line. Each subcommand lives in `app/commands/<name>.py` exposing
`add_parser(subparsers)` (registers its arguments and sets `func`)."""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = ["info", "serve", "worker", "predict", "train", "eval", "bench"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="s2amnet",
        description="S2-AMNet defect inspection: serve, train, evaluate and benchmark models.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"app.commands.{name}")
        except ModuleNotFoundError as exc:  # a command not written yet
            if exc.name != f"app.commands.{name}":
                raise
            continue
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    result = args.func(args)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
