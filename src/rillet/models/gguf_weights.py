"""Read a GGUF file as HF-named tensors and a :class:`ModelConfig`.

Three things differ from an HF checkpoint, and each is undone here:
- names: ``blk.3.attn_q.weight`` is ``model.layers.3.self_attn.q_proj.weight``;
- storage: tensors may be quantized (Q4_1, Q8_0, K-quants...); ``gguf.quants.dequantize``
  turns them into float32, while F16/BF16/F32 keep their dtype;
- layout: llama.cpp's converter permutes the rows of Llama's q/k projections (its rotary
  implementation pairs adjacent dimensions, HF pairs the two halves), so they are permuted back.
Shapes need no transposition: GGUF lists dimensions fastest-first (``ne``), and ``gguf_file``
already exposes the data in C order, i.e. HF's ``[out, in]``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize

from rillet.errors import ModelLoadError
from rillet.models import registry
from rillet.models.config import GEMMA3_LOCAL_ROPE_THETA, GEMMA3_SLIDING_PATTERN, ModelConfig
from rillet.models.gguf_codes import GroupCodes, group_codes
from rillet.models.gguf_file import GGUFFile, GGUFTensor, read_gguf

_TOP_LEVEL = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
#: Gemma 3's own block tensors (its ``ffn_norm`` is the norm before the MLP). llama.cpp stores
#: Gemma's norm weights as 1 + w (its RMSNorm multiplies by the weight); HF's are w.
_GEMMA3_BLOCK = {
    **_BLOCK,
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
_BLOCK_NAME = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
#: Tensors we knowingly skip: Llama-3.1 ``rope_freqs`` (per-dimension rope factors). rillet takes
#: rope scaling from metadata only, so such files run with unscaled rope at long context.
IGNORED_TENSORS = frozenset({"rope_freqs.weight"})

#: Integer weight formats and their width: Q4_1, Q8_0, Q6_K, IQ4_NL, TQ2_0, ...
_QUANT_WIDTH = re.compile(r"(?:I?Q|TQ)(\d)_")

_SAMPLING_KEYS = {
    "general.sampling.temp": "temperature",
    "general.sampling.top_k": "top_k",
    "general.sampling.top_p": "top_p",
    "general.sampling.min_p": "min_p",
    "general.sampling.penalty_repeat": "repetition_penalty",
}


def open_gguf(path: Path) -> GGUFFile:
    """Open (memory-map) a GGUF file and parse its metadata (plain Python values) and tensor
    table; a corrupt or truncated file is a ModelLoadError."""
    try:
        return read_gguf(path)
    except Exception as exc:  # ValueError, struct.error, UnicodeDecodeError, OSError...
        raise ModelLoadError(
            f"cannot read GGUF file {path}: {exc} (truncated or corrupt?)"
        ) from exc


def gguf_to_hf_name(name: str, arch: str = "llama") -> str | None:
    """The HF parameter name of GGUF tensor ``name``, or None if it has no HF counterpart."""
    if name in _TOP_LEVEL:
        return _TOP_LEVEL[name]
    block = _GEMMA3_BLOCK if arch == "gemma3" else _BLOCK
    match = _BLOCK_NAME.fullmatch(name)
    if match is None or match.group(2) not in block:
        return None
    layer, part, suffix = match.groups()
    return f"model.layers.{layer}.{block[part]}.{suffix}"


def config_from_gguf(meta: Mapping[str, Any], tensors: Sequence[GGUFTensor]) -> ModelConfig:
    """The ModelConfig a GGUF file describes; unsupported or incomplete files raise."""
    arch = registry.from_gguf_name(meta.get("general.architecture")).name

    def need(key: str) -> Any:
        value = meta.get(f"{arch}.{key}")
        if value is None:
            raise ModelLoadError(f"GGUF file lacks metadata key '{arch}.{key}'")
        return value

    shapes = {t.name: [int(d) for d in t.shape] for t in tensors}
    heads = int(need("attention.head_count"))
    hidden = int(need("embedding_length"))
    kv_heads = meta.get(f"{arch}.attention.head_count_kv", heads)
    if not isinstance(kv_heads, int):
        raise ModelLoadError("GGUF per-layer attention.head_count_kv is not supported")
    tokens = meta.get("tokenizer.ggml.tokens") or []
    # The embedding may be padded past the token list; the model's size is the embedding's.
    vocab = shapes.get("token_embd.weight", [0, len(tokens)])[-1]
    scaling = None
    if meta.get(f"{arch}.rope.scaling.type") in ("linear", "yarn"):
        scaling = {
            "rope_type": meta[f"{arch}.rope.scaling.type"],
            "factor": float(meta.get(f"{arch}.rope.scaling.factor", 1.0)),
        }
        original = meta.get(f"{arch}.rope.scaling.original_context_length")
        if original is not None:
            scaling["original_max_position_embeddings"] = int(original)
    head_dim = meta.get(f"{arch}.attention.key_length") or meta.get(f"{arch}.rope.dimension_count")
    eos = [meta.get(f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom")]
    bos = meta.get("tokenizer.ggml.bos_token_id")
    gemma: dict[str, Any] = {}
    if arch == "gemma3":
        # What llama.cpp (and transformers' GGUF reader) assume for the keys a file lacks.
        layers = int(need("block_count"))
        gemma = {
            "sliding_layers": tuple(bool((i + 1) % GEMMA3_SLIDING_PATTERN) for i in range(layers)),
            "sliding_window": int(need("attention.sliding_window")),
            "rope_local_theta": GEMMA3_LOCAL_ROPE_THETA,
            "query_pre_attn_scalar": float(head_dim or hidden // heads),
        }
    return ModelConfig(
        architecture=arch,
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(need("feed_forward_length")),
        num_layers=int(need("block_count")),
        num_heads=heads,
        num_kv_heads=int(kv_heads),
        head_dim=int(head_dim or hidden // heads),
        rms_norm_eps=float(meta.get(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(meta.get(f"{arch}.rope.freq_base", 10000.0)),
        rope_scaling=scaling,
        max_position_embeddings=int(meta.get(f"{arch}.context_length", 2048)),
        tie_word_embeddings="output.weight" not in shapes,
        attention_bias="blk.0.attn_q.bias" in shapes,
        bos_token_id=int(bos) if bos is not None else None,
        eos_token_ids=tuple(dict.fromkeys(int(e) for e in eos if e is not None)),
        **gemma,
    )


def check_tensor_names(tensors: Sequence[GGUFTensor], arch: str = "llama") -> None:
    """Refuse a file with tensors we would otherwise drop silently (another architecture's)."""
    unknown = [
        t.name
        for t in tensors
        if t.name not in IGNORED_TENSORS and gguf_to_hf_name(t.name, arch) is None
    ]
    if unknown:
        shown = ", ".join(unknown[:5]) + (" ..." if len(unknown) > 5 else "")
        raise ModelLoadError(f"GGUF file has tensors rillet cannot place: {shown}")


def layer_weight_bits(tensors: Sequence[GGUFTensor]) -> int | None:
    """The widest integer width among the decoder layers' matrices, None when any of them is
    stored as floats. It tells how coarse a copy of the weights can be without losing
    precision the file had (a Q4_1 file: 4)."""
    widest = 0
    for tensor in tensors:
        if not tensor.name.startswith("blk.") or len(tensor.shape) != 2:
            continue
        name = GGMLQuantizationType(tensor.tensor_type).name
        match = _QUANT_WIDTH.match(name)
        if match is None:
            return None
        widest = max(widest, int(match.group(1)))
    return widest or None


def generation_defaults_from_gguf(meta: Mapping[str, Any]) -> dict[str, Any]:
    """Sampling defaults recorded in ``general.sampling.*``, under generation_config names."""
    return {name: meta[key] for key, name in _SAMPLING_KEYS.items() if key in meta}


def dequantize_tensor(tensor: GGUFTensor) -> torch.Tensor:
    """One GGUF tensor as a torch tensor in HF's shape: float32, or the file's float dtype."""
    qtype = tensor.tensor_type
    shape = tuple(reversed(tensor.shape))
    data = tensor.data
    try:
        if qtype == GGMLQuantizationType.F32:
            out = torch.from_numpy(np.array(data, dtype=np.float32))
        elif qtype == GGMLQuantizationType.F16:
            out = torch.from_numpy(np.array(data, dtype=np.float16))
        elif qtype == GGMLQuantizationType.BF16:
            # Keep bf16 as bf16: reinterpret the raw bytes rather than widen through float32.
            out = torch.from_numpy(np.array(data).view(np.int16)).view(torch.bfloat16)
        else:
            out = torch.from_numpy(_dequantize_rows(data, qtype))
        return out.reshape(shape)
    except NotImplementedError as exc:
        raise ModelLoadError(
            f"tensor {tensor.name!r} uses {qtype.name}, which rillet cannot dequantize"
        ) from exc
    except (ValueError, RuntimeError) as exc:
        raise ModelLoadError(f"tensor {tensor.name!r} ({qtype.name}) is malformed: {exc}") from exc


#: Values dequantized at a time (4 MB of float32).
_VALUES_AT_ONCE = 1 << 20


def _dequantize_rows(data: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """``gguf.quants.dequantize``, a slab of rows at a time into one float32 array.

    The same arithmetic, row by row, so the same values; but gguf keeps every 16-row
    piece of a tensor until it joins them, so a large matrix costs twice its float32
    size in memory and most of its time in page faults: Qwen2.5-1.5B's 151,936-row
    embedding took 5.3 s, against 1.2 s in slabs.
    """
    rows = data.reshape(-1, data.shape[-1])
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    columns = rows.shape[1] // type_size * block_size
    out = np.empty((rows.shape[0], columns), dtype=np.float32)
    step = max(1, _VALUES_AT_ONCE // max(columns, 1))
    for start in range(0, rows.shape[0], step):
        out[start : start + step] = dequantize(rows[start : start + step], qtype)
    return out


def unpermute_rope_rows(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Invert llama.cpp's ``permute``: per head, rows (pair, half) -> (half, pair)."""
    rows = weight.shape[0]
    if rows % (2 * num_heads):
        raise ModelLoadError(
            f"q/k projection with {rows} rows does not split into {num_heads} heads"
        )
    per_head = weight.reshape(num_heads, rows // num_heads // 2, 2, *weight.shape[1:])
    return per_head.transpose(1, 2).reshape(weight.shape)


def iter_gguf_weights(
    reader: GGUFFile, config: ModelConfig, skip: Callable[[str], bool] | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(hf_name, tensor)`` one tensor at a time, so only one is dequantized at once;
    a tensor whose HF name ``skip`` accepts is not dequantized at all."""
    permuted = registry.get(config.architecture).gguf_permutes_qk
    gemma = config.architecture == "gemma3"
    for tensor in reader.tensors:
        name = gguf_to_hf_name(tensor.name, config.architecture)
        if name is None or (skip is not None and skip(name)):
            continue
        weight = dequantize_tensor(tensor)
        if gemma and name.endswith("norm.weight"):
            weight = weight.float() - 1  # llama.cpp's 1 + w, back to HF's w
        if permuted and ".self_attn.q_proj." in name:
            weight = unpermute_rope_rows(weight, config.num_heads)
        elif permuted and ".self_attn.k_proj." in name:
            weight = unpermute_rope_rows(weight, config.num_kv_heads)
        yield name, weight


def iter_gguf_group_codes(
    reader: GGUFFile, config: ModelConfig
) -> Iterator[tuple[str, GroupCodes]]:
    """Yield ``(hf_name, codes)`` for every matrix stored in a format the integer kernel can
    take as it is (``gguf_codes``), in HF's row order."""
    permuted = registry.get(config.architecture).gguf_permutes_qk
    for tensor in reader.tensors:
        name = gguf_to_hf_name(tensor.name, config.architecture)
        if name is None or len(tensor.shape) != 2:
            continue
        rows, cols = reversed(tensor.shape)
        codes = group_codes(tensor.data, tensor.tensor_type, (rows, cols))
        if codes is None:
            continue
        heads = None
        if permuted and ".self_attn.q_proj." in name:
            heads = config.num_heads
        elif permuted and ".self_attn.k_proj." in name:
            heads = config.num_kv_heads
        if heads is not None:
            codes = codes.rows(unpermute_rope_rows(torch.arange(rows), heads))
        yield name, codes
