// Decode-sized bf16 projections: y = x . [W_0; W_1; ...]^T for a few rows of x.
//
// At one token per sequence a decoder layer's projections are matrix-vector products, bound by
// the weight read. oneDNN's bf16 linear spends a fixed ~50 us per call at one row on two cores
// (docs/PERFORMANCE.md), a third of a SmolLM2 decode step. This op reads the weights as stored
// ([N, K] row-major, no packed copy), several of them in one parallel pass (q/k/v, gate/up),
// with AVX512-BF16 dot products accumulated in fp32 and rounded to bf16 once. CPUs without
// AVX512-BF16 (and the FLASHBACK_CPU_GEMM=fp32 test setting) take at::linear per weight instead.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "tile_dot_bf16.h"  // cpu_has_avx512_bf16, FLASHBACK_AVX512_BF16

#ifdef FLASHBACK_AVX512_BF16_X86
#include <immintrin.h>
#endif

namespace flashback {
namespace {

constexpr int64_t kMaxRows = 4;      // rows of x per pass over the weights (4 x 4 accumulators)
constexpr int64_t kWeightRows = 4;   // weight rows read side by side
constexpr int64_t kBlock = 16;       // weight rows per work item

bool avx512_bf16_available() {
  static const bool ok = [] {
    const char* forced = std::getenv("FLASHBACK_CPU_GEMM");  // "fp32": test the fallback
    if (forced != nullptr && std::strcmp(forced, "fp32") == 0) return false;
    return cpu_has_avx512_bf16();
  }();
  return ok;
}

inline float bf16_to_float(uint16_t h) {
  const uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

#ifdef FLASHBACK_AVX512_BF16_X86
// acc[m][i] += x[m, k:k+32] . w[i, k:k+32] for one 32-wide slice of K (masked: the last slice
// when K % 32 != 0).
template <int M>
FLASHBACK_AVX512_BF16 inline void accumulate_slice(__m512 (&acc)[M][kWeightRows],
                                                   const uint16_t* x, int64_t ldx,
                                                   const uint16_t* w, int64_t k_len, int64_t k,
                                                   __mmask32 mask) {
  __m512i wv[kWeightRows];
  for (int i = 0; i < kWeightRows; ++i) wv[i] = _mm512_maskz_loadu_epi16(mask, w + i * k_len + k);
  for (int m = 0; m < M; ++m) {
    const __m512i xv = _mm512_maskz_loadu_epi16(mask, x + m * ldx + k);
    for (int i = 0; i < kWeightRows; ++i)
      acc[m][i] = _mm512_dpbf16_ps(acc[m][i], (__m512bh)xv, (__m512bh)wv[i]);
  }
}

// out[m * ldo + r] = dot(x[m], w[r]) for r < rows, m < M; K elements each, fp32 results.
template <int M>
FLASHBACK_AVX512_BF16 void dot_rows(
    const uint16_t* x, int64_t ldx, const uint16_t* w, int64_t k_len, int64_t rows, float* out,
    int64_t ldo) {
  const int64_t full = k_len / 32 * 32;
  const __mmask32 tail = static_cast<__mmask32>((1ull << (k_len - full)) - 1);
  int64_t r = 0;
  for (; r + kWeightRows <= rows; r += kWeightRows) {
    __m512 acc[M][kWeightRows];
    for (int m = 0; m < M; ++m)
      for (int i = 0; i < kWeightRows; ++i) acc[m][i] = _mm512_setzero_ps();
    const uint16_t* wr = w + r * k_len;
    for (int64_t k = 0; k < full; k += 32)
      accumulate_slice<M>(acc, x, ldx, wr, k_len, k, static_cast<__mmask32>(~0u));
    if (full < k_len) accumulate_slice<M>(acc, x, ldx, wr, k_len, full, tail);
    for (int m = 0; m < M; ++m)
      for (int i = 0; i < kWeightRows; ++i) out[m * ldo + r + i] = _mm512_reduce_add_ps(acc[m][i]);
  }
  for (; r < rows; ++r)  // fewer than kWeightRows left
    for (int m = 0; m < M; ++m) {
      float s = 0.f;
      for (int64_t k = 0; k < k_len; ++k)
        s += bf16_to_float(x[m * ldx + k]) * bf16_to_float(w[r * k_len + k]);
      out[m * ldo + r] = s;
    }
}

void dot_rows_any(int64_t m, const uint16_t* x, int64_t ldx, const uint16_t* w, int64_t k_len,
                  int64_t rows, float* out, int64_t ldo) {
  switch (m) {
    case 1: return dot_rows<1>(x, ldx, w, k_len, rows, out, ldo);
    case 2: return dot_rows<2>(x, ldx, w, k_len, rows, out, ldo);
    case 3: return dot_rows<3>(x, ldx, w, k_len, rows, out, ldo);
    default: return dot_rows<4>(x, ldx, w, k_len, rows, out, ldo);
  }
}
#endif

void check_args(const at::Tensor& x, const std::vector<at::Tensor>& weights) {
  TORCH_CHECK(x.device().is_cpu(), "decode_linear: x must be a CPU tensor, got ", x.device());
  TORCH_CHECK(x.dim() == 2, "decode_linear: x must be [M, K], got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kBFloat16, "decode_linear: x must be bfloat16, got ",
              x.scalar_type());
  TORCH_CHECK(!weights.empty(), "decode_linear: weights must not be empty");
  for (size_t i = 0; i < weights.size(); ++i) {
    const at::Tensor& w = weights[i];
    TORCH_CHECK(w.device().is_cpu() && w.scalar_type() == at::kBFloat16,
                "decode_linear: weights[", i, "] must be a bfloat16 CPU tensor, got ",
                w.scalar_type(), " on ", w.device());
    TORCH_CHECK(w.dim() == 2 && w.size(1) == x.size(1), "decode_linear: weights[", i,
                "] must be [N, K=", x.size(1), "], got ", w.sizes());
  }
}

}  // namespace

at::Tensor decode_linear_cpu(const at::Tensor& x, at::TensorList weight_list) {
  std::vector<at::Tensor> weights(weight_list.begin(), weight_list.end());
  check_args(x, weights);
  const int64_t m_rows = x.size(0), k_len = x.size(1);
  int64_t n_total = 0;
  std::vector<int64_t> starts;  // first output column of each weight
  for (const auto& w : weights) {
    starts.push_back(n_total);
    n_total += w.size(0);
  }
  if (!avx512_bf16_available() || m_rows == 0 || k_len == 0) {
    std::vector<at::Tensor> parts;
    for (const auto& w : weights) parts.push_back(at::linear(x, w));
    return at::cat(parts, 1);
  }
#ifdef FLASHBACK_AVX512_BF16_X86
  const at::Tensor xc = x.contiguous();
  for (auto& w : weights) w = w.contiguous();
  at::Tensor out = at::empty({m_rows, n_total}, x.options());
  const auto* xp = reinterpret_cast<const uint16_t*>(xc.data_ptr());
  c10::BFloat16* outp = out.data_ptr<c10::BFloat16>();
  const int64_t blocks = (n_total + kBlock - 1) / kBlock;
  // contiguous ranges of weight rows per thread: each streams its share of the matrices once
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    float acc[kMaxRows * kBlock];  // one block's fp32 sums, rounded to bf16 once
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t n0 = b * kBlock, n1 = std::min(n_total, n0 + kBlock);
      for (int64_t m0 = 0; m0 < m_rows; m0 += kMaxRows) {
        const int64_t rows = std::min(kMaxRows, m_rows - m0);
        for (int64_t n = n0; n < n1;) {  // the block may span two weights
          size_t wi = 0;
          while (starts[wi] + weights[wi].size(0) <= n) ++wi;
          const int64_t stop = std::min(n1, starts[wi] + weights[wi].size(0));
          const auto* wp = reinterpret_cast<const uint16_t*>(weights[wi].data_ptr()) +
                           (n - starts[wi]) * k_len;
          dot_rows_any(rows, xp + m0 * k_len, k_len, wp, k_len, stop - n, acc + (n - n0), kBlock);
          n = stop;
        }
        for (int64_t m = 0; m < rows; ++m)
          for (int64_t n = n0; n < n1; ++n)
            outp[(m0 + m) * n_total + n] = c10::BFloat16(acc[m * kBlock + (n - n0)]);
      }
    }
  });
  return out;
#else
  TORCH_CHECK(false, "decode_linear: unreachable without x86-64");
#endif
}

}  // namespace flashback
