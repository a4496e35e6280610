// y = x @ w^T for a few rows x and 4- or 8-bit weights in groups of 32 inputs: the
// matrix-vector products of small decode steps, which are bound by reading the weights.
//
// Weights: w[n, k] = d[n, g] * u[n, k] + m[n, g] for k in group g = k / 32, u unsigned
// (4-bit: 0..15, llama.cpp's Q4_1; 8-bit: 0..255 with m = -128 d, i.e. Q8_0), d and m fp16.
// Inputs: each row's group of 32 is quantized to int8 with its own scale s (as llama.cpp's
// Q8 activations), so a group's dot product is
//     sum_k w x = d s sum_k(u q) + m s sum_k(q)
// and sum_k(u q) is integer math: vpdpbusd multiplies 4 unsigned weight bytes by 4 signed
// input bytes and adds the four products to an int32 lane.
//
// Packed layout, one record per (16 output columns, group of 32 inputs), records of one
// column block contiguous over the groups so each block is one sequential stream:
//   8-bit: 8 lines of 64 bytes, line t byte 4i + j = u[col i, 4t + j]       (512 bytes)
//   4-bit: 4 lines, line t byte 4i + j = u[col i, 8t + j] | u[col i, 8t + 4 + j] << 4
//                                                                            (256 bytes)
//   then d[16] and m[16] as fp16 (64 bytes).
//   6-bit (llama.cpp's Q6_K, kept at its width): w = d[half] * (u - 32), u in 0..63, with a
//   scale per 16 inputs and no offset. The low four bits as the 4-bit layout's 4 lines; then
//   2 lines of the top two bits, line h byte 4i + j bits 2k..2k+1 = u[col i, 16h + 4k + j]
//   >> 4; then d[half 0][16] and d[half 1][16] as fp16                     (448 bytes)
//   (7 bits a weight against the 8-bit mode's 9, which Q6_K tensors took before).
//   Mode 41 (llama.cpp's Q4_K with its own scales): 4-bit codes under two levels of scale,
//   w = d[col] * sc[g, col] * u - dmin[col] * mn[g, col] over a super-block of 8 groups.
//   One super-record per (16 columns, 256 inputs): the 8 groups' 4-bit lines (8 x 256
//   bytes), sc[8][16] as bytes, mn as [4 group pairs][16][2] bytes, then d[16] and
//   -dmin[16] as fp16 (2368 bytes: 4.625 bits a weight against 5 with an fp16 d and m per
//   group). Its inputs are quantized per 256 (one scale s per row and super-block, as
//   llama.cpp's Q8_K) with each group's sum of int8 values b_g, so a super-block's dot is
//       d s sum_g sc_g sum_k(u q) - dmin s sum_g mn_g b_g
//   with both sums over g in int32 and two fp32 multiply-adds per super-block: the per-group
//   fp32 scale arithmetic of a scale per 32 inputs was mode 41's bound (see micro_tile_k4).
// A line is exactly vpdpbusd's weight operand for 16 columns; the input operand is one
// int32 (4 input bytes) broadcast to every lane.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

#include "kernels.h"
#include "vec.h"

namespace rillet {
namespace {

constexpr int64_t kLanes = 16;  // output columns per block
constexpr int64_t kGroup = 32;  // inputs per quantization group
constexpr int kMaxRowsPerTile = 4;

constexpr int kK4 = 41;             // the mode of Q4_K's own scales
constexpr int64_t kSuperGroups = 8;  // groups of 32 per K-quant super-block
constexpr int64_t kSuperRecord = kSuperGroups * 256 + 2 * kSuperGroups * kLanes + 2 * kLanes * 2;

constexpr int64_t payload_bytes(int64_t bits) {
  return (bits == kK4 ? 4 : bits) * kGroup * kLanes / 8;
}
// The integers, then d[16] and m[16] as fp16; mode 41: a super-record's share per group.
constexpr int64_t record_bytes(int64_t bits) {
  return bits == kK4 ? kSuperRecord / kSuperGroups : payload_bytes(bits) + 2 * kLanes * 2;
}

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
// One row's inputs quantized per group: int8 values, the scale, and scale * sum of values.
struct QuantizedRows {
  std::vector<int8_t> values;  // [M, K]
  std::vector<float> scales;   // [M, G]
  std::vector<float> offsets;  // [M, G]: scale * sum of the group's int8 values
  std::vector<int32_t> half_sums;  // [M, G, 2]: sum of each half's int8 values (6-bit mode)
};

// Row m of x ([K] values) quantized per group into q.
template <typename T>
void quantize_row(const T* row, int64_t K, int64_t m, QuantizedRows& q) {
  const int64_t G = K / kGroup;
  for (int64_t g = 0; g < G; ++g) {
    const T* src = row + g * kGroup;
    const __m512 a = load16(src), b = load16(src + kLanes);
    const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(b)));
    const float scale = amax / 127.f;
    const __m512 inv = _mm512_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
    // cvtps_epi32 rounds to nearest even; |value| <= 127 so the narrowing is exact.
    const __m512i qa = _mm512_cvtps_epi32(_mm512_mul_ps(a, inv));
    const __m512i qb = _mm512_cvtps_epi32(_mm512_mul_ps(b, inv));
    int8_t* dst = q.values.data() + m * K + g * kGroup;
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), _mm512_cvtepi32_epi8(qa));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + kLanes), _mm512_cvtepi32_epi8(qb));
    const int sum_a = _mm512_reduce_add_epi32(qa), sum_b = _mm512_reduce_add_epi32(qb);
    q.scales[m * G + g] = scale;
    q.offsets[m * G + g] = scale * static_cast<float>(sum_a + sum_b);
    q.half_sums[2 * (m * G + g)] = sum_a;
    q.half_sums[2 * (m * G + g) + 1] = sum_b;
  }
}

// Rows a thread quantizes at least: a decode step's few rows stay on the calling thread.
// (perf, 512 rows at K = 1536 on 2 threads: quantizing on the calling thread alone was ~5 %
// of the samples, with the other thread waiting for it as long.)
constexpr int64_t kQuantizeGrain = 32;

template <typename T>
QuantizedRows quantize_rows(const T* x, int64_t M, int64_t K) {
  const int64_t G = K / kGroup;
  QuantizedRows q{std::vector<int8_t>(M * K), std::vector<float>(M * G), std::vector<float>(M * G),
                  std::vector<int32_t>(2 * M * G)};
  at::parallel_for(0, M, kQuantizeGrain, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) quantize_row(x + m * K, K, m, q);
  });
  return q;
}

// Mode 41's inputs: each row quantized per super-block of 256 (one scale) with each group of
// 32's sum of int8 values, which the mins multiply.
struct SuperQuantizedRows {
  std::vector<int8_t> values;  // [M, K]
  std::vector<float> scales;   // [M, K / 256]
  std::vector<int16_t> sums;   // [M, K / 32]: |sum| <= 32 x 127
};

constexpr int64_t kSuperInputs = kSuperGroups * kGroup;

template <typename T>
void quantize_row_super(const T* row, int64_t K, int64_t m, SuperQuantizedRows& q) {
  const int64_t S = K / kSuperInputs, G = K / kGroup;
  for (int64_t s = 0; s < S; ++s) {
    const T* src = row + s * kSuperInputs;
    __m512 v[kSuperInputs / kLanes];
    __m512 top = _mm512_setzero_ps();
    for (int64_t i = 0; i < kSuperInputs / kLanes; ++i) {
      v[i] = load16(src + i * kLanes);
      top = _mm512_max_ps(top, _mm512_abs_ps(v[i]));
    }
    const float amax = _mm512_reduce_max_ps(top);
    const __m512 inv = _mm512_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
    int8_t* dst = q.values.data() + m * K + s * kSuperInputs;
    for (int64_t g = 0; g < kSuperGroups; ++g) {
      // cvtps_epi32 rounds to nearest even; |value| <= 127 so the narrowing is exact.
      const __m512i qa = _mm512_cvtps_epi32(_mm512_mul_ps(v[2 * g], inv));
      const __m512i qb = _mm512_cvtps_epi32(_mm512_mul_ps(v[2 * g + 1], inv));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + g * kGroup), _mm512_cvtepi32_epi8(qa));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + g * kGroup + kLanes),
                       _mm512_cvtepi32_epi8(qb));
      q.sums[m * G + s * kSuperGroups + g] =
          static_cast<int16_t>(_mm512_reduce_add_epi32(_mm512_add_epi32(qa, qb)));
    }
    q.scales[m * S + s] = amax / 127.f;
  }
}

template <typename T>
SuperQuantizedRows quantize_rows_super(const T* x, int64_t M, int64_t K) {
  SuperQuantizedRows q{std::vector<int8_t>(M * K), std::vector<float>(M * K / kSuperInputs),
                       std::vector<int16_t>(M * K / kGroup)};
  at::parallel_for(0, M, kQuantizeGrain, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) quantize_row_super(x + m * K, K, m, q);
  });
  return q;
}

// Adds the products of two weight lines with an input quad pair to dot: lo[b] and hi[b] hold
// column block b's weights for the quads 2t and 2t + 1 of every row's inputs xq[m].
template <int MR, int NB>
inline __attribute__((always_inline)) void dot_quad_pair(__m512i (&dot)[MR][NB],
                                                         const __m512i (&lo)[NB],
                                                         const __m512i (&hi)[NB],
                                                         const int32_t* const (&xq)[MR], int t) {
  for (int m = 0; m < MR; ++m) {
    const __m512i xlo = _mm512_set1_epi32(xq[m][2 * t]);
    const __m512i xhi = _mm512_set1_epi32(xq[m][2 * t + 1]);
    for (int b = 0; b < NB; ++b) {
      dot[m][b] = _mm512_dpbusd_epi32(dot[m][b], lo[b], xlo);
      dot[m][b] = _mm512_dpbusd_epi32(dot[m][b], hi[b], xhi);
    }
  }
}

// Adds a group of 32 inputs' products to dot, its weights as 4-bit codes: the four 64-byte
// lines from lines[b] hold column block b's codes, low nibbles for quad 2t, high for 2t + 1.
template <int MR, int NB>
inline __attribute__((always_inline)) void dot_nibble_group(__m512i (&dot)[MR][NB],
                                                            const uint8_t* const (&lines)[NB],
                                                            const int32_t* const (&xq)[MR]) {
  const __m512i low_nibbles = _mm512_set1_epi8(0x0F);
  for (int t = 0; t < 4; ++t) {
    __m512i lo[NB], hi[NB];
    for (int b = 0; b < NB; ++b) {
      const __m512i v = _mm512_loadu_si512(lines[b] + t * 64);
      lo[b] = _mm512_and_si512(v, low_nibbles);
      hi[b] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low_nibbles);
    }
    dot_quad_pair(dot, lo, hi, xq, t);
  }
}

// Mode 41, MR rows x NB column blocks over all super-blocks. Per (row, block, group) the
// products' int32 sums take one vpmulld by the group's byte scales and one vpaddd, against
// a cvt, a mul and two fmas on the fp32 pipes with an input scale per 32 (removing those
// made this loop 23 % faster, bench/RESULTS.md); the mins are 4 vpdpwssd of (mn_2j,
// mn_2j+1) pairs by the input sums per (row, block, super-block). Integer sums up to
// 8 x 63 x 32 x 15 x 127 < 2^25 (scales) and 8 x 63 x 4064 (mins): no overflow.
// ahead: bytes from a super-record to the one its groups prefetch (see kStreamAheadK4).
template <int MR, int NB, typename T>
void micro_tile_k4(const SuperQuantizedRows& q, int64_t m0, int64_t K, const uint8_t* w,
                   int64_t block_stride, T* y, int64_t N, int64_t ahead) {
  constexpr int64_t kShare = kSuperRecord / kSuperGroups;  // prefetched per group
  const int64_t S = K / kSuperInputs, G = K / kGroup;
  __m512 acc[MR][NB];
  for (int m = 0; m < MR; ++m)
    for (int b = 0; b < NB; ++b) acc[m][b] = _mm512_setzero_ps();
  for (int64_t s = 0; s < S; ++s) {
    const uint8_t* super[NB];
    for (int b = 0; b < NB; ++b) super[b] = w + b * block_stride + s * kSuperRecord;
    __m512i scaled[MR][NB];
    for (int m = 0; m < MR; ++m)
      for (int b = 0; b < NB; ++b) scaled[m][b] = _mm512_setzero_si512();
    for (int64_t g = 0; g < kSuperGroups; ++g) {
      // A super-record `ahead` into L2, a group's share at a time.
      for (int b = 0; b < NB; ++b)
        for (int64_t off = 0; off < kShare; off += 64)
          _mm_prefetch(reinterpret_cast<const char*>(super[b] + ahead + g * kShare + off),
                       _MM_HINT_T1);
      const int32_t* xq[MR];
      for (int m = 0; m < MR; ++m)
        xq[m] = reinterpret_cast<const int32_t*>(q.values.data() + (m0 + m) * K +
                                                 s * kSuperInputs + g * kGroup);
      __m512i dot[MR][NB];
      for (int m = 0; m < MR; ++m)
        for (int b = 0; b < NB; ++b) dot[m][b] = _mm512_setzero_si512();
      const uint8_t* lines[NB];
      for (int b = 0; b < NB; ++b) lines[b] = super[b] + g * 256;
      dot_nibble_group(dot, lines, xq);
      for (int b = 0; b < NB; ++b) {
        const __m512i sc = _mm512_cvtepu8_epi32(_mm_loadu_si128(
            reinterpret_cast<const __m128i*>(super[b] + kSuperGroups * 256 + g * kLanes)));
        for (int m = 0; m < MR; ++m)
          scaled[m][b] = _mm512_add_epi32(scaled[m][b], _mm512_mullo_epi32(dot[m][b], sc));
      }
    }
    for (int b = 0; b < NB; ++b) {
      const uint8_t* mins = super[b] + kSuperGroups * 256 + kSuperGroups * kLanes;
      const auto* halves = reinterpret_cast<const c10::Half*>(mins + kSuperGroups * kLanes);
      const __m512 d = load16(halves), neg_dmin = load16(halves + kLanes);
      __m512i pairs[kSuperGroups / 2];
      for (int j = 0; j < kSuperGroups / 2; ++j)
        pairs[j] = _mm512_cvtepu8_epi16(
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(mins + j * 2 * kLanes)));
      for (int m = 0; m < MR; ++m) {
        const int16_t* sums = q.sums.data() + (m0 + m) * G + s * kSuperGroups;
        __m512i low = _mm512_setzero_si512();
        for (int j = 0; j < kSuperGroups / 2; ++j) {
          int32_t pair;  // groups 2j and 2j + 1's sums as vpdpwssd's int16 pair
          std::memcpy(&pair, sums + 2 * j, sizeof(pair));
          low = _mm512_dpwssd_epi32(low, pairs[j], _mm512_set1_epi32(pair));
        }
        const __m512 scale = _mm512_set1_ps(q.scales[(m0 + m) * S + s]);
        acc[m][b] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(scaled[m][b]), _mm512_mul_ps(d, scale),
                                    acc[m][b]);
        acc[m][b] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(low), _mm512_mul_ps(neg_dmin, scale),
                                    acc[m][b]);
      }
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int b = 0; b < NB; ++b) store16(y + (m0 + m) * N + b * kLanes, acc[m][b]);
}

// One row of mode 41, one column block at a time: a thread's blocks are one contiguous run
// of memory, read as a single sequential stream with a software prefetch kRowAhead bytes
// ahead of it, where micro_tile_k4<1, 4> reads four streams 14 KB apart (K = 1536) that
// restart cold at every 4-block tile. The group's 8 vpdpbusd go to two int32 chains added
// at the end (integer sums: the same int32 in any order), and every fp32 operation is
// micro_tile_k4's for that block, in its order, so the result is bit-identical to it.
constexpr int64_t kRowAhead = 4096;

template <typename T>
void row_blocks_k4(const SuperQuantizedRows& q, int64_t K, const uint8_t* w, int64_t b0,
                   int64_t b1, T* y) {
  const int64_t S = K / kSuperInputs;
  constexpr int64_t kShare = kSuperRecord / kSuperGroups;
  const __m512i low_nibbles = _mm512_set1_epi8(0x0F);
  const int32_t* x = reinterpret_cast<const int32_t*>(q.values.data());
  for (int64_t b = b0; b < b1; ++b) {
    const uint8_t* block = w + b * S * kSuperRecord;
    __m512 acc = _mm512_setzero_ps();
    for (int64_t s = 0; s < S; ++s) {
      const uint8_t* super = block + s * kSuperRecord;
      __m512i scaled = _mm512_setzero_si512();
      for (int64_t g = 0; g < kSuperGroups; ++g) {
        for (int64_t off = 0; off < kShare; off += 64)
          _mm_prefetch(reinterpret_cast<const char*>(super + kRowAhead + g * kShare + off),
                       _MM_HINT_T0);
        const int32_t* xq = x + (s * kSuperInputs + g * kGroup) / 4;
        const uint8_t* lines = super + g * 256;
        __m512i even = _mm512_setzero_si512(), odd = _mm512_setzero_si512();
        for (int t = 0; t < 4; ++t) {
          const __m512i v = _mm512_loadu_si512(lines + t * 64);
          even = _mm512_dpbusd_epi32(even, _mm512_and_si512(v, low_nibbles),
                                     _mm512_set1_epi32(xq[2 * t]));
          odd = _mm512_dpbusd_epi32(odd, _mm512_and_si512(_mm512_srli_epi16(v, 4), low_nibbles),
                                    _mm512_set1_epi32(xq[2 * t + 1]));
        }
        const __m512i sc = _mm512_cvtepu8_epi32(_mm_loadu_si128(
            reinterpret_cast<const __m128i*>(super + kSuperGroups * 256 + g * kLanes)));
        scaled = _mm512_add_epi32(scaled, _mm512_mullo_epi32(_mm512_add_epi32(even, odd), sc));
      }
      const uint8_t* mins = super + kSuperGroups * 256 + kSuperGroups * kLanes;
      const auto* halves = reinterpret_cast<const c10::Half*>(mins + kSuperGroups * kLanes);
      const __m512 d = load16(halves), neg_dmin = load16(halves + kLanes);
      const int16_t* sums = q.sums.data() + s * kSuperGroups;
      __m512i low = _mm512_setzero_si512();
      for (int j = 0; j < kSuperGroups / 2; ++j) {
        const __m512i pairs = _mm512_cvtepu8_epi16(
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(mins + j * 2 * kLanes)));
        int32_t pair;  // groups 2j and 2j + 1's sums as vpdpwssd's int16 pair
        std::memcpy(&pair, sums + 2 * j, sizeof(pair));
        low = _mm512_dpwssd_epi32(low, pairs, _mm512_set1_epi32(pair));
      }
      const __m512 scale = _mm512_set1_ps(q.scales[s]);
      acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(scaled), _mm512_mul_ps(d, scale), acc);
      acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(low), _mm512_mul_ps(neg_dmin, scale), acc);
    }
    store16(y + b * kLanes, acc);
  }
}

// MR rows x NB column blocks, over all groups.
template <int BITS, int MR, int NB, typename T>
void micro_tile(const QuantizedRows& q, int64_t m0, int64_t K, const uint8_t* w,
                int64_t block_stride, T* y, int64_t N, int64_t ahead) {
  constexpr int64_t kPayload = payload_bytes(BITS);
  constexpr int64_t kRecord = record_bytes(BITS);
  const int64_t G = K / kGroup;
  __m512 acc[MR][NB];
  for (int m = 0; m < MR; ++m)
    for (int b = 0; b < NB; ++b) acc[m][b] = _mm512_setzero_ps();
  const __m512i low_nibbles = _mm512_set1_epi8(0x0F);
  for (int64_t g = 0; g < G; ++g) {
    __m512i dot[MR][NB];
    for (int m = 0; m < MR; ++m)
      for (int b = 0; b < NB; ++b) dot[m][b] = _mm512_setzero_si512();
    const uint8_t* rec[NB];
    for (int b = 0; b < NB; ++b) {
      rec[b] = w + b * block_stride + g * kRecord;
      // The record `ahead` bytes on into L2 (see kStreamAhead).
      for (int64_t off = 0; off < kRecord; off += 64)
        _mm_prefetch(reinterpret_cast<const char*>(rec[b] + ahead + off), _MM_HINT_T1);
    }
    const int32_t* xq[MR];
    for (int m = 0; m < MR; ++m)
      xq[m] = reinterpret_cast<const int32_t*>(q.values.data() + (m0 + m) * K + g * kGroup);
    if constexpr (BITS == 6) {
      const __m512i top_bits = _mm512_set1_epi8(0x30);
      for (int half = 0; half < 2; ++half) {
        __m512i hdot[MR][NB];
        for (int m = 0; m < MR; ++m)
          for (int b = 0; b < NB; ++b) hdot[m][b] = _mm512_setzero_si512();
        __m512i high[NB];
        for (int b = 0; b < NB; ++b) high[b] = _mm512_loadu_si512(rec[b] + 256 + half * 64);
        for (int t = 2 * half; t < 2 * half + 2; ++t) {
          // Quads 2t and 2t + 1 (inputs 8t..8t+7): the low nibbles of line t, and fields
          // k = 2(t - 2 half) and k + 1 of the half's top-bits line moved to bits 4..5.
          const int k = 2 * (t - 2 * half);
          __m512i lo[NB], hi[NB];
          for (int b = 0; b < NB; ++b) {
            const __m512i v = _mm512_loadu_si512(rec[b] + t * 64);
            const __m512i h = high[b];
            const __m512i top_lo = k == 0 ? _mm512_slli_epi16(h, 4) : h;
            const __m512i top_hi = k == 0 ? _mm512_slli_epi16(h, 2) : _mm512_srli_epi16(h, 2);
            lo[b] = _mm512_or_si512(_mm512_and_si512(v, low_nibbles),
                                    _mm512_and_si512(top_lo, top_bits));
            hi[b] = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(v, 4), low_nibbles),
                                    _mm512_and_si512(top_hi, top_bits));
          }
          dot_quad_pair(hdot, lo, hi, xq, t);
        }
        // sum_k d (u - 32) x s = d s (sum_k u q - 32 sum_k q), the bracket exact in int32.
        for (int b = 0; b < NB; ++b) {
          const __m512 d = load16(
              reinterpret_cast<const c10::Half*>(rec[b] + kPayload + half * 2 * kLanes));
          for (int m = 0; m < MR; ++m) {
            const int64_t at = (m0 + m) * G + g;
            const __m512i centred = _mm512_sub_epi32(
                hdot[m][b], _mm512_set1_epi32(32 * q.half_sums[2 * at + half]));
            const __m512 ds = _mm512_mul_ps(d, _mm512_set1_ps(q.scales[at]));
            acc[m][b] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(centred), ds, acc[m][b]);
          }
        }
      }
      continue;
    } else if constexpr (BITS == 8) {
      for (int t = 0; t < 8; ++t) {
        __m512i wv[NB];
        for (int b = 0; b < NB; ++b) wv[b] = _mm512_loadu_si512(rec[b] + t * 64);
        for (int m = 0; m < MR; ++m) {
          const __m512i xv = _mm512_set1_epi32(xq[m][t]);
          for (int b = 0; b < NB; ++b) dot[m][b] = _mm512_dpbusd_epi32(dot[m][b], wv[b], xv);
        }
      }
    } else {  // 4 bits
      dot_nibble_group(dot, rec, xq);
    }
    for (int b = 0; b < NB; ++b) {
      const __m512 d = load16(reinterpret_cast<const c10::Half*>(rec[b] + kPayload));
      const __m512 mn = load16(reinterpret_cast<const c10::Half*>(rec[b] + kPayload + 2 * kLanes));
      for (int m = 0; m < MR; ++m) {
        const int64_t at = (m0 + m) * G + g;
        const __m512 ds = _mm512_mul_ps(d, _mm512_set1_ps(q.scales[at]));
        acc[m][b] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot[m][b]), ds, acc[m][b]);
        acc[m][b] = _mm512_fmadd_ps(mn, _mm512_set1_ps(q.offsets[at]), acc[m][b]);
      }
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int b = 0; b < NB; ++b) store16(y + (m0 + m) * N + b * kLanes, acc[m][b]);
}

// 6-bit steps of many rows: each column block's codes are unpacked once into a per-thread
// scratch of whole bytes (as the 8-bit layout: line j holds inputs 4j..4j+3 of the 16
// columns) with its two scales as fp32, and every row tile then reads that. micro_tile
// repeats the unpacking for every 4 rows: ~70 logic and shift ops per 64 vpdpbusd of a
// (4 rows, 2 blocks, group) tile, on the same vector pipes. At 64 rows (one thread, CPU
// time, bench/linear_kernels.py --qwen): the LM head 133.9 -> 122.6 ms, a Q6_K down
// projection 7.98 -> 7.30 ms. Not at 16 rows (LM head 37.8 -> 43.2 ms: four row tiles do not
// pay for writing and reading the scratch), nor for the 4-bit modes, whose unpacking is
// 3 ops a line (mode 41 at 64 rows: 12.1 -> 12.9 ms). The sums are micro_tile's ops in its
// order, so results are bit-identical to it.
constexpr int64_t kScratchRecord = 8 * 64 + 2 * kLanes * 4;  // 8 lines, then d of each half
// Rows from which a 6-bit step takes the unpacked path.
constexpr int64_t kUnpackMinRows = 32;

// Block b's group g of a 6-bit weight as a scratch record: the codes as bytes, then d of
// each half of 16 inputs as fp32.
void unpack_record6(const uint8_t* w, int64_t block_stride, int64_t b, int64_t g, uint8_t* out) {
  constexpr int64_t kPayload = payload_bytes(6);
  const __m512i low_nibbles = _mm512_set1_epi8(0x0F), top_bits = _mm512_set1_epi8(0x30);
  const uint8_t* rec = w + b * block_stride + g * record_bytes(6);
  auto* lines = reinterpret_cast<__m512i*>(out);
  auto* scales = reinterpret_cast<float*>(out + 8 * 64);
  for (int half = 0; half < 2; ++half) {  // as micro_tile's 6-bit unpacking
    const __m512i h = _mm512_loadu_si512(rec + 256 + half * 64);
    for (int t = 2 * half; t < 2 * half + 2; ++t) {
      const int k = 2 * (t - 2 * half);
      const __m512i v = _mm512_loadu_si512(rec + t * 64);
      const __m512i top_lo = k == 0 ? _mm512_slli_epi16(h, 4) : h;
      const __m512i top_hi = k == 0 ? _mm512_slli_epi16(h, 2) : _mm512_srli_epi16(h, 2);
      _mm512_store_si512(lines + 2 * t, _mm512_or_si512(_mm512_and_si512(v, low_nibbles),
                                                        _mm512_and_si512(top_lo, top_bits)));
      _mm512_store_si512(lines + 2 * t + 1,
                         _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(v, 4), low_nibbles),
                                         _mm512_and_si512(top_hi, top_bits)));
    }
    _mm512_store_ps(scales + half * kLanes,
                    load16(reinterpret_cast<const c10::Half*>(rec + kPayload + half * 2 * kLanes)));
  }
}

// MR rows x NB column blocks of a 6-bit weight over all groups, from a column tile's scratch
// ([NB][G] records): micro_tile's sums, in its order.
template <int MR, int NB, typename T>
void unpacked_tile6(const QuantizedRows& q, int64_t m0, int64_t K, const uint8_t* scratch, T* y,
                    int64_t N) {
  const int64_t G = K / kGroup;
  __m512 acc[MR][NB];
  for (int m = 0; m < MR; ++m)
    for (int b = 0; b < NB; ++b) acc[m][b] = _mm512_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    const uint8_t* rec[NB];
    for (int b = 0; b < NB; ++b) rec[b] = scratch + (b * G + g) * kScratchRecord;
    const int32_t* xq[MR];
    for (int m = 0; m < MR; ++m)
      xq[m] = reinterpret_cast<const int32_t*>(q.values.data() + (m0 + m) * K + g * kGroup);
    for (int half = 0; half < 2; ++half) {
      __m512i dot[MR][NB];
      for (int m = 0; m < MR; ++m)
        for (int b = 0; b < NB; ++b) dot[m][b] = _mm512_setzero_si512();
      for (int j = 4 * half; j < 4 * half + 4; ++j) {
        __m512i wv[NB];
        for (int b = 0; b < NB; ++b) wv[b] = _mm512_load_si512(rec[b] + j * 64);
        for (int m = 0; m < MR; ++m) {
          const __m512i xv = _mm512_set1_epi32(xq[m][j]);
          for (int b = 0; b < NB; ++b) dot[m][b] = _mm512_dpbusd_epi32(dot[m][b], wv[b], xv);
        }
      }
      // sum_k d (u - 32) x s = d s (sum_k u q - 32 sum_k q), the bracket exact in int32.
      for (int b = 0; b < NB; ++b) {
        const __m512 d = _mm512_load_ps(reinterpret_cast<const float*>(rec[b] + 8 * 64) +
                                        half * kLanes);
        for (int m = 0; m < MR; ++m) {
          const int64_t at = (m0 + m) * G + g;
          const __m512i centred = _mm512_sub_epi32(
              dot[m][b], _mm512_set1_epi32(32 * q.half_sums[2 * at + half]));
          const __m512 ds = _mm512_mul_ps(d, _mm512_set1_ps(q.scales[at]));
          acc[m][b] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(centred), ds, acc[m][b]);
        }
      }
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int b = 0; b < NB; ++b) store16(y + (m0 + m) * N + b * kLanes, acc[m][b]);
}

template <typename T>
using UnpackedFn = void (*)(const QuantizedRows&, int64_t, int64_t, const uint8_t*, T*, int64_t);

template <int NB, typename T>
UnpackedFn<T> pick_unpacked_rows(int64_t rows) {
  switch (rows) {
    case 1: return unpacked_tile6<1, NB, T>;
    case 2: return unpacked_tile6<2, NB, T>;
    case 3: return unpacked_tile6<3, NB, T>;
    default: return unpacked_tile6<4, NB, T>;
  }
}

template <typename T>
UnpackedFn<T> pick_unpacked(int64_t rows, int64_t blocks) {
  return blocks == 1 ? pick_unpacked_rows<1, T>(rows) : pick_unpacked_rows<2, T>(rows);
}

template <typename T>
using MicroFn = void (*)(const QuantizedRows&, int64_t, int64_t, const uint8_t*, int64_t, T*,
                         int64_t, int64_t);

template <int BITS, int NB, typename T>
MicroFn<T> pick_rows(int64_t rows) {
  switch (rows) {
    case 1: return micro_tile<BITS, 1, NB, T>;
    case 2: return micro_tile<BITS, 2, NB, T>;
    case 3: return micro_tile<BITS, 3, NB, T>;
    default: return micro_tile<BITS, 4, NB, T>;
  }
}

template <int BITS, typename T>
MicroFn<T> pick(int64_t rows, int64_t blocks) {
  switch (blocks) {
    case 1: return pick_rows<BITS, 1, T>(rows);
    case 2: return pick_rows<BITS, 2, T>(rows);
    case 3: return pick_rows<BITS, 3, T>(rows);
    default: return pick_rows<BITS, 4, T>(rows);
  }
}

template <typename T>
using K4Fn = void (*)(const SuperQuantizedRows&, int64_t, int64_t, const uint8_t*, int64_t, T*,
                      int64_t, int64_t);

template <int NB, typename T>
K4Fn<T> pick_k4_rows(int64_t rows) {
  switch (rows) {
    case 1: return micro_tile_k4<1, NB, T>;
    case 2: return micro_tile_k4<2, NB, T>;
    case 3: return micro_tile_k4<3, NB, T>;
    default: return micro_tile_k4<4, NB, T>;
  }
}

template <typename T>
K4Fn<T> pick_k4(int64_t rows, int64_t blocks) {
  switch (blocks) {
    case 1: return pick_k4_rows<1, T>(rows);
    case 2: return pick_k4_rows<2, T>(rows);
    case 3: return pick_k4_rows<3, T>(rows);
    default: return pick_k4_rows<4, T>(rows);
  }
}

// Column blocks per work item: four independent accumulator chains per row hide
// vpdpbusd's latency at one or two rows; more rows bring chains of their own and need
// the registers.
int64_t blocks_per_tile(int64_t M) { return M <= 2 ? 4 : 2; }

// What a row tile prefetches. A column tile's first row tile streams its weights from memory
// and prefetches along its own stream: micro_tile 8 records ahead, micro_tile_k4 the next
// super-record, so each stream keeps a few lines in flight. The later row tiles find those
// weights in cache and prefetch the same records of the next column tile instead, so the
// next first row tile reads L2, not memory: a step's weights from memory (bit-identical,
// only prefetches move), 16 rows, 2 threads, 1.04 GB of Qwen2.5 1.5B's weights: 120.6 ->
// 108.9 ms (bench/RESULTS.md, issue 27). One row tile (up to 4 rows) keeps its own stream.
constexpr int64_t kStreamAhead = 8;  // records, micro_tile's first row tile
constexpr int64_t kStreamAheadK4 = kSuperRecord;  // bytes, micro_tile_k4's first row tile

template <typename T>
void run_k4(const T* x, int64_t M, int64_t K, const uint8_t* w, int64_t num_blocks, T* y) {
  const SuperQuantizedRows q = quantize_rows_super(x, M, K);
  if (M == 1) {  // each thread one contiguous run of blocks (see row_blocks_k4)
    at::parallel_for(0, num_blocks, 1, [&](int64_t begin, int64_t end) {
      row_blocks_k4(q, K, w, begin, end, y);
    });
    return;
  }
  const int64_t N = num_blocks * kLanes;
  const int64_t block_stride = (K / kSuperInputs) * kSuperRecord;
  const int64_t per_tile = blocks_per_tile(M);
  const int64_t tiles = (num_blocks + per_tile - 1) / per_tile;
  const int64_t next_tile = per_tile * block_stride;  // bytes to the next column tile
  at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b0 = t * per_tile;
      const int64_t blocks = std::min(per_tile, num_blocks - b0);
      const uint8_t* wt = w + b0 * block_stride;
      T* yt = y + b0 * kLanes;
      int64_t m = 0;
      for (; m + kMaxRowsPerTile <= M; m += kMaxRowsPerTile)
        pick_k4<T>(kMaxRowsPerTile, blocks)(q, m, K, wt, block_stride, yt, N,
                                            m == 0 ? kStreamAheadK4 : next_tile);
      if (m < M)
        pick_k4<T>(M - m, blocks)(q, m, K, wt, block_stride, yt, N,
                                  m == 0 ? kStreamAheadK4 : next_tile);
    }
  });
}

template <int BITS, typename T>
void run(const T* x, int64_t M, int64_t K, const uint8_t* w, int64_t num_blocks, T* y) {
  const QuantizedRows q = quantize_rows(x, M, K);
  const int64_t N = num_blocks * kLanes;
  const int64_t block_stride = (K / kGroup) * record_bytes(BITS);
  const int64_t stream_ahead = kStreamAhead * record_bytes(BITS);
  if (M == 1) {
    // Each thread one contiguous run of blocks, one block at a time: a single sequential
    // stream, which micro_tile's prefetch (8 records ahead) carries across block ends, where
    // 4-block tiles read four streams that restart cold at every tile (row_blocks_k4). A
    // block's operations do not depend on the blocks beside it: bit-identical.
    at::parallel_for(0, num_blocks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b)
        micro_tile<BITS, 1, 1, T>(q, 0, K, w + b * block_stride, block_stride, y + b * kLanes, N,
                                  stream_ahead);
    });
    return;
  }
  const int64_t per_tile = blocks_per_tile(M);
  const int64_t tiles = (num_blocks + per_tile - 1) / per_tile;
  const int64_t next_tile = per_tile * block_stride;  // bytes to the next column tile
  if constexpr (BITS == 6) {
    if (M >= kUnpackMinRows) {
      const int64_t G = K / kGroup;
      at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
        // 64-byte aligned (the row tiles' loads are whole lines), and not zeroed.
        std::unique_ptr<__m512i[]> scratch(
            new __m512i[per_tile * G * kScratchRecord / sizeof(__m512i)]);
        auto* base = reinterpret_cast<uint8_t*>(scratch.get());
        for (int64_t t = begin; t < end; ++t) {
          const int64_t b0 = t * per_tile;
          const int64_t blocks = std::min(per_tile, num_blocks - b0);
          const uint8_t* wt = w + b0 * block_stride;
          for (int64_t b = 0; b < blocks; ++b)
            for (int64_t g = 0; g < G; ++g)
              unpack_record6(wt, block_stride, b, g, base + (b * G + g) * kScratchRecord);
          T* yt = y + b0 * kLanes;
          int64_t m = 0;
          for (; m + kMaxRowsPerTile <= M; m += kMaxRowsPerTile)
            pick_unpacked<T>(kMaxRowsPerTile, blocks)(q, m, K, base, yt, N);
          if (m < M) pick_unpacked<T>(M - m, blocks)(q, m, K, base, yt, N);
        }
      });
      return;
    }
  }
  at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b0 = t * per_tile;
      const int64_t blocks = std::min(per_tile, num_blocks - b0);
      const uint8_t* wt = w + b0 * block_stride;
      T* yt = y + b0 * kLanes;
      int64_t m = 0;
      for (; m + kMaxRowsPerTile <= M; m += kMaxRowsPerTile)
        pick<BITS, T>(kMaxRowsPerTile, blocks)(q, m, K, wt, block_stride, yt, N,
                                               m == 0 ? stream_ahead : next_tile);
      if (m < M)
        pick<BITS, T>(M - m, blocks)(q, m, K, wt, block_stride, yt, N,
                                     m == 0 ? stream_ahead : next_tile);
    }
  });
}
#endif

}  // namespace

bool quantized_linear_supported() {
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
  return true;
#else
  return false;
#endif
}

at::Tensor quantized_linear(at::Tensor x, at::Tensor packed, int64_t bits) {
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
  TORCH_CHECK(bits == 4 || bits == 6 || bits == 8 || bits == kK4, "bits must be 4, 6, 8 or 41");
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() &&
                  (x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kFloat),
              "x must be [M, K] bf16 or fp32, contiguous");
  TORCH_CHECK(packed.dim() == 3 && packed.scalar_type() == at::kByte && packed.is_contiguous() &&
                  packed.size(2) == (bits == kK4 ? kSuperRecord : record_bytes(bits)),
              "packed must be [N / 16, K / 32, ", record_bytes(bits),
              "] uint8 (mode 41: [N / 16, K / 256, ", kSuperRecord, "])");
  const int64_t M = x.size(0), K = x.size(1), num_blocks = packed.size(0);
  const int64_t per_row_unit = bits == kK4 ? kSuperGroups * kGroup : kGroup;
  TORCH_CHECK(packed.size(1) * per_row_unit == K, "x has ", K, " columns; the weight expects ",
              packed.size(1) * per_row_unit);
  at::Tensor y = at::empty({M, num_blocks * kLanes}, x.options());
  if (M == 0) return y;
  const uint8_t* wp = packed.data_ptr<uint8_t>();
  if (x.scalar_type() == at::kBFloat16) {
    const auto* xp = x.data_ptr<c10::BFloat16>();
    auto* yp = y.data_ptr<c10::BFloat16>();
    bits == 4     ? run<4>(xp, M, K, wp, num_blocks, yp)
    : bits == 6   ? run<6>(xp, M, K, wp, num_blocks, yp)
    : bits == kK4 ? run_k4(xp, M, K, wp, num_blocks, yp)
                  : run<8>(xp, M, K, wp, num_blocks, yp);
  } else {
    const auto* xp = x.data_ptr<float>();
    auto* yp = y.data_ptr<float>();
    bits == 4     ? run<4>(xp, M, K, wp, num_blocks, yp)
    : bits == 6   ? run<6>(xp, M, K, wp, num_blocks, yp)
    : bits == kK4 ? run_k4(xp, M, K, wp, num_blocks, yp)
                  : run<8>(xp, M, K, wp, num_blocks, yp);
  }
  return y;
#else
  TORCH_CHECK(false, "quantized_linear needs AVX512-VNNI");
#endif
}

}  // namespace rillet
