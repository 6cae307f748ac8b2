"""``python -m service <command>`` (or ``instcolor <command>``): one parser, one module per command.

Each module in ``COMMANDS`` defines ``add_parser(subparsers)``, which adds its sub-parser and sets
``func=run`` with ``run(args: argparse.Namespace) -> int`` returning the exit code. A new command is
one more module name in ``COMMANDS``; modules are imported only when the parser is built, so
``service.cli`` itself stays light; command modules import torch only inside ``run`` so that a
command which does not need it (the HTTP API in Redis mode) starts without it.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Sequence

from service import __version__

COMMANDS: tuple[str, ...] = (
    "service.commands.colorize",
    "service.commands.evaluate",
    "service.commands.fetch_weights",
    "service.commands.prepare_data",
    "service.commands.serve",
    "service.commands.train",
    "service.commands.worker",
)
"""Command modules, in the order ``--help`` lists them. Add a line here to add a command."""

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m service",
        description="InstColor Service: instance-aware colorization of grayscale photos.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument(
        "--log-level",
        type=str.upper,
        choices=LOG_LEVELS,
        default=None,
        help="logging level on stderr [COLORIZE_LOG_LEVEL, default INFO]",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:  # the command exists but one of its imports is broken: say so
                raise
            continue  # a command that is not written yet
        module.add_parser(subparsers)
    return parser


def setup_logging(level: str | None) -> None:
    chosen = (level or os.environ.get("COLORIZE_LOG_LEVEL") or "INFO").upper()
    if chosen not in LOG_LEVELS:
        raise SystemExit(
            f"COLORIZE_LOG_LEVEL must be one of {', '.join(LOG_LEVELS)}, got {chosen!r}"
        )
    # basicConfig is a no-op where the root logger already has handlers (pytest, an embedding app)
    logging.basicConfig(format=LOG_FORMAT, stream=sys.stderr)
    logging.getLogger().setLevel(chosen)


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``), run the command and return its exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.log_level)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        return 130
