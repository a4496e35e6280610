// Decode attention straight from the paged KV cache, for CPUs.
//
// One query token per sequence. Each (sequence, kv head) pair is one task: it reads the
// sequence's K rows block by block through its block table (no gathered copy of the
// context), scores the `group` query heads that share this kv head, softmaxes in fp32,
// then accumulates V. The order of work inside a task never depends on the rest of the
// batch, so a sequence's result is the same alone or among many.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

inline float to_float(float x) { return x; }
inline float to_float(c10::BFloat16 x) {
  uint32_t bits = static_cast<uint32_t>(x.x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}
inline float to_float(c10::Half x) { return static_cast<float>(x); }

template <typename T>
inline void store(T* dst, float value) { *dst = static_cast<T>(value); }

#if defined(__AVX512F__)
// 16 lanes of T -> 16 fp32 lanes.
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const c10::BFloat16* p) {
  __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}
inline __m512 load16(const c10::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
#endif

// sum_i a[i] * b[i], a in fp32
template <typename T>
inline float dot(const float* a, const T* b, int64_t n) {
  int64_t i = 0;
  float s = 0.f;
#if defined(__AVX512F__)
  __m512 acc = _mm512_setzero_ps();
  for (; i + 16 <= n; i += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), load16(b + i), acc);
  s = _mm512_reduce_add_ps(acc);
#endif
  for (; i < n; ++i) s += a[i] * to_float(b[i]);
  return s;
}

// acc[i] += p * v[i]
template <typename T>
inline void axpy(float* acc, float p, const T* v, int64_t n) {
  int64_t i = 0;
#if defined(__AVX512F__)
  const __m512 pv = _mm512_set1_ps(p);
  for (; i + 16 <= n; i += 16)
    _mm512_storeu_ps(acc + i, _mm512_fmadd_ps(pv, load16(v + i), _mm512_loadu_ps(acc + i)));
#endif
  for (; i < n; ++i) acc[i] += p * to_float(v[i]);
}

template <typename T>
void decode_attention(const torch::Tensor& query,        // [D, H, d]
                      const torch::Tensor& key_cache,    // [NB, bs, Hkv, d]
                      const torch::Tensor& value_cache,  // [NB, bs, Hkv, d]
                      const torch::Tensor& block_tables, // [D, max_blocks] int64
                      const torch::Tensor& context_lens, // [D] int64
                      double scale, torch::Tensor& out) {
  const int64_t num_seqs = query.size(0);
  const int64_t num_heads = query.size(1);
  const int64_t head_dim = query.size(2);
  const int64_t block_size = key_cache.size(1);
  const int64_t num_kv_heads = key_cache.size(2);
  const int64_t group = num_heads / num_kv_heads;
  const int64_t max_blocks = block_tables.size(1);

  const T* q = query.data_ptr<T>();
  const T* kc = key_cache.data_ptr<T>();
  const T* vc = value_cache.data_ptr<T>();
  const int64_t* tables = block_tables.data_ptr<int64_t>();
  const int64_t* lens = context_lens.data_ptr<int64_t>();
  T* o = out.data_ptr<T>();
  const int64_t token_stride = num_kv_heads * head_dim;  // between rows of one block
  const int64_t block_stride = block_size * token_stride;
  const float fscale = static_cast<float>(scale);

  at::parallel_for(0, num_seqs * num_kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(group * head_dim), acc(group * head_dim), scores;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t seq = task / num_kv_heads, kvh = task % num_kv_heads;
      const int64_t len = lens[seq];
      const int64_t* table = tables + seq * max_blocks;
      for (int64_t g = 0; g < group; ++g) {
        const T* src = q + (seq * num_heads + kvh * group + g) * head_dim;
        for (int64_t i = 0; i < head_dim; ++i) qf[g * head_dim + i] = to_float(src[i]) * fscale;
      }
      scores.assign(group * len, 0.f);
      // 1. scores[g][t] = q_g . k_t
      for (int64_t t = 0; t < len; ++t) {
        const T* k = kc + table[t / block_size] * block_stride + (t % block_size) * token_stride +
                     kvh * head_dim;
        for (int64_t g = 0; g < group; ++g)
          scores[g * len + t] = dot(qf.data() + g * head_dim, k, head_dim);
      }
      // 2. softmax per query head, in fp32
      for (int64_t g = 0; g < group; ++g) {
        float* row = scores.data() + g * len;
        float m = row[0];
        for (int64_t t = 1; t < len; ++t) m = row[t] > m ? row[t] : m;
        float sum = 0.f;
        for (int64_t t = 0; t < len; ++t) {
          row[t] = std::exp(row[t] - m);
          sum += row[t];
        }
        const float inv = 1.f / sum;
        for (int64_t t = 0; t < len; ++t) row[t] *= inv;
      }
      // 3. out_g = sum_t p[g][t] * v_t
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t t = 0; t < len; ++t) {
        const T* v = vc + table[t / block_size] * block_stride + (t % block_size) * token_stride +
                     kvh * head_dim;
        for (int64_t g = 0; g < group; ++g)
          axpy(acc.data() + g * head_dim, scores[g * len + t], v, head_dim);
      }
      for (int64_t g = 0; g < group; ++g) {
        T* dst = o + (seq * num_heads + kvh * group + g) * head_dim;
        for (int64_t i = 0; i < head_dim; ++i) store(dst + i, acc[g * head_dim + i]);
      }
    }
  });
}

}  // namespace

torch::Tensor paged_decode_attention(torch::Tensor query, torch::Tensor key_cache,
                                     torch::Tensor value_cache, torch::Tensor block_tables,
                                     torch::Tensor context_lens, double scale) {
  TORCH_CHECK(query.dim() == 3 && key_cache.dim() == 4, "bad ranks");
  TORCH_CHECK(query.is_contiguous() && key_cache.is_contiguous() && value_cache.is_contiguous(),
              "inputs must be contiguous");
  TORCH_CHECK(block_tables.scalar_type() == torch::kLong && context_lens.scalar_type() == torch::kLong,
              "block tables and lengths must be int64");
  TORCH_CHECK(query.size(1) % key_cache.size(2) == 0, "heads must be a multiple of kv heads");
  auto tables = block_tables.contiguous();
  auto lens = context_lens.contiguous();
  auto out = torch::empty_like(query);
  switch (query.scalar_type()) {
    case torch::kFloat:
      decode_attention<float>(query, key_cache, value_cache, tables, lens, scale, out);
      break;
    case torch::kBFloat16:
      decode_attention<c10::BFloat16>(query, key_cache, value_cache, tables, lens, scale, out);
      break;
    case torch::kHalf:
      decode_attention<c10::Half>(query, key_cache, value_cache, tables, lens, scale, out);
      break;
    default:
      TORCH_CHECK(false, "unsupported dtype");
  }
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode_attention", &paged_decode_attention, "decode attention over a paged KV cache");
}
