// Math helpers for the CPU attention kernel: 2^x and the two per-row softmax loops, with an
// AVX-512 path (softmax_avx512.cpp, chosen at run time), an AVX2/FMA path (the flags setup.py
// builds with on x86-64) and a portable scalar path.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define FLASHBACK_CPU_AVX2 1
#endif

namespace flashback {

// softmax_avx512.cpp: the row loops below in 16 lanes, and whether this CPU (and
// FLASHBACK_CPU_SIMD) lets them run.
bool use_avx512_softmax();
float row_max_avx512(const float* row, int64_t n);
float exp2_shift_sum_avx512(float* row, int64_t n, float m);

// 2^x for x <= 0 with ~1e-8 relative error: round-to-nearest range reduction to |f| <= 0.5 and a
// degree-7 Taylor polynomial of e^(f ln 2). Inputs below -126 (including -inf) flush to 0.
inline float fast_exp2(float x) {
  const bool underflow = !(x >= -126.0f);
  x = underflow ? 0.0f : x;
  const float n = std::nearbyint(x);
  const float f = (x - n) * 0.6931471805599453f;
  float p = 1.0f / 5040.0f;
  p = p * f + 1.0f / 720.0f;
  p = p * f + 1.0f / 120.0f;
  p = p * f + 1.0f / 24.0f;
  p = p * f + 1.0f / 6.0f;
  p = p * f + 0.5f;
  p = p * f + 1.0f;
  p = p * f + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return underflow ? 0.0f : p * scale;
}

#ifdef FLASHBACK_CPU_AVX2
// Eight lanes of fast_exp2 (same polynomial, same flush-to-zero below -126).
inline __m256 fast_exp2_avx2(__m256 x) {
  const __m256 lo = _mm256_set1_ps(-126.0f);
  const __m256 keep = _mm256_cmp_ps(x, lo, _CMP_GE_OQ);  // false for x < -126 and NaN/-inf
  x = _mm256_blendv_ps(_mm256_setzero_ps(), x, keep);
  const __m256 n = _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 f = _mm256_mul_ps(_mm256_sub_ps(x, n), _mm256_set1_ps(0.6931471805599453f));
  __m256 p = _mm256_set1_ps(1.0f / 5040.0f);
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f / 720.0f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f / 120.0f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f / 24.0f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f / 6.0f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_and_ps(_mm256_mul_ps(p, _mm256_castsi256_ps(e)), keep);
}

inline float hmax(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 1));
  return _mm_cvtss_f32(m);
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}
#endif

// max(row[0..n)), -inf for n == 0.
inline float row_max(const float* row, int64_t n) {
  static const bool wide = use_avx512_softmax();
  if (wide) return n > 0 ? row_max_avx512(row, n) : -std::numeric_limits<float>::infinity();
  float m = -std::numeric_limits<float>::infinity();
  int64_t i = 0;
#ifdef FLASHBACK_CPU_AVX2
  __m256 acc = _mm256_set1_ps(m);
  for (; i + 8 <= n; i += 8) acc = _mm256_max_ps(acc, _mm256_loadu_ps(row + i));
  m = hmax(acc);
#endif
  for (; i < n; ++i) m = std::max(m, row[i]);
  return m;
}

// row[i] = 2^(row[i] - m) in place for i < n; returns the sum.
inline float exp2_shift_sum(float* row, int64_t n, float m) {
  static const bool wide = use_avx512_softmax();
  if (wide) return exp2_shift_sum_avx512(row, n, m);
  float sum = 0.f;
  int64_t i = 0;
#ifdef FLASHBACK_CPU_AVX2
  const __m256 mv = _mm256_set1_ps(m);
  __m256 acc = _mm256_setzero_ps();
  for (; i + 8 <= n; i += 8) {
    const __m256 p = fast_exp2_avx2(_mm256_sub_ps(_mm256_loadu_ps(row + i), mv));
    _mm256_storeu_ps(row + i, p);
    acc = _mm256_add_ps(acc, p);
  }
  sum = hsum(acc);
#endif
  for (; i < n; ++i) {
    row[i] = fast_exp2(row[i] - m);
    sum += row[i];
  }
  return sum;
}

}  // namespace flashback
