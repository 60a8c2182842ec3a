// The bf16 tile GEMMs of CPU attention on AMX (ATen's oneDNN brgemm): bf16 operands, fp32
// accumulation, so a bf16 cache is never widened to fp32. brgemm wants its B operand in VNNI
// layout (pairs along the reduction dimension interleaved), so each K/V tile is packed once
// into a scratch buffer, zero-padded to a multiple of kPad keys: a handful of tile shapes, so
// oneDNN generates (and caches) a handful of kernels instead of one per tail length.
#pragma once

#include <c10/util/BFloat16.h>

#include <cstdint>

namespace flashback {

class AmxTileGemm {
 public:
  static constexpr int64_t kPad = 32;  // keys per packed tile are a multiple of this
  // True when this CPU has AMX-BF16 and FLASHBACK_CPU_GEMM does not force an fp32 path.
  static bool available();
  static int64_t padded(int64_t keys) { return (keys + kPad - 1) / kPad * kPad; }

  // K rows [n, d] -> VNNI of K^T: out[d/2][np][2], columns n..np zero. d must be even.
  static void pack_k(const c10::BFloat16* k, int64_t n, int64_t np, int64_t d, c10::BFloat16* out);
  // V rows [n, d] -> VNNI of V: out[np/2][d][2], rows n..np zero.
  static void pack_v(const c10::BFloat16* v, int64_t n, int64_t np, int64_t d, c10::BFloat16* out);
  // S[m, np] = Q[m, d] . K^T (packed by pack_k); S has row stride lds.
  static void qk(int64_t m, int64_t np, int64_t d, const c10::BFloat16* q,
                 const c10::BFloat16* k_packed, float* s, int64_t lds);
  // O[m, d] += P[m, np] . V (packed by pack_v); P has row stride np.
  static void pv_accumulate(int64_t m, int64_t d, int64_t np, const c10::BFloat16* p,
                            const c10::BFloat16* v_packed, float* o);
  static void release();  // per-thread AMX state, after a thread's last call
};

}  // namespace flashback
