#include "tile_dot_bf16.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>

#ifdef FLASHBACK_AVX512_BF16_X86
#include <immintrin.h>
#endif

namespace flashback {

bool cpu_has_avx512_bf16() {
#ifdef FLASHBACK_AVX512_BF16_X86
  static const bool ok = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512bw");
  }();
  return ok;
#else
  return false;
#endif
}

bool Bf16DotTiles::available() {
  static const bool ok = [] {
    const char* forced = std::getenv("FLASHBACK_CPU_GEMM");  // "fp32" / "brgemm": other paths
    if (forced != nullptr && (std::strcmp(forced, "fp32") == 0 || std::strcmp(forced, "brgemm") == 0))
      return false;
    return cpu_has_avx512_bf16();
  }();
  return ok;
}

#ifdef FLASHBACK_AVX512_BF16_X86
namespace {

// 16 bf16 -> 16 fp32 (exact: a bf16 is the top half of an fp32)
FLASHBACK_AVX512_BF16 inline __m512 widen(const c10::BFloat16* src) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

FLASHBACK_AVX512_BF16 void qk_impl(int64_t m, int64_t n, int64_t d, const c10::BFloat16* q,
                                   int64_t ldq, const c10::BFloat16* k, float scale, float* s,
                                   int64_t lds) {
  for (int64_t j = 0; j < n; ++j) {
    const c10::BFloat16* kj = k + j * d;
    for (int64_t r = 0; r < m; ++r) {
      const c10::BFloat16* qr = q + r * ldq;
      __m512 acc = _mm512_setzero_ps();
      for (int64_t c = 0; c < d; c += 32)
        acc = _mm512_dpbf16_ps(acc, (__m512bh)_mm512_loadu_si512(qr + c),
                               (__m512bh)_mm512_loadu_si512(kj + c));
      s[r * lds + j] = _mm512_reduce_add_ps(acc) * scale;
    }
  }
}

// Output columns in chunks of 64 (four registers) for up to four rows at a time: 16
// accumulators stay in registers while the tile's V rows stream past.
FLASHBACK_AVX512_BF16 void pv_impl(int64_t m, int64_t n, int64_t d, const float* p, int64_t ldp,
                                   const c10::BFloat16* v, float* o) {
  for (int64_t c0 = 0; c0 < d; c0 += 64) {
    const int chunks = static_cast<int>(std::min<int64_t>(64, d - c0) / 16);  // d % 32 == 0
    for (int64_t r0 = 0; r0 < m; r0 += 4) {
      const int rows = static_cast<int>(std::min<int64_t>(4, m - r0));
      __m512 acc[4][4];
      for (int r = 0; r < rows; ++r)
        for (int c = 0; c < chunks; ++c) acc[r][c] = _mm512_loadu_ps(o + (r0 + r) * d + c0 + 16 * c);
      for (int64_t j = 0; j < n; ++j) {
        __m512 vj[4];
        for (int c = 0; c < chunks; ++c) vj[c] = widen(v + j * d + c0 + 16 * c);
        for (int r = 0; r < rows; ++r) {
          const __m512 pr = _mm512_set1_ps(p[(r0 + r) * ldp + j]);
          for (int c = 0; c < chunks; ++c) acc[r][c] = _mm512_fmadd_ps(pr, vj[c], acc[r][c]);
        }
      }
      for (int r = 0; r < rows; ++r)
        for (int c = 0; c < chunks; ++c) _mm512_storeu_ps(o + (r0 + r) * d + c0 + 16 * c, acc[r][c]);
    }
  }
}

}  // namespace
#endif

void Bf16DotTiles::qk(int64_t m, int64_t n, int64_t d, const c10::BFloat16* q, int64_t ldq,
                      const c10::BFloat16* k, float scale, float* s, int64_t lds) {
#ifdef FLASHBACK_AVX512_BF16_X86
  qk_impl(m, n, d, q, ldq, k, scale, s, lds);
#endif
}

void Bf16DotTiles::pv_accumulate(int64_t m, int64_t n, int64_t d, const float* p, int64_t ldp,
                                 const c10::BFloat16* v, float* o) {
#ifdef FLASHBACK_AVX512_BF16_X86
  pv_impl(m, n, d, p, ldp, v, o);
#endif
}

}  // namespace flashback
