// The native CPU kernels' entry points (bound to Python in module.cpp).
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Optional.h>

#include <tuple>
#include <vector>

// Calls NAME<T>(args...) with T the C++ type of a float32, bfloat16 or float16 tensor.
#define RILLET_DISPATCH(dtype, NAME, ...)                        \
  switch (dtype) {                                               \
    case at::kFloat: NAME<float>(__VA_ARGS__); break;            \
    case at::kBFloat16: NAME<c10::BFloat16>(__VA_ARGS__); break; \
    case at::kHalf: NAME<c10::Half>(__VA_ARGS__); break;         \
    default: TORCH_CHECK(false, "unsupported dtype ", dtype);    \
  }

namespace rillet {

// query [D, H, d], caches [blocks, block_size, Hkv, d] -> [D, H, d]; window > 0: only the
// last `window` keys of each context (a sliding window), 0: all. seq_starts [S + 1]: rows
// seq_starts[s] .. seq_starts[s + 1] are one sequence's (read through the block table of
// its first row, each row with its own context length); none: one row a sequence.
at::Tensor paged_decode_attention(at::Tensor query, at::Tensor key_cache, at::Tensor value_cache,
                                  at::Tensor block_tables, at::Tensor context_lens, double scale,
                                  int64_t window, c10::optional<at::Tensor> seq_starts);

// query [P, H, d]: the rows of prefill chunks, chunk c at rows [starts[c], starts[c] + lens[c])
// and positions from positions[c], each attending causally to its own context through its
// row of block_tables [C, max_blocks] -> [P, H, d]. The chunks' K/V must be in the cache.
// window > 0: a row at p sees keys p - window + 1 .. p only.
at::Tensor paged_prefill_attention(at::Tensor query, at::Tensor key_cache, at::Tensor value_cache,
                                   at::Tensor block_tables, at::Tensor query_starts,
                                   at::Tensor query_lens, at::Tensor positions, double scale,
                                   int64_t window);

// residual += x (when given), then x <- rms_norm(residual) * weight; see fused_ops.cpp.
at::Tensor add_rms_norm(at::Tensor x, c10::optional<at::Tensor> residual, at::Tensor weight,
                        double eps);

// qkv [T, (H + 2 Hkv) d]: rotate q and k heads in place, write k and v rows into the cache.
void rotary_and_cache(at::Tensor qkv, at::Tensor positions, at::Tensor cos, at::Tensor sin,
                      at::Tensor key_cache, at::Tensor value_cache, at::Tensor slot_mapping,
                      int64_t num_heads, int64_t num_kv_heads);

// Gemma's norms: each group of `group` values of each row of x [T, width] (rows may be
// strided) -> rms_norm * scale (fp32, e.g. 1 + w), in fp32; in place or into a new tensor.
at::Tensor scaled_rms_norm(at::Tensor x, at::Tensor scale, double eps, int64_t group,
                           bool in_place);

// x [T, 2 I] -> gelu_tanh(x[:, :I]) * x[:, I:] (Gemma's GeGLU)
at::Tensor gelu_tanh_and_mul(at::Tensor x);

// x [T, 2 I] -> silu(x[:, :I]) * x[:, I:]
at::Tensor silu_and_mul(at::Tensor x);

// weight [N, K] bf16 -> the layout bf16_linear reads ([N/16, K/2, 16, 2]; N % 16 == 0).
at::Tensor pack_bf16_weight(at::Tensor weight);
// x [M, K] bf16 @ weight^T, the weight packed by pack_bf16_weight -> [M, N] bf16.
at::Tensor bf16_linear(at::Tensor x, at::Tensor packed);
bool bf16_linear_supported();

// x [M, K] bf16/fp32 @ w^T, w in 4- or 8-bit groups of 32 packed as quantized_linear.cpp
// describes ([N/16, K/32, record bytes] uint8) -> [M, N], x's dtype. For small M.
at::Tensor quantized_linear(at::Tensor x, at::Tensor packed, int64_t bits);
bool quantized_linear_supported();

// A packed weight from group_quantization.pack and its bit width.
using QuantizedWeight = std::tuple<at::Tensor, int64_t>;

// Every decoder layer of a decode-only step in one call; see decoder_stack.cpp.
class DecoderStack {
 public:
  DecoderStack(int64_t num_heads, int64_t num_kv_heads, double eps, double scale, at::Tensor cos,
               at::Tensor sin, at::Tensor final_norm);
  void add_layer(at::Tensor input_norm, QuantizedWeight qkv, c10::optional<at::Tensor> qkv_bias,
                 QuantizedWeight o, at::Tensor post_norm, QuantizedWeight gate_up,
                 QuantizedWeight down, at::Tensor key_cache, at::Tensor value_cache);
  // hidden [T, n] (the embeddings; used as the residual stream and overwritten), one decode
  // token per row -> the final norm's output [T, n]. seq_starts: as paged_decode_attention's.
  at::Tensor forward(at::Tensor hidden, at::Tensor positions, at::Tensor slot_mapping,
                     at::Tensor block_tables, at::Tensor context_lens,
                     c10::optional<at::Tensor> seq_starts) const;

 private:
  struct Layer {
    at::Tensor input_norm;
    QuantizedWeight qkv;
    c10::optional<at::Tensor> qkv_bias;
    QuantizedWeight o;
    at::Tensor post_norm;
    QuantizedWeight gate_up;
    QuantizedWeight down;
    at::Tensor key_cache;
    at::Tensor value_cache;
  };
  int64_t num_heads_, num_kv_heads_;
  double eps_, scale_;
  at::Tensor cos_, sin_, final_norm_;
  std::vector<Layer> layers_;
};

// Gemma 3's decode-only step, as models/gemma3.py computes it: four (1 + w) norms a layer
// (fp32 scales given), QK-norm before RoPE, each layer's own rotary tables and window,
// GeGLU. hidden [T, n]: the embeddings, already scaled -> the final norm's output [T, n].
class Gemma3DecoderStack {
 public:
  Gemma3DecoderStack(int64_t num_heads, int64_t num_kv_heads, double eps, double scale,
                     at::Tensor final_norm);
  void add_layer(at::Tensor input_norm, QuantizedWeight qkv, at::Tensor q_norm,
                 at::Tensor k_norm, QuantizedWeight o, at::Tensor post_attention_norm,
                 at::Tensor pre_feedforward_norm, QuantizedWeight gate_up, QuantizedWeight down,
                 at::Tensor post_feedforward_norm, at::Tensor cos, at::Tensor sin, int64_t window,
                 at::Tensor key_cache, at::Tensor value_cache);
  at::Tensor forward(at::Tensor hidden, at::Tensor positions, at::Tensor slot_mapping,
                     at::Tensor block_tables, at::Tensor context_lens,
                     c10::optional<at::Tensor> seq_starts) const;

 private:
  struct Layer {
    at::Tensor input_norm;
    QuantizedWeight qkv;
    at::Tensor q_norm, k_norm;
    QuantizedWeight o;
    at::Tensor post_attention_norm, pre_feedforward_norm;
    QuantizedWeight gate_up, down;
    at::Tensor post_feedforward_norm;
    at::Tensor cos, sin;
    int64_t window;
    at::Tensor key_cache, value_cache;
  };
  int64_t num_heads_, num_kv_heads_;
  double eps_, scale_;
  at::Tensor final_norm_;
  std::vector<Layer> layers_;
};

// Sets to -inf the logits of `rows` whose bit in `bits` ([B, ceil(V / 32)] int32) is clear.
void apply_token_bitmask(at::Tensor logits, at::Tensor bits, at::Tensor rows);

// Per row of `rows`, the allowed token (bit set in `bits`) of highest logit, ties to the lowest
// id: argmax of the masked row without writing it. A row whose allowed logits are all -inf
// gets its first allowed id; a row with no allowed token, -1. Returns int64 [len(rows)].
at::Tensor masked_argmax(at::Tensor logits, at::Tensor bits, at::Tensor rows);

}  // namespace rillet
