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

}  // namespace

void apply_token_bitmask(at::Tensor logits, at::Tensor bits, at::Tensor rows) {
  TORCH_CHECK(logits.dim() == 2 && logits.scalar_type() == at::kFloat && logits.is_contiguous(),
              "logits: a contiguous float32 [B, V] tensor");
  TORCH_CHECK(bits.dim() == 2 && bits.scalar_type() == at::kInt && bits.is_contiguous() &&
                  bits.size(0) == logits.size(0) && bits.size(1) * 32 >= logits.size(1),
              "bits: a contiguous int32 [B, ceil(V / 32)] tensor");
  TORCH_CHECK(rows.dim() == 1 && rows.scalar_type() == at::kLong && rows.is_contiguous(),
              "rows: a contiguous int64 vector");
  const int64_t batch = logits.size(0), vocab = logits.size(1), width = bits.size(1);
  const int64_t* index = rows.data_ptr<int64_t>();
  for (int64_t k = 0; k < rows.size(0); ++k)
    TORCH_CHECK(index[k] >= 0 && index[k] < batch, "row ", index[k], " outside the batch");
  float* out = logits.data_ptr<float>();
  const auto* words = reinterpret_cast<const uint32_t*>(bits.data_ptr<int32_t>());
  // One thread: 64 rows of 49,152 logits take 0.55 ms on it (151,936: 2.3 ms), while a
  // second thread made it 5.7-11.8 ms when the other core was busy (the step waits for a
  // descheduled team member; see fused_ops.cpp).
  for (int64_t k = 0; k < rows.size(0); ++k)
    mask_row(out + index[k] * vocab, words + index[k] * width, vocab);
}

}  // namespace rillet
