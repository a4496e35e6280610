"""Rotary position embeddings (HF's rotate-half layout) with the scaling variants configs use."""

from __future__ import annotations

import math
from typing import Any

import torch

from rillet.errors import ModelLoadError


def inverse_frequencies(
    head_dim: int, theta: float, scaling: dict[str, Any] | None, max_positions: int
) -> tuple[torch.Tensor, float]:
    """Return (inv_freq [head_dim/2], attention_factor) for the config's rope_scaling.

    Supported: default, linear, dynamic (NTK, fixed at the served context length as vLLM
    does, since a per-length base would make a token's encoding depend on later tokens),
    llama3, yarn.
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    if not scaling:
        return inv_freq.float(), 1.0
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    factor = float(scaling.get("factor", 1.0))
    if kind == "default":
        return inv_freq.float(), 1.0
    if kind == "linear":
        return (inv_freq / factor).float(), 1.0
    if kind == "dynamic":
        original = int(scaling.get("original_max_position_embeddings", max_positions))
        if max_positions <= original:
            return inv_freq.float(), 1.0
        base = theta * ((factor * max_positions / original) - (factor - 1)) ** (
            head_dim / (head_dim - 2)
        )
        exponents = torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim
        return (1.0 / (base**exponents)).float(), 1.0
    if kind == "llama3":
        return _llama3(inv_freq, scaling).float(), 1.0
    if kind == "yarn":
        return _yarn(head_dim, theta, scaling, max_positions)
    raise ModelLoadError(f"unsupported rope_scaling type {kind!r}")


def _llama3(inv_freq: torch.Tensor, scaling: dict[str, Any]) -> torch.Tensor:
    factor = float(scaling["factor"])
    low = float(scaling.get("low_freq_factor", 1.0))
    high = float(scaling.get("high_freq_factor", 4.0))
    original = float(scaling.get("original_max_position_embeddings", 8192))
    wavelen = 2 * math.pi / inv_freq
    low_wavelen, high_wavelen = original / low, original / high
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (original / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def _yarn(
    head_dim: int, theta: float, scaling: dict[str, Any], max_positions: int
) -> tuple[torch.Tensor, float]:
    factor = float(scaling["factor"])
    original = int(scaling.get("original_max_position_embeddings", max_positions))
    beta_fast = float(scaling.get("beta_fast", 32))
    beta_slow = float(scaling.get("beta_slow", 1))
    attention_factor = float(scaling.get("attention_factor") or (0.1 * math.log(factor) + 1.0))

    def correction_dim(num_rotations: float) -> float:
        return (head_dim * math.log(original / (num_rotations * 2 * math.pi))) / (
            2 * math.log(theta)
        )

    low = max(math.floor(correction_dim(beta_fast)), 0)
    high = min(math.ceil(correction_dim(beta_slow)), head_dim - 1)
    exponents = torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim
    extrapolation = 1.0 / theta**exponents
    interpolation = extrapolation / factor
    ramp = (torch.arange(head_dim // 2, dtype=torch.float64) - low) / max(high - low, 1e-3)
    extrapolation_weight = 1 - ramp.clamp(0, 1)
    inv_freq = interpolation * (1 - extrapolation_weight) + extrapolation * extrapolation_weight
    return inv_freq.float(), attention_factor


class RotaryEmbedding(torch.nn.Module):
    """Precomputed cos/sin tables for every position the model serves."""

    def __init__(
        self,
        head_dim: int,
        max_positions: int,
        theta: float,
        scaling: dict[str, Any] | None,
        dtype: torch.dtype,
    ) -> None:
        super().__init__()
        # On the CPU even inside ``torch.device("meta")`` (``CausalLM.empty``): a meta
        # arange runs torch's Python reference, whose first call imports torch._dynamo, 2 s
        # of every start. The tables move with the module.
        with torch.device("cpu"):
            inv_freq, factor = inverse_frequencies(head_dim, theta, scaling, max_positions)
            freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)
            emb = torch.cat((freqs, freqs), dim=-1)
            cos, sin = (emb.cos() * factor).to(dtype), (emb.sin() * factor).to(dtype)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        self.cos: torch.Tensor
        self.sin: torch.Tensor
        self._last: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Tables for this step's positions, [T, 1, d] each.

        Every layer asks with the same ``positions`` tensor, so the lookup is kept for it:
        one gather per step, not one per layer.
        """
        if self._last is None or self._last[0] is not positions:
            cos, sin = self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)
            self._last = (positions, cos, sin)
        return self._last[1], self._last[2]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, d] -> a rotated copy (HF's rotate-half layout)."""
    return x * cos + _rotate_half(x) * sin


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)
