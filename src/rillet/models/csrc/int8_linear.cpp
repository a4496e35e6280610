// y = x @ (w * scales)^T for a few bf16 rows x and int8 weights with one scale per output
// row: the matrix-vector products of small decode steps.
//
// Each output row's int8 weights are widened to bf16 32 at a time (exact: |w| <= 127) and
// dotted with every input row by vdpbf16ps (bf16 products, fp32 sums); the row's scale is
// applied once at the end. Output rows are split into chunks claimed through
// run_claimed, so a step never waits for a descheduled helper thread.
#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <functional>

#include "kernels.h"
#include "vec.h"
#include "work_pool.h"

namespace rillet {
namespace {

// Output rows per claimed item: small enough to balance, large enough that claiming
// (one atomic add) is noise next to reading 32 x K weight bytes.
constexpr int64_t kRowsPerItem = 32;

#if defined(__AVX512BF16__)
// 32 int8 weights -> 32 bf16 lanes in the same order.
inline __m512bh widen32(const int8_t* w) {
  const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w))));
  const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + 16))));
  return _mm512_cvtne2ps_pbh(hi, lo);  // lanes 0-15 from lo, 16-31 from hi
}

// ROWS output rows at once (independent accumulator chains), for M input rows.
template <int M, int ROWS>
void rows_block(const c10::BFloat16* x, const int8_t* w, const c10::BFloat16* scales,
                c10::BFloat16* y, int64_t K, int64_t N, int64_t n0) {
  __m512 acc[ROWS][M];
  for (int r = 0; r < ROWS; ++r)
    for (int m = 0; m < M; ++m) acc[r][m] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 32) {
    __m512bh xv[M];
    for (int m = 0; m < M; ++m)
      xv[m] = reinterpret_cast<__m512bh>(_mm512_loadu_si512(x + m * K + k));
    for (int r = 0; r < ROWS; ++r) {
      const __m512bh wv = widen32(w + (n0 + r) * K + k);
      for (int m = 0; m < M; ++m) acc[r][m] = _mm512_dpbf16_ps(acc[r][m], xv[m], wv);
    }
  }
  for (int r = 0; r < ROWS; ++r) {
    const float scale = to_float(scales[n0 + r]);
    for (int m = 0; m < M; ++m) store(y + m * N + n0 + r, _mm512_reduce_add_ps(acc[r][m]) * scale);
  }
}

template <int M>
void rows_range(const c10::BFloat16* x, const int8_t* w, const c10::BFloat16* scales,
                c10::BFloat16* y, int64_t K, int64_t N, int64_t begin, int64_t end) {
  // Four chains hide vdpbf16ps latency at one or two input rows; more rows bring their own.
  constexpr int ROWS = M <= 2 ? 4 : (M <= 4 ? 2 : 1);
  int64_t n = begin;
  for (; n + ROWS <= end; n += ROWS) rows_block<M, ROWS>(x, w, scales, y, K, N, n);
  for (; n < end; ++n) rows_block<M, 1>(x, w, scales, y, K, N, n);
}

using RangeFn = void (*)(const c10::BFloat16*, const int8_t*, const c10::BFloat16*,
                         c10::BFloat16*, int64_t, int64_t, int64_t, int64_t);

RangeFn pick(int64_t m) {
  switch (m) {
    case 1: return rows_range<1>;
    case 2: return rows_range<2>;
    case 3: return rows_range<3>;
    case 4: return rows_range<4>;
    case 5: return rows_range<5>;
    case 6: return rows_range<6>;
    case 7: return rows_range<7>;
    case 8: return rows_range<8>;
    default: return nullptr;
  }
}
#endif

}  // namespace

bool int8_linear_supported() {
#if defined(__AVX512BF16__)
  return true;
#else
  return false;
#endif
}

at::Tensor int8_linear(at::Tensor x, at::Tensor weight, at::Tensor scales, int64_t helpers) {
#if defined(__AVX512BF16__)
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16 && x.is_contiguous(),
              "x must be [M, K] bf16, contiguous");
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kChar && weight.is_contiguous(),
              "weight must be [N, K] int8, contiguous");
  TORCH_CHECK(scales.scalar_type() == at::kBFloat16 && scales.numel() == weight.size(0) &&
                  scales.is_contiguous(),
              "scales must be [N] bf16");
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  TORCH_CHECK(weight.size(1) == K && K % 32 == 0, "K must match and be a multiple of 32");
  const RangeFn range = pick(M);
  TORCH_CHECK(range != nullptr, "at most 8 rows");
  at::Tensor y = at::empty({M, N}, x.options());
  const c10::BFloat16* xp = x.data_ptr<c10::BFloat16>();
  const int8_t* wp = weight.data_ptr<int8_t>();
  const c10::BFloat16* sp = scales.data_ptr<c10::BFloat16>();
  c10::BFloat16* yp = y.data_ptr<c10::BFloat16>();
  const int64_t items = (N + kRowsPerItem - 1) / kRowsPerItem;
  run_claimed(items, static_cast<int>(helpers), [&](int64_t item) {
    const int64_t begin = item * kRowsPerItem;
    const int64_t end = std::min(N, begin + kRowsPerItem);
    range(xp, wp, sp, yp, K, N, begin, end);
  });
  return y;
#else
  TORCH_CHECK(false, "int8_linear needs AVX512-BF16");
#endif
}

}  // namespace rillet
