// The bf16 tile products of CPU attention for decode-sized items (a few query rows) on CPUs with
// AVX512-BF16: dot products straight on the cache's bf16 K/V rows, fp32 accumulation. There the
// fp32 path's widening of every K/V tile, and AMX's packing of it, cost more than the products;
// this reads each K/V row once, in place.
#pragma once

#include <c10/util/BFloat16.h>

#include <cstdint>

#if defined(__x86_64__) && defined(__GNUC__)
#define FLASHBACK_AVX512_BF16_X86 1
// functions built for AVX512-BF16 whatever the flags of the rest of the extension
#define FLASHBACK_AVX512_BF16 __attribute__((target("avx512f,avx512bw,avx512bf16")))
#endif

namespace flashback {

// Whether this CPU has AVX512-BF16 (and AVX512-BW), read once. Callers add their own
// FLASHBACK_CPU_GEMM test settings.
bool cpu_has_avx512_bf16();

class Bf16DotTiles {
 public:
  static constexpr int64_t kMaxRows = 16;  // items with more query rows take another path
  // True when this CPU has AVX512-BF16 and FLASHBACK_CPU_GEMM does not force the fp32 path.
  static bool available();
  static bool handles(int64_t rows, int64_t d) { return rows <= kMaxRows && d % 32 == 0; }

  // S[m, n] = scale * Q[m, d] . K[n, d]^T (K rows read in place); S has row stride lds.
  static void qk(int64_t m, int64_t n, int64_t d, const c10::BFloat16* q, int64_t ldq,
                 const c10::BFloat16* k, float scale, float* s, int64_t lds);
  // O[m, d] += P[m, n] . V[n, d] (fp32 P with row stride ldp, V rows read in place).
  static void pv_accumulate(int64_t m, int64_t n, int64_t d, const float* p, int64_t ldp,
                            const c10::BFloat16* v, float* o);
};

}  // namespace flashback
