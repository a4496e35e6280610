#!/usr/bin/env python3
"""Plot tok/s and TTFT p50/p99 vs concurrency from ``rillet bench --out`` JSON-lines files.

    python bench/plot.py bench/out/serve-*/*.jsonl --out bench/out/serve.png

One line per label, so the files of several servers give one side-by-side chart.
Needs matplotlib (``pip install matplotlib``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

try:
    from rillet.benchmark.plot import PlotUnavailable, plot_levels, read_rows
except ImportError:  # run from a checkout with another Python: use the source tree
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from rillet.benchmark.plot import PlotUnavailable, plot_levels, read_rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("jsonl", nargs="+", type=Path, help="files written by --out")
    parser.add_argument("--out", type=Path, required=True, help="PNG to write")
    parser.add_argument("--title", default="", help="title above both charts")
    args = parser.parse_args()
    try:
        print(plot_levels(read_rows(args.jsonl), args.out, args.title))
    except PlotUnavailable as exc:
        print(f"bench/plot.py: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
