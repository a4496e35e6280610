#!/usr/bin/env python3
"""Closed-loop streaming benchmark of an OpenAI-compatible server: ``rillet bench`` as a script.

    python bench/serve.py --url http://127.0.0.1:8080 --model smollm2 \\
        --concurrency 1,4,16,64 --max-tokens 128 --out bench/out/rillet.jsonl

The code is rillet's (``rillet.benchmark``): with rillet not installed in the running
Python, the repository's ``src/`` is used, which needs only httpx (and matplotlib for
``--plot``). ``--help`` lists every option.
"""

from __future__ import annotations

import sys
from pathlib import Path

try:
    from rillet.benchmark.cli import build_parser, run_from_args
except ImportError:  # run from a checkout with another Python: use the source tree
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from rillet.benchmark.cli import build_parser, run_from_args

if __name__ == "__main__":
    sys.exit(run_from_args(build_parser().parse_args()))
