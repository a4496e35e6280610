// A decode-only step through all decoder layers in one native call (Llama's layer, and
// Gemma 3's).
//
// The Python layers (models/llama.py) run each step as ~9 kernel calls a layer, and at one
// stream the Python between them (module and attribute lookups, views, argument checks,
// pybind) cost as much as the 4-bit matmuls. This class holds each layer's weights and
// cache and makes the same kernel calls, in the same order, from C++, so its results are
// bit-identical to the Python path's (tests/test_decoder_stack.py checks that).
//
// It covers the steady state of streaming only: every row a decode of one token, every
// linear layer on its quantized copy, attention on the paged-decode kernel. Anything else
// (prefill chunks, bf16 weights, other devices) takes the Python path. Gemma3DecoderStack
// does the same for models/gemma3.py's layers.
#include <ATen/ATen.h>

#include <vector>

#include "kernels.h"
#include "kv_int8.h"

namespace rillet {

namespace {
at::Tensor linear(const at::Tensor& x, const QuantizedWeight& w) {
  return quantized_linear(x, std::get<0>(w), std::get<1>(w));
}
}  // namespace

DecoderStack::DecoderStack(int64_t num_heads, int64_t num_kv_heads, double eps, double scale,
                           at::Tensor cos, at::Tensor sin, at::Tensor final_norm)
    : num_heads_(num_heads),
      num_kv_heads_(num_kv_heads),
      eps_(eps),
      scale_(scale),
      cos_(std::move(cos)),
      sin_(std::move(sin)),
      final_norm_(std::move(final_norm)) {}

void DecoderStack::add_layer(at::Tensor input_norm, QuantizedWeight qkv,
                             c10::optional<at::Tensor> qkv_bias, QuantizedWeight o,
                             at::Tensor post_norm, QuantizedWeight gate_up, QuantizedWeight down,
                             at::Tensor key_cache, at::Tensor value_cache) {
  layers_.push_back(Layer{std::move(input_norm), std::move(qkv), std::move(qkv_bias), std::move(o),
                          std::move(post_norm), std::move(gate_up), std::move(down),
                          std::move(key_cache), std::move(value_cache)});
}

at::Tensor DecoderStack::forward(at::Tensor hidden, at::Tensor positions, at::Tensor slot_mapping,
                                 at::Tensor block_tables, at::Tensor context_lens,
                                 c10::optional<at::Tensor> seq_starts) const {
  TORCH_CHECK(!layers_.empty(), "no layers added");
  const int64_t rows = hidden.size(0);
  const int64_t head_dim = cache_head_dim(layers_[0].key_cache);
  const int64_t q_width = num_heads_ * head_dim;
  // As LlamaForCausalLM.forward: the first layer's input is the residual stream itself.
  at::Tensor residual = hidden;
  at::Tensor x;
  bool first = true;
  for (const Layer& layer : layers_) {
    at::Tensor normed = first ? add_rms_norm(residual, c10::nullopt, layer.input_norm, eps_)
                              : add_rms_norm(x, residual, layer.input_norm, eps_);
    first = false;
    at::Tensor qkv = linear(normed, layer.qkv);
    if (layer.qkv_bias) qkv = qkv + *layer.qkv_bias;
    rotary_and_cache(qkv, positions, cos_, sin_, layer.key_cache, layer.value_cache, slot_mapping,
                     num_heads_, num_kv_heads_);
    at::Tensor q = qkv.slice(1, 0, q_width).view({rows, num_heads_, head_dim}).contiguous();
    at::Tensor attended = paged_decode_attention(q, layer.key_cache, layer.value_cache, block_tables,
                                                 context_lens, scale_, /*window=*/0, seq_starts);
    at::Tensor o = linear(attended.reshape({rows, q_width}).contiguous(), layer.o);
    at::Tensor mlp_in = add_rms_norm(o, residual, layer.post_norm, eps_);
    x = linear(silu_and_mul(linear(mlp_in, layer.gate_up)), layer.down);
  }
  return add_rms_norm(x, residual, final_norm_, eps_);
}

Gemma3DecoderStack::Gemma3DecoderStack(int64_t num_heads, int64_t num_kv_heads, double eps,
                                       double scale, at::Tensor final_norm)
    : num_heads_(num_heads),
      num_kv_heads_(num_kv_heads),
      eps_(eps),
      scale_(scale),
      final_norm_(std::move(final_norm)) {}

void Gemma3DecoderStack::add_layer(at::Tensor input_norm, QuantizedWeight qkv, at::Tensor q_norm,
                                   at::Tensor k_norm, QuantizedWeight o,
                                   at::Tensor post_attention_norm,
                                   at::Tensor pre_feedforward_norm, QuantizedWeight gate_up,
                                   QuantizedWeight down, at::Tensor post_feedforward_norm,
                                   at::Tensor cos, at::Tensor sin, int64_t window,
                                   at::Tensor key_cache, at::Tensor value_cache) {
  layers_.push_back(Layer{std::move(input_norm), std::move(qkv), std::move(q_norm),
                          std::move(k_norm), std::move(o), std::move(post_attention_norm),
                          std::move(pre_feedforward_norm), std::move(gate_up), std::move(down),
                          std::move(post_feedforward_norm), std::move(cos), std::move(sin),
                          window, std::move(key_cache), std::move(value_cache)});
}

at::Tensor Gemma3DecoderStack::forward(at::Tensor hidden, at::Tensor positions,
                                       at::Tensor slot_mapping, at::Tensor block_tables,
                                       at::Tensor context_lens,
                                       c10::optional<at::Tensor> seq_starts) const {
  TORCH_CHECK(!layers_.empty(), "no layers added");
  const int64_t rows = hidden.size(0), width = hidden.size(1);
  const int64_t head_dim = cache_head_dim(layers_[0].key_cache);
  const int64_t q_width = num_heads_ * head_dim, kv_width = num_kv_heads_ * head_dim;
  // As Gemma3DecoderLayer.forward, call for call.
  at::Tensor x = hidden;
  for (const Layer& layer : layers_) {
    at::Tensor qkv = linear(scaled_rms_norm(x, layer.input_norm, eps_, width, false), layer.qkv);
    scaled_rms_norm(qkv.slice(1, 0, q_width), layer.q_norm, eps_, head_dim, true);
    scaled_rms_norm(qkv.slice(1, q_width, q_width + kv_width), layer.k_norm, eps_, head_dim, true);
    rotary_and_cache(qkv, positions, layer.cos, layer.sin, layer.key_cache, layer.value_cache,
                     slot_mapping, num_heads_, num_kv_heads_);
    at::Tensor q = qkv.slice(1, 0, q_width).view({rows, num_heads_, head_dim}).contiguous();
    at::Tensor attended =
        paged_decode_attention(q, layer.key_cache, layer.value_cache, block_tables, context_lens,
                               scale_, layer.window, seq_starts);
    at::Tensor h = linear(attended.reshape({rows, q_width}).contiguous(), layer.o);
    x = x + scaled_rms_norm(h, layer.post_attention_norm, eps_, width, false);
    h = scaled_rms_norm(x, layer.pre_feedforward_norm, eps_, width, false);
    h = linear(gelu_tanh_and_mul(linear(h, layer.gate_up)), layer.down);
    x = x + scaled_rms_norm(h, layer.post_feedforward_norm, eps_, width, false);
  }
  return scaled_rms_norm(x, final_norm_, eps_, width, false);
}

}  // namespace rillet
