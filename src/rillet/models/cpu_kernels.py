"""Native CPU kernels, compiled on first use with torch's C++ extension builder.

- Decode attention read straight from the paged KV cache (``csrc/paged_decode_attention.cpp``).
  Gathering each sequence's context into a padded tensor and calling SDPA copied the whole
  KV context every step and cost more than the matmuls at high batch; the kernel reads each
  K/V row once, in place.
- Prefill attention read the same way (``csrc/paged_prefill_attention.cpp``), flash-style
  over 16-key tiles in position order. One layer of a 1,024-token bf16 prompt (9 heads, 3 KV
  heads, 64 dims): 44.5 ms on SDPA's math path (what 3-D inputs get), 12.0 ms on its flash
  kernel (4-D), 6.4-8.4 ms here, at the machine's vdpbf16ps rate; the whole prompt's prefill
  went from 1.22 s to 0.79 s. And a row's result no longer depends on how its prompt was
  chunked or whether its prefix came from the cache, which SDPA's kernels did not give.
- The layer's elementwise steps (``csrc/fused_ops.cpp``, called through ``models.ops``):
  residual add + RMSNorm, RoPE + K/V cache write, SwiGLU. Each replaced a run of small torch
  ops whose dispatch cost more than their arithmetic.

- Batched linear layers on bf16 weights in vdpbf16ps operand order (``csrc/bf16_linear.cpp``,
  AVX512-BF16 builds): faster than oneDNN at decode batch sizes.
- Small-batch linear layers on 4- or 8-bit weights in groups of 32 with integer dot products
  (``csrc/quantized_linear.cpp``, AVX512-VNNI builds): a one-row step reads 2.7x fewer bytes.

Every entry point releases the GIL (``csrc/module.cpp``).

Compilation takes about a minute the first time on a machine (``python -m
rillet.models.cpu_kernels`` does it ahead, as ``scripts/setup.sh`` does). Each version of the
sources builds into a folder of its own under ``rillet.config.kernels_dir()``, named by a
digest of the sources, the flags and the torch version: checkouts with different kernels
no longer rebuild over each other, and a start whose build exists imports the library
directly instead of asking ninja (0.3 s). If compiling fails (no compiler, no ninja), the
model falls back to the torch versions and logs why once.
``RILLET_NATIVE_KERNELS=0`` turns the kernels off (read in ``rillet.config``).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import logging
import shutil
import sys
import threading
import time
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

from rillet.config import kernels_dir

if TYPE_CHECKING:  # torch is imported when the kernels are: is_built() needs none of it
    import torch

log = logging.getLogger("rillet.kernels")

_CFLAGS = ["-O3", "-march=native", "-ffast-math", "-fopenmp"]
_LDFLAGS = ["-fopenmp"]
#: Builds kept: the newest few versions of the sources (other checkouts' too).
_KEEP_BUILDS = 6
#: What a user is told before a compile.
COMPILE_NOTICE = "compiling rillet's CPU kernels (first start only, about a minute)"

_SOURCES = [
    Path(__file__).parent / "csrc" / name
    for name in (
        "module.cpp",
        "paged_decode_attention.cpp",
        "paged_prefill_attention.cpp",
        "fused_ops.cpp",
        "bf16_linear.cpp",
        "quantized_linear.cpp",
        "decoder_stack.cpp",
        "token_mask.cpp",
    )
]
_lock = threading.Lock()
_module: ModuleType | None = None
_failed = False


def load(enabled: bool = True) -> ModuleType | None:
    """Compile (once per machine and version) and import the kernels; None if unavailable
    or disabled."""
    global _module, _failed
    if not enabled or _failed:
        return None
    with _lock:
        if _module is None and not _failed:
            try:
                _module = _import_built() or _compile()
            except Exception as exc:  # no compiler, no ninja, unsupported platform ...
                _failed = True
                log.warning("native CPU kernels unavailable (%s); using the torch path", exc)
    return _module


def is_built() -> bool:
    """Whether this version of the kernels is compiled already (``load`` will not compile)."""
    return _library().is_file()


def build_directory() -> Path:
    """Where this version of the kernels is built."""
    return kernels_dir() / _module_name()


@cache
def _module_name() -> str:
    """``rillet_cpu_kernels_<digest>``: of every file in csrc/, the flags, torch and Python."""
    digest = hashlib.sha256()
    for path in sorted((Path(__file__).parent / "csrc").iterdir()):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    versions = [importlib.metadata.version("torch"), sys.version.split()[0], *_CFLAGS, *_LDFLAGS]
    digest.update(" ".join(versions).encode())
    return f"rillet_cpu_kernels_{digest.hexdigest()[:16]}"


def _library() -> Path:
    return build_directory() / f"{_module_name()}.so"


def _import_built() -> ModuleType | None:
    """The library built earlier, imported as torch's loader would; None if there is none
    or it does not import (then it is compiled again)."""
    path = _library()
    if not path.is_file():
        return None
    import torch  # noqa: F401 -- the library links against the libraries torch loads

    try:
        spec = importlib.util.spec_from_file_location(_module_name(), path)
        if spec is None or spec.loader is None:
            return None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    except ImportError as exc:  # a build cut short, or a library from another machine
        log.warning("cannot import %s (%s); compiling it again", path, exc)
        return None


def _compile() -> ModuleType:
    from torch.utils.cpp_extension import load as load_extension

    directory = build_directory()
    log.info("%s into %s", COMPILE_NOTICE, directory)
    directory.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    module: ModuleType = load_extension(
        name=_module_name(),
        sources=[str(p) for p in _SOURCES],
        extra_cflags=_CFLAGS,
        extra_ldflags=_LDFLAGS,
        build_directory=str(directory),
        verbose=False,
    )
    log.info("compiled rillet's CPU kernels in %.0fs", time.monotonic() - started)
    _prune_builds(directory)
    return module


def _prune_builds(keep: Path) -> None:
    """Drop all but the :data:`_KEEP_BUILDS` most recently built versions (best effort)."""
    builds = [p for p in keep.parent.glob("rillet_cpu_kernels_*") if p.is_dir() and p != keep]
    builds.sort(key=lambda p: p.stat().st_mtime, reverse=True)
    for old in builds[_KEEP_BUILDS - 1 :]:
        shutil.rmtree(old, ignore_errors=True)


def paged_decode_attention(
    module: ModuleType,
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    window: int | None = None,
    seq_starts: torch.Tensor | None = None,
) -> torch.Tensor:
    """query [D, H, d], caches [blocks, block_size, Hkv, d] -> [D, H, d]; ``window``: only
    the last ``window`` keys of each context (None: all). ``seq_starts`` [S + 1]: rows
    ``seq_starts[s]:seq_starts[s + 1]`` are one sequence's, read once through the block table
    of its first row, each row with its own context length (None: one row a sequence)."""
    out: torch.Tensor = module.paged_decode_attention(
        query.contiguous(),
        key_cache,
        value_cache,
        block_tables,
        context_lens,
        scale,
        window or 0,
        seq_starts,
    )
    return out


def paged_prefill_attention(
    module: ModuleType,
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_starts: torch.Tensor,
    query_lens: torch.Tensor,
    positions: torch.Tensor,
    scale: float,
    window: int | None = None,
) -> torch.Tensor:
    """query [P, H, d] (prefill rows; chunk c at rows ``query_starts[c]`` onwards, at
    positions from ``positions[c]``), caches [blocks, block_size, Hkv, d] -> [P, H, d].
    ``window``: a row at p sees keys p - window + 1 .. p (None: 0 .. p)."""
    out: torch.Tensor = module.paged_prefill_attention(
        query.contiguous(),
        key_cache,
        value_cache,
        block_tables,
        query_starts,
        query_lens,
        positions,
        scale,
        window or 0,
    )
    return out


def main() -> int:
    """``python -m rillet.models.cpu_kernels``: compile the kernels now if they are not."""
    if is_built():
        print(f"rillet: CPU kernels already built ({build_directory()})", file=sys.stderr)
        return 0
    print(
        "rillet: compiling rillet's CPU kernels, once per machine and version of the kernels "
        "(about a minute; longer on a busy machine)...",
        file=sys.stderr,
        flush=True,
    )
    started = time.monotonic()
    if load() is None:
        print(
            "rillet: the CPU kernels did not compile (see above); rillet uses torch's",
            file=sys.stderr,
        )
        return 1
    took = time.monotonic() - started
    print(f"rillet: CPU kernels ready in {took:.0f}s ({build_directory()})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    sys.exit(main())
