"""Tiny model files written by the tests: HF folders (config.json + safetensors) and GGUF
files in llama.cpp's layout and quantization types, from a small random Llama or Qwen2."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as Q
from gguf.quants import quantize
from safetensors.torch import save_file

from rillet.tokenizer_gguf import build_gguf_backend

HEADS, KV_HEADS, HIDDEN, LAYERS = 4, 2, 64, 2
# A byte-level vocabulary: the 256 byte symbols plus two control tokens.
TOKENS = [chr(c) for c in range(33, 127)] + [chr(c) for c in (*range(161, 173), *range(174, 256))]
TOKENS += [chr(256 + i) for i in range(256 - len(TOKENS))] + ["<|endoftext|>", "<|im_end|>"]
TOKEN_TYPES = [1] * 256 + [3, 3]


def tiny_hf_config(model_type: str = "llama") -> dict[str, Any]:
    arch = "Qwen2ForCausalLM" if model_type == "qwen2" else "LlamaForCausalLM"
    return {
        "architectures": [arch],
        "model_type": model_type,
        "vocab_size": len(TOKENS),
        "hidden_size": HIDDEN,
        "intermediate_size": 128,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "max_position_embeddings": 256,
        "tie_word_embeddings": False,
        "eos_token_id": 256,
    }


def tiny_state_dict(model_type: str = "llama") -> dict[str, torch.Tensor]:
    """Random weights under transformers' own names and shapes for the tiny config."""
    import transformers  # the tests that write these files skip without it

    torch.manual_seed(0)
    cfg = transformers.AutoConfig.for_model(**tiny_hf_config(model_type))
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    return {k: torch.randn_like(v) * 0.5 for k, v in model.state_dict().items()}


def write_hf_folder(
    folder: Path, state: dict[str, torch.Tensor], shards: int = 1, model_type: str = "llama"
) -> None:
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(json.dumps(tiny_hf_config(model_type)))
    (folder / "generation_config.json").write_text(
        json.dumps({"eos_token_id": [257], "temperature": 0.6, "transformers_version": "x"})
    )
    tokenizer_meta = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.tokens": TOKENS,
        "tokenizer.ggml.token_type": TOKEN_TYPES,
    }
    build_gguf_backend(tokenizer_meta).save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    names = sorted(state)
    if shards == 1:
        save_file(state, str(folder / "model.safetensors"))
        return
    weight_map = {}
    for i in range(shards):
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = names[i::shards]
        save_file({n: state[n] for n in part}, str(folder / file))
        weight_map.update(dict.fromkeys(part, file))
    index = {"metadata": {}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


def llama_cpp_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """What llama.cpp's converter does to Llama q/k rows (pairs the two rotary halves)."""
    return (
        w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    )


GGUF_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
GGUF_PARTS = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}
# Every type the gguf package can write, spread over the tiny model's matrices.
QTYPES = {
    "token_embd.weight": Q.F16,
    "output.weight": Q.Q8_0,
    "blk.0.attn_q.weight": Q.F32,
    "blk.0.attn_k.weight": Q.F16,
    "blk.0.attn_v.weight": Q.Q8_0,
    "blk.0.attn_output.weight": Q.Q4_0,
    "blk.0.ffn_gate.weight": Q.Q4_1,
    "blk.0.ffn_up.weight": Q.Q5_0,
    "blk.0.ffn_down.weight": Q.Q5_1,
    "blk.1.attn_q.weight": Q.Q8_0,
    "blk.1.attn_k.weight": Q.BF16,
    "blk.1.attn_v.weight": Q.Q4_1,
    "blk.1.attn_output.weight": Q.F32,
}


def to_gguf_name(hf_name: str) -> str:
    if hf_name in GGUF_NAMES:
        return GGUF_NAMES[hf_name]
    _, _, layer, rest = hf_name.split(".", 3)
    module, suffix = rest.rsplit(".", 1)
    return f"blk.{layer}.{GGUF_PARTS[module]}.{suffix}"


def write_gguf(
    path: Path,
    state: dict[str, torch.Tensor],
    arch: str = "llama",
    tied: bool = False,
    temperature: float | None = None,
) -> dict[str, np.ndarray]:
    """Write ``state`` as llama.cpp would; returns the float values stored per GGUF name."""
    writer = gguf.GGUFWriter(path, arch)
    writer.add_block_count(LAYERS)
    writer.add_context_length(256)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(128)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(HIDDEN // HEADS)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(TOKENS)
    writer.add_token_types(TOKEN_TYPES)
    writer.add_token_merges([])
    writer.add_eos_token_id(257)
    if temperature is not None:
        writer.add_float32("general.sampling.temp", temperature)
    stored: dict[str, np.ndarray] = {}
    for hf_name, tensor in state.items():
        if tied and hf_name == "lm_head.weight":
            continue
        name = to_gguf_name(hf_name)
        data = tensor.float().numpy()
        if arch == "llama" and ".attn_q." in name:
            data = llama_cpp_permute(data, HEADS)
        elif arch == "llama" and ".attn_k." in name:
            data = llama_cpp_permute(data, KV_HEADS)
        qtype = QTYPES.get(name, Q.F32)
        raw = data if qtype == Q.F32 else quantize(data, qtype)
        writer.add_tensor(name, raw, raw_dtype=None if qtype == Q.F32 else qtype)
        stored[name] = gguf.quants.dequantize(raw, qtype) if qtype != Q.F32 else data
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return stored


def k_quant_bytes(qtype: Q, rows: int, rng: np.random.Generator) -> np.ndarray:
    """Random K-quant blocks whose fp16 scale fields hold sane values."""
    _, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(rows, 2, block_bytes), dtype=np.uint8)
    scale_at = {Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,)}[qtype]
    for offset in scale_at:
        halves = rng.uniform(0.001, 0.05, size=(rows, 2)).astype(np.float16)
        raw[:, :, offset : offset + 2] = halves.view(np.uint8).reshape(rows, 2, 2)
    return raw.reshape(rows, -1)
