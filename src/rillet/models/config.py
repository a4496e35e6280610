"""The architecture facts our model code needs, from an HF ``config.json`` or GGUF metadata."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from rillet.errors import ModelLoadError

#: HF ``architectures`` / ``model_type`` values our Llama code serves.
LLAMA_FAMILY = frozenset(
    {"llama", "mistral", "qwen2", "LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"}
)


@dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of a Llama-family decoder.

    ``rope_scaling`` is the HF dict (``rope_type`` in {"default", "linear", "dynamic",
    "llama3", "yarn"}) or None. ``attention_bias`` is True for Qwen2 (q/k/v biases).
    """

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> ModelConfig:
        """Build from a parsed HF ``config.json``; raise ModelLoadError if unsupported."""
        archs = [*(cfg.get("architectures") or []), cfg.get("model_type", "")]
        if not any(a in LLAMA_FAMILY for a in archs):
            raise ModelLoadError(
                f"unsupported architecture {archs[0] if archs[0] else 'unknown'!r}: "
                f"rillet serves the Llama family ({', '.join(sorted(LLAMA_FAMILY))})"
            )
        try:
            num_heads = int(cfg["num_attention_heads"])
            hidden = int(cfg["hidden_size"])
            eos = cfg.get("eos_token_id")
            eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
            model_type = str(cfg.get("model_type", "llama"))
            return cls(
                architecture=model_type,
                vocab_size=int(cfg["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(cfg["intermediate_size"]),
                num_layers=int(cfg["num_hidden_layers"]),
                num_heads=num_heads,
                num_kv_heads=int(cfg.get("num_key_value_heads") or num_heads),
                head_dim=int(cfg.get("head_dim") or hidden // num_heads),
                rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
                rope_theta=float(cfg.get("rope_theta", 10000.0)),
                rope_scaling=cfg.get("rope_scaling"),
                max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                attention_bias=bool(cfg.get("attention_bias", model_type == "qwen2")),
                bos_token_id=cfg.get("bos_token_id"),
                eos_token_ids=tuple(int(e) for e in eos_ids),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelLoadError(f"config.json is missing or has a bad field: {exc}") from exc
