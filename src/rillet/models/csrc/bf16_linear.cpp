// y = x @ w^T for bf16 x [M, K] and a bf16 weight packed for vdpbf16ps: the matmuls of
// decode steps with a batch of streams (tens of rows), where oneDNN reaches 40-60 % of
// this CPU's bf16 peak.
//
// Packed layout: [N / 16][K / 2][16][2]. One 64-byte line holds, for 16 output columns,
// the weights of one pair of inputs, which is exactly vdpbf16ps's right operand; the left
// operand is the pair (x[m, 2p], x[m, 2p + 1]) broadcast to every lane, folded into the
// instruction as a memory broadcast. A micro-tile keeps 8 rows x 3 column blocks (24 fp32
// accumulators) in registers, so each weight line loaded feeds 8 rows and each broadcast
// feeds 3 blocks. Work items are tiles of 48 output columns over all rows: a tile's
// weights (K x 96 bytes) are read from memory once and from cache for every further group
// of 8 rows.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>

#include "kernels.h"
#include "vec.h"

namespace rillet {
namespace {

constexpr int64_t kLanes = 16;     // output columns per block (fp32 lanes of a zmm)
constexpr int kBlocksPerTile = 3;  // column blocks per work item
constexpr int kRowsPerTile = 8;    // rows per register tile

#if defined(__AVX512BF16__)
// MR rows x NB column blocks: y[m, 16 b + i] = sum_p x[m, 2p..2p+1] . w[b][p][i][0..1].
template <int MR, int NB>
void micro_tile(const c10::BFloat16* x, int64_t pairs, const c10::BFloat16* w,
                int64_t block_stride, c10::BFloat16* y, int64_t N) {
  __m512 acc[MR][NB];
  for (int m = 0; m < MR; ++m)
    for (int b = 0; b < NB; ++b) acc[m][b] = _mm512_setzero_ps();
  const int32_t* xpairs = reinterpret_cast<const int32_t*>(x);  // one int32 = one bf16 pair
  for (int64_t p = 0; p < pairs; ++p) {
    __m512bh wv[NB];
    for (int b = 0; b < NB; ++b) {
      _mm_prefetch(reinterpret_cast<const char*>(w + b * block_stride + (p + 16) * 32), _MM_HINT_T0);
      wv[b] = reinterpret_cast<__m512bh>(_mm512_loadu_si512(w + b * block_stride + p * 32));
    }
    for (int m = 0; m < MR; ++m) {
      const __m512bh xv = reinterpret_cast<__m512bh>(_mm512_set1_epi32(xpairs[m * pairs + p]));
      for (int b = 0; b < NB; ++b) acc[m][b] = _mm512_dpbf16_ps(acc[m][b], xv, wv[b]);
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int b = 0; b < NB; ++b) store16(y + m * N + b * kLanes, acc[m][b]);
}

using MicroFn = void (*)(const c10::BFloat16*, int64_t, const c10::BFloat16*, int64_t,
                         c10::BFloat16*, int64_t);

template <int NB>
MicroFn pick_rows(int64_t rows) {
  switch (rows) {
    case 1: return micro_tile<1, NB>;
    case 2: return micro_tile<2, NB>;
    case 3: return micro_tile<3, NB>;
    case 4: return micro_tile<4, NB>;
    case 5: return micro_tile<5, NB>;
    case 6: return micro_tile<6, NB>;
    case 7: return micro_tile<7, NB>;
    default: return micro_tile<8, NB>;
  }
}

MicroFn pick(int64_t rows, int64_t blocks) {
  switch (blocks) {
    case 1: return pick_rows<1>(rows);
    case 2: return pick_rows<2>(rows);
    default: return pick_rows<3>(rows);
  }
}

// Every row of x times column blocks [b0, b0 + blocks) of w.
void tile(const c10::BFloat16* x, int64_t M, int64_t K, const c10::BFloat16* w, int64_t b0,
          int64_t blocks, c10::BFloat16* y, int64_t N) {
  const int64_t pairs = K / 2;
  const int64_t block_stride = pairs * 32;
  const c10::BFloat16* wt = w + b0 * block_stride;
  c10::BFloat16* yt = y + b0 * kLanes;
  int64_t m = 0;
  const MicroFn full = pick(kRowsPerTile, blocks);
  for (; m + kRowsPerTile <= M; m += kRowsPerTile)
    full(x + m * K, pairs, wt, block_stride, yt + m * N, N);
  if (m < M) pick(M - m, blocks)(x + m * K, pairs, wt, block_stride, yt + m * N, N);
}
#endif

}  // namespace

bool bf16_linear_supported() {
#if defined(__AVX512BF16__)
  return true;
#else
  return false;
#endif
}

at::Tensor pack_bf16_weight(at::Tensor weight) {
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kBFloat16,
              "weight must be [N, K] bf16");
  const int64_t N = weight.size(0), K = weight.size(1);
  TORCH_CHECK(N % kLanes == 0 && K % 2 == 0, "N must be a multiple of 16 and K even");
  return weight.reshape({N / kLanes, kLanes, K / 2, 2}).permute({0, 2, 1, 3}).contiguous();
}

at::Tensor bf16_linear(at::Tensor x, at::Tensor packed) {
#if defined(__AVX512BF16__)
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16 && x.is_contiguous(),
              "x must be [M, K] bf16, contiguous");
  TORCH_CHECK(packed.dim() == 4 && packed.scalar_type() == at::kBFloat16 &&
                  packed.is_contiguous() && packed.size(2) == kLanes && packed.size(3) == 2,
              "packed must come from pack_bf16_weight");
  const int64_t M = x.size(0), K = x.size(1);
  const int64_t num_blocks = packed.size(0), N = num_blocks * kLanes;
  TORCH_CHECK(packed.size(1) * 2 == K, "x has ", K, " columns; the weight expects ",
              packed.size(1) * 2);
  at::Tensor y = at::empty({M, N}, x.options());
  if (M == 0) return y;
  const c10::BFloat16* xp = x.data_ptr<c10::BFloat16>();
  const c10::BFloat16* wp = packed.data_ptr<c10::BFloat16>();
  c10::BFloat16* yp = y.data_ptr<c10::BFloat16>();
  const int64_t tiles = (num_blocks + kBlocksPerTile - 1) / kBlocksPerTile;
  at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b0 = t * kBlocksPerTile;
      tile(xp, M, K, wp, b0, std::min<int64_t>(kBlocksPerTile, num_blocks - b0), yp, N);
    }
  });
  return y;
#else
  TORCH_CHECK(false, "bf16_linear needs AVX512-BF16");
#endif
}

}  // namespace rillet
