"""Decode-only steps through every layer in one native call (``csrc/decoder_stack.cpp``).

A one-stream decode step on the 4-bit weights spends as long in Python between the kernels
as in the kernels themselves. The native stack makes the same kernel calls in the same
order from C++, so its results are bit-identical; it is built only where every piece it
replaces has a native kernel, and the model uses it only for steps it covers (every row a
one-token decode, at most ``max_rows`` rows).

A model builds its own stack (``LlamaForCausalLM.build_decoder_stack`` walks Llama's
layers); this module knows the stack, not any model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from rillet.models.attention import AttentionMetadata, KVCache
from rillet.models.linear import Linear


@dataclass
class DecoderStack:
    """The native stack, the caches it holds, and the largest step it may take (the
    quantized copies' limit)."""

    native_stack: Any  # rillet_cpu_kernels.DecoderStack
    kv_caches: list[KVCache]
    max_rows: int

    def covers(self, num_tokens: int, kv_caches: list[KVCache], meta: AttentionMetadata) -> bool:
        """Whether a step is decodes only, on the attention kernel, within ``max_rows``, and
        on the caches the stack was built with (it writes to those, whatever it is given)."""
        return (
            kv_caches is self.kv_caches
            and not meta.prefills
            and meta.num_decode_tokens == num_tokens <= self.max_rows
            and meta.decode_context_lens is not None
        )


def quantized_layer(linears: Sequence[Linear]) -> tuple[list[tuple[Any, int]], int] | None:
    """One layer's linears for the native stack: their quantized copies, in order, and the
    largest step all of them take; None if one has no quantized copy."""
    weights = [quantized(linear) for linear in linears]
    if any(weight is None for weight in weights):
        return None
    rows = min(linear.quantized_max_rows for linear in linears)
    return [weight for weight in weights if weight is not None], rows


def quantized(layer: Linear) -> tuple[Any, int] | None:
    """``(packed weight, bits)`` of a linear layer's quantized copy, or None if it has none."""
    if layer.quantized_native is None or layer.quantized_weight is None:
        return None
    return layer.quantized_weight, layer.quantized_bits
