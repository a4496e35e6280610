"""Model fixtures for engine tests: a tiny random-weight Llama (and a tiny Gemma 3) as real
HF folders.

The tiny model has the bundled SmolLM2 tokenizer (so prompts with CJK and emoji tokenize
as they would in production) and 2 small layers, so a step takes a millisecond or two.
Its weights are drawn with a larger init range than HF's default so logits are peaked:
random models with near-uniform logits produce near-ties, and batch-shape rounding
differences could then flip a greedy pick, which would test luck rather than the engine.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

TINY_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 49152,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 1024,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "initializer_range": 0.2,
    "torch_dtype": "float32",
}


def write_tiny_model(folder: Path, seed: int = 0, **overrides: object) -> Path:
    """Write config.json, model.safetensors and the tokenizer files into ``folder``."""
    import torch
    import transformers

    from rillet.models.loader import load_model_files

    folder.mkdir(parents=True, exist_ok=True)
    config = transformers.LlamaConfig(**{**TINY_CONFIG, **overrides})
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config)
    model.save_pretrained(folder, safe_serialization=True)
    bundled = load_model_files(None).tokenizer
    bundled.backend.save(str(folder / "tokenizer.json"))
    chat_template = getattr(bundled, "chat_template", None)
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "bos_token": "<|im_start|>",
                "eos_token": "<|im_end|>",
                "chat_template": chat_template,
                "add_bos_token": False,
            }
        )
    )
    return folder


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


WINDOW = 8
GEMMA_CONFIG = {
    "architectures": ["Gemma3ForCausalLM"],
    "model_type": "gemma3_text",
    "vocab_size": 49152,
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "query_pre_attn_scalar": 48,  # not head_dim: the scale must come from here
    "sliding_window": WINDOW,
    "layer_types": [
        "sliding_attention",
        "sliding_attention",
        "full_attention",
        "sliding_attention",
    ],
    "rope_parameters": {
        "full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
        "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
    },
    "max_position_embeddings": 512,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": True,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
    "torch_dtype": "float32",
}


@pytest.fixture(scope="session")
def tiny_gemma(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random Gemma 3 as an HF folder, with the bundled tokenizer. Every weight, the norms'
    too (zero at init, i.e. a scale of 1), is drawn wide so that logits are peaked."""
    import torch
    import transformers

    from rillet.models.loader import load_model_files

    folder = tmp_path_factory.mktemp("tiny-gemma3")
    config = transformers.Gemma3TextConfig(**GEMMA_CONFIG)
    torch.manual_seed(0)
    model = transformers.Gemma3ForCausalLM(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.normal_(0.0, 0.3 if "norm" in name else 0.15)
    model.save_pretrained(folder, safe_serialization=True)
    bundled = load_model_files(None).tokenizer
    bundled.backend.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": False}))
    return folder
