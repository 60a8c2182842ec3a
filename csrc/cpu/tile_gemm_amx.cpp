#include "tile_gemm_amx.h"

#include <ATen/native/CPUBlas.h>

#include <cstdlib>
#include <cstring>

namespace flashback {

bool AmxTileGemm::available() {
  static const bool ok = [] {
    const char* forced = std::getenv("FLASHBACK_CPU_GEMM");  // "fp32" / "brgemm": test those paths
    if (forced != nullptr && (std::strcmp(forced, "fp32") == 0 || std::strcmp(forced, "brgemm") == 0))
      return false;
    return at::native::cpublas::could_pack(at::kBFloat16);
  }();
  return ok;
}

void AmxTileGemm::pack_k(const c10::BFloat16* k, int64_t n, int64_t np, int64_t d,
                         c10::BFloat16* out) {
  // a pair of bf16 along d is one 32-bit word: VNNI of K^T is the transpose of [n, d/2] words
  const int64_t pairs = d / 2;
  const auto* src = reinterpret_cast<const uint32_t*>(k);
  auto* dst = reinterpret_cast<uint32_t*>(out);
  for (int64_t p = 0; p < pairs; ++p) {
    uint32_t* row = dst + p * np;
    for (int64_t j = 0; j < n; ++j) row[j] = src[j * pairs + p];
    for (int64_t j = n; j < np; ++j) row[j] = 0;
  }
}

void AmxTileGemm::pack_v(const c10::BFloat16* v, int64_t n, int64_t np, int64_t d,
                         c10::BFloat16* out) {
  const auto* src = reinterpret_cast<const uint16_t*>(v);
  auto* dst = reinterpret_cast<uint16_t*>(out);
  for (int64_t r = 0; r < np; r += 2) {
    uint16_t* o = dst + r * d;  // rows r and r+1 interleaved: o[2j] = V[r][j], o[2j+1] = V[r+1][j]
    const uint16_t* a = src + r * d;
    const uint16_t* b = src + (r + 1) * d;
    const bool has_a = r < n, has_b = r + 1 < n;
    for (int64_t j = 0; j < d; ++j) {
      o[2 * j] = has_a ? a[j] : 0;
      o[2 * j + 1] = has_b ? b[j] : 0;
    }
  }
}

void AmxTileGemm::qk(int64_t m, int64_t np, int64_t d, const c10::BFloat16* q,
                     const c10::BFloat16* k_packed, float* s, int64_t lds) {
  at::native::cpublas::brgemm(m, np, d, d, np, lds, false, q, k_packed, s, true);
}

void AmxTileGemm::pv_accumulate(int64_t m, int64_t d, int64_t np, const c10::BFloat16* p,
                                const c10::BFloat16* v_packed, float* o) {
  at::native::cpublas::brgemm(m, d, np, np, d, d, true, p, v_packed, o, true);
}

void AmxTileGemm::release() { at::native::cpublas::brgemm_release(true); }

}  // namespace flashback
