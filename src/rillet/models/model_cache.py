"""A catalogue entry's installed parts -> one model file, checked before it is used.

A one-part model is used where pip put it; a model in several parts is joined into
``<cache>/models/<name>/<file>`` (:func:`rillet.config.cache_dir`). Either way the file's
size and SHA-256 must be the catalogue's before anything reads it: a hash mismatch refuses
the file. Hashing 1 GB on every start would cost seconds, so a verified file gets a sidecar
(``<file>.verified.json``: path, size, mtime, hash) and is hashed again only when it changed.
Assembly streams into a temporary file that is renamed into place once its hash is right, so
a crash or a concurrent start never leaves a half-written model under the real name.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import logging
import os
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from rillet.config import cache_dir
from rillet.errors import ModelLoadError
from rillet.models.catalogue import CatalogueEntry, PartLocator, install_hint, locate_installed

log = logging.getLogger(__name__)

_CHUNK = 8 << 20


def model_file(
    entry: CatalogueEntry,
    locate: PartLocator = locate_installed,
    cache_root: Path | None = None,
    progress: bool = True,
) -> Path:
    """The checked file of ``entry``, joining its parts into the cache first if needed.

    A joined file that checks out is used even when its packages were uninstalled since
    (they hold a second copy of the bytes). Raises ModelLoadError with one line to act on: a
    part is not installed (how to install it), or the parts or the file are not the bytes
    the catalogue records (refused). ``locate`` finds a part's file (tests hand in their
    own); ``cache_root`` defaults to :func:`rillet.config.cache_dir`; ``progress`` draws a
    bar while hashing or joining.
    """
    path = _checked_file(entry, locate, cached_path(entry, cache_root), progress)
    if not entry.trusted:
        log.warning("model %r is not trusted: %s", entry.name, entry.note)
    return path


def _checked_file(entry: CatalogueEntry, locate: PartLocator, target: Path, progress: bool) -> Path:
    record = target.with_name(f"{entry.file_name}.verified.json")
    if not entry.is_assembled:
        part = _located_parts(entry, locate)[0]
        _verify(entry, part, record, progress)
        return part
    if target.is_file():
        try:
            _verify(entry, target, record, progress)
            return target
        except ModelLoadError as exc:  # the parts may still be good: join them again
            log.warning("%s; assembling it again", exc)
    _assemble(entry, _located_parts(entry, locate), target, record, progress)
    return target


def _located_parts(entry: CatalogueEntry, locate: PartLocator) -> list[Path]:
    """Every part's file, in order; raises the "how to install it" line if any is missing."""
    located = [locate(part) for part in entry.parts]
    paths = [path for path in located if path is not None]
    if len(paths) < len(located):
        missing = [p.requirement for p, path in zip(entry.parts, located, strict=True) if not path]
        shown = ", ".join(missing[:3]) + (
            f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        )
        what = "is not installed" if not paths else f"is not fully installed (missing {shown})"
        raise ModelLoadError(f"model {entry.name!r} {what}: {install_hint(entry)}")
    return paths


def cached_path(entry: CatalogueEntry, cache_root: Path | None = None) -> Path:
    """Where ``entry``'s file is assembled (and, for every entry, where its sidecar lives)."""
    root = cache_root if cache_root is not None else cache_dir()
    return root / "models" / entry.name / entry.file_name


def _verify(entry: CatalogueEntry, path: Path, record: Path, progress: bool) -> None:
    """Raise unless ``path`` has the entry's size and hash (the hash taken from ``record``
    when that describes the file as it is now)."""
    stat = path.stat()
    if stat.st_size != entry.size:
        raise ModelLoadError(
            f"{path} is {stat.st_size} bytes, not the {entry.size} of model {entry.name!r}: "
            f"refusing to use it; {_reinstall(entry)}"
        )
    fingerprint = {"path": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    if _read_record(record) == {**fingerprint, "sha256": entry.sha256}:
        return
    digest = hashlib.sha256()
    with path.open("rb") as f, _bar(progress, entry.size, f"checking {entry.name}") as advance:
        while block := f.read(_CHUNK):
            digest.update(block)
            advance(len(block))
    _check_hash(entry, digest.hexdigest(), str(path))
    _write_record(record, {**fingerprint, "sha256": entry.sha256})


def _assemble(
    entry: CatalogueEntry, parts: list[Path], target: Path, record: Path, progress: bool
) -> None:
    """Join ``parts`` into ``target``, hashing as it writes, and rename it into place only
    if size and hash are right."""
    total = sum(part.stat().st_size for part in parts)
    if total != entry.size:  # cheap, and names the cause before a minute of copying
        raise ModelLoadError(
            f"the {len(parts)} parts of model {entry.name!r} add up to {total} bytes, not "
            f"{entry.size}: a part is corrupt; {_reinstall(entry)}"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    temp = target.with_name(f".{target.name}.{_writer_id()}.part")
    log.info("assembling %s from %d parts into %s", entry.name, len(parts), target)
    digest = hashlib.sha256()
    try:
        with temp.open("wb") as out, _bar(progress, total, f"assembling {entry.name}") as advance:
            for part in parts:
                with part.open("rb") as f:
                    while block := f.read(_CHUNK):
                        digest.update(block)
                        out.write(block)
                        advance(len(block))
        _check_hash(entry, digest.hexdigest(), f"the joined parts of {entry.name!r}")
        os.replace(temp, target)
    except OSError as exc:
        raise ModelLoadError(f"cannot assemble model {entry.name!r} into {target}: {exc}") from exc
    finally:
        temp.unlink(missing_ok=True)
    stat = target.stat()
    fingerprint = {"path": str(target), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    _write_record(record, {**fingerprint, "sha256": entry.sha256})


def _check_hash(entry: CatalogueEntry, sha256: str, what: str) -> None:
    if sha256 != entry.sha256:
        raise ModelLoadError(
            f"{what}: SHA-256 {sha256} is not the {entry.sha256} recorded for model "
            f"{entry.name!r}: refusing to use it; {_reinstall(entry)}"
        )


def _reinstall(entry: CatalogueEntry) -> str:
    return f"reinstall it with `rillet pull --reinstall {entry.name}`"


def _read_record(record: Path) -> object:
    try:
        return json.loads(record.read_text())
    except (OSError, ValueError):
        return None


def _write_record(record: Path, values: dict[str, object]) -> None:
    """Write the sidecar atomically; a cache we cannot write only costs a rehash next time."""
    temp = record.with_name(f".{record.name}.{_writer_id()}.tmp")
    try:
        record.parent.mkdir(parents=True, exist_ok=True)
        temp.write_text(json.dumps(values))
        os.replace(temp, record)
    except OSError as exc:
        log.debug("cannot record the verified hash in %s: %s", record, exc)
        temp.unlink(missing_ok=True)


def _writer_id() -> str:
    """Names this writer's temporary file apart from any other process's or thread's."""
    return f"{os.getpid()}-{threading.get_ident()}"


@contextlib.contextmanager
def _bar(enabled: bool, total: int, label: str) -> Iterator[Callable[[int], None]]:
    """A bytes progress bar on stderr: tqdm's when installed, shown only on a terminal."""
    tqdm: Any = None
    if enabled:
        with contextlib.suppress(ImportError):  # an optional dependency (the bench extra)
            tqdm = importlib.import_module("tqdm").tqdm
    if tqdm is None:
        yield lambda n: None
        return
    # disable=None: tqdm draws nothing when stderr is not a terminal (a server's log).
    bar = tqdm(total=total, desc=label, unit="B", unit_scale=True, file=sys.stderr, disable=None)
    try:
        yield bar.update
    finally:
        bar.close()
