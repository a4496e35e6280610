// Prefill attention straight from the paged KV cache, for CPUs.
//
// The rows of one step's prefill chunks (whole prompts, chunks after a cached prefix,
// recomputes) attend causally to their sequence's context, read in place through the block
// table: no gathered copy of the context and no mask tensor. A chunk's own K/V is in the
// cache already (rotary_and_cache runs first), so a cold chunk and a chunk after a cached
// prefix take the same path.
//
// Flash-style: every query row keeps a softmax shift, sum and fp32 output, and meets its
// context in steps of 16 or 32 keys, in position order from position 0. A row's arithmetic depends
// only on its own query and its context, never on how the prompt was chunked, which rows
// share its task, or which thread ran it: a prompt's attention is bitwise the same cold,
// after a prefix-cache hit, or split into any chunks. (PyTorch's SDPA kernels tile by the
// shapes they are given, so a cold prompt and a prefix-cache hit rounded differently there,
// and a bf16 near-tie flipped a greedy answer between them.)
//
// A task is one chunk's run of kTileTokens positions for one KV head: its rows are those
// positions times the `group` query heads sharing that KV head. The task first lays out
// its context's K and V for its path (widened or paired, K transposed), once for all its
// rows; then each group of kRows rows runs through every step it can see: its scores in
// registers, then their softmax, then the outputs' update.
//
// The bf16 path, on a 1,024-token prompt at SmolLM2's shapes (9 heads, 3 KV heads, head
// size 64), 2 threads: 2.1 ms a layer, from 4.7-5.0 ms with one tile a step, the exact
// running max and the outputs in registers throughout.
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <utility>
#include <vector>

#include "kernels.h"
#include "kv_int8.h"
#include "vec.h"

namespace rillet {
namespace {

constexpr int64_t kKeys = 16;        // keys per tile: one fp32 zmm of scores
constexpr int64_t kTileTokens = 64;  // query positions per task

// Where keys [0, n) of one KV head live: row t at cache + offset(t).
struct ContextView {
  const int64_t* table;
  int64_t block_size, block_stride, token_stride, head_offset;
  int64_t offset(int64_t t) const {
    return table[t / block_size] * block_stride + (t % block_size) * token_stride + head_offset;
  }
};

inline int64_t tiles_for(int64_t keys) { return (keys + kKeys - 1) / kKeys; }

// The keys a row sees: positions [first, pos] (first > 0 under a sliding window).
struct RowKeys {
  int64_t first, pos;
  // Its lanes [begin, end) of the tile from k0 (possibly empty).
  int64_t begin(int64_t k0) const { return std::clamp<int64_t>(first - k0, 0, kKeys); }
  int64_t end(int64_t k0) const { return std::clamp<int64_t>(pos - k0 + 1, 0, kKeys); }
  uint32_t mask(int64_t k0) const {
    const int64_t b = begin(k0), e = end(k0);
    return b >= e ? 0u : ((1u << e) - 1u) & ~((1u << b) - 1u);
  }
};

// Portable path, any head size and CPU, one row at a time: fp32 queries (scaled), each tile
// of K transposed to [d][16] and of V as [16][d]; lanes past the context are zero.
template <typename T>
struct GenericPath {
  static constexpr int64_t kRows = 1;
  int64_t d;
  float scale;
  std::vector<float> q, kt, v, out;
  GenericPath(int64_t rows, int64_t d_, float scale_)
      : d(d_), scale(scale_), q(rows * d_), out(d_) {}

  void set_query(int64_t r, const T* src) {
    for (int64_t i = 0; i < d; ++i) q[r * d + i] = src ? to_float(src[i]) * scale : 0.f;
  }
  // Keys [first, keys) into their tiles (tiles before first's are left as they are).
  void load_context(const T* kc, const T* vc, const ContextView& view, int64_t first,
                    int64_t keys) {
    const int64_t size = tiles_for(keys) * kKeys * d, from = first / kKeys * kKeys * d;
    if (static_cast<int64_t>(kt.size()) < size) kt.resize(size), v.resize(size);
    std::fill(kt.begin() + from, kt.begin() + size, 0.f);
    std::fill(v.begin() + from, v.begin() + size, 0.f);
    for (int64_t t = first; t < keys; ++t) {
      const T* k_row = kc + view.offset(t);
      const T* v_row = vc + view.offset(t);
      float* k_tile = kt.data() + t / kKeys * kKeys * d;
      for (int64_t i = 0; i < d; ++i) {
        k_tile[i * kKeys + t % kKeys] = to_float(k_row[i]);
        v[t * d + i] = to_float(v_row[i]);
      }
    }
  }
  // Rows [r0, r0 + kRows), seeing keys[], written to dst[] (nullptr: padding).
  void run_group(int64_t r0, const RowKeys* keys, T* const* dst) {
    for (int64_t r = 0; r < kRows; ++r) {
      if (dst[r] == nullptr) continue;
      std::fill(out.begin(), out.end(), 0.f);
      float max = -FLT_MAX, sum = 0.f;
      for (int64_t tile = keys[r].first / kKeys; tile * kKeys <= keys[r].pos; ++tile) {
        const int64_t b = keys[r].begin(tile * kKeys), n = keys[r].end(tile * kKeys);
        const float* k_tile = kt.data() + tile * kKeys * d;
        float scores[kKeys], p[kKeys];
        float new_max = max;
        for (int64_t j = b; j < n; ++j) {
          float acc = 0.f;
          for (int64_t i = 0; i < d; ++i) acc += q[(r0 + r) * d + i] * k_tile[i * kKeys + j];
          scores[j] = acc;
          new_max = std::max(new_max, acc);
        }
        const float alpha = std::exp(max - new_max);
        sum *= alpha;
        for (int64_t i = 0; i < d; ++i) out[i] *= alpha;
        for (int64_t j = b; j < n; ++j) {
          p[j] = std::exp(scores[j] - new_max);
          sum += p[j];
          const float* v_row = v.data() + (tile * kKeys + j) * d;
          for (int64_t i = 0; i < d; ++i) out[i] += p[j] * v_row[i];
        }
        max = new_max;
      }
      for (int64_t i = 0; i < d; ++i) store(dst[r] + i, out[i] / sum);
    }
  }
};

#if defined(__AVX512F__)
// e^x for probabilities that are rounded to bf16 next: a degree-5 polynomial (relative
// error ~3e-6, three orders below bf16's rounding), and no upper clamp (x <= kShiftSlack
// on every lane that is kept).
inline __m512 probability_exp16(__m512 x) {
  return exp16_taylor<5>(_mm512_max_ps(x, _mm512_set1_ps(-87.0f)));
}

// How far a score may rise above a row's shift before the row is rescaled: probabilities
// then reach e^8 ~ 3e3, far inside fp32's and bf16's range (both have 8 exponent bits).
constexpr float kShiftSlack = 8.f;

// One row's online-softmax update for N tiles of scores (16 N consecutive keys), in
// registers: leaves the row's probabilities e^(score - shift) in `scores` (zero outside
// `lanes`) and adds them to its lane sums `sum`. The shift is not the running max, only
// kept within kShiftSlack of it: a row is rescaled (its output `acc` and `sum`, by
// e^(old - new shift)) only when a score exceeds shift + slack, so most steps need no
// horizontal max and no exp of their own. (The exact running max cost a reduction and a
// data-dependent branch every 16 keys, ~40 % of the kernel's time.) With no valid key it
// is an exact no-op, so a row's result never depends on the rows it runs beside. ROUND:
// probabilities rounded to bf16 first, as the bf16 path multiplies them, so that the sum
// divides exactly what was accumulated.
template <bool ROUND, int VEC, int N>
inline void online_softmax(__m512 (&scores)[N], const uint32_t (&lanes)[N], float& shift,
                           __m512& sum, __m512* acc, __m256i* rounded = nullptr) {
  const __m512 limit = _mm512_set1_ps(shift + kShiftSlack);
  __mmask16 over = 0;
  for (int n = 0; n < N; ++n)
    over |= _mm512_mask_cmp_ps_mask(static_cast<__mmask16>(lanes[n]), scores[n], limit,
                                    _CMP_GT_OQ);
  if (over) [[unlikely]] {
    __m512 top = _mm512_set1_ps(-FLT_MAX);
    for (int n = 0; n < N; ++n)
      top = _mm512_mask_max_ps(top, static_cast<__mmask16>(lanes[n]), top, scores[n]);
    const float next = _mm512_reduce_max_ps(top);
    const __m512 alpha = exp16(_mm512_set1_ps(shift - next));
    sum = _mm512_mul_ps(sum, alpha);
    for (int j = 0; j < VEC; ++j) acc[j] = _mm512_mul_ps(acc[j], alpha);
    shift = next;
  }
  const __m512 by = _mm512_set1_ps(shift);
  for (int n = 0; n < N; ++n) {
    const __m512 x = _mm512_sub_ps(scores[n], by);
    __m512 e = _mm512_maskz_mov_ps(static_cast<__mmask16>(lanes[n]),
                                   ROUND ? probability_exp16(x) : exp16(x));
    if constexpr (ROUND) {
      rounded[n] = reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(e));
      e = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(rounded[n]), 16));
    }
    scores[n] = e;
    sum = _mm512_add_ps(sum, e);
  }
}

// A loaded vector, kept in its register: without this GCC reloads each K (or V) vector
// for every row that uses it, and the score loop makes 18 loads for 12 vdpbf16ps.
template <typename V>
inline V in_register(V v) {
  asm("" : "+v"(v));
  return v;
}

// Rows before their first key: zero output and lane sums, the lowest shift.
template <int ROWS, int VEC>
inline void start_rows(__m512 (&acc)[ROWS][VEC], __m512 (&sum)[ROWS], float (&shift)[ROWS]) {
  for (int r = 0; r < ROWS; ++r) {
    for (int j = 0; j < VEC; ++j) acc[r][j] = _mm512_setzero_ps();
    sum[r] = _mm512_setzero_ps();
    shift[r] = -FLT_MAX;
  }
}

template <typename T, int VEC>
inline void store_row(T* dst, const __m512* acc, __m512 sum) {
  if (dst == nullptr) return;
  const __m512 inv = _mm512_set1_ps(1.f / _mm512_reduce_add_ps(sum));
  for (int j = 0; j < VEC; ++j) store16(dst + j * 16, _mm512_mul_ps(acc[j], inv));
}

// Rows run together when the outputs stay in registers throughout (the fp32 path): as many
// as keep outputs, lane sums and score chains in the 32 zmm registers (three at head size
// 64: with four, GCC spilled accumulators every tile).
constexpr int64_t rows_for(int vec) { return vec <= 4 ? 3 : vec <= 8 ? 2 : 1; }

// fp32 math for head_dim = 16 * VEC. Scores: sum over i of q[i] (broadcast) x kt[i]
// (16 keys) in two chains per row (even and odd i), for independent FMA chains.
template <typename T, int VEC>
struct Fp32Path : GenericPath<T> {
  static constexpr int D = VEC * 16;
  static constexpr int64_t kRows = rows_for(VEC);
  using GenericPath<T>::GenericPath;

  void run_group(int64_t r0, const RowKeys* keys, T* const* dst) {
    const float* q = this->q.data() + r0 * D;
    __m512 acc[kRows][VEC], sum[kRows];
    float shift[kRows];
    start_rows(acc, sum, shift);
    alignas(64) float p[kRows][kKeys];
    // Rows are in position order: the first sees the first key, the last the last.
    for (int64_t tile = keys[0].first / kKeys; tile * kKeys <= keys[kRows - 1].pos; ++tile) {
      const float* kt = this->kt.data() + tile * kKeys * D;
      const float* v = this->v.data() + tile * kKeys * D;
      __m512 even[kRows], odd[kRows];
      for (int r = 0; r < kRows; ++r) even[r] = odd[r] = _mm512_setzero_ps();
      for (int i = 0; i < D; i += 2) {
        const __m512 k0 = _mm512_loadu_ps(kt + i * kKeys);
        const __m512 k1 = _mm512_loadu_ps(kt + (i + 1) * kKeys);
        for (int r = 0; r < kRows; ++r) {
          even[r] = _mm512_fmadd_ps(_mm512_set1_ps(q[r * D + i]), k0, even[r]);
          odd[r] = _mm512_fmadd_ps(_mm512_set1_ps(q[r * D + i + 1]), k1, odd[r]);
        }
      }
      for (int r = 0; r < kRows; ++r) {
        __m512 scores[1] = {_mm512_add_ps(even[r], odd[r])};
        online_softmax<false, VEC>(scores, {keys[r].mask(tile * kKeys)}, shift[r], sum[r], acc[r]);
        _mm512_store_ps(p[r], scores[0]);
      }
      const int64_t end = keys[kRows - 1].end(tile * kKeys);
      for (int64_t k = 0; k < end; ++k) {
        __m512 vk[VEC];
        for (int j = 0; j < VEC; ++j) vk[j] = _mm512_loadu_ps(v + k * D + j * 16);
        for (int r = 0; r < kRows; ++r) {
          const __m512 pk = _mm512_set1_ps(p[r][k]);
          for (int j = 0; j < VEC; ++j) acc[r][j] = _mm512_fmadd_ps(pk, vk[j], acc[r][j]);
        }
      }
    }
    for (int r = 0; r < kRows; ++r) store_row<T, VEC>(dst[r], acc[r], sum[r]);
  }
};
#endif

#if defined(__AVX512BF16__)
// bf16 data on vdpbf16ps, which multiplies pairs of bf16 exactly and adds in fp32: half the
// instructions of the fp32 path (Zen 4 retires one 512-bit FMA a cycle, so that is the
// bound). Operands are pairs along the reduced axis: the query's (q[2i], q[2i+1]) against
// kp[i][key] = (k[key][2i], k[key][2i+1]); the probabilities (p[2k], p[2k+1]), rounded
// to bf16, against vp[k][i] = (v[2k][i], v[2k+1][i]). The scale is applied to the scores.
template <int VEC>
struct Bf16Path {
  using T = c10::BFloat16;
  static constexpr int D = VEC * 16;
  // Four rows at head size 64: the outputs are out of registers during the score loop.
  static constexpr int64_t kRows = VEC <= 4 ? 4 : rows_for(VEC);
  static constexpr int kTiles = 2;                 // tiles of 16 keys a row meets per step
  static constexpr int64_t kStep = kTiles * kKeys;  // keys per step, aligned to position 0
  float scale;
  std::vector<uint32_t> q, kp, vp;
  Bf16Path(int64_t rows, int64_t, float scale_) : scale(scale_), q(rows * D / 2) {}

  void set_query(int64_t r, const T* src) {
    if (src)
      std::memcpy(q.data() + r * D / 2, src, D * sizeof(T));
    else
      std::fill(q.begin() + r * D / 2, q.begin() + (r + 1) * D / 2, 0u);
  }
  // Keys [first, keys) into whole steps (keys before first's step are left as they are).
  void load_context(const T* kc, const T* vc, const ContextView& view, int64_t first,
                    int64_t keys) {
    const int64_t begin = first / kStep * kStep, end = (keys + kStep - 1) / kStep * kStep;
    if (static_cast<int64_t>(kp.size()) < end * D / 2) kp.resize(end * D / 2), vp.resize(end * D / 2);
    std::fill(kp.begin() + begin * D / 2, kp.begin() + end * D / 2, 0u);
    for (int64_t t = first; t < keys; ++t) {
      const uint32_t* pairs = reinterpret_cast<const uint32_t*>(kc + view.offset(t));
      uint32_t* k_tile = kp.data() + t / kKeys * kKeys * D / 2;
      for (int i = 0; i < D / 2; ++i) k_tile[i * kKeys + t % kKeys] = pairs[i];
    }
    for (int64_t t = begin; t < end; t += 2) {
      const T* lo = first <= t && t < keys ? vc + view.offset(t) : nullptr;
      const T* hi = first <= t + 1 && t + 1 < keys ? vc + view.offset(t + 1) : nullptr;
      for (int i = 0; i < D; i += 16) {
        const __m512i a = lo ? _mm512_cvtepu16_epi32(_mm256_loadu_si256(
                                   reinterpret_cast<const __m256i*>(lo + i)))
                             : _mm512_setzero_si512();
        const __m512i b = hi ? _mm512_cvtepu16_epi32(_mm256_loadu_si256(
                                   reinterpret_cast<const __m256i*>(hi + i)))
                             : _mm512_setzero_si512();
        _mm512_storeu_si512(vp.data() + t / 2 * D + i, _mm512_or_si512(a, _mm512_slli_epi32(b, 16)));
      }
    }
  }
  void run_group(int64_t r0, const RowKeys* keys, T* const* dst) {
    const uint32_t* q_rows = q.data() + r0 * D / 2;
    // The outputs wait in memory while the scores are computed: kept in registers through
    // the score loop, GCC spilled its accumulators to the stack every iteration.
    alignas(64) __m512 acc[kRows][VEC];
    __m512 sum[kRows];
    float shift[kRows];
    start_rows(acc, sum, shift);
    const __m512 vscale = _mm512_set1_ps(scale);
    alignas(64) uint32_t pp[kRows][kStep / 2];
    // Rows are in position order: the first sees the first key, the last the last.
    for (int64_t k0 = keys[0].first / kStep * kStep; k0 <= keys[kRows - 1].pos; k0 += kStep) {
      // Scores of each row for both tiles, even and odd pairs in separate chains: twelve
      // independent vdpbf16ps chains at head size 64 (with one tile, six chains left the
      // loop waiting on the instruction's latency).
      __m512 s[kRows][kTiles][2];
      for (int r = 0; r < kRows; ++r)
        for (int n = 0; n < kTiles; ++n) s[r][n][0] = s[r][n][1] = _mm512_setzero_ps();
      const uint32_t* k_step = kp.data() + k0 * D / 2;
      asm volatile("" : : "r"(acc) : "memory");  // acc is in memory, not in registers
      for (int i = 0; i < D / 2; i += 2) {
        __m512bh k[kTiles][2];
        for (int n = 0; n < kTiles; ++n)
          for (int h = 0; h < 2; ++h)
            k[n][h] = in_register(reinterpret_cast<__m512bh>(
                _mm512_loadu_si512(k_step + n * kKeys * D / 2 + (i + h) * kKeys)));
        for (int r = 0; r < kRows; ++r) {
          const uint32_t* row = q_rows + r * D / 2;
          for (int h = 0; h < 2; ++h) {
            const __m512bh qi = reinterpret_cast<__m512bh>(_mm512_set1_epi32(row[i + h]));
            for (int n = 0; n < kTiles; ++n) s[r][n][h] = _mm512_dpbf16_ps(s[r][n][h], qi, k[n][h]);
          }
        }
      }
      for (int r = 0; r < kRows; ++r) {
        __m512 scores[kTiles];
        uint32_t lanes[kTiles];
        for (int n = 0; n < kTiles; ++n) {
          scores[n] = _mm512_mul_ps(_mm512_add_ps(s[r][n][0], s[r][n][1]), vscale);
          lanes[n] = keys[r].mask(k0 + n * kKeys);
        }
        __m256i rounded[kTiles];
        online_softmax<true, VEC>(scores, lanes, shift[r], sum[r], acc[r], rounded);
        for (int n = 0; n < kTiles; ++n)
          _mm256_store_si256(reinterpret_cast<__m256i*>(pp[r] + n * kKeys / 2), rounded[n]);
      }
      const uint32_t* v_step = vp.data() + k0 * D / 2;
      const int64_t end = std::clamp<int64_t>(keys[kRows - 1].pos - k0 + 1, 0, kStep);
      __m512 out[kRows][VEC];
      for (int r = 0; r < kRows; ++r)
        for (int j = 0; j < VEC; ++j) out[r][j] = acc[r][j];
      for (int64_t k2 = 0; 2 * k2 < end; ++k2) {
        __m512bh vk[VEC];
        for (int j = 0; j < VEC; ++j)
          vk[j] = in_register(
              reinterpret_cast<__m512bh>(_mm512_loadu_si512(v_step + k2 * D + j * 16)));
        for (int r = 0; r < kRows; ++r) {
          const __m512bh pk = reinterpret_cast<__m512bh>(_mm512_set1_epi32(pp[r][k2]));
          for (int j = 0; j < VEC; ++j) out[r][j] = _mm512_dpbf16_ps(out[r][j], pk, vk[j]);
        }
      }
      for (int r = 0; r < kRows; ++r)
        for (int j = 0; j < VEC; ++j) acc[r][j] = out[r][j];
    }
    for (int r = 0; r < kRows; ++r) store_row<T, VEC>(dst[r], acc[r], sum[r]);
  }
};
#endif

struct Task {
  int64_t chunk, kv_head, first, count;  // positions [first, first + count) of the chunk
  int64_t cost;
};

struct Problem {
  const int64_t *starts, *lens, *pos0, *tables;
  int64_t num_chunks, num_heads, num_kv_heads, head_dim, block_size, max_blocks;
  float scale;
  int64_t window;  // > 0: a sliding window
  int64_t first_key(int64_t pos) const { return window > 0 ? std::max<int64_t>(0, pos - window + 1) : 0; }
};

template <typename T, typename Path>
void run_tasks(const Problem& pb, const T* q, const T* kc, const T* vc, T* o) {
  const int64_t d = pb.head_dim, group = pb.num_heads / pb.num_kv_heads;
  // Tasks, costliest first (a row's cost grows with its position), handed out one at a time:
  // a causal prompt split in equal halves would leave one thread three quarters of the work.
  std::vector<Task> tasks;
  for (int64_t c = 0; c < pb.num_chunks; ++c)
    for (int64_t first = 0; first < pb.lens[c]; first += kTileTokens) {
      const int64_t count = std::min(kTileTokens, pb.lens[c] - first);
      for (int64_t h = 0; h < pb.num_kv_heads; ++h)
        tasks.push_back(Task{c, h, first, count, count * (pb.pos0[c] + first + count)});
    }
  std::stable_sort(tasks.begin(), tasks.end(),
                   [](const Task& a, const Task& b) { return a.cost > b.cost; });
  constexpr int64_t kRows = Path::kRows;
  const int64_t max_rows = (kTileTokens * group + kRows - 1) / kRows * kRows;
  std::atomic<int64_t> next{0};
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), tasks.size());

  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    Path path(max_rows, d, pb.scale);
    for (int64_t index = next++; index < static_cast<int64_t>(tasks.size()); index = next++) {
      const Task& task = tasks[index];
      const int64_t rows = task.count * group;
      const int64_t first_pos = pb.pos0[task.chunk] + task.first;
      // Row r = (position first + r / group, query head kv_head * group + r % group), in
      // position order. Rows past `rows` pad the last group: zero queries, never stored.
      auto row_offset = [&](int64_t r) {
        return ((pb.starts[task.chunk] + task.first + r / group) * pb.num_heads +
                task.kv_head * group + r % group) * d;
      };
      const int64_t padded = (rows + kRows - 1) / kRows * kRows;
      for (int64_t r = 0; r < padded; ++r) path.set_query(r, r < rows ? q + row_offset(r) : nullptr);
      const ContextView view{pb.tables + task.chunk * pb.max_blocks, pb.block_size,
                             pb.block_size * pb.num_kv_heads * d, pb.num_kv_heads * d,
                             task.kv_head * d};
      path.load_context(kc, vc, view, pb.first_key(first_pos), first_pos + task.count);
      for (int64_t r0 = 0; r0 < padded; r0 += kRows) {
        RowKeys keys[kRows];
        T* dst[kRows];
        for (int64_t r = 0; r < kRows; ++r) {
          const int64_t pos = first_pos + std::min(r0 + r, rows - 1) / group;
          keys[r] = RowKeys{pb.first_key(pos), pos};
          dst[r] = r0 + r < rows ? o + row_offset(r0 + r) : nullptr;
        }
        path.run_group(r0, keys, dst);
      }
    }
  });
}

template <typename T>
void prefill_attention(const at::Tensor& query,        // [P, H, d]
                       const at::Tensor& key_cache,    // [NB, bs, Hkv, d]
                       const at::Tensor& value_cache,  // [NB, bs, Hkv, d]
                       const at::Tensor& block_tables, // [C, max_blocks] int64
                       const at::Tensor& query_starts, // [C] int64, first row of each chunk
                       const at::Tensor& query_lens,   // [C] int64
                       const at::Tensor& positions,    // [C] int64, position of each first row
                       double scale, int64_t window, at::Tensor& out) {
  const Problem pb{query_starts.data_ptr<int64_t>(), query_lens.data_ptr<int64_t>(),
                   positions.data_ptr<int64_t>(),    block_tables.data_ptr<int64_t>(),
                   query_starts.size(0),             query.size(1),
                   key_cache.size(2),                query.size(2),
                   key_cache.size(1),                block_tables.size(1),
                   static_cast<float>(scale),        window};
  const T* q = query.data_ptr<T>();
  const T* kc = key_cache.data_ptr<T>();
  const T* vc = value_cache.data_ptr<T>();
  T* o = out.data_ptr<T>();
#if defined(__AVX512BF16__)
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    if (pb.head_dim == 64) return run_tasks<T, Bf16Path<4>>(pb, q, kc, vc, o);
    if (pb.head_dim == 128) return run_tasks<T, Bf16Path<8>>(pb, q, kc, vc, o);
    if (pb.head_dim == 256) return run_tasks<T, Bf16Path<16>>(pb, q, kc, vc, o);
  }
#endif
#if defined(__AVX512F__)
  if (pb.head_dim == 64) return run_tasks<T, Fp32Path<T, 4>>(pb, q, kc, vc, o);
  if (pb.head_dim == 128) return run_tasks<T, Fp32Path<T, 8>>(pb, q, kc, vc, o);
  if (pb.head_dim == 256) return run_tasks<T, Fp32Path<T, 16>>(pb, q, kc, vc, o);
#endif
  run_tasks<T, GenericPath<T>>(pb, q, kc, vc, o);
}

// The 8-bit cache's rows that the chunks can see, widened to T in a compact cache of their
// own, and the block tables renumbered into it: the paths above then run unchanged. This
// costs one pass over each chunk's context a layer (~400k values for a 1,024-token prompt
// on SmolLM2), small beside the attention's quadratic work on it.
template <typename T>
void widen_blocks(const at::Tensor& cache, const std::vector<int64_t>& ids, at::Tensor& out) {
  const int64_t rows_per_block = cache.size(1) * cache.size(2);
  const int64_t d = cache_head_dim(cache), width = cache.size(3);
  const int8_t* src = cache.data_ptr<int8_t>();
  T* dst = out.data_ptr<T>();
  at::parallel_for(0, static_cast<int64_t>(ids.size()), 1, [&](int64_t begin, int64_t end) {
    std::vector<float> wide(d);
    for (int64_t b = begin; b < end; ++b) {
      const int8_t* rows = src + ids[b] * rows_per_block * width;
      T* to = dst + b * rows_per_block * d;
      for (int64_t r = 0; r < rows_per_block; ++r) {
        dequantize_row(rows + r * width, d, wide.data());
        for (int64_t i = 0; i < d; ++i) store(to + r * d + i, wide[i]);
      }
    }
  });
}

// The caches a prefill reads and the block tables into them.
struct PrefillCaches {
  at::Tensor key_cache, value_cache, block_tables;
};

PrefillCaches widen_visible_blocks(const at::Tensor& key_cache, const at::Tensor& value_cache,
                                   const at::Tensor& tables, const at::Tensor& lens,
                                   const at::Tensor& positions,
                                   at::ScalarType dtype) {
  const int64_t chunks = tables.size(0), max_blocks = tables.size(1);
  const int64_t block_size = key_cache.size(1);
  const int64_t* table = tables.data_ptr<int64_t>();
  const int64_t* len = lens.data_ptr<int64_t>();
  const int64_t* pos = positions.data_ptr<int64_t>();
  at::Tensor renumbered = at::zeros_like(tables);
  int64_t* to = renumbered.data_ptr<int64_t>();
  std::vector<int64_t> ids;
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t visible = std::min(max_blocks, (pos[c] + len[c] + block_size - 1) / block_size);
    for (int64_t b = 0; b < visible; ++b) {
      to[c * max_blocks + b] = static_cast<int64_t>(ids.size());
      ids.push_back(table[c * max_blocks + b]);
    }
  }
  if (ids.empty()) ids.push_back(0);
  const int64_t d = cache_head_dim(key_cache);
  const auto shape = std::vector<int64_t>{static_cast<int64_t>(ids.size()), block_size,
                                          key_cache.size(2), d};
  PrefillCaches out{at::empty(shape, key_cache.options().dtype(dtype)),
                    at::empty(shape, key_cache.options().dtype(dtype)), renumbered};
  for (auto [from, into] : {std::pair{&key_cache, &out.key_cache},
                            std::pair{&value_cache, &out.value_cache}}) {
    RILLET_DISPATCH(dtype, widen_blocks, *from, ids, *into);
  }
  return out;
}

}  // namespace

at::Tensor paged_prefill_attention(at::Tensor query, at::Tensor key_cache, at::Tensor value_cache,
                                   at::Tensor block_tables, at::Tensor query_starts,
                                   at::Tensor query_lens, at::Tensor positions, double scale,
                                   int64_t window) {
  TORCH_CHECK(query.dim() == 3 && key_cache.dim() == 4, "bad ranks");
  TORCH_CHECK(query.is_contiguous() && key_cache.is_contiguous() && value_cache.is_contiguous(),
              "inputs must be contiguous");
  TORCH_CHECK(query.size(1) % key_cache.size(2) == 0, "heads must be a multiple of kv heads");
  for (const at::Tensor* t : {&block_tables, &query_starts, &query_lens, &positions})
    TORCH_CHECK(t->scalar_type() == at::kLong, "block tables, starts, lengths, positions: int64");
  auto tables = block_tables.contiguous();
  auto starts = query_starts.contiguous();
  auto lens = query_lens.contiguous();
  auto pos = positions.contiguous();
  check_cache_dtype(key_cache, value_cache, query.scalar_type());
  TORCH_CHECK(cache_head_dim(key_cache) == query.size(2), "cache rows do not match the head size");
  PrefillCaches caches{key_cache, value_cache, tables};
  if (is_int8_cache(key_cache))
    caches = widen_visible_blocks(key_cache, value_cache, tables, lens, pos, query.scalar_type());
  auto out = at::empty_like(query);
  RILLET_DISPATCH(query.scalar_type(), prefill_attention, query, caches.key_cache,
                  caches.value_cache, caches.block_tables, starts, lens, pos, scale, window, out);
  return out;
}

}  // namespace rillet
