// Grammar masks on the logits, for CPUs.
//
// xgrammar's CPU kernel tests a row's tokens one bit at a time: 0.1-0.5 ms for a row of
// SmolLM2's 49,152 tokens, 18.5 ms for the 64 constrained rows of a c=64 step (7.7 ms on
// two threads), against ~60 ms for the step itself. Here each 32-bit word of the mask is
// two 16-lane masked stores of -inf (the word's zero bits are the store mask), so a row is
// one pass over its logits at memory speed.
#include <cstdint>
#include <limits>

#include "kernels.h"
#include "vec.h"

namespace rillet {
namespace {

void mask_row(float* row, const uint32_t* words, int64_t vocab) {
  const float ninf = -std::numeric_limits<float>::infinity();
  int64_t w = 0;
#if defined(__AVX512F__)
  const __m512 vinf = _mm512_set1_ps(ninf);
  for (; 32 * (w + 1) <= vocab; ++w) {
    const uint32_t word = words[w];
    if (word == 0xFFFFFFFFu) continue;  // all 32 allowed: nothing to write
    _mm512_mask_storeu_ps(row + 32 * w, static_cast<__mmask16>(~word & 0xFFFFu), vinf);
    _mm512_mask_storeu_ps(row + 32 * w + 16, static_cast<__mmask16>(~word >> 16), vinf);
  }
#endif
  for (int64_t t = 32 * w; t < vocab; ++t) {
    if (((words[t / 32] >> (t % 32)) & 1u) == 0) row[t] = ninf;
  }
}

// The lowest id among the allowed tokens of highest logit; -1 when no allowed token has a
// logit above -inf. Per lane the first greater value wins, so each lane keeps its lowest id
// among equals, and the lanes' tie is settled by the lowest id.
int64_t masked_argmax_row(const float* row, const uint32_t* words, int64_t vocab) {
  const float ninf = -std::numeric_limits<float>::infinity();
  float best = ninf;
  int64_t best_id = -1;
  int64_t w = 0;
#if defined(__AVX512F__)
  __m512 vbest = _mm512_set1_ps(ninf);
  __m512i vid = _mm512_set1_epi32(-1);
  const __m512i lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  for (; 32 * (w + 1) <= vocab; ++w) {
    const uint32_t word = words[w];
    if (word == 0) continue;  // nothing allowed in these 32
    for (int half = 0; half < 2; ++half) {
      const auto allowed = static_cast<__mmask16>(word >> (16 * half));
      if (allowed == 0) continue;
      const int32_t first = static_cast<int32_t>(32 * w + 16 * half);
      const __m512 v = _mm512_maskz_loadu_ps(allowed, row + first);
      const __mmask16 up = _mm512_mask_cmp_ps_mask(allowed, v, vbest, _CMP_GT_OQ);
      vbest = _mm512_mask_mov_ps(vbest, up, v);
      vid = _mm512_mask_mov_epi32(vid, up, _mm512_add_epi32(lanes, _mm512_set1_epi32(first)));
    }
  }
  alignas(64) float values[16];
  alignas(64) int32_t ids[16];
  _mm512_store_ps(values, vbest);
  _mm512_store_si512(ids, vid);
  for (int lane = 0; lane < 16; ++lane) {
    if (ids[lane] < 0) continue;
    if (values[lane] > best || (values[lane] == best && ids[lane] < best_id)) {
      best = values[lane];
      best_id = ids[lane];
    }
  }
#endif
  for (int64_t t = 32 * w; t < vocab; ++t) {
    if (((words[t / 32] >> (t % 32)) & 1u) && row[t] > best) {
      best = row[t];
      best_id = t;
    }
  }
  return best_id;
}

// The first allowed id of a row, or -1: the answer where every allowed logit is -inf.
int64_t first_allowed(const uint32_t* words, int64_t vocab) {
  for (int64_t w = 0; 32 * w < vocab; ++w) {
    if (words[w] == 0) continue;
    const int64_t t = 32 * w + __builtin_ctz(words[w]);
    return t < vocab ? t : -1;
  }
  return -1;
}

void check_mask_args(const at::Tensor& logits, const at::Tensor& bits, const at::Tensor& rows) {
  TORCH_CHECK(logits.dim() == 2 && logits.scalar_type() == at::kFloat && logits.is_contiguous(),
              "logits: a contiguous float32 [B, V] tensor");
  TORCH_CHECK(bits.dim() == 2 && bits.scalar_type() == at::kInt && bits.is_contiguous() &&
                  bits.size(0) >= logits.size(0) && bits.size(1) * 32 >= logits.size(1),
              "bits: a contiguous int32 [>= B, ceil(V / 32)] tensor");
  TORCH_CHECK(rows.dim() == 1 && rows.scalar_type() == at::kLong && rows.is_contiguous(),
              "rows: a contiguous int64 vector");
  const int64_t* index = rows.data_ptr<int64_t>();
  for (int64_t k = 0; k < rows.size(0); ++k)
    TORCH_CHECK(index[k] >= 0 && index[k] < logits.size(0), "row ", index[k],
                " outside the batch");
}

}  // namespace

at::Tensor masked_argmax(at::Tensor logits, at::Tensor bits, at::Tensor rows) {
  check_mask_args(logits, bits, rows);
  const int64_t vocab = logits.size(1), width = bits.size(1), n = rows.size(0);
  const int64_t* index = rows.data_ptr<int64_t>();
  const float* in = logits.data_ptr<float>();
  const auto* words = reinterpret_cast<const uint32_t*>(bits.data_ptr<int32_t>());
  at::Tensor out = at::empty({n}, at::kLong);
  int64_t* ids = out.data_ptr<int64_t>();
  // One thread, as apply_token_bitmask (the reasons are the same).
  for (int64_t k = 0; k < n; ++k) {
    const uint32_t* row_words = words + index[k] * width;
    const int64_t id = masked_argmax_row(in + index[k] * vocab, row_words, vocab);
    ids[k] = id >= 0 ? id : first_allowed(row_words, vocab);
  }
  return out;
}

void apply_token_bitmask(at::Tensor logits, at::Tensor bits, at::Tensor rows) {
  TORCH_CHECK(bits.size(0) == logits.size(0), "bits: one row per logits row");
  check_mask_args(logits, bits, rows);
  const int64_t vocab = logits.size(1), width = bits.size(1);
  const int64_t* index = rows.data_ptr<int64_t>();
  float* out = logits.data_ptr<float>();
  const auto* words = reinterpret_cast<const uint32_t*>(bits.data_ptr<int32_t>());
  // One thread: 64 rows of 49,152 logits take 0.55 ms on it (151,936: 2.3 ms), while a
  // second thread made it 5.7-11.8 ms when the other core was busy (the step waits for a
  // descheduled team member; see fused_ops.cpp).
  for (int64_t k = 0; k < rows.size(0); ++k)
    mask_row(out + index[k] * vocab, words + index[k] * width, vocab);
}

}  // namespace rillet
