"""``rillet bench``: load a running OpenAI-compatible server and report TTFT, ITL, tokens/s.

The implementation lives in :mod:`rillet.benchmark`; ``bench/serve.py`` in the repository
runs the same code without the ``rillet`` command.
"""

from __future__ import annotations

import argparse
from typing import Any

from rillet.benchmark.cli import DESCRIPTION, add_arguments


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``bench`` subcommand to an ``argparse`` subparsers object."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "bench",
        help="benchmark an OpenAI-compatible streaming server (TTFT, ITL, tokens/s)",
        description=DESCRIPTION,
    )
    add_arguments(parser)
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """Run ``rillet bench``; returns the process exit code."""
    from rillet.benchmark.cli import run_from_args

    return run_from_args(args)
