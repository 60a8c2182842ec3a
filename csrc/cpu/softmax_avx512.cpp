// AVX-512 versions of the softmax row loops of cpu_math.h (16 lanes, masked tails), compiled
// with a target attribute so the extension still loads on AVX2-only CPUs; cpu_math.h picks them
// once per process where the CPU has AVX-512F.
#include "cpu_math.h"

#include <cstdlib>
#include <cstring>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>

namespace flashback {
namespace {

#define FLASHBACK_AVX512 __attribute__((target("avx512f")))

// Sixteen lanes of fast_exp2: the same polynomial; 2^n applied with scalef (exact for the
// integers n in [-126, 0]); lanes below -126, -inf and NaN flush to 0.
FLASHBACK_AVX512 inline __m512 fast_exp2_avx512(__m512 x) {
  const __mmask16 keep = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-126.0f), _CMP_GE_OQ);
  x = _mm512_maskz_mov_ps(keep, x);
  const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_mul_ps(_mm512_sub_ps(x, n), _mm512_set1_ps(0.6931471805599453f));
  __m512 p = _mm512_set1_ps(1.0f / 5040.0f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f / 720.0f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f / 120.0f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f / 24.0f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f / 6.0f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  return _mm512_maskz_mov_ps(keep, _mm512_scalef_ps(p, n));
}

inline __mmask16 tail_mask(int64_t left) {
  return static_cast<__mmask16>(left >= 16 ? 0xFFFF : (1u << left) - 1u);
}

}  // namespace

FLASHBACK_AVX512 float row_max_avx512(const float* row, int64_t n) {
  const __m512 ninf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  __m512 acc = ninf;
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = tail_mask(n - i);
    acc = _mm512_max_ps(acc, _mm512_mask_loadu_ps(ninf, m, row + i));
  }
  return _mm512_reduce_max_ps(acc);
}

FLASHBACK_AVX512 float exp2_shift_sum_avx512(float* row, int64_t n, float m) {
  const __m512 mv = _mm512_set1_ps(m);
  __m512 acc = _mm512_setzero_ps();
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 k = tail_mask(n - i);
    const __m512 p = fast_exp2_avx512(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, row + i), mv));
    _mm512_mask_storeu_ps(row + i, k, p);
    acc = _mm512_add_ps(acc, _mm512_maskz_mov_ps(k, p));
  }
  return _mm512_reduce_add_ps(acc);
}

bool use_avx512_softmax() {
  // FLASHBACK_CPU_SIMD=avx2 keeps the AVX2 loops (to test them on AVX-512 machines)
  static const bool on = [] {
    const char* forced = std::getenv("FLASHBACK_CPU_SIMD");
    if (forced != nullptr && std::strcmp(forced, "avx2") == 0) return false;
    return __builtin_cpu_supports("avx512f") != 0;
  }();
  return on;
}

}  // namespace flashback

#else

namespace flashback {
float row_max_avx512(const float*, int64_t) { return 0.f; }
float exp2_shift_sum_avx512(float*, int64_t, float) { return 0.f; }
bool use_avx512_softmax() { return false; }
}  // namespace flashback

#endif
