// The 8-bit KV cache. Each row (one token's K or V for one kv head) is head_dim int8 codes
// followed by one fp32 scale per group of 32 values (the last group may be shorter), so a
// cache tensor is int8 [blocks, block_size, Hkv, d + 4 * ceil(d / 32)]. A value is
// code * scale, with scale = max |x| / 127 over its group (symmetric, round half to even).
// At d = 64 a row is 72 bytes instead of bf16's 128. Decode attention at long contexts is
// bound by the bytes it reads (64 streams x 1,100 tokens: 54 MB a layer at ~15 GB/s).
// Groups of 32, as llama.cpp's q8_0: one scale for a whole 256-value row of Gemma 3 cost
// 0.008 nats/token on bench/quantization_check.py, where bf16 costs nothing.
// attention.py's quantize_kv_rows is the same arithmetic in torch.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "vec.h"

namespace rillet {

constexpr int64_t kKvGroup = 32;

inline bool is_int8_cache(const at::Tensor& cache) { return cache.scalar_type() == at::kChar; }

constexpr int64_t kv_groups(int64_t d) { return (d + kKvGroup - 1) / kKvGroup; }

// Elements of C per cache row for head size d.
template <typename C>
constexpr int64_t cache_row_width(int64_t d) {
  return std::is_same_v<C, int8_t> ? d + 4 * kv_groups(d) : d;
}

// The head size of a cache tensor [blocks, block_size, Hkv, row width]: for the 8-bit
// cache, the d with d + 4 ceil(d / 32) = width, which is width - 4 ceil(width / 36).
inline int64_t cache_head_dim(const at::Tensor& cache) {
  const int64_t width = cache.size(3);
  return is_int8_cache(cache) ? width - 4 * ((width + 35) / 36) : width;
}

// Every kernel that takes the caches: both of one dtype, `dtype` (the activations') or int8.
inline void check_cache_dtype(const at::Tensor& key_cache, const at::Tensor& value_cache,
                              at::ScalarType dtype) {
  TORCH_CHECK(value_cache.scalar_type() == key_cache.scalar_type() &&
                  (key_cache.scalar_type() == dtype || is_int8_cache(key_cache)),
              "cache dtype must match the activations', or be int8");
}

// The scale of group g of an 8-bit row of head size d.
inline float group_scale(const int8_t* row, int64_t d, int64_t g) {
  float scale;
  std::memcpy(&scale, row + d + 4 * g, sizeof(scale));
  return scale;
}

// One 8-bit row -> d floats.
inline void dequantize_row(const int8_t* row, int64_t d, float* out) {
  for (int64_t g = 0; g < kv_groups(d); ++g) {
    const float scale = group_scale(row, d, g);
    for (int64_t i = g * kKvGroup; i < std::min(d, (g + 1) * kKvGroup); ++i)
      out[i] = static_cast<float>(row[i]) * scale;
  }
}

// src[0..d) -> one 8-bit cache row at dst (d codes, then the groups' scales).
template <typename T>
inline void quantize_row(const T* src, int64_t d, int8_t* dst) {
  for (int64_t g = 0; g < kv_groups(d); ++g) {
    const int64_t begin = g * kKvGroup, end = std::min(d, begin + kKvGroup);
    float absmax = 0.f;
    for (int64_t i = begin; i < end; ++i) absmax = std::max(absmax, std::fabs(to_float(src[i])));
    // torch's copy of this arithmetic must round the same way, so the steps are pinned:
    // multiplications by reciprocals (what -ffast-math would make of divisions anyway),
    // and an empty asm that keeps it from folding 1 / (absmax / 127) into 127 / absmax,
    // which rounds differently (a code off by one at exact halves, seen on bf16 rows).
    float scale = absmax * (1.f / 127.f);
    asm("" : "+v"(scale));
    const float inverse = scale > 0.f ? 1.f / scale : 0.f;
    for (int64_t i = begin; i < end; ++i) {
      const float q = std::nearbyint(to_float(src[i]) * inverse);  // half to even
      dst[i] = static_cast<int8_t>(std::clamp(q, -127.f, 127.f));
    }
    std::memcpy(dst + d + 4 * g, &scale, sizeof(scale));
  }
}

}  // namespace rillet
