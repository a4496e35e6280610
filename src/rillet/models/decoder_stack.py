"""Decode-only steps through every layer in one native call (``csrc/decoder_stack.cpp``).

A one-stream decode step on the 4-bit weights spends as long in Python between the kernels
as in the kernels themselves. The native stack makes the same kernel calls in the same
order from C++, so its results are bit-identical; it is built only where every piece it
replaces has a native kernel, and the model uses it only for steps it covers (every row a
one-token decode, at most ``max_rows`` rows).
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Any, cast

from rillet.models.attention import AttentionMetadata, KVCache
from rillet.models.linear import Linear

if TYPE_CHECKING:
    from rillet.models.llama import LlamaDecoderLayer, LlamaForCausalLM


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


def _quantized(layer: Linear) -> tuple[Any, int] | None:
    if layer.quantized_native is None or layer.quantized_weight is None:
        return None
    return layer.quantized_weight, layer.quantized_bits


def build_decoder_stack(
    model: LlamaForCausalLM, kv_caches: list[KVCache], native: ModuleType | None
) -> DecoderStack | None:
    """The native stack for ``model`` and its caches, or None where it does not apply:
    no kernels, a layer without a quantized copy, or a bias other than the QKV one."""
    if native is None:
        return None
    rope = model.rope
    layers = cast("list[LlamaDecoderLayer]", list(model.layers))
    first = layers[0].self_attn
    stack = native.DecoderStack(
        first.num_heads,
        first.num_kv_heads,
        model.norm.eps,
        first.scale,
        rope.cos,
        rope.sin,
        model.norm.weight,
    )
    max_rows: int | None = None
    for layer, (key_cache, value_cache) in zip(layers, kv_caches, strict=True):
        attn, mlp = layer.self_attn, layer.mlp
        linears = (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)
        weights = [_quantized(linear) for linear in linears]
        if any(w is None for w in weights) or any(lin.bias is not None for lin in linears[1:]):
            return None
        qkv, o, gate_up, down = weights
        stack.add_layer(
            layer.input_layernorm.weight,
            qkv,
            attn.qkv_proj.bias,
            o,
            layer.post_attention_layernorm.weight,
            gate_up,
            down,
            key_cache,
            value_cache,
        )
        rows = min(linear.quantized_max_rows for linear in linears)
        max_rows = rows if max_rows is None else min(max_rows, rows)
    if max_rows is None:
        return None
    return DecoderStack(stack, kv_caches, max_rows)
