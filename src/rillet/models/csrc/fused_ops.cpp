// Fused elementwise kernels for the decoder layer, for CPUs.
//
// Each replaces a run of small torch ops (RMSNorm alone was ~10 ops in bf16, RoPE ~8, plus
// two cache writes) that cost more in dispatch than in arithmetic at decode batch sizes.
// Math is fp32 with one rounding to the storage dtype at the end. Rows are independent,
// so a token's result never depends on the rest of the batch.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "kernels.h"
#include "kv_int8.h"
#include "vec.h"

namespace rillet {
namespace {

// These ops are a few microseconds of work per step at decode batch sizes. Split across
// threads they became the slowest ops of a served step: every parallel region waits for
// each thread of the team, and on a busy machine (HTTP thread, clients) one of them is
// often descheduled for a whole time slice. So a task gets at least this many elements,
// and only prefill-sized batches use more than the calling thread.
constexpr int64_t kElementsPerTask = 1 << 18;

inline int64_t row_grain(int64_t width) { return std::max<int64_t>(1, kElementsPerTask / width); }

// dst = rms_norm(src) * weight, one row of n; the weight in T, or fp32 (Gemma's 1 + w).
template <typename T, typename W>
void rms_norm_row(const T* src, const W* weight, T* dst, int64_t n, float eps) {
  int64_t i = 0;
  float sum = 0.f;
#if defined(__AVX512F__)
  __m512 acc = _mm512_setzero_ps();
  for (; i + 16 <= n; i += 16) {
    const __m512 v = load16(src + i);
    acc = _mm512_fmadd_ps(v, v, acc);
  }
  sum = _mm512_reduce_add_ps(acc);
#endif
  for (; i < n; ++i) sum += to_float(src[i]) * to_float(src[i]);
  const float inv = 1.f / std::sqrt(sum / static_cast<float>(n) + eps);
  i = 0;
#if defined(__AVX512F__)
  const __m512 vinv = _mm512_set1_ps(inv);
  for (; i + 16 <= n; i += 16)
    store16(dst + i, _mm512_mul_ps(_mm512_mul_ps(load16(src + i), vinv), load16(weight + i)));
#endif
  for (; i < n; ++i) store(dst + i, to_float(src[i]) * inv * to_float(weight[i]));
}

// residual += x, rounded to T as the unfused `residual + x` would be.
template <typename T>
void add_row(T* residual, const T* x, int64_t n) {
  int64_t i = 0;
#if defined(__AVX512F__)
  for (; i + 16 <= n; i += 16)
    store16(residual + i, _mm512_add_ps(load16(residual + i), load16(x + i)));
#endif
  for (; i < n; ++i) store(residual + i, to_float(residual[i]) + to_float(x[i]));
}

template <typename T>
void add_rms_norm_impl(at::Tensor& x, c10::optional<at::Tensor>& residual, const at::Tensor& weight,
                       at::Tensor& out, float eps) {
  const int64_t rows = x.size(0), n = x.size(1);
  T* xp = x.data_ptr<T>();
  T* rp = residual ? residual->data_ptr<T>() : nullptr;
  const T* wp = weight.data_ptr<T>();
  T* op = out.data_ptr<T>();
  at::parallel_for(0, rows, row_grain(n), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      if (rp != nullptr) {
        add_row(rp + r * n, xp + r * n, n);
        rms_norm_row(rp + r * n, wp, op + r * n, n, eps);
      } else {
        rms_norm_row(xp + r * n, wp, op + r * n, n, eps);
      }
    }
  });
}

// HF's rotate-half RoPE on one head of d values, in place: for i < d/2,
// x[i] <- x[i] cos[i] - x[i + d/2] sin[i] and x[i + d/2] <- x[i + d/2] cos[i + d/2] + x[i] sin[i + d/2].
template <typename T>
void rotate_head(T* x, const T* cos, const T* sin, int64_t d) {
  const int64_t half = d / 2;
  int64_t i = 0;
#if defined(__AVX512F__)
  for (; i + 16 <= half; i += 16) {
    const __m512 a = load16(x + i), b = load16(x + half + i);
    store16(x + i, _mm512_fmsub_ps(a, load16(cos + i), _mm512_mul_ps(b, load16(sin + i))));
    store16(x + half + i,
            _mm512_fmadd_ps(b, load16(cos + half + i), _mm512_mul_ps(a, load16(sin + half + i))));
  }
#endif
  for (; i < half; ++i) {
    const float a = to_float(x[i]), b = to_float(x[half + i]);
    store(x + i, a * to_float(cos[i]) - b * to_float(sin[i]));
    store(x + half + i, b * to_float(cos[half + i]) + a * to_float(sin[half + i]));
  }
}

template <typename T>
void rotary_and_cache_impl(at::Tensor& qkv, const at::Tensor& positions, const at::Tensor& cos,
                           const at::Tensor& sin, at::Tensor& key_cache, at::Tensor& value_cache,
                           const at::Tensor& slots, int64_t num_heads, int64_t num_kv_heads) {
  const int64_t rows = qkv.size(0), width = qkv.size(1);
  const int64_t d = cache_head_dim(key_cache);
  const int64_t kv_width = num_kv_heads * d;
  const bool int8_cache = is_int8_cache(key_cache);
  T* qp = qkv.data_ptr<T>();
  const int64_t* pos = positions.data_ptr<int64_t>();
  const int64_t* slot = slots.data_ptr<int64_t>();
  const T* cp = cos.data_ptr<T>();
  const T* sp = sin.data_ptr<T>();
  at::parallel_for(0, rows, row_grain(width), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      T* row = qp + r * width;
      const T* c = cp + pos[r] * d;
      const T* s = sp + pos[r] * d;
      for (int64_t h = 0; h < num_heads + num_kv_heads; ++h) rotate_head(row + h * d, c, s, d);
      const T* k = row + num_heads * d;
      const T* v = k + kv_width;
      if (int8_cache) {
        const int64_t row_width = cache_row_width<int8_t>(d);
        int8_t* kc = key_cache.data_ptr<int8_t>() + slot[r] * num_kv_heads * row_width;
        int8_t* vc = value_cache.data_ptr<int8_t>() + slot[r] * num_kv_heads * row_width;
        for (int64_t h = 0; h < num_kv_heads; ++h) {
          quantize_row(k + h * d, d, kc + h * row_width);
          quantize_row(v + h * d, d, vc + h * row_width);
        }
      } else {
        std::memcpy(key_cache.data_ptr<T>() + slot[r] * kv_width, k, kv_width * sizeof(T));
        std::memcpy(value_cache.data_ptr<T>() + slot[r] * kv_width, v, kv_width * sizeof(T));
      }
    }
  });
}

// The activations of the gated MLPs, in fp32 on 16 lanes and on one value.
struct Silu {
#if defined(__AVX512F__)
  __m512 operator()(__m512 g) const {
    return _mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.f), exp16(_mm512_sub_ps(_mm512_setzero_ps(), g))));
  }
#endif
  float operator()(float g) const { return g / (1.f + std::exp(-g)); }
};

// GELU, tanh approximation (transformers' gelu_pytorch_tanh).
struct GeluTanh {
  static constexpr float kAlpha = 0.7978845608028654f;  // sqrt(2 / pi)
  static constexpr float kBeta = 0.044715f;
#if defined(__AVX512F__)
  __m512 operator()(__m512 g) const {
    const __m512 one = _mm512_set1_ps(1.f);
    const __m512 inner = _mm512_mul_ps(
        _mm512_set1_ps(kAlpha),
        _mm512_fmadd_ps(_mm512_mul_ps(_mm512_set1_ps(kBeta), g), _mm512_mul_ps(g, g), g));
    // tanh(y) = 1 - 2 / (e^{2y} + 1)
    const __m512 e = exp16(_mm512_add_ps(inner, inner));
    const __m512 tanh = _mm512_sub_ps(one, _mm512_div_ps(_mm512_set1_ps(2.f), _mm512_add_ps(e, one)));
    return _mm512_mul_ps(_mm512_mul_ps(_mm512_set1_ps(0.5f), g), _mm512_add_ps(one, tanh));
  }
#endif
  float operator()(float g) const {
    return 0.5f * g * (1.f + std::tanh(kAlpha * (g + kBeta * g * g * g)));
  }
};

// act(gate) * up, with gate and up the two halves of each row of x, in fp32.
template <typename T, typename Act>
void act_and_mul_impl(const at::Tensor& x, at::Tensor& out) {
  const Act act;
  const int64_t rows = x.size(0), n = out.size(1);
  const T* xp = x.data_ptr<T>();
  T* op = out.data_ptr<T>();
  at::parallel_for(0, rows, row_grain(3 * n), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* gate = xp + r * 2 * n;
      const T* up = gate + n;
      T* dst = op + r * n;
      int64_t i = 0;
#if defined(__AVX512F__)
      for (; i + 16 <= n; i += 16) store16(dst + i, _mm512_mul_ps(act(load16(gate + i)), load16(up + i)));
#endif
      for (; i < n; ++i) store(dst + i, act(to_float(gate[i])) * to_float(up[i]));
    }
  });
}

template <typename T>
void silu_and_mul_impl(const at::Tensor& x, at::Tensor& out) {
  act_and_mul_impl<T, Silu>(x, out);
}

template <typename T>
void gelu_tanh_and_mul_impl(const at::Tensor& x, at::Tensor& out) {
  act_and_mul_impl<T, GeluTanh>(x, out);
}

// Each group of n values of each row: rms_norm(x) * scale (scale fp32), into dst.
template <typename T>
void scaled_rms_norm_impl(const at::Tensor& x, const at::Tensor& scale, at::Tensor& out,
                          int64_t n, float eps) {
  const int64_t rows = x.size(0), width = x.size(1);
  const int64_t in_stride = x.stride(0), out_stride = out.stride(0);
  const T* xp = x.data_ptr<T>();
  const float* wp = scale.data_ptr<float>();
  T* op = out.data_ptr<T>();
  at::parallel_for(0, rows, row_grain(width), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r)
      for (int64_t g = 0; g < width; g += n)
        rms_norm_row(xp + r * in_stride + g, wp, op + r * out_stride + g, n, eps);
  });
}

}  // namespace

at::Tensor scaled_rms_norm(at::Tensor x, at::Tensor scale, double eps, int64_t group,
                           bool in_place) {
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, "x must be [T, width] with contiguous rows");
  TORCH_CHECK(group > 0 && x.size(1) % group == 0, "width must be whole groups");
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.is_contiguous() && scale.numel() == group,
              "scale must be fp32 [group]");
  at::Tensor out = in_place ? x : at::empty({x.size(0), x.size(1)}, x.options());
  RILLET_DISPATCH(x.scalar_type(), scaled_rms_norm_impl, x, scale, out, group,
                  static_cast<float>(eps));
  return out;
}

at::Tensor gelu_tanh_and_mul(at::Tensor x) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.size(1) % 2 == 0,
              "x must be [T, 2 I], contiguous");
  at::Tensor out = at::empty({x.size(0), x.size(1) / 2}, x.options());
  RILLET_DISPATCH(x.scalar_type(), gelu_tanh_and_mul_impl, x, out);
  return out;
}

at::Tensor add_rms_norm(at::Tensor x, c10::optional<at::Tensor> residual, at::Tensor weight,
                        double eps) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && weight.is_contiguous(), "x must be [T, n], contiguous");
  TORCH_CHECK(weight.scalar_type() == x.scalar_type() && weight.numel() == x.size(1), "bad weight");
  if (residual) {
    TORCH_CHECK(residual->sizes() == x.sizes() && residual->is_contiguous() &&
                    residual->scalar_type() == x.scalar_type(),
                "residual must match x");
  }
  // With a residual the normalised rows overwrite x (the caller's fresh layer output);
  // without one, x is the residual stream itself and must survive.
  at::Tensor out = residual ? x : at::empty_like(x);
  RILLET_DISPATCH(x.scalar_type(), add_rms_norm_impl, x, residual, weight, out,
                  static_cast<float>(eps));
  return out;
}

void rotary_and_cache(at::Tensor qkv, at::Tensor positions, at::Tensor cos, at::Tensor sin,
                      at::Tensor key_cache, at::Tensor value_cache, at::Tensor slot_mapping,
                      int64_t num_heads, int64_t num_kv_heads) {
  TORCH_CHECK(qkv.dim() == 2 && qkv.is_contiguous(), "qkv must be [T, width], contiguous");
  TORCH_CHECK(key_cache.dim() == 4 && key_cache.is_contiguous() && value_cache.is_contiguous(),
              "caches must be [blocks, block_size, Hkv, d], contiguous");
  const int64_t d = cache_head_dim(key_cache);
  TORCH_CHECK(key_cache.size(2) == num_kv_heads && d % 2 == 0, "bad cache shape");
  TORCH_CHECK(qkv.size(1) == (num_heads + 2 * num_kv_heads) * d, "qkv width does not match heads");
  TORCH_CHECK(cos.dim() == 2 && cos.size(1) == d && cos.is_contiguous() && sin.is_contiguous() &&
                  cos.scalar_type() == qkv.scalar_type() && sin.scalar_type() == qkv.scalar_type(),
              "bad rope tables");
  check_cache_dtype(key_cache, value_cache, qkv.scalar_type());
  TORCH_CHECK(positions.scalar_type() == at::kLong && slot_mapping.scalar_type() == at::kLong &&
                  positions.numel() == qkv.size(0) && slot_mapping.numel() == qkv.size(0),
              "positions and slots must be int64, one per row");
  auto pos = positions.contiguous();
  auto slots = slot_mapping.contiguous();
  const int64_t max_pos = cos.size(0);
  const int64_t num_slots = key_cache.size(0) * key_cache.size(1);
  const int64_t* pp = pos.data_ptr<int64_t>();
  const int64_t* sp = slots.data_ptr<int64_t>();
  for (int64_t r = 0; r < pos.numel(); ++r) {
    TORCH_CHECK(pp[r] >= 0 && pp[r] < max_pos, "position out of range");
    TORCH_CHECK(sp[r] >= 0 && sp[r] < num_slots, "cache slot out of range");
  }
  RILLET_DISPATCH(qkv.scalar_type(), rotary_and_cache_impl, qkv, pos, cos, sin, key_cache,
                  value_cache, slots, num_heads, num_kv_heads);
}

at::Tensor silu_and_mul(at::Tensor x) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.size(1) % 2 == 0,
              "x must be [T, 2 I], contiguous");
  at::Tensor out = at::empty({x.size(0), x.size(1) / 2}, x.options());
  RILLET_DISPATCH(x.scalar_type(), silu_and_mul_impl, x, out);
  return out;
}

}  // namespace rillet
