"""Gemma 3 (text), on the same serving machinery as the Llama family.

What differs from Llama, each as transformers' ``Gemma3ForCausalLM`` computes it:

- RMSNorm scales by ``1 + w`` and computes in fp32 (then casts); four norms a layer: before
  and after attention, before and after the MLP, the residual added after the "post" norms;
- QK-norm: q and k are RMS-normalised per head (``1 + w`` again) before RoPE;
- attention interleaves local layers (a sliding window: a query at p sees keys p - W + 1 .. p)
  with global ones, every sixth layer in the released models; each kind has its own RoPE
  base (10k local, 1M global) and the scale is ``query_pre_attn_scalar ** -0.5``;
- GeGLU: ``down(gelu_tanh(gate(x)) * up(x))``;
- the embedding is multiplied by sqrt(hidden_size), rounded to the model's dtype.

The KV cache keeps every token of a local layer, window or not: blocks are shared by all
layers of a sequence, so a block can only be freed when every layer is past it, and the
global layers never are. The kernels skip the keys outside a row's window (they are read
never, not masked after reading).

Decode-only steps on quantized weights run through ``Gemma3DecoderStack``
(``csrc/decoder_stack.cpp``), which makes these layers' kernel calls in the same order from
C++ (bit-identical; one stream's step spent about as long in Python between the kernels).
"""

from __future__ import annotations

from types import ModuleType

import torch
from torch import nn

from rillet.errors import ModelLoadError
from rillet.models import ops
from rillet.models.attention import AttentionMetadata, KVCache
from rillet.models.causal_lm import CausalLM, Embedding
from rillet.models.config import ModelConfig
from rillet.models.decoder_stack import DecoderStack, quantized_layer
from rillet.models.linear import Linear
from rillet.models.llama import GatedMLP, LlamaAttention
from rillet.models.rope import RotaryEmbedding


class GemmaRMSNorm(nn.Module):
    """``x / rms(x) * (1 + w)`` in fp32, cast back to x's dtype (as transformers), one native
    call (``ops.scaled_rms_norm``) where the kernels are: as ~9 torch ops, Gemma's six
    norms a layer were about a fifth of a one-stream decode step."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(size))
        self.eps = eps
        self._scale: tuple[int, torch.Tensor] | None = None

    def scale(self) -> torch.Tensor:
        """``1 + w`` in fp32, recomputed when the weight changes (loading writes it in place)."""
        version = self.weight._version
        if self._scale is None or self._scale[0] != version:
            self._scale = (version, 1.0 + self.weight.detach().float())
        return self._scale[1]

    def forward(
        self, x: torch.Tensor, meta: AttentionMetadata, *, group: int | None = None
    ) -> torch.Tensor:
        """Rows of x (or each ``group`` of a row: QK-norm's heads) -> a new tensor."""
        return ops.scaled_rms_norm(x, self.scale(), self.eps, meta.native, group=group)

    def normalize_(self, x: torch.Tensor, meta: AttentionMetadata, group: int) -> None:
        """The same, in place, on rows that may be strided (q or k inside the fused qkv)."""
        ops.scaled_rms_norm(x, self.scale(), self.eps, meta.native, group=group, in_place=True)


class Gemma3Attention(LlamaAttention):
    """Llama's attention with QK-norm before RoPE, Gemma's scale and, on local layers, a
    sliding window."""

    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__(config)
        self.q_norm = GemmaRMSNorm(self.head_dim, config.rms_norm_eps)
        self.k_norm = GemmaRMSNorm(self.head_dim, config.rms_norm_eps)
        self.scale = config.attention_scale
        self.window = config.layer_window(layer)

    def before_rope(self, qkv: torch.Tensor, meta: AttentionMetadata) -> None:
        """QK-norm per head, in place in the fused row that rotary_and_cache reads."""
        d = self.head_dim
        self.q_norm.normalize_(qkv[:, : self.q_size], meta, d)
        self.k_norm.normalize_(qkv[:, self.q_size : self.q_size + self.kv_size], meta, d)


class Gemma3DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        eps = config.rms_norm_eps
        self.input_layernorm = GemmaRMSNorm(config.hidden_size, eps)
        self.self_attn = Gemma3Attention(config, layer)
        self.post_attention_layernorm = GemmaRMSNorm(config.hidden_size, eps)
        self.pre_feedforward_layernorm = GemmaRMSNorm(config.hidden_size, eps)
        self.mlp = GatedMLP(config, ops.gelu_tanh_and_mul)
        self.post_feedforward_layernorm = GemmaRMSNorm(config.hidden_size, eps)

    def forward(
        self, x: torch.Tensor, rope: RotaryEmbedding, cache: KVCache, meta: AttentionMetadata
    ) -> torch.Tensor:
        """The residual stream in, the residual stream out."""
        h = self.self_attn.forward(self.input_layernorm.forward(x, meta), rope, cache, meta)
        x = x + self.post_attention_layernorm.forward(h, meta)
        h = self.mlp.forward(self.pre_feedforward_layernorm.forward(x, meta), meta)
        return x + self.post_feedforward_layernorm.forward(h, meta)


class Gemma3ForCausalLM(CausalLM):
    """Gemma 3's text model (loading, fusing and logits: ``CausalLM``)."""

    def __init__(self, config: ModelConfig, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        if config.architecture != "gemma3" or config.rope_local_theta is None:
            raise ModelLoadError("Gemma3ForCausalLM needs a Gemma 3 config")
        self.config = config
        self.dtype = dtype
        self.rope, self.local_rope = self._ropes(config, dtype)
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Gemma3DecoderLayer(config, i) for i in range(config.num_layers))
        self.norm = GemmaRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.to(dtype)

    @staticmethod
    def _ropes(config: ModelConfig, dtype: torch.dtype) -> tuple[RotaryEmbedding, RotaryEmbedding]:
        """(global, local) rotary tables; scaling applies to the global layers only."""
        assert config.rope_local_theta is not None
        size, length = config.head_dim, config.max_position_embeddings
        return (
            RotaryEmbedding(size, length, config.rope_theta, config.rope_scaling, dtype),
            RotaryEmbedding(size, length, config.rope_local_theta, None, dtype),
        )

    def _init_buffers(self, device: torch.device | str) -> None:
        ropes = self._ropes(self.config, self.dtype)
        self.rope, self.local_rope = ropes[0].to(device), ropes[1].to(device)

    def forward(
        self, input_ids: torch.Tensor, kv_caches: list[KVCache], meta: AttentionMetadata
    ) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        x = x * torch.tensor(self.config.hidden_size**0.5, dtype=x.dtype)
        stack = self.decoder_stack
        if stack is not None and stack.covers(x.shape[0], kv_caches, meta):
            tables, lens = meta.decode_block_ids, meta.decode_context_lens
            hidden: torch.Tensor = stack.native_stack.forward(
                x, meta.positions, meta.slot_mapping, tables, lens, meta.decode_seq_starts
            )
            return hidden
        layers: list[Gemma3DecoderLayer] = list(self.layers)  # type: ignore[arg-type]
        for layer, cache in zip(layers, kv_caches, strict=True):
            rope = self.rope if layer.self_attn.window is None else self.local_rope
            x = layer.forward(x, rope, cache, meta)
        out: torch.Tensor = self.norm.forward(x, meta)
        return out

    def build_decoder_stack(
        self, kv_caches: list[KVCache], native: ModuleType | None
    ) -> DecoderStack | None:
        """The native stack for this model and its caches (the norms' scales as they are
        now), or None where it does not apply: no kernels, or a layer without a quantized
        copy."""
        if native is None:
            return None
        layers: list[Gemma3DecoderLayer] = list(self.layers)  # type: ignore[arg-type]
        first = layers[0].self_attn
        stack = native.Gemma3DecoderStack(
            first.num_heads, first.num_kv_heads, self.norm.eps, first.scale, self.norm.scale()
        )
        layer_rows: list[int] = []
        for layer, (key_cache, value_cache) in zip(layers, kv_caches, strict=True):
            attn, mlp = layer.self_attn, layer.mlp
            linears = (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)
            found = quantized_layer(linears)
            if found is None or any(lin.bias is not None for lin in linears):
                return None
            (qkv, o, gate_up, down), rows = found
            rope = self.rope if attn.window is None else self.local_rope
            stack.add_layer(
                layer.input_layernorm.scale(),
                qkv,
                attn.q_norm.scale(),
                attn.k_norm.scale(),
                o,
                layer.post_attention_layernorm.scale(),
                layer.pre_feedforward_layernorm.scale(),
                gate_up,
                down,
                layer.post_feedforward_layernorm.scale(),
                rope.cos,
                rope.sin,
                attn.window or 0,
                key_cache,
                value_cache,
            )
            layer_rows.append(rows)
        if not layer_rows:
            return None
        return DecoderStack(stack, kv_caches, min(layer_rows))

    def _expected_tensors(self) -> set[str]:
        expected = {"embed_tokens.weight", "norm.weight"}
        if not self.config.tie_word_embeddings:
            expected.add("lm_head.weight")
        leaves = [
            *(f"self_attn.{p}_proj.weight" for p in "qkvo"),
            *(f"mlp.{p}_proj.weight" for p in ("gate", "up", "down")),
            "self_attn.q_norm.weight",
            "self_attn.k_norm.weight",
            "input_layernorm.weight",
            "post_attention_layernorm.weight",
            "pre_feedforward_layernorm.weight",
            "post_feedforward_layernorm.weight",
        ]
        return {f"layers.{i}.{leaf}" for i in range(self.config.num_layers) for leaf in leaves} | (
            expected
        )
