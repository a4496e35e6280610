// Decode attention straight from the paged KV cache, for CPUs.
//
// One query token per row. Each (sequence, kv head) pair is one task: it reads the
// sequence's K rows block by block through its block table (no gathered copy of the
// context), scores the `group` query heads that share this kv head, softmaxes in fp32,
// then accumulates V. The order of work inside a task never depends on the rest of the
// batch, so a sequence's result is the same alone or among many.
//
// Several consecutive rows may belong to one sequence (`seq_starts`): speculative
// decoding's verification, the last known token and k drafts at positions p .. p + k, each
// row with its own context length. They are one task: the rows are folded into the query
// group (R rows x `group` heads), so the context is read once for all of them, and each
// row's softmax covers only its own keys (the keys past it score 0). Without a window, a
// row's result is bit-identical to the same row decoded alone.
#include "kernels.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "kv_int8.h"
#include "vec.h"

namespace rillet {
namespace {

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

// Where one task's rows live: K/V rows first..len of kv head `kvh` of one sequence (first
// is past 0 only under a sliding window).
struct TaskView {
  const int64_t* table;
  int64_t len, block_size, token_stride, block_stride, head_offset, first;
  int64_t count() const { return len - first; }
};

// fn(t, offset of row t) for t = 0..len, walking the block table block by block (no
// division per row). While a block is processed, the next block's rows of `cache` are
// prefetched: blocks sit anywhere in the cache, so the hardware prefetcher stalls at each
// block boundary, and in a real step (the cache cold after the layer's matmuls) the
// kernel ran at a third of its hot-cache speed.
template <typename T>
inline void prefetch_block(const TaskView& view, const T* cache, int64_t b, int64_t row_bytes) {
  const int64_t first = b * view.block_size;
  if (first >= view.len) return;
  const char* rows =
      reinterpret_cast<const char*>(cache + view.table[b] * view.block_stride + view.head_offset);
  const int64_t n = std::min(view.block_size, view.len - first);
  const int64_t stride = view.token_stride * static_cast<int64_t>(sizeof(T));
  for (int64_t i = 0; i < n; ++i)
    for (int64_t line = 0; line < row_bytes; line += 64) __builtin_prefetch(rows + i * stride + line);
}

// fn(t - first, offset of row t) for t = first..len.
template <typename T, typename Fn>
inline void for_each_row(const TaskView& view, const T* cache, int64_t row_bytes, Fn&& fn) {
  int64_t t = view.first;
  for (int64_t b = view.first / view.block_size; t < view.len; ++b) {
    const int64_t base = view.table[b] * view.block_stride + view.head_offset;
    const int64_t end = std::min(view.block_size, view.len - b * view.block_size);
    prefetch_block(view, cache, b + 1, row_bytes);
    for (int64_t i = t - b * view.block_size; i < end; ++i, ++t)
      fn(t - view.first, base + i * view.token_stride);
  }
}

// A cache row as values: itself for a float cache; an 8-bit row widened into `buffer`.
template <typename C>
inline const auto* row_values(const C* row, int64_t head_dim, float* buffer) {
  if constexpr (std::is_same_v<C, int8_t>) {
    dequantize_row(row, head_dim, buffer);
    return static_cast<const float*>(buffer);
  } else {
    (void)head_dim, (void)buffer;
    return row;
  }
}

// Portable task: any head_dim, any CPU. `qf` holds the group's queries in fp32, scaled.
// C: the cache's element type.
// Each query head's keys, [lo, hi) relative to the task's first row, or all when null.
struct HeadRanges {
  const int64_t* lo;
  const int64_t* hi;
};

// Softmax of each head's scores over its own range; the rest of its row becomes 0.
template <typename Softmax>
inline void softmax_heads(float* scores, int64_t group, int64_t len, const HeadRanges& ranges,
                          Softmax&& softmax) {
  for (int64_t g = 0; g < group; ++g) {
    float* row = scores + g * len;
    if (ranges.lo == nullptr) {
      softmax(row, len);
      continue;
    }
    const int64_t lo = ranges.lo[g], hi = ranges.hi[g];
    softmax(row + lo, hi - lo);
    std::fill(row, row + lo, 0.f);
    std::fill(row + hi, row + len, 0.f);
  }
}

inline void softmax_row_scalar(float* row, int64_t len) {
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

template <typename C>
void attend_generic(const float* qf, int64_t group, int64_t head_dim, const C* kc, const C* vc,
                    const TaskView& view, const HeadRanges& ranges, float* scores, float* acc) {
  const int64_t len = view.count();
  const int64_t row_bytes = cache_row_width<C>(head_dim) * static_cast<int64_t>(sizeof(C));
  std::vector<float> wide(head_dim);
  for_each_row(view, kc, row_bytes, [&](int64_t t, int64_t row) {
    const auto* k = row_values(kc + row, head_dim, wide.data());
    for (int64_t g = 0; g < group; ++g) scores[g * len + t] = dot(qf + g * head_dim, k, head_dim);
  });
  softmax_heads(scores, group, len, ranges, softmax_row_scalar);
  std::fill(acc, acc + group * head_dim, 0.f);
  for_each_row(view, vc, row_bytes, [&](int64_t t, int64_t row) {
    const auto* v = row_values(vc + row, head_dim, wide.data());
    for (int64_t g = 0; g < group; ++g) axpy(acc + g * head_dim, scores[g * len + t], v, head_dim);
  });
}

#if defined(__AVX512F__)
// In-place softmax of one row of scores, vectorised.
inline void softmax_row(float* row, int64_t len) {
  __m512 vmax = _mm512_set1_ps(-INFINITY);
  int64_t t = 0;
  for (; t + 16 <= len; t += 16) vmax = _mm512_max_ps(vmax, _mm512_loadu_ps(row + t));
  float m = _mm512_reduce_max_ps(vmax);
  for (; t < len; ++t) m = row[t] > m ? row[t] : m;
  const __m512 mv = _mm512_set1_ps(m);
  __m512 vsum = _mm512_setzero_ps();
  for (t = 0; t + 16 <= len; t += 16) {
    const __m512 e = exp16(_mm512_sub_ps(_mm512_loadu_ps(row + t), mv));
    _mm512_storeu_ps(row + t, e);
    vsum = _mm512_add_ps(vsum, e);
  }
  if (t < len) {
    const __mmask16 tail = static_cast<__mmask16>((1u << (len - t)) - 1);
    const __m512 x = _mm512_maskz_loadu_ps(tail, row + t);
    const __m512 e = _mm512_maskz_mov_ps(tail, exp16(_mm512_sub_ps(x, mv)));
    _mm512_mask_storeu_ps(row + t, tail, e);
    vsum = _mm512_add_ps(vsum, e);
  }
  const __m512 inv = _mm512_set1_ps(1.f / _mm512_reduce_add_ps(vsum));
  for (t = 0; t + 16 <= len; t += 16) _mm512_storeu_ps(row + t, _mm512_mul_ps(_mm512_loadu_ps(row + t), inv));
  for (; t < len; ++t) row[t] *= _mm512_cvtss_f32(inv);
}

// Fast task for head_dim = 16 * VEC, with GC query heads of the group handled per pass so
// that their queries (QK) or accumulators (PV) stay in registers; each K/V row is loaded
// and widened once per pass instead of once per head (an 8-bit row's codes times their
// group's scale: two registers a group).
// One cache row of 16 * VEC values into registers, in fp32.
template <int VEC, typename C>
inline void load_row(const C* row, __m512 (&out)[VEC]) {
  for (int j = 0; j < VEC; ++j) out[j] = load16(row + j * 16);
  if constexpr (std::is_same_v<C, int8_t>) {
    static_assert(kKvGroup == 32 && VEC % 2 == 0, "two registers per group of 32");
    for (int j = 0; j < VEC; ++j)
      out[j] = _mm512_mul_ps(out[j], _mm512_set1_ps(group_scale(row, VEC * 16, j / 2)));
  }
}

template <typename C, int VEC, int GC>
void attend_avx512(const float* qf, int64_t group, const C* kc, const C* vc,
                   const TaskView& view, const HeadRanges& ranges, float* scores, float* acc) {
  constexpr int D = VEC * 16;
  constexpr int64_t kRowBytes = cache_row_width<C>(D) * static_cast<int64_t>(sizeof(C));
  const int64_t len = view.count();
  for (int64_t g0 = 0; g0 < group; g0 += GC) {
    __m512 q[GC][VEC];
    for (int g = 0; g < GC; ++g)
      for (int j = 0; j < VEC; ++j) q[g][j] = _mm512_loadu_ps(qf + (g0 + g) * D + j * 16);
    for_each_row(view, kc, kRowBytes, [&](int64_t t, int64_t row) {
      __m512 kv[VEC];
      load_row<VEC>(kc + row, kv);
      for (int g = 0; g < GC; ++g) {
        __m512 s = _mm512_mul_ps(q[g][0], kv[0]);
        for (int j = 1; j < VEC; ++j) s = _mm512_fmadd_ps(q[g][j], kv[j], s);
        scores[(g0 + g) * len + t] = _mm512_reduce_add_ps(s);
      }
    });
  }
  softmax_heads(scores, group, len, ranges, softmax_row);
  for (int64_t g0 = 0; g0 < group; g0 += GC) {
    __m512 a[GC][VEC];
    for (int g = 0; g < GC; ++g)
      for (int j = 0; j < VEC; ++j) a[g][j] = _mm512_setzero_ps();
    for_each_row(view, vc, kRowBytes, [&](int64_t t, int64_t row) {
      __m512 vv[VEC];
      load_row<VEC>(vc + row, vv);
      for (int g = 0; g < GC; ++g) {
        const __m512 p = _mm512_set1_ps(scores[(g0 + g) * len + t]);
        for (int j = 0; j < VEC; ++j) a[g][j] = _mm512_fmadd_ps(p, vv[j], a[g][j]);
      }
    });
    for (int g = 0; g < GC; ++g)
      for (int j = 0; j < VEC; ++j) _mm512_storeu_ps(acc + (g0 + g) * D + j * 16, a[g][j]);
  }
}

template <typename T>
using TaskFn = void (*)(const float*, int64_t, const T*, const T*, const TaskView&,
                        const HeadRanges&, float*, float*);

// The fast task for this head size and group, or nullptr for the portable one. Heads per
// pass: the largest of 4/3/2/1 dividing the group that keeps the pass in registers.
template <typename T>
TaskFn<T> pick_fast_task(int64_t head_dim, int64_t group) {
  if (head_dim == 64) {
    if (group % 4 == 0) return attend_avx512<T, 4, 4>;
    if (group % 3 == 0) return attend_avx512<T, 4, 3>;
    if (group % 2 == 0) return attend_avx512<T, 4, 2>;
    return attend_avx512<T, 4, 1>;
  }
  if (head_dim == 128) {
    if (group % 2 == 0) return attend_avx512<T, 8, 2>;
    return attend_avx512<T, 8, 1>;
  }
  return nullptr;
}
#else
template <typename T>
using TaskFn = void (*)(const float*, int64_t, const T*, const T*, const TaskView&,
                        const HeadRanges&, float*, float*);
template <typename T>
TaskFn<T> pick_fast_task(int64_t, int64_t) { return nullptr; }
#endif

// T: the query's and output's type; C: the cache's (T, or int8_t for the 8-bit cache).
template <typename T, typename C>
void decode_attention(const at::Tensor& query,        // [D, H, d]
                      const at::Tensor& key_cache,    // [NB, bs, Hkv, d]
                      const at::Tensor& value_cache,  // [NB, bs, Hkv, d]
                      const at::Tensor& block_tables, // [D, max_blocks] int64
                      const at::Tensor& context_lens, // [D] int64
                      const int64_t* seq_starts,      // [S + 1] or null: one row a sequence
                      int64_t num_seqs, double scale, int64_t window, at::Tensor& out) {
  const int64_t num_heads = query.size(1);
  const int64_t head_dim = query.size(2);
  const int64_t block_size = key_cache.size(1);
  const int64_t num_kv_heads = key_cache.size(2);
  const int64_t group = num_heads / num_kv_heads;
  const int64_t max_blocks = block_tables.size(1);

  const T* q = query.data_ptr<T>();
  const C* kc = key_cache.data_ptr<C>();
  const C* vc = value_cache.data_ptr<C>();
  const int64_t* tables = block_tables.data_ptr<int64_t>();
  const int64_t* lens = context_lens.data_ptr<int64_t>();
  T* o = out.data_ptr<T>();
  const int64_t row_width = cache_row_width<C>(head_dim);
  const int64_t token_stride = num_kv_heads * row_width;  // between rows of one block
  const int64_t block_stride = block_size * token_stride;
  const float fscale = static_cast<float>(scale);
  const TaskFn<C> fast = pick_fast_task<C>(head_dim, group);

  at::parallel_for(0, num_seqs * num_kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf, acc, scores;
    std::vector<int64_t> lo, hi;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t seq = task / num_kv_heads, kvh = task % num_kv_heads;
      const int64_t row0 = seq_starts ? seq_starts[seq] : seq;
      const int64_t rows = seq_starts ? seq_starts[seq + 1] - row0 : 1;
      int64_t shortest = lens[row0], longest = lens[row0];
      for (int64_t r = 1; r < rows; ++r) {
        shortest = std::min(shortest, lens[row0 + r]);
        longest = std::max(longest, lens[row0 + r]);
      }
      const int64_t first = window > 0 ? std::max<int64_t>(0, shortest - window) : 0;
      const TaskView view{tables + row0 * max_blocks, longest, block_size,
                          token_stride, block_stride, kvh * row_width, first};
      const int64_t heads = rows * group;  // the rows folded into the query group
      qf.resize(heads * head_dim);
      acc.resize(heads * head_dim);
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t g = 0; g < group; ++g) {
          const T* src = q + ((row0 + r) * num_heads + kvh * group + g) * head_dim;
          float* dst = qf.data() + (r * group + g) * head_dim;
          for (int64_t i = 0; i < head_dim; ++i) dst[i] = to_float(src[i]) * fscale;
        }
      HeadRanges ranges{nullptr, nullptr};
      if (rows > 1) {
        lo.resize(heads);
        hi.resize(heads);
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t len = lens[row0 + r];
          const int64_t from = window > 0 ? std::max<int64_t>(0, len - window) : 0;
          for (int64_t g = 0; g < group; ++g) {
            lo[r * group + g] = from - first;
            hi[r * group + g] = len - first;
          }
        }
        ranges = HeadRanges{lo.data(), hi.data()};
      }
      if (static_cast<int64_t>(scores.size()) < heads * view.count())
        scores.resize(heads * view.count());
      if (fast != nullptr)
        fast(qf.data(), heads, kc, vc, view, ranges, scores.data(), acc.data());
      else
        attend_generic(qf.data(), heads, head_dim, kc, vc, view, ranges, scores.data(),
                       acc.data());
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t g = 0; g < group; ++g) {
          T* dst = o + ((row0 + r) * num_heads + kvh * group + g) * head_dim;
          const float* src = acc.data() + (r * group + g) * head_dim;
          for (int64_t i = 0; i < head_dim; ++i) store(dst + i, src[i]);
        }
    }
  });
}

template <typename T>
void decode_attention_on(const at::Tensor& query, const at::Tensor& key_cache,
                         const at::Tensor& value_cache, const at::Tensor& block_tables,
                         const at::Tensor& context_lens, const int64_t* seq_starts,
                         int64_t num_seqs, double scale, int64_t window, at::Tensor& out) {
  if (is_int8_cache(key_cache))
    decode_attention<T, int8_t>(query, key_cache, value_cache, block_tables, context_lens,
                                seq_starts, num_seqs, scale, window, out);
  else
    decode_attention<T, T>(query, key_cache, value_cache, block_tables, context_lens,
                           seq_starts, num_seqs, scale, window, out);
}

}  // namespace

at::Tensor paged_decode_attention(at::Tensor query, at::Tensor key_cache,
                                     at::Tensor value_cache, at::Tensor block_tables,
                                     at::Tensor context_lens, double scale, int64_t window,
                                     c10::optional<at::Tensor> seq_starts) {
  TORCH_CHECK(query.dim() == 3 && key_cache.dim() == 4, "bad ranks");
  TORCH_CHECK(query.is_contiguous() && key_cache.is_contiguous() && value_cache.is_contiguous(),
              "inputs must be contiguous");
  TORCH_CHECK(block_tables.scalar_type() == at::kLong && context_lens.scalar_type() == at::kLong,
              "block tables and lengths must be int64");
  TORCH_CHECK(query.size(1) % key_cache.size(2) == 0, "heads must be a multiple of kv heads");
  check_cache_dtype(key_cache, value_cache, query.scalar_type());
  TORCH_CHECK(cache_head_dim(key_cache) == query.size(2), "cache rows do not match the head size");
  auto tables = block_tables.contiguous();
  auto lens = context_lens.contiguous();
  TORCH_CHECK(lens.size(0) == query.size(0) && tables.size(0) == query.size(0),
              "one block table and context length per query row");
  const int64_t* starts = nullptr;
  int64_t num_seqs = query.size(0);
  at::Tensor starts_tensor;
  if (seq_starts.has_value() && seq_starts->defined()) {
    starts_tensor = seq_starts->contiguous();
    TORCH_CHECK(starts_tensor.scalar_type() == at::kLong && starts_tensor.dim() == 1 &&
                    starts_tensor.size(0) >= 1,
                "seq_starts must be int64 [S + 1]");
    num_seqs = starts_tensor.size(0) - 1;
    starts = starts_tensor.data_ptr<int64_t>();
    TORCH_CHECK(starts[0] == 0 && starts[num_seqs] == query.size(0),
                "seq_starts must run from 0 to the number of rows");
    for (int64_t s = 0; s < num_seqs; ++s)
      TORCH_CHECK(starts[s + 1] > starts[s], "every sequence needs a row");
  }
  auto out = at::empty_like(query);
  RILLET_DISPATCH(query.scalar_type(), decode_attention_on, query, key_cache, value_cache, tables,
                  lens, starts, num_seqs, scale, window, out);
  return out;
}

}  // namespace rillet
