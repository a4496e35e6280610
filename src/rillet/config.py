"""Engine and server configuration: frozen dataclasses, validated once.

This is the only module that reads the environment (``RILLET_*`` variables), so nothing
changes behaviour at import time.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from rillet.errors import ModelLoadError

DTYPES = ("auto", "float32", "bfloat16", "float16")
#: ``EngineConfig.kv_cache_dtype``'s choices.
KV_CACHE_DTYPES = ("auto", "int8")
#: ``EngineConfig.speculative``'s choices, besides ``draft:NAME`` (:data:`DRAFT_PREFIX`).
SPECULATIVE_METHODS = ("off", "ngram")
#: ``speculative="draft:NAME"`` drafts with the model NAME (a catalogue name or a path).
DRAFT_PREFIX = "draft:"


def draft_model_of(speculative: str) -> str | None:
    """The draft model named by a ``speculative`` value (``draft:NAME``), else None."""
    if speculative.startswith(DRAFT_PREFIX):
        return speculative[len(DRAFT_PREFIX) :]
    return None


@dataclass(frozen=True)
class EngineConfig:
    """How to load the model and run the engine.

    ``model=None`` serves the bundled SmolLM2-135M-Instruct. The KV cache is sized from
    ``kv_cache_memory_bytes`` (``None``: :func:`auto_kv_cache_bytes`, from the memory the
    machine has) unless ``num_kv_blocks`` pins it (tests use that to force preemption).
    ``max_num_batched_tokens`` is the per-step token budget that bounds how
    long one step (and so every stream's inter-token gap) can take while prompts prefill;
    ``max_prefill_tokens_when_decoding`` bounds the prompt tokens of a step that also carries
    decodes (None: no bound beyond the budget).
    Steps of at most ``small_batch_tokens`` tokens run on one CPU thread, leaving the other
    cores to the server's own threads (0 = always use every thread).
    Steps of at most ``quantized_max_batch_tokens`` rows run the linear layers on 4- or
    8-bit copies of the weights with integer dot products: 2.7x fewer bytes to read (4-bit),
    and faster than bf16 at every step size measured. ``None`` turns them on for every step
    where they cost (next to) no precision the checkpoint had: a CPU serving bf16, with
    rillet's kernel (AVX512-VNNI), an integer GGUF. Its Q4_0/Q4_1/Q4_K matrices run on the
    4-bit kernel and Q5_*/Q8_0 on the 8-bit one with the file's own integers
    (``models.gguf_codes``); others (Q6_K...) are quantized again at 8 bits, and the LM head
    takes 8 bits unless the file's own are 4. 0 turns them off.
    ``kv_cache_dtype``: ``"auto"`` keeps K/V in the model's dtype (as vLLM's ``auto``);
    ``"int8"`` stores them in 8 bits with an fp32 scale per 32 values (``models.attention``):
    1.8x the tokens in the same memory, and 1.8x fewer bytes for decode attention to read,
    which is what bounds it at long contexts. ``None`` picks int8 for a CPU serving bf16 with
    the native kernels (where it is fast, and measured to cost no likelihood), else auto.
    ``native_kernels`` compiles rillet's C++ CPU kernels on first use (``RILLET_NATIVE_KERNELS=0``
    turns them off).
    ``speculative="ngram"`` drafts up to ``num_speculative_tokens`` tokens per row by prompt
    lookup (``engine/speculation.py``) and verifies them in the row's forward, as decode rows;
    a greedy or seeded request's output is unchanged, a sampled one's follows the model's
    distribution. How many drafts a request gets follows its measured acceptance and the
    batch size, in steps of at most ``speculative_max_num_seqs`` running requests.
    ``speculative="draft:NAME"`` drafts with a smaller model of the same tokenizer (a
    catalogue name or a path; ``engine/draft_model.py``), refused at start-up when its
    tokenizer differs from the target's.
    ``weight_cache`` keeps the weights ready to serve (dequantized, quantized, packed) on
    disk after the first start and maps them on later ones (``models.weight_cache``, under
    :func:`weight_cache_dir`); ``RILLET_WEIGHT_CACHE=0`` turns it off.
    ``fail_forward_at_batch_size`` is a fault-injection hook for tests
    (``RILLET_FAIL_FORWARD_AT_BATCH_SIZE``): the first model step that runs exactly that many
    requests raises inside its forward, once.
    """

    model: str | None = None
    dtype: str = "auto"
    device: str = "auto"
    max_model_len: int | None = None
    block_size: int = 16
    kv_cache_memory_bytes: int | None = None
    kv_cache_dtype: str | None = None
    num_kv_blocks: int | None = None
    max_num_seqs: int = 128
    max_num_batched_tokens: int = 512
    max_prefill_tokens_when_decoding: int | None = None
    enable_prefix_caching: bool = True
    seed: int | None = None
    num_threads: int | None = None
    native_kernels: bool = True
    weight_cache: bool = True
    small_batch_tokens: int = 0
    quantized_max_batch_tokens: int | None = None
    fail_forward_at_batch_size: int | None = None
    speculative: str = "off"
    num_speculative_tokens: int = 4
    speculative_max_num_seqs: int = 4

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ModelLoadError(f"dtype must be one of {', '.join(DTYPES)}, not {self.dtype!r}")
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens"):
            if getattr(self, name) <= 0:
                raise ModelLoadError(f"{name} must be positive")
        if self.max_model_len is not None and self.max_model_len <= 0:
            raise ModelLoadError("max_model_len must be positive")
        if self.quantized_max_batch_tokens is not None and self.quantized_max_batch_tokens < 0:
            raise ModelLoadError("quantized_max_batch_tokens must be >= 0")
        bound = self.max_prefill_tokens_when_decoding
        if bound is not None and bound <= 0:
            raise ModelLoadError("max_prefill_tokens_when_decoding must be positive")
        if self.kv_cache_dtype is not None and self.kv_cache_dtype not in KV_CACHE_DTYPES:
            choices = ", ".join(KV_CACHE_DTYPES)
            raise ModelLoadError(
                f"kv_cache_dtype must be one of {choices}, not {self.kv_cache_dtype!r}"
            )
        if self.speculative not in SPECULATIVE_METHODS and not draft_model_of(self.speculative):
            choices = ", ".join(SPECULATIVE_METHODS)
            raise ModelLoadError(
                f"speculative must be one of {choices} or {DRAFT_PREFIX}NAME, "
                f"not {self.speculative!r}"
            )
        if self.num_speculative_tokens < 0 or self.speculative_max_num_seqs < 0:
            raise ModelLoadError("num_speculative_tokens and speculative_max_num_seqs must be >= 0")
        if self.num_kv_blocks is not None and self.num_kv_blocks <= 0:
            raise ModelLoadError("num_kv_blocks must be positive")
        if self.kv_cache_memory_bytes is not None and self.kv_cache_memory_bytes <= 0:
            raise ModelLoadError("the KV cache memory must be positive")

    @classmethod
    def from_env(cls, **overrides: object) -> EngineConfig:
        """Defaults, then ``RILLET_MODEL``/``RILLET_DTYPE``/``RILLET_DEVICE``, then overrides."""
        values: dict[str, object] = {}
        for field_name, var in (
            ("model", "RILLET_MODEL"),
            ("dtype", "RILLET_DTYPE"),
            ("device", "RILLET_DEVICE"),
        ):
            if os.environ.get(var):
                values[field_name] = os.environ[var]
        if os.environ.get("RILLET_NATIVE_KERNELS") == "0":
            values["native_kernels"] = False
        if os.environ.get("RILLET_WEIGHT_CACHE") == "0":
            values["weight_cache"] = False
        if os.environ.get("RILLET_FAIL_FORWARD_AT_BATCH_SIZE"):
            values["fail_forward_at_batch_size"] = int(
                os.environ["RILLET_FAIL_FORWARD_AT_BATCH_SIZE"]
            )
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)  # type: ignore[arg-type]


#: The automatic KV cache takes this share of the memory available at start-up, within
#: these bounds: a fifth leaves room for the weights, the server and other processes, and
#: 4 GiB is what vLLM's CPU backend is commonly given (``VLLM_CPU_KVCACHE_SPACE``).
AUTO_KV_SHARE = 0.2
AUTO_KV_MIN_BYTES = 512 << 20
AUTO_KV_MAX_BYTES = 8 << 30


def auto_kv_cache_bytes(meminfo: str = "/proc/meminfo") -> int:
    """The default KV cache size: a fifth of ``MemAvailable``, between 512 MiB and 8 GiB
    (1 GiB where the kernel does not say). On this 24 GiB machine: about 4 GiB, 180k tokens
    of SmolLM2-135M. CPU pages are only taken as the cache fills (``allocate_kv_caches``)."""
    try:
        with open(meminfo) as lines:
            for line in lines:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
                    break
            else:
                return 1 << 30
    except (OSError, ValueError, IndexError):
        return 1 << 30
    share = int(available * AUTO_KV_SHARE)
    return max(AUTO_KV_MIN_BYTES, min(AUTO_KV_MAX_BYTES, share))


def cache_dir() -> Path:
    """Where rillet keeps the files it makes (models assembled from PyPI parts):
    ``RILLET_CACHE_DIR``, else ``$XDG_CACHE_HOME/rillet``, else ``~/.cache/rillet``."""
    if os.environ.get("RILLET_CACHE_DIR"):
        return Path(os.environ["RILLET_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "rillet"


def weight_cache_dir() -> Path:
    """Where ready-to-serve weights are kept (``models.weight_cache``): ``weights/`` under
    :func:`cache_dir`."""
    return cache_dir() / "weights"


def kernels_dir() -> Path:
    """Where rillet's C++ CPU kernels are compiled, a folder per version of their sources
    (``models.cpu_kernels``): ``kernels/`` under :func:`cache_dir`."""
    return cache_dir() / "kernels"
