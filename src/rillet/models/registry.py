"""The architectures rillet serves and the model class that runs each.

A new architecture is a file (its ``CausalLM`` subclass) and a line in ``ARCHITECTURES``;
one that reads its config or its GGUF tensors differently from Llama also needs that
reading in ``config.py`` / ``gguf_weights.py`` (as Gemma 3 has).

An architecture's ``name`` is the value of ``ModelConfig.architecture``: llama.cpp's GGUF
``general.architecture`` (llama, qwen2, gemma3), or for one GGUF does not name, the HF
``model_type`` (mistral: llama.cpp writes Mistral checkpoints as ``llama``). An HF
``config.json`` selects one by any of its ``hf_names`` (``architectures`` class names and
``model_type`` values).

Classes are named as ``"module:Class"`` and imported on first use, not at import: the
config and GGUF readers look names up here before any model is built, and the model modules
import torch and the config module itself.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

from rillet.errors import ModelLoadError

if TYPE_CHECKING:
    from rillet.models.causal_lm import CausalLM


@dataclass(frozen=True)
class Architecture:
    """One architecture: its name, the class that runs it and how its files name it."""

    name: str
    #: ``"module:Class"`` of its ``CausalLM`` subclass.
    model_class_path: str
    #: HF ``architectures`` / ``model_type`` values that select it.
    hf_names: tuple[str, ...]
    #: Whether a GGUF file's ``general.architecture`` may name it.
    in_gguf: bool = True
    #: Whether llama.cpp's converter permuted the q/k rows in its GGUF files (its rotary
    #: pairs adjacent dimensions, HF's the two halves), so the reader must permute them back.
    gguf_permutes_qk: bool = False

    def model_class(self) -> type[CausalLM]:
        """Import and return the class that runs this architecture."""
        module, _, name = self.model_class_path.partition(":")
        return cast("type[CausalLM]", getattr(importlib.import_module(module), name))


_LLAMA = "rillet.models.llama:LlamaForCausalLM"
_GEMMA3 = "rillet.models.gemma3:Gemma3ForCausalLM"

#: ``ModelConfig.architecture`` -> its Architecture.
ARCHITECTURES: dict[str, Architecture] = {
    arch.name: arch
    for arch in (
        Architecture("llama", _LLAMA, ("llama", "LlamaForCausalLM"), gguf_permutes_qk=True),
        Architecture("mistral", _LLAMA, ("mistral", "MistralForCausalLM"), in_gguf=False),
        Architecture("qwen2", _LLAMA, ("qwen2", "Qwen2ForCausalLM")),
        # Text-only checkpoints: the multimodal ``gemma3`` keeps its text model under
        # ``text_config``, which is not read.
        Architecture("gemma3", _GEMMA3, ("gemma3_text", "Gemma3ForCausalLM")),
    )
}


def get(name: str) -> Architecture:
    """The architecture ``ModelConfig.architecture`` names; ModelLoadError if none."""
    arch = ARCHITECTURES.get(name)
    if arch is None:
        raise unsupported(name)
    return arch


def from_hf_names(names: Sequence[str]) -> Architecture:
    """The architecture of an HF ``config.json``, given its ``architectures`` then its
    ``model_type``: the first name any architecture claims; ModelLoadError if none does."""
    for name in names:
        for arch in ARCHITECTURES.values():
            if name in arch.hf_names:
                return arch
    raise unsupported(next((name for name in names if name), "unknown"))


def from_gguf_name(name: object) -> Architecture:
    """The architecture a GGUF file's ``general.architecture`` names; ModelLoadError if
    rillet does not read that one from GGUF."""
    arch = ARCHITECTURES.get(name) if isinstance(name, str) else None
    if arch is None or not arch.in_gguf:
        raise unsupported(name, " in GGUF file")
    return arch


def model_class(name: str) -> type[CausalLM]:
    """The class that runs the architecture ``ModelConfig.architecture`` names."""
    return get(name).model_class()


def unsupported(name: object, where: str = "") -> ModelLoadError:
    """The one error for an architecture rillet does not serve, listing those it does."""
    return ModelLoadError(f"unsupported architecture {name!r}{where}: rillet serves {supported()}")


def supported() -> str:
    """Every architecture with the HF names that select it, e.g. ``llama
    (LlamaForCausalLM), ..., mistral (MistralForCausalLM; not from GGUF)``."""
    parts = []
    for arch in ARCHITECTURES.values():
        aliases = [name for name in arch.hf_names if name != arch.name]
        note = "" if arch.in_gguf else "; not from GGUF"
        parts.append(f"{arch.name} ({', '.join(aliases)}{note})")
    return ", ".join(parts)
