// Element and 16-lane helpers shared by the kernels: fp32 math on float, bf16 and fp16 data.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace rillet {

inline float to_float(float x) { return x; }
inline float to_float(c10::BFloat16 x) {
  uint32_t bits = static_cast<uint32_t>(x.x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}
inline float to_float(c10::Half x) { return static_cast<float>(x); }
inline float to_float(int8_t x) { return static_cast<float>(x); }  // the 8-bit KV cache's values

// fp32 -> T, rounding to nearest even (c10's conversions).
template <typename T>
inline void store(T* dst, float value) { *dst = static_cast<T>(value); }

#if defined(__AVX512F__)
// 16 lanes of T <-> 16 fp32 lanes.
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const c10::BFloat16* p) {
  __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}
inline __m512 load16(const c10::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

inline __m512 load16(const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}

inline void store16(float* p, __m512 v) { _mm512_storeu_ps(p, v); }
inline void store16(c10::BFloat16* p, __m512 v) {
  // Round to nearest even, as c10::BFloat16(float) does (NaN stays NaN: its mantissa
  // is non-zero above the rounding bit for every NaN torch produces).
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m512i rounded =
      _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(rounded));
}
inline void store16(c10::Half* p, __m512 v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p),
                      _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

constexpr float inverse_factorial(int k) {
  float factorial = 1.f;  // exact in fp32 up to 13!
  for (int i = 2; i <= k; ++i) factorial *= static_cast<float>(i);
  return 1.f / factorial;
}

// e^x as 2^n * e^r with |r| <= ln2/2 and the Taylor polynomial of e^r to degree kDegree.
// Inputs must be >= -87 (callers clamp); no upper clamp here.
template <int kDegree>
inline __m512 exp16_taylor(__m512 x) {
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(inverse_factorial(kDegree));
#pragma GCC unroll 16
  for (int k = kDegree - 1; k >= 0; --k) {  // Horner
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(inverse_factorial(k)));
  }
  return _mm512_scalef_ps(p, n);
}

// e^x in fp32: degree 7 (relative error ~1e-9, below fp32 rounding); inputs clamped to
// [-87, 88].
inline __m512 exp16(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.0f)), _mm512_set1_ps(88.0f));
  return exp16_taylor<7>(x);
}
#endif

}  // namespace rillet
