"""Llama-family decoder written for serving: flat token batches, paged KV, fused projections.

Covers Llama 2/3, Mistral, Qwen2 (q/k/v biases) and SmolLM2: RMSNorm, RoPE with scaling,
grouped-query attention, SwiGLU, tied embeddings. Parameters are loaded under HF names
and fused on the way in (q/k/v into one matmul, gate/up into one) because on CPU each
separate small matmul costs a Python dispatch and a pass over the activations.

The step's hot path calls submodules' ``forward`` directly: ``nn.Module.__call__`` checks
for hooks on every call (about 2 us, ~300 calls a step) and rillet registers none.
"""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType

import torch
from torch import nn

from rillet.models import ops
from rillet.models.attention import AttentionMetadata, KVCache, paged_attention
from rillet.models.causal_lm import CausalLM, Embedding
from rillet.models.config import ModelConfig
from rillet.models.decoder_stack import DecoderStack, quantized_layer
from rillet.models.linear import Linear
from rillet.models.rope import RotaryEmbedding

ActAndMul = Callable[[torch.Tensor, ModuleType | None], torch.Tensor]


class RMSNorm(nn.Module):
    """Pre-norm with the residual add folded in (``ops.add_rms_norm``).

    The mean square is taken in fp32 even for bf16 inputs. (HF rounds to the input dtype
    before the weight multiply; in fp32 the two agree.)
    """

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None, meta: AttentionMetadata
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (normalised residual + x, residual + x)."""
        return ops.add_rms_norm(x, residual, self.weight, self.eps, meta.native)


class LlamaAttention(nn.Module):
    """Fused q/k/v projection, RoPE and the cache write, paged attention, output projection.

    Subclasses adjust it through ``scale``, ``window`` (a sliding window, None for full
    causal attention) and :meth:`before_rope` (Gemma's QK-norm)."""

    window: int | None = None

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.qkv_proj = Linear(
            config.hidden_size, self.q_size + 2 * self.kv_size, bias=config.attention_bias
        )
        self.o_proj = Linear(self.q_size, config.hidden_size, bias=False)
        self.scale = self.head_dim**-0.5

    def before_rope(self, qkv: torch.Tensor, meta: AttentionMetadata) -> None:
        """Change the fused projection [T, (H + 2 Hkv) d] in place before RoPE (none here)."""

    def forward(
        self,
        x: torch.Tensor,
        rope: RotaryEmbedding,
        cache: KVCache,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        qkv = self.qkv_proj.forward(x)
        self.before_rope(qkv, meta)
        q, k, v = ops.rotary_and_cache(
            qkv,
            meta.positions,
            rope,
            cache,
            meta.slot_mapping,
            self.num_heads,
            self.num_kv_heads,
            meta.native,
        )
        out = paged_attention(q, k, v, cache, meta, self.scale, self.window)
        return self.o_proj.forward(out.reshape(x.shape[0], self.q_size))


class GatedMLP(nn.Module):
    """``down(act(gate(x)) * up(x))`` with gate and up fused; ``act_and_mul`` is SwiGLU's
    ``ops.silu_and_mul`` (Llama) or GeGLU's ``ops.gelu_tanh_and_mul`` (Gemma)."""

    def __init__(self, config: ModelConfig, act_and_mul: ActAndMul = ops.silu_and_mul) -> None:
        super().__init__()
        self.intermediate_size = config.intermediate_size
        self.gate_up_proj = Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down_proj = Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.act_and_mul = act_and_mul

    def forward(self, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        gate_up = self.gate_up_proj.forward(x)
        return self.down_proj.forward(self.act_and_mul(gate_up, meta.native))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = LlamaAttention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = GatedMLP(config)

    def forward(
        self,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        rope: RotaryEmbedding,
        cache: KVCache,
        meta: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (this layer's MLP output, the residual stream before it is added)."""
        h, residual = self.input_layernorm.forward(x, residual, meta)
        h = self.self_attn.forward(h, rope, cache, meta)
        h, residual = self.post_attention_layernorm.forward(h, residual, meta)
        return self.mlp.forward(h, meta), residual


class LlamaForCausalLM(CausalLM):
    """The Llama family; its decode-only steps can run on the native decoder stack."""

    def __init__(self, config: ModelConfig, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.config = config
        self.dtype = dtype
        self.rope = self._rope(config, dtype)
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.to(dtype)

    @staticmethod
    def _rope(config: ModelConfig, dtype: torch.dtype) -> RotaryEmbedding:
        return RotaryEmbedding(
            config.head_dim,
            config.max_position_embeddings,
            config.rope_theta,
            config.rope_scaling,
            dtype,
        )

    def _init_buffers(self, device: torch.device | str) -> None:
        self.rope = self._rope(self.config, self.dtype).to(device)

    def forward(
        self,
        input_ids: torch.Tensor,
        kv_caches: list[KVCache],
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        stack = self.decoder_stack
        if stack is not None and stack.covers(x.shape[0], kv_caches, meta):
            tables, lens = meta.decode_block_ids, meta.decode_context_lens
            hidden: torch.Tensor = stack.native_stack.forward(
                x, meta.positions, meta.slot_mapping, tables, lens, meta.decode_seq_starts
            )
            return hidden
        residual: torch.Tensor | None = None
        for layer, cache in zip(self.layers, kv_caches, strict=True):
            x, residual = layer.forward(x, residual, self.rope, cache, meta)
        return self.norm.forward(x, residual, meta)[0]

    def build_decoder_stack(
        self, kv_caches: list[KVCache], native: ModuleType | None
    ) -> DecoderStack | None:
        """The native stack for this model and its caches, or None where it does not apply:
        no kernels, a layer without a quantized copy, or a bias other than the QKV one."""
        if native is None:
            return None
        layers: list[LlamaDecoderLayer] = list(self.layers)  # type: ignore[arg-type]
        first = layers[0].self_attn
        stack = native.DecoderStack(
            first.num_heads,
            first.num_kv_heads,
            self.norm.eps,
            first.scale,
            self.rope.cos,
            self.rope.sin,
            self.norm.weight,
        )
        layer_rows: list[int] = []
        for layer, (key_cache, value_cache) in zip(layers, kv_caches, strict=True):
            attn, mlp = layer.self_attn, layer.mlp
            linears = (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)
            found = quantized_layer(linears)
            if found is None or any(lin.bias is not None for lin in linears[1:]):
                return None
            (qkv, o, gate_up, down), rows = found
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
            layer_rows.append(rows)
        if not layer_rows:
            return None
        return DecoderStack(stack, kv_caches, min(layer_rows))

    def _expected_tensors(self) -> set[str]:
        """Every tensor a checkpoint must have, under our (unfused) names."""
        expected = {"embed_tokens.weight", "norm.weight"}
        if not self.config.tie_word_embeddings:
            expected.add("lm_head.weight")
        for i in range(self.config.num_layers):
            prefix = f"layers.{i}."
            for leaf in (
                "self_attn.q_proj.weight",
                "self_attn.k_proj.weight",
                "self_attn.v_proj.weight",
                "self_attn.o_proj.weight",
                "mlp.gate_proj.weight",
                "mlp.up_proj.weight",
                "mlp.down_proj.weight",
                "input_layernorm.weight",
                "post_attention_layernorm.weight",
            ):
                expected.add(prefix + leaf)
            if self.config.attention_bias:
                expected.update(prefix + f"self_attn.{n}_proj.bias" for n in "qkv")
        return expected
