"""``python -m service <command>`` (or ``instcolor <command>``): one parser, one module per command.

Each module in ``COMMANDS`` defines ``add_parser(subparsers)``, which adds its sub-parser and sets
``func=run`` with ``run(args: argparse.Namespace) -> int`` returning the exit code. A new command is
one more module name in ``COMMANDS``. Every command module is imported to build the parser, so a
command module imports its heavy dependencies (torch, uvicorn, fastapi, redis) only inside ``run``:
one command never fails for a package only another needs, and the HTTP API in Redis mode starts
without torch. A package missing at run time is reported with what to do (the extra to install,
``MODULE_EXTRAS``; or run the venv's Python), not as a traceback.
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
    "service.commands.batch",
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


PROGRAM = "instcolor"
"""The installed command's name, used by ``--version``."""


def program_name(argv0: str | None = None) -> str:
    """How the user started us, for usage lines: ``instcolor`` or ``python -m service``."""
    name = os.path.basename(argv0 if argv0 is not None else sys.argv[0])
    return "python -m service" if name in ("__main__.py", "-m", "") else name


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=program_name(),
        description="InstColor Service: instance-aware colorization of grayscale photos.",
    )
    parser.add_argument("--version", action="version", version=f"{PROGRAM} {__version__}")
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


MODULE_EXTRAS: dict[str, tuple[str, ...]] = {
    "skimage": ("eval", "train"),
    "scipy": ("eval", "train"),
    "lpips": ("eval", "train"),
    "matplotlib": ("eval", "train"),
    "jinja2": ("eval",),
    "pytorch_fid": ("eval",),
    "evaluation": ("eval", "train"),  # our packages themselves, absent from the container image
    "training": ("train",),
}
"""Modules that only an extra of pyproject.toml installs -> the extras that carry them. Serving
(serve, worker, colorize, fetch-weights) needs none."""

COMMAND_EXTRAS: dict[str, str] = {"evaluate": "eval", "prepare-data": "train", "train": "train"}
"""The extra each command needs beyond the base dependencies."""

OWN_PACKAGES = ("service", "models", "evaluation", "training")


def missing_package_message(exc: ModuleNotFoundError, command: str | None = None) -> str:
    """What to do when a dependency is not importable: install the extra the command needs, or
    (for a base dependency) use the Python of the environment the project was installed into."""
    top = (exc.name or "").split(".")[0]
    extras = MODULE_EXTRAS.get(top)
    if extras:
        wanted = COMMAND_EXTRAS.get(command or "")
        extra = wanted if wanted in extras else extras[0]
        needs = f"`{command}` needs" if command else "this command needs"
        return (
            f"error: No module named {top!r}: install the {extra} extra: "
            f"pip install -e '.[{extra}]'\n"
            f"({needs} the {extra} extra, which the base install and the container image leave "
            f"out; if it is installed, run the command with that environment's Python, e.g. "
            f"`.venv/bin/python -m service ...`)\n"
        )
    return (
        f"error: the Python package {exc.name!r} is not installed for {sys.executable}.\n"
        "Run the command with the Python of the environment the project was installed into, "
        "e.g. `.venv/bin/python -m service ...` (or `source .venv/bin/activate` first), or "
        "install the project there: `pip install -e .`\n"
    )


def _is_own_code(name: str | None) -> bool:
    """A missing module of our own packages is broken code (its traceback is the answer), except
    a whole package left out of this installation (``evaluation`` in the image)."""
    if name is None:
        return True
    top = name.split(".")[0]
    return top in OWN_PACKAGES and not (name == top and top in MODULE_EXTRAS)


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``), run the command and return its exit code."""
    command = None
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        command = args.command
        setup_logging(args.log_level)
        return int(args.func(args))
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        return 130
    except ModuleNotFoundError as exc:
        if _is_own_code(exc.name):
            raise  # our own code is broken: the traceback is the useful answer
        sys.stderr.write(missing_package_message(exc, command))
        return 1
