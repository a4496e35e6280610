"""``rillet <command>``: one argparse subparser per command, each in its own module.

A command module exposes ``add_parser(subparsers)``, which registers its arguments and sets
``func`` (``args -> exit code``). Registration must stay cheap: heavy imports (torch, the
engine) belong inside ``func``.
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Sequence

from rillet import __version__

#: Modules that register a subcommand, in help order; a new command is a module and a line.
COMMAND_MODULES: tuple[str, ...] = (
    "rillet.server.serve_cmd",
    "rillet.client.chat_cli",
    "rillet.client.generate_cli",
    "rillet.benchmark.cli",
    "rillet.models_cmd",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rillet", description="A token-streaming LLM inference server."
    )
    parser.add_argument("--version", action="version", version=f"rillet {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``rillet`` script and ``python -m rillet``."""
    args = build_parser().parse_args(argv)
    code: int = args.func(args)
    return code
