"""The architecture registry: names to classes, the one error for the rest, and every
registered class built on a tiny config."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from rillet.errors import ModelLoadError
from rillet.models import registry
from rillet.models.causal_lm import CausalLM
from rillet.models.config import ModelConfig
from rillet.models.gemma3 import Gemma3ForCausalLM
from rillet.models.llama import LlamaForCausalLM

TINY: dict[str, Any] = {
    "vocab_size": 64,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 8,
    "max_position_embeddings": 64,
}


def test_lookup_by_config_name_hf_name_and_gguf_name() -> None:
    assert registry.model_class("llama") is LlamaForCausalLM
    assert registry.model_class("mistral") is LlamaForCausalLM
    assert registry.model_class("qwen2") is LlamaForCausalLM
    assert registry.model_class("gemma3") is Gemma3ForCausalLM
    assert registry.from_hf_names(["Qwen2ForCausalLM", "qwen2"]).name == "qwen2"
    assert registry.from_hf_names(["", "gemma3_text"]).name == "gemma3"
    assert registry.from_gguf_name("llama").gguf_permutes_qk
    assert not registry.from_gguf_name("qwen2").gguf_permutes_qk


def test_hf_configs_name_the_registered_architecture() -> None:
    """``ModelConfig.architecture`` is the registry's name, whatever the HF spelling."""
    for arch in registry.ARCHITECTURES.values():
        for hf_name in arch.hf_names:
            assert ModelConfig.from_hf({**TINY, "architectures": [hf_name]}).architecture == (
                arch.name
            )


@pytest.mark.parametrize(
    ("lookup", "shown"),
    [
        (lambda: registry.model_class("gpt2"), "'gpt2':"),
        (lambda: registry.from_hf_names(["GPT2LMHeadModel", "gpt2"]), "'GPT2LMHeadModel':"),
        (lambda: registry.from_hf_names([""]), "'unknown':"),
        (lambda: registry.from_gguf_name("gpt2"), "'gpt2' in GGUF file:"),
        # llama.cpp writes Mistral as llama: a GGUF naming it is not one rillet reads.
        (lambda: registry.from_gguf_name("mistral"), "'mistral' in GGUF file:"),
        (lambda: registry.from_gguf_name(None), "None in GGUF file:"),
    ],
)
def test_unknown_architecture_is_one_error_naming_the_supported(lookup: Any, shown: str) -> None:
    with pytest.raises(ModelLoadError) as info:
        lookup()
    message = str(info.value)
    assert message.startswith(f"unsupported architecture {shown} rillet serves ")
    for arch in registry.ARCHITECTURES.values():
        assert all(name in message for name in arch.hf_names)
    assert "mistral (MistralForCausalLM; not from GGUF)" in message


@pytest.mark.parametrize("name", sorted(registry.ARCHITECTURES))
def test_every_registered_class_builds_on_a_tiny_config(name: str) -> None:
    arch = registry.ARCHITECTURES[name]
    config = ModelConfig.from_hf({**TINY, "architectures": [arch.hf_names[-1]]})
    cls = arch.model_class()
    assert issubclass(cls, CausalLM)
    model = cls.empty(config, torch.float32)
    assert isinstance(model, cls) and len(model.layers) == TINY["num_hidden_layers"]
    # Every tensor the class expects has an HF name that lands on one of its parameters.
    params = dict(model.named_parameters(remove_duplicate=False))
    for expected in model._expected_tensors():
        assert model._target(f"model.{expected}")[0] in params, expected
