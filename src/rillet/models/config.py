"""The architecture facts our model code needs, from an HF ``config.json`` or GGUF metadata."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from rillet.errors import ModelLoadError
from rillet.models import registry

#: Gemma 3's defaults where a config leaves them out (transformers' Gemma3TextConfig).
GEMMA3_SLIDING_PATTERN = 6  # every sixth layer is global
GEMMA3_LOCAL_ROPE_THETA = 10_000.0


@dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of a Llama-family decoder.

    ``rope_scaling`` is the HF dict (``rope_type`` in {"default", "linear", "dynamic",
    "llama3", "yarn"}) or None. ``attention_bias`` is True for Qwen2 (q/k/v biases).

    Gemma 3 (``architecture == "gemma3"``): ``sliding_layers[i]`` is True where layer i
    attends locally, a query at position p seeing keys p - sliding_window + 1 .. p; those
    layers rotate with ``rope_local_theta``, the global ones with ``rope_theta`` (and
    ``rope_scaling``). Attention scales by ``query_pre_attn_scalar ** -0.5``.
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
    sliding_layers: tuple[bool, ...] = ()
    sliding_window: int | None = None
    rope_local_theta: float | None = None
    query_pre_attn_scalar: float | None = None

    @property
    def attention_scale(self) -> float:
        """The factor on q.k: ``query_pre_attn_scalar ** -0.5``, by default head_dim's."""
        return float(self.query_pre_attn_scalar or self.head_dim) ** -0.5

    def layer_window(self, layer: int) -> int | None:
        """The sliding window of ``layer``'s attention, None where it is global."""
        return self.sliding_window if self.sliding_layers and self.sliding_layers[layer] else None

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> ModelConfig:
        """Build from a parsed HF ``config.json``; raise ModelLoadError if unsupported."""
        arch = registry.from_hf_names(
            [*(cfg.get("architectures") or []), cfg.get("model_type", "")]
        )
        if arch.name == "gemma3":
            return _gemma3_from_hf(cfg)
        try:
            num_heads = int(cfg["num_attention_heads"])
            hidden = int(cfg["hidden_size"])
            eos = cfg.get("eos_token_id")
            eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
            model_type = str(cfg.get("model_type", "llama"))
            return cls(
                architecture=arch.name,
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


def _gemma3_from_hf(cfg: dict[str, Any]) -> ModelConfig:
    """A Gemma 3 text ``config.json``, in transformers' current form (``rope_parameters``
    per layer type, ``layer_types``) or its older one (``rope_theta`` with
    ``rope_local_base_freq``, ``sliding_window_pattern``)."""
    for name in ("final_logit_softcapping", "attn_logit_softcapping"):
        if cfg.get(name) is not None:
            raise ModelLoadError(f"Gemma 3 config sets {name}, which rillet does not implement")
    if cfg.get("use_bidirectional_attention"):
        raise ModelLoadError("bidirectional Gemma 3 (an embedding model) is not a decoder")
    activation = cfg.get("hidden_activation", "gelu_pytorch_tanh")
    if activation != "gelu_pytorch_tanh":
        raise ModelLoadError(f"Gemma 3 activation {activation!r} is not supported")
    try:
        layers = int(cfg["num_hidden_layers"])
        types = cfg.get("layer_types")
        if types is None:
            pattern = int(cfg.get("sliding_window_pattern", GEMMA3_SLIDING_PATTERN))
            sliding = tuple(bool((i + 1) % pattern) for i in range(layers))
        else:
            sliding = tuple(t == "sliding_attention" for t in types)
        ropes = cfg.get("rope_parameters") or {}
        full = dict(ropes.get("full_attention") or {})
        local = dict(ropes.get("sliding_attention") or {})
        theta = float(full.pop("rope_theta", cfg.get("rope_theta", 1_000_000.0)))
        local_theta = float(
            local.get("rope_theta", cfg.get("rope_local_base_freq", GEMMA3_LOCAL_ROPE_THETA))
        )
        scaling = full if full.get("rope_type", "default") != "default" else cfg.get("rope_scaling")
        num_heads = int(cfg["num_attention_heads"])
        eos = cfg.get("eos_token_id", 1)
        eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
        return ModelConfig(
            architecture="gemma3",
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=int(cfg["hidden_size"]),
            intermediate_size=int(cfg["intermediate_size"]),
            num_layers=layers,
            num_heads=num_heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or num_heads),
            head_dim=int(cfg.get("head_dim", 256)),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=scaling,
            max_position_embeddings=int(cfg.get("max_position_embeddings", 131_072)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", True)),
            attention_bias=bool(cfg.get("attention_bias", False)),
            bos_token_id=cfg.get("bos_token_id", 2),
            eos_token_ids=tuple(int(e) for e in eos_ids),
            sliding_layers=sliding,
            sliding_window=int(cfg.get("sliding_window") or 4096),
            rope_local_theta=local_theta,
            query_pre_attn_scalar=float(cfg.get("query_pre_attn_scalar", 256)),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelLoadError(f"config.json is missing or has a bad field: {exc}") from exc
