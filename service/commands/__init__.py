"""Subcommands of ``python -m service``; each module defines ``add_parser(subparsers)``."""
