"""Build an EngineCore from an EngineConfig: load files, size the KV cache, wire the parts."""

from __future__ import annotations

import ctypes
import logging
import sys
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import torch

from rillet.config import EngineConfig, auto_kv_cache_bytes, draft_model_of
from rillet.engine.block_manager import BlockManager
from rillet.engine.core import EngineCore
from rillet.engine.draft_model import DraftModelProposer, check_same_tokenizer
from rillet.engine.model_runner import ModelRunner
from rillet.engine.model_setup import prepare_model
from rillet.engine.scheduler import Scheduler, SchedulerConfig
from rillet.engine.speculation import SpeculationConfig, Speculator
from rillet.errors import ModelLoadError
from rillet.models import cpu_kernels
from rillet.models.attention import kv_row_width
from rillet.models.config import ModelConfig
from rillet.models.loader import LoadedModel, load_model_files
from rillet.tokenizer import Tokenizer

log = logging.getLogger("rillet.engine")

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
#: Served context when the model allows more; keeps RoPE tables and prompts bounded.
DEFAULT_MAX_MODEL_LEN = 8192


@dataclass
class EngineParts:
    core: EngineCore
    tokenizer: Tokenizer
    model_config: ModelConfig
    model_name: str
    max_model_len: int
    dtype: torch.dtype
    device: torch.device
    #: The model's own sampling defaults (generation_config.json names), for the server.
    generation_defaults: dict[str, Any] = field(default_factory=dict)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto``: bf16 on accelerators and on CPUs with native bf16 math, else fp32.

    On this project's CPUs (AVX-512 BF16) bf16 matmuls run 2-5x faster than fp32 and read
    half the weight bytes. The cost: results are no longer independent of the batch shape
    (see tests/engine/test_engine_invariants.py); ``--dtype float32`` restores that.
    """
    if name == "auto":
        if device.type != "cpu":
            return torch.bfloat16
        return torch.bfloat16 if cpu_has_native_bf16() else torch.float32
    return _DTYPES[name]


def cpu_has_native_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def keep_freed_memory_for_reuse() -> None:
    """Stop glibc from handing large freed blocks back to the OS after every step.

    Each step allocates multi-megabyte temporaries (logits are 3 MB at 16 rows). Above
    glibc's default mmap threshold every one is a fresh mapping whose pages fault in on
    first touch, one by one: at 16 rows that was 5 ms a step in page faults, a sixth of the
    step. Raising the mmap and trim thresholds to their maximum keeps such blocks on the
    heap for reuse. Linux/glibc only; elsewhere a no-op.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
    libc.mallopt(m_mmap_threshold, 32 << 20)  # the largest glibc accepts on 64-bit
    libc.mallopt(m_trim_threshold, 1 << 30)


def resolve_kv_cache_dtype(
    config: EngineConfig, device: torch.device, dtype: torch.dtype, native: ModuleType | None
) -> torch.dtype:
    """The KV cache's dtype: int8 (the 8-bit cache) or the model's ``dtype``. Unset (None):
    int8 where serving in bf16 on a CPU with the native kernels, which
    bench/quantization_check.py measured as costing no likelihood (see EngineConfig)."""
    if config.kv_cache_dtype is not None:
        eight_bit = config.kv_cache_dtype == "int8"
    else:
        eight_bit = native is not None and (device.type, dtype) == ("cpu", torch.bfloat16)
    return torch.int8 if eight_bit else dtype


def kv_bytes_per_token(cfg: ModelConfig, dtype: torch.dtype) -> int:
    """K and V of one token in every layer, in a cache of ``dtype`` (int8: with scales)."""
    row_bytes = kv_row_width(cfg.head_dim, dtype) * torch.empty((), dtype=dtype).element_size()
    return 2 * cfg.num_layers * cfg.num_kv_heads * row_bytes


def speculator_for(config: EngineConfig, draft_cost: float = 0.0) -> Speculator | None:
    """The scheduler's speculator, or None when speculation is off. ``draft_cost``: a draft
    model's forward as a fraction of a target decode step (``engine/speculation.py``)."""
    spec = SpeculationConfig(
        method=config.speculative,
        num_speculative_tokens=config.num_speculative_tokens,
        max_num_seqs=config.speculative_max_num_seqs,
        draft_cost=draft_cost,
    )
    return Speculator(spec) if spec.enabled else None


def weight_bytes(files: LoadedModel) -> int:
    """Bytes of a model's weight files: what a memory-bound decode step reads, about."""
    return sum(f.stat().st_size for f in files.weight_files if f.suffix != ".json")


@dataclass
class _Draft:
    proposer: DraftModelProposer
    #: Its forward's time as a fraction of the target's decode step (weight bytes' ratio).
    cost: float


def _draft_model(
    config: EngineConfig,
    target: LoadedModel,
    max_model_len: int,
    device: torch.device,
    dtype: torch.dtype,
    kv_dtype: torch.dtype,
    native: ModuleType | None,
    max_cache_tokens: int,
) -> _Draft | None:
    """The draft model of ``--speculative draft:NAME``, with its own KV cache, or None.

    Refused (ModelLoadError) when its tokenizer differs from the target's or its context is
    shorter than the served one. Its cache holds ``speculative_max_num_seqs + 1`` full
    contexts (only steps of that many requests draft), at most ``max_cache_tokens`` (the
    target's); when it is full, the least recently drafting request's part is evicted.
    """
    name = draft_model_of(config.speculative)
    if name is None or config.num_speculative_tokens == 0:
        return None
    files = load_model_files(name)
    check_same_tokenizer(target.tokenizer, files.tokenizer, name)
    cfg = files.config
    if cfg.max_position_embeddings < max_model_len:
        raise ModelLoadError(
            f"draft model {name!r} has {cfg.max_position_embeddings} positions, fewer than "
            f"the served context of {max_model_len}; lower --max-model-len"
        )
    ready = prepare_model(files, config, device, dtype, native)
    tokens = min((config.speculative_max_num_seqs + 1) * max_model_len, max_cache_tokens)
    num_blocks = -(-tokens // config.block_size) + config.num_speculative_tokens + 1
    runner = ModelRunner(
        ready.model,
        num_blocks,
        config.block_size,
        device,
        kv_dtype=kv_dtype,
        native=native,
        small_batch_tokens=config.small_batch_tokens,
    )
    cost = max(0.05, weight_bytes(files) / max(1, weight_bytes(target)))
    log.info(
        "draft model %s: %d layers, %d KV blocks of %d tokens, a forward ~%.2f of a step",
        files.name,
        cfg.num_layers,
        num_blocks,
        config.block_size,
        cost,
    )
    block_manager = BlockManager(num_blocks, config.block_size, enable_prefix_caching=False)
    proposer = DraftModelProposer(
        runner, block_manager, config.max_num_batched_tokens, target.config.vocab_size
    )
    return _Draft(proposer, cost)


def build_engine(config: EngineConfig) -> EngineParts:
    """Load the model named by ``config`` and return a ready EngineCore with its tokenizer."""
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    if device.type == "cpu":
        keep_freed_memory_for_reuse()
    files = load_model_files(config.model)
    cfg = files.config
    max_model_len = min(config.max_model_len or DEFAULT_MAX_MODEL_LEN, cfg.max_position_embeddings)
    if config.max_model_len and config.max_model_len > cfg.max_position_embeddings:
        log.warning(
            "max_model_len %d exceeds the model's %d positions; using %d",
            config.max_model_len,
            cfg.max_position_embeddings,
            max_model_len,
        )
    native = cpu_kernels.load(config.native_kernels and device.type == "cpu")
    kv_dtype = resolve_kv_cache_dtype(config, device, dtype, native)
    bytes_per_block = kv_bytes_per_token(cfg, kv_dtype) * config.block_size
    num_blocks = config.num_kv_blocks or max(
        1, (config.kv_cache_memory_bytes or auto_kv_cache_bytes()) // bytes_per_block
    )
    log.info(
        "KV cache: %d blocks of %d tokens, %s (%.2f GiB)",
        num_blocks,
        config.block_size,
        str(kv_dtype).removeprefix("torch."),
        num_blocks * bytes_per_block / (1 << 30),
    )
    if num_blocks * config.block_size < max_model_len:
        raise ModelLoadError(
            f"KV cache of {num_blocks} blocks x {config.block_size} tokens cannot hold one "
            f"sequence of max_model_len={max_model_len}; raise the KV budget or lower it"
        )

    ready = prepare_model(files, config, device, dtype, native)
    model = ready.model
    tokens = num_blocks * config.block_size
    draft = _draft_model(config, files, max_model_len, device, dtype, kv_dtype, native, tokens)

    eos_ids = frozenset(files.tokenizer.eos_token_ids) | frozenset(cfg.eos_token_ids)
    scheduler = Scheduler(
        SchedulerConfig(
            max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=config.max_num_batched_tokens,
            max_prefill_tokens_when_decoding=config.max_prefill_tokens_when_decoding,
            max_model_len=max_model_len,
            block_size=config.block_size,
            num_blocks=num_blocks,
            enable_prefix_caching=config.enable_prefix_caching,
        ),
        eos_token_ids=eos_ids,
        speculator=speculator_for(config, draft.cost if draft is not None else 0.0),
    )
    runner = ModelRunner(
        model,
        num_blocks,
        config.block_size,
        device,
        kv_dtype=kv_dtype,
        eos_token_ids=eos_ids,
        seed=config.seed,
        native=native,
        small_batch_tokens=config.small_batch_tokens,
        fail_at_batch_size=config.fail_forward_at_batch_size,
        tokenizer=files.tokenizer,
        drafter=draft.proposer if draft is not None else None,
    )
    runner.grammars.warm()
    log.info(
        "loaded %s: %d layers, %s on %s (%d linear layers packed; 4/8-bit weights in "
        "%d for steps of <= %d tokens%s), %d KV blocks of %d tokens, context %d",
        files.name,
        cfg.num_layers,
        str(dtype).removeprefix("torch."),
        device,
        ready.packed_layers,
        ready.quantized_layers,
        ready.quantized_rows,
        ", from the weight cache" if ready.cached else "",
        num_blocks,
        config.block_size,
        max_model_len,
    )
    return EngineParts(
        core=EngineCore(runner, scheduler, max_model_len),
        tokenizer=files.tokenizer,
        model_config=cfg,
        model_name=files.name,
        max_model_len=max_model_len,
        dtype=dtype,
        device=device,
        generation_defaults=files.generation_defaults,
    )
