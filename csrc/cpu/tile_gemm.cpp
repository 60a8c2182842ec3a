#include "tile_gemm.h"

#include <ATen/native/CPUBlas.h>
#include <dlfcn.h>

#include <cstdlib>
#include <cstring>

namespace flashback {

namespace {

// BLAS integers are 32-bit (LP64) or 64-bit (ILP64). Passing the address of an int64 holding a
// small non-negative value is read correctly by both on little-endian machines.
struct BlasInt {
  int64_t value;
  explicit BlasInt(int64_t v) : value(v) {}
  const int* ptr() const { return reinterpret_cast<const int*>(&value); }
};

// Looks up sgemm_ and proves on a 2x3x2 product that it computes what we expect.
void* resolve_checked_sgemm() {
  const char* forced = std::getenv("FLASHBACK_CPU_GEMM");  // "brgemm": test the fallback
  if (forced != nullptr && std::strcmp(forced, "brgemm") == 0) return nullptr;
  void* sym = dlsym(RTLD_DEFAULT, "sgemm_");
  if (sym == nullptr) return nullptr;
  using Fn = void (*)(const char*, const char*, const int*, const int*, const int*, const float*,
                      const float*, const int*, const float*, const int*, const float*, float*,
                      const int*);
  const float a[6] = {1, 2, 3, 4, 5, 6};  // col-major 2x3
  const float b[6] = {1, 0, 2, 1, 0, 3};  // col-major 3x2
  float c[4] = {-1, -1, -1, -1};
  const float one = 1.f, zero = 0.f;
  const BlasInt m(2), n(2), k(3), lda(2), ldb(3), ldc(2);
  reinterpret_cast<Fn>(sym)("N", "N", m.ptr(), n.ptr(), k.ptr(), &one, a, lda.ptr(), b, ldb.ptr(),
                            &zero, c, ldc.ptr());
  // C = A.B: col0 = A0 + 2 A2 = (11, 14); col1 = A0 + 3 A2 = (16, 20)
  const bool ok = c[0] == 11.f && c[1] == 14.f && c[2] == 16.f && c[3] == 20.f;
  return ok ? sym : nullptr;
}

}  // namespace

TileGemm::TileGemm() : sgemm_(nullptr) {
  static void* const resolved = resolve_checked_sgemm();
  sgemm_ = reinterpret_cast<SgemmFn>(resolved);
}

void TileGemm::qk(int64_t m, int64_t n, int64_t k, const float* q, int64_t ldq,
                  const float* kmat, int64_t ldk, float* s, int64_t lds, float* scratch) const {
  if (sgemm_ != nullptr) {
    // column-major view: S^T[n, m] = K[n, k] . Q^T[k, m]  (K stored row-major = K^T col-major)
    const BlasInt mi(m), ni(n), ki(k), lq(ldq), lk(ldk), ls(lds);
    const float one = 1.f, zero = 0.f;
    sgemm_("T", "N", ni.ptr(), mi.ptr(), ki.ptr(), &one, kmat, lk.ptr(), q, lq.ptr(), &zero, s,
           ls.ptr());
    return;
  }
  for (int64_t r = 0; r < n; ++r)  // K^T into scratch [k, n]
    for (int64_t i = 0; i < k; ++i) scratch[i * n + r] = kmat[r * ldk + i];
  at::native::cpublas::brgemm(m, n, k, ldq, n, lds, false, q, scratch, s, false);
}

void TileGemm::pv_accumulate(int64_t m, int64_t n, int64_t k, const float* p, int64_t ldp,
                             const float* v, int64_t ldv, float* o, int64_t ldo) const {
  if (sgemm_ != nullptr) {
    // column-major view: O^T[n, m] += V^T[n, k] . P^T[k, m]
    const BlasInt mi(m), ni(n), ki(k), lp(ldp), lv(ldv), lo(ldo);
    const float one = 1.f;
    sgemm_("N", "N", ni.ptr(), mi.ptr(), ki.ptr(), &one, v, lv.ptr(), p, lp.ptr(), &one, o,
           lo.ptr());
    return;
  }
  at::native::cpublas::brgemm(m, n, k, ldp, ldv, ldo, true, p, v, o, false);
}

void TileGemm::release() { at::native::cpublas::brgemm_release(); }

}  // namespace flashback
