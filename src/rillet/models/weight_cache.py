"""The weights a model holds once it is ready to serve, kept on disk and mapped back in.

Getting a GGUF ready means dequantizing some tensors, decoding the file's integer codes,
quantizing the rest again, and packing everything in the kernels' layouts: 45 s for
Qwen2.5-Coder-1.5B, every start. llama.cpp maps its file and uses the blocks as they are;
this is the closest rillet gets: the finished tensors (parameters, quantized copies) go to
one ``torch.save`` file under ``<cache_dir>/weights/`` after the first start, and later
starts map it (``torch.load(mmap=True)``): no copy, pages read on first touch and shared by
every process that maps the same file.

An entry is found by a key naming everything its contents depend on: each weight file's
path, size and mtime; the layout version and a digest of ``rillet/models``' sources (the
Python that builds the tensors and the C++ that reads them); the torch version; and the
caller's options (dtype, quantized rows, step budget, which kernels run). A different key
is a different file, so a changed model or option misses and builds afresh. The key is
stored inside the entry too and compared on load; an entry that does not load, or does not
fit the model exactly, is ignored (and rebuilt). Entries are written to a temporary file
and renamed into place, so a crash or a concurrent start never leaves half a file under an
entry's name. Each model keeps its :data:`KEEP_PER_MODEL` most recently used entries, and a
model's folder goes once its weight files are gone.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rillet.models.linear import Linear

log = logging.getLogger(__name__)

#: Bump when what an entry holds, or how it is read back, changes in a way the sources'
#: digest would not show.
LAYOUT_VERSION = 1
#: Entries kept per model: the options in use, and the previous ones.
KEEP_PER_MODEL = 2
#: A temporary file older than this was left by a writer that died.
_STALE_TEMP_S = 3600


@dataclass
class Entry:
    """What a ready model holds beyond its module structure: parameter values by name (one
    per storage; tied parameters appear once), each quantized copy (layer name -> (packed
    weight, bits)), and the parameters left on the meta device."""

    params: dict[str, torch.Tensor]
    quantized: dict[str, tuple[torch.Tensor, int]]
    released: list[str]


def cache_key(weight_files: Sequence[Path], options: dict[str, Any]) -> dict[str, Any]:
    """Everything an entry's contents depend on (JSON-able): see the module docstring."""
    files = []
    for path in weight_files:
        stat = path.stat()
        files.append([str(path.resolve()), stat.st_size, stat.st_mtime_ns])
    return {
        "layout": LAYOUT_VERSION,
        "files": files,
        "sources": _sources_digest(),
        "torch": torch.__version__,
        "options": options,
    }


def load(root: Path, key: dict[str, Any]) -> Entry | None:
    """The entry for ``key`` under ``root``, mapped; None if there is none or it is unusable."""
    path = _entry_path(root, key)
    if not path.is_file():
        return None
    try:
        saved = torch.load(path, mmap=True, weights_only=True)
        if not isinstance(saved, dict) or saved.get("key") != _canonical(key):
            raise ValueError("it was written for another key")
        quantized = {name: (t, int(bits)) for name, (t, bits) in saved["quantized"].items()}
        entry = Entry(dict(saved["params"]), quantized, list(saved["released"]))
    except Exception as exc:  # a truncated zip, a pickle error, a wrong shape of dict...
        log.warning("ignoring the weight cache entry %s (%s); rebuilding it", path, exc)
        return None
    with contextlib.suppress(OSError):  # a read-only cache is still a cache
        os.utime(path)  # most recently used: kept longest
    return entry


def save(root: Path, key: dict[str, Any], entry: Entry) -> Path | None:
    """Write ``entry`` for ``key`` atomically, then drop old entries; returns its path, or
    None if it could not be written (a full disk only costs the next start its time)."""
    path = _entry_path(root, key)
    temp = path.with_name(f".{path.name}.{os.getpid()}-{threading.get_ident()}.tmp")
    saved = {
        "key": _canonical(key),
        "params": entry.params,
        "quantized": {name: [t, bits] for name, (t, bits) in entry.quantized.items()},
        "released": entry.released,
    }
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_model_record(path.parent, key)
        torch.save(saved, temp)
        os.replace(temp, path)
    except (OSError, RuntimeError) as exc:
        log.warning("cannot write the weight cache entry %s: %s", path, exc)
        temp.unlink(missing_ok=True)
        return None
    prune(root, keep=path)
    return path


def save_in_background(root: Path, key: dict[str, Any], entry: Entry) -> None:
    """:func:`save` on a thread of its own, so a start is ready without waiting for the
    write (1.6 GB for Qwen2.5-1.5B: seconds). torch releases the GIL while it writes a
    tensor (the longest pause measured on the calling thread: 14 ms). A daemon: an engine
    process told to stop must not outlive its server by a write; one cut short leaves only
    a temporary file (:func:`prune` removes it), and the next start writes the entry."""
    thread = threading.Thread(
        target=_timed_save, args=(root, key, entry), name="weight-cache", daemon=True
    )
    with _writers_lock:
        _writers[:] = [w for w in _writers if w.is_alive()] + [thread]
    thread.start()


def wait_for_writes() -> None:
    """Block until every entry being written in the background is on disk."""
    with _writers_lock:
        writers = list(_writers)
    for writer in writers:
        writer.join()


def _timed_save(root: Path, key: dict[str, Any], entry: Entry) -> None:
    started = time.perf_counter()
    try:
        path = save(root, key, entry)
    except Exception:  # a bug here must not look like the engine's; the start went on
        log.exception("cannot write the weight cache entry")
        return
    if path is not None:
        log.info(
            "weights cached in %.1fs for the next start: %s", time.perf_counter() - started, path
        )


_writers: list[threading.Thread] = []
_writers_lock = threading.Lock()


def snapshot(model: nn.Module) -> Entry:
    """The tensors that make ``model`` ready: every parameter (on meta: its name only) and
    every Linear's quantized copy."""
    params: dict[str, torch.Tensor] = {}
    released: list[str] = []
    for name, param in model.named_parameters():  # tied parameters: once
        if param.device.type == "meta":
            released.append(name)
        else:
            params[name] = param.detach()
    quantized = {
        name: (module.quantized_weight, module.quantized_bits)
        for name, module in model.named_modules()
        if isinstance(module, Linear) and module.quantized_weight is not None
    }
    return Entry(params, quantized, released)


def restore(model: nn.Module, entry: Entry, max_rows: int, native: Any) -> int:
    """Give ``model`` (as ``CausalLM.empty`` made it) the entry's tensors, and quantized
    copies for steps of up to ``max_rows`` rows run by ``native``; returns how many copies.
    Raises ValueError, changing nothing, unless the entry fits the model exactly."""
    params = dict(model.named_parameters())
    modules = dict(model.named_modules())
    if set(params) != set(entry.params) | set(entry.released):
        raise ValueError("its parameters are not the model's")
    for name, tensor in entry.params.items():
        if tensor.shape != params[name].shape or tensor.dtype != params[name].dtype:
            raise ValueError(f"{name} has shape {tuple(tensor.shape)} {tensor.dtype}")
    if not all(isinstance(modules.get(name), Linear) for name in entry.quantized):
        raise ValueError("a quantized copy has no linear layer")
    if not all(isinstance(modules.get(n.rpartition(".")[0]), Linear) for n in entry.released):
        raise ValueError("a released parameter is not a linear layer's")
    with torch.no_grad():
        for name, tensor in entry.params.items():
            params[name].data = tensor  # the same Parameter: ties stay tied
    for name in entry.released:
        module_name, _, leaf = name.rpartition(".")
        meta = torch.empty_like(params[name], device="meta")
        setattr(modules[module_name], leaf, nn.Parameter(meta, requires_grad=False))
    for name, (packed, bits) in entry.quantized.items():
        linear = modules[name]
        assert isinstance(linear, Linear)
        linear.quantized_weight, linear.quantized_bits = packed, bits
        linear.quantized_max_rows, linear.quantized_native = max_rows, native
    return len(entry.quantized)


def prune(root: Path, keep: Path | None = None) -> None:
    """Keep each model's :data:`KEEP_PER_MODEL` most recently used entries (and ``keep``);
    remove the folders of models whose weight files are gone, and dead writers' temporary
    files. Best effort: another process may be pruning too."""
    if not root.is_dir():
        return
    now = time.time()
    for folder in root.iterdir():
        try:
            record = json.loads((folder / "model.json").read_text())
            if not all(Path(p).exists() for p in record["files"]):
                shutil.rmtree(folder, ignore_errors=True)
                continue
            for temp in folder.glob(".*.tmp"):
                if now - temp.stat().st_mtime > _STALE_TEMP_S:
                    temp.unlink(missing_ok=True)
            entries = sorted(folder.glob("*.pt"), key=lambda p: p.stat().st_mtime, reverse=True)
            for old in [p for p in entries if p != keep][KEEP_PER_MODEL - (keep in entries) :]:
                old.unlink(missing_ok=True)
        except (OSError, ValueError, KeyError, TypeError):
            continue  # not ours, or another process got there first


def _entry_path(root: Path, key: dict[str, Any]) -> Path:
    """``<root>/<model name>-<files digest>/<key digest>.pt``: one folder per model, named
    after its file (a GGUF) or its folder (an HF checkpoint, whose first file is its config)."""
    files = json.dumps([f[0] for f in key["files"]])
    first = Path(key["files"][0][0]) if key["files"] else Path("model")
    stem = first.parent.name if first.name == "config.json" else first.stem
    folder = f"{stem}-{hashlib.sha256(files.encode()).hexdigest()[:12]}"
    return root / folder / f"{hashlib.sha256(_canonical(key).encode()).hexdigest()[:24]}.pt"


def _write_model_record(folder: Path, key: dict[str, Any]) -> None:
    """``model.json``: the weight files this folder's entries are for (read by prune)."""
    record = folder / "model.json"
    if record.is_file():
        return
    temp = record.with_name(f".model.json.{os.getpid()}-{threading.get_ident()}.tmp")
    temp.write_text(json.dumps({"files": [f[0] for f in key["files"]]}))
    os.replace(temp, record)


def _canonical(key: dict[str, Any]) -> str:
    return json.dumps(key, sort_keys=True)


@cache
def _sources_digest() -> str:
    """A digest of every source file under ``rillet/models`` (Python and C++)."""
    package = Path(__file__).parent
    digest = hashlib.sha256()
    for path in sorted([*package.glob("*.py"), *package.glob("csrc/*")]):
        digest.update(path.relative_to(package).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]
