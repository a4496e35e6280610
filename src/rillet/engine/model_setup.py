"""A model ready to serve from its files: weights loaded, quantized and packed, or mapped
from the weight cache (``models.weight_cache``) when an earlier start left them there.

A fresh build, in order: the file's own integer codes go to the linear layers first, so
that the float values of every matrix whose quantized copy will take every step (the file's
codes, as they are) are never dequantized; then the other tensors; then the quantized copies
(codes where the file has them, quantized again where not); then those float weights are
released. What is left is what the cache keeps.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from rillet.config import EngineConfig, weight_cache_dir
from rillet.models import registry, weight_cache
from rillet.models.attribute_binding import bind_attributes
from rillet.models.causal_lm import CausalLM
from rillet.models.linear import (
    enable_packed_weights,
    enable_quantized_weights,
    release_float_weights,
)
from rillet.models.loader import LoadedModel

log = logging.getLogger("rillet.engine")

#: Bits of the decoder layers' copies: llama.cpp's Q4_1, the bundled file's own format.
QUANTIZED_LAYER_BITS = 4


@dataclass
class ReadyModel:
    model: CausalLM
    #: Steps of at most this many rows run on the quantized copies (0: none).
    quantized_rows: int
    quantized_layers: int
    packed_layers: int
    #: Whether the weights came from the weight cache.
    cached: bool


def quantized_rows_for(
    config: EngineConfig, files: LoadedModel, device: torch.device, dtype: torch.dtype
) -> int:
    """Steps of at most how many rows run on 4-/8-bit copies: the configured number, else
    every step where that loses no precision the checkpoint had (see EngineConfig): an
    integer GGUF served in bf16 on a CPU."""
    if config.quantized_max_batch_tokens is not None:
        return config.quantized_max_batch_tokens
    # Every step: the integer kernel beats the bf16 one at every size measured, 1 to 512
    # rows (whole passes, bench/linear_kernels.py), and then results do not depend on how
    # many rows a step has.
    cpu_bf16 = (device.type, dtype) == ("cpu", torch.bfloat16)
    return config.max_num_batched_tokens if cpu_bf16 and files.layer_weight_bits else 0


def prepare_model(
    files: LoadedModel,
    config: EngineConfig,
    device: torch.device,
    dtype: torch.dtype,
    native: ModuleType | None,
    cache_root: Path | None = None,
) -> ReadyModel:
    """The model of ``files`` ready to serve; ``cache_root`` defaults to
    :func:`rillet.config.weight_cache_dir`."""
    rows = quantized_rows_for(config, files, device, dtype) if native is not None else 0
    model: CausalLM = registry.model_class(files.config.architecture).empty(
        files.config, dtype, device
    )
    root = cache_root if cache_root is not None else weight_cache_dir()
    key = None
    if config.weight_cache and device.type == "cpu" and files.weight_files:
        key = weight_cache.cache_key(files.weight_files, _options(config, dtype, native, rows))
    started = time.perf_counter()
    quantized = _from_cache(model, root, key, rows, native) if key is not None else None
    cached = quantized is not None
    if quantized is None:
        with _one_thread():
            quantized = _build(model, files, config, native, rows)
        log.info("weights ready in %.1fs", time.perf_counter() - started)
        if key is not None:  # written while this start goes on
            weight_cache.save_in_background(root, key, weight_cache.snapshot(model))
    else:
        log.info("weights mapped from the cache in %.1fs", time.perf_counter() - started)
    packed = enable_packed_weights(model, native, config.max_num_batched_tokens)
    model.eval()
    bind_attributes(model)  # last: after every weight copy above is in place
    return ReadyModel(model, rows, quantized, packed, cached)


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """torch on one thread while the weights are prepared: thousands of small element-wise
    ops and copies, each a fork and join across threads that gains nothing on memory-bound
    work, and on a busy machine waits on a descheduled thread. On this 2-core VM, shared:
    8-bit quantization 143 Mparams/s on one thread against 31 on two, packing 505 against
    192 (bench/RESULTS.md)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _from_cache(
    model: CausalLM, root: Path, key: dict[str, Any], rows: int, native: ModuleType | None
) -> int | None:
    """How many quantized copies the cache entry gave ``model``; None on a miss."""
    entry = weight_cache.load(root, key)
    if entry is None:
        return None
    try:
        return weight_cache.restore(model, entry, rows, native)
    except ValueError as exc:  # restore changed nothing: build as if it had missed
        log.warning("ignoring a weight cache entry that does not fit the model: %s", exc)
        return None


def _build(
    model: CausalLM,
    files: LoadedModel,
    config: EngineConfig,
    native: ModuleType | None,
    rows: int,
) -> int:
    """Load, quantize and release; returns how many layers took a quantized copy."""
    if native is None or rows <= 0:
        model.load_weights(files.weights())
        return 0
    skipped: set[str] = set()
    if files.group_codes is not None:
        model.load_group_codes(files.group_codes())
    if rows >= config.max_num_batched_tokens and native.quantized_linear_supported():

        def skip(name: str) -> bool:
            if model.codes_cover(name):
                skipped.add(name)
                return True
            return False

        model.load_weights(files.weights(skip), model.codes_cover)
    else:
        model.load_weights(files.weights())
    # Layers without codes of their own: 8 bits from a file with wider formats, else 4.
    source_bits = files.layer_weight_bits
    bits = 8 if source_bits and source_bits > QUANTIZED_LAYER_BITS else QUANTIZED_LAYER_BITS
    quantized = enable_quantized_weights(model, rows, native, bits)
    _load_floats_of_layers_without_copies(model, files, skipped)
    release_float_weights(model, config.max_num_batched_tokens)
    return quantized


def _load_floats_of_layers_without_copies(
    model: CausalLM, files: LoadedModel, skipped: set[str]
) -> None:
    """A layer whose float values were skipped but which did not take a quantized copy (its
    kernel probe failed) runs on its float weight after all: read those values now."""
    lacking = set()
    for name in skipped:
        found = model.linear_for(name)
        if found is not None and found[0].quantized_weight is None:
            lacking.add(name)
    if lacking:
        log.warning("%d matrices had no quantized copy; loading their floats", len(lacking))
        model.load_weights(files.weights(lambda name: name not in lacking), lambda _: True)


def _options(
    config: EngineConfig, dtype: torch.dtype, native: ModuleType | None, rows: int
) -> dict[str, Any]:
    """The options that change what a ready model holds (the weight cache's key)."""
    return {
        "dtype": str(dtype),
        "quantized_rows": rows,
        "max_num_batched_tokens": config.max_num_batched_tokens,
        "native": native is not None,
        "quantized_kernel": bool(native is not None and native.quantized_linear_supported()),
        "bf16_kernel": bool(native is not None and native.bf16_linear_supported()),
    }
