#!/usr/bin/env python3
"""Write a model rillet can load (default: the bundled GGUF) as an HF folder for other servers.

vLLM serves HF folders (safetensors + config.json + tokenizer files), not our Q4_1 GGUF,
so the comparison gives it the same weights through rillet's own loader: dequantized,
q/k in HF layout, cast to ``--dtype``. Nothing is downloaded.

    .venv/bin/python bench/export_hf.py bench/out/hf-smollm2            # bfloat16
    .venv/bin/python bench/export_hf.py OUT --model path/to/model.gguf --dtype float32

The folder also loads in transformers (``AutoModelForCausalLM.from_pretrained(OUT)``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

DTYPES = ("bfloat16", "float16", "float32")


def export(model: str | None, out: Path, dtype_name: str) -> Path:
    """Write ``out``/{model.safetensors, config.json, tokenizer*.json, generation_config.json}."""
    import torch
    from safetensors.torch import save_file

    from rillet.models.loader import load_model_files

    loaded = load_model_files(model)
    config, tokenizer = loaded.config, loaded.tokenizer
    dtype = getattr(torch, dtype_name)
    tensors: dict[str, torch.Tensor] = {}
    for name, tensor in loaded.weights():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # tied: HF checkpoints leave it out and loaders re-tie it
        tensors[name] = tensor.to(dtype).contiguous()
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})

    eos = list(config.eos_token_ids)
    hf_config: dict[str, Any] = {
        "architectures": [_architecture(config.architecture)],
        "model_type": config.architecture,
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": config.rope_theta,
        "rope_scaling": config.rope_scaling,
        "max_position_embeddings": config.max_position_embeddings,
        "tie_word_embeddings": config.tie_word_embeddings,
        "attention_bias": config.attention_bias,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": eos[0] if len(eos) == 1 else eos,
        "torch_dtype": dtype_name,
    }
    if config.architecture == "gemma3":  # transformers' Gemma3TextConfig, older field names
        hf_config |= {
            "model_type": "gemma3_text",
            "hidden_act": None,
            "hidden_activation": "gelu_pytorch_tanh",
            "sliding_window": config.sliding_window,
            "layer_types": [
                "sliding_attention" if s else "full_attention" for s in config.sliding_layers
            ],
            "rope_local_base_freq": config.rope_local_theta,
            "query_pre_attn_scalar": int(config.query_pre_attn_scalar or config.head_dim),
            "final_logit_softcapping": None,
            "attn_logit_softcapping": None,
        }
    _write_json(out / "config.json", hf_config)
    _write_json(
        out / "generation_config.json",
        {"bos_token_id": config.bos_token_id, "eos_token_id": hf_config["eos_token_id"]}
        | loaded.generation_defaults,
    )

    tokenizer.backend.save(str(out / "tokenizer.json"))
    tokenizer_config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **tokenizer.special_tokens,
        "add_bos_token": tokenizer.add_bos,
        "add_eos_token": False,
        "model_max_length": config.max_position_embeddings,
        "clean_up_tokenization_spaces": False,
    }
    if tokenizer.has_chat_template:
        tokenizer_config["chat_template"] = tokenizer.chat_template
    _write_json(out / "tokenizer_config.json", tokenizer_config)
    return out


def _architecture(model_type: str) -> str:
    names = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM"}
    names |= {"qwen2": "Qwen2ForCausalLM", "gemma3": "Gemma3ForCausalLM"}
    return names.get(model_type, "LlamaForCausalLM")


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="folder to write (created if missing)")
    parser.add_argument("--model", help="GGUF file or HF folder (default: the bundled SmolLM2)")
    parser.add_argument("--dtype", choices=DTYPES, default="bfloat16")
    args = parser.parse_args()
    print(export(args.model, args.out, args.dtype))
    return 0


if __name__ == "__main__":
    sys.exit(main())
