"""`s2amnet` command line. Each subcommand lives in `app/commands/<name>.py` exposing
`add_parser(subparsers)` (registers its arguments and sets `func`)."""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = ["info", "serve", "worker", "predict", "train", "eval", "calibrate", "export", "bench"]


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


class _NoValidationError(Exception):
    """Stands in for pydantic's ValidationError where pydantic is not installed (never raised)."""


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        from pydantic import ValidationError
    except ImportError:  # train / eval need only the model's dependencies (e.g. on a bare GPU machine)
        ValidationError = _NoValidationError  # noqa: N806

    try:
        result = args.func(args)
    except ValidationError as exc:
        if exc.title != "Settings":
            raise
        # a bad S2AMNET_* variable or serve/worker flag: say which and why, not a traceback
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']} (got {e.get('input')!r})"
                             for e in exc.errors())
        print(f"error: invalid setting: {problems}", file=sys.stderr)
        return 2
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
