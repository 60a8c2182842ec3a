// The two fp32 tile GEMMs of CPU attention, row-major:
//   S[m, n]  = Q[m, k] . K[n, k]^T      (scores; K rows read in place from the cache)
//   O[m, n] += P[m, k] . V[k, n]        (output update; V rows read in place)
// The BLAS `sgemm_` that torch's x86 wheels export (MKL) handles the transposed K directly and is
// fastest on small tiles; where the loaded torch exports none, ATen's brgemm is used, which needs
// K^T materialised in a scratch tile.
#pragma once

#include <cstdint>

namespace flashback {

class TileGemm {
 public:
  TileGemm();  // resolves sgemm_ once
  bool uses_blas() const { return sgemm_ != nullptr; }
  // scratch must hold k * n floats (only used without BLAS).
  void qk(int64_t m, int64_t n, int64_t k, const float* q, int64_t ldq, const float* kmat,
          int64_t ldk, float* s, int64_t lds, float* scratch) const;
  void pv_accumulate(int64_t m, int64_t n, int64_t k, const float* p, int64_t ldp,
                     const float* v, int64_t ldv, float* o, int64_t ldo) const;
  static void release();  // per-thread brgemm state

 private:
  using SgemmFn = void (*)(const char*, const char*, const int*, const int*, const int*,
                           const float*, const float*, const int*, const float*, const int*,
                           const float*, float*, const int*);
  SgemmFn sgemm_;
};

}  // namespace flashback
