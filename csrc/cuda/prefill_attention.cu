// CUDA attention of an appended block (Sq > 1) over the ring KV cache, on tensor cores.
//
// Grid = (packed row tiles, kv heads, batch). The query rows of the Hq/Hkv heads sharing a kv
// head are packed (row r -> head g = r / Sq, position s = r % Sq), so a K/V tile is loaded once
// per kv head. A block of 4 warps owns 64 packed rows; each warp owns 16 of them end to end
// (scores, softmax, output), so warps only meet at the K/V tile loads. S = Q K^T and O += P V run
// on tensor cores through WMMA (mma.sync m16n16k16, fp32 accumulation); the online-softmax state
// (running max, sum) and the fp32 output tile live in shared memory because WMMA's fragment
// layout is opaque. The bottom-right causal limit of each row bounds how many keys the tile reads.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <mma.h>

#include "../checks.h"
#include "common.cuh"
#include "cuda_ops.h"

namespace flashback {
namespace cuda {
namespace {

namespace wmma = nvcuda::wmma;

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kRows = 16 * kWarps;  // packed query rows per block
constexpr int kKeys = 64;           // keys per tile

struct PrefillParams {
  const void* q;
  int64_t q_stride_b, q_stride_h, q_stride_s;
  const void* k_cache;
  const void* v_cache;
  const int32_t* kv_lens;
  const int32_t* ring_offset;
  const int32_t* q_lens;  // may be null: every sequence has Sq rows
  void* out;              // [B, Sq, Hq, D]
  float* lse;             // [B, Hq, Sq]
  int64_t hq, hkv, group, sq, capacity, sink;
  float scale_log2;
};

// Shared-memory tiles; leading dimensions are padded (multiples of 8 halves / 4 floats, as WMMA
// requires) to spread rows over banks.
template <typename T, int D>
struct Smem {
  static constexpr int kLdT = D + 8;         // Q, K, V rows (T)
  static constexpr int kLdS = kKeys + 4;     // scores (float)
  static constexpr int kLdP = kKeys + 8;     // probabilities (T)
  static constexpr int kLdO = D + 4;         // output accumulator (float)
  static constexpr size_t kQ = 0;
  static constexpr size_t kK = kQ + sizeof(T) * kRows * kLdT;
  static constexpr size_t kV = kK + sizeof(T) * kKeys * kLdT;
  static constexpr size_t kS = kV + sizeof(T) * kKeys * kLdT;
  static constexpr size_t kP = kS + sizeof(float) * kRows * kLdS;
  static constexpr size_t kO = kP + sizeof(T) * kRows * kLdP;
  static constexpr size_t kM = kO + sizeof(float) * kRows * kLdO;
  static constexpr size_t kL = kM + sizeof(float) * kRows;
  static constexpr size_t kAlpha = kL + sizeof(float) * kRows;
  static constexpr size_t kLimit = kAlpha + sizeof(float) * kRows;
  static constexpr size_t kBytes = kLimit + sizeof(int64_t) * kRows + 16;
  static_assert(kK % 32 == 0 && kV % 32 == 0 && kS % 32 == 0 && kP % 32 == 0 && kO % 32 == 0,
                "WMMA tiles need 256-bit aligned shared memory");
};

template <typename T, int D>
__global__ void __launch_bounds__(kThreads) prefill_kernel(PrefillParams p) {
  using S = Smem<T, D>;
  extern __shared__ __align__(128) unsigned char smem[];
  T* qs = reinterpret_cast<T*>(smem + S::kQ);
  T* ks = reinterpret_cast<T*>(smem + S::kK);
  T* vs = reinterpret_cast<T*>(smem + S::kV);
  float* ss = reinterpret_cast<float*>(smem + S::kS);
  T* ps = reinterpret_cast<T*>(smem + S::kP);
  float* os = reinterpret_cast<float*>(smem + S::kO);
  float* row_m = reinterpret_cast<float*>(smem + S::kM);
  float* row_l = reinterpret_cast<float*>(smem + S::kL);
  float* row_alpha = reinterpret_cast<float*>(smem + S::kAlpha);
  int64_t* row_limit = reinterpret_cast<int64_t*>(smem + S::kLimit);
  __shared__ int64_t block_end;

  constexpr int kChunks = D / 8;  // 16-byte chunks per row
  const int64_t b = blockIdx.z, hk = blockIdx.y;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kRows;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  int64_t len = p.kv_lens[b];
  len = len < 0 ? 0 : (len > p.capacity ? p.capacity : len);
  int64_t qlen = p.q_lens != nullptr ? p.q_lens[b] : p.sq;
  qlen = qlen < 0 ? 0 : (qlen > p.sq ? p.sq : qlen);  // a row whose limit is < 0 sees no key

  if (threadIdx.x == 0) block_end = 0;
  __syncthreads();
  // Load the packed Q tile and each row's causal limit (-1: padding or past q_lens).
  for (int idx = threadIdx.x; idx < kRows * kChunks; idx += kThreads) {
    const int r = idx / kChunks, c = idx % kChunks;
    const int64_t row = row0 + r, g = row / p.sq, s = row % p.sq;
    const bool valid = g < p.group && s < qlen;
    uint4 val = make_uint4(0, 0, 0, 0);
    if (valid) {
      const T* src = static_cast<const T*>(p.q) + b * p.q_stride_b +
                     (hk * p.group + g) * p.q_stride_h + s * p.q_stride_s + c * 8;
      val = *reinterpret_cast<const uint4*>(src);
    }
    *reinterpret_cast<uint4*>(qs + r * S::kLdT + c * 8) = val;
    if (c == 0) {
      const int64_t limit = valid ? len - qlen + s : -1;
      row_limit[r] = limit;
      row_m[r] = -INFINITY;
      row_l[r] = 0.f;
      atomicMax(reinterpret_cast<unsigned long long*>(&block_end),
                static_cast<unsigned long long>(limit + 1 > 0 ? limit + 1 : 0));
    }
  }
  for (int idx = threadIdx.x; idx < kRows * S::kLdO; idx += kThreads) os[idx] = 0.f;
  __syncthreads();

  const int64_t ring = p.capacity - p.sink;
  const int64_t offset = ((static_cast<int64_t>(p.ring_offset[b]) % ring) + ring) % ring;
  const T* kbase = static_cast<const T*>(p.k_cache) + (b * p.hkv + hk) * p.capacity * D;
  const T* vbase = static_cast<const T*>(p.v_cache) + (b * p.hkv + hk) * p.capacity * D;
  const int64_t kv_end = block_end;  // keys past the largest causal limit are never read
  const int mrow = warp * 16;

  for (int64_t t0 = 0; t0 < kv_end; t0 += kKeys) {
    __syncthreads();  // every warp is done with the previous K/V tile
    for (int idx = threadIdx.x; idx < kKeys * kChunks; idx += kThreads) {
      const int n = idx / kChunks, c = idx % kChunks;
      const int64_t j = t0 + n;
      uint4 kv = make_uint4(0, 0, 0, 0), vv = kv;  // zero rows keep 0 * garbage out of O
      if (j < kv_end) {
        const int64_t off = slot_of(j, p.sink, ring, offset) * D + c * 8;
        kv = __ldg(reinterpret_cast<const uint4*>(kbase + off));
        vv = __ldg(reinterpret_cast<const uint4*>(vbase + off));
      }
      *reinterpret_cast<uint4*>(ks + n * S::kLdT + c * 8) = kv;
      *reinterpret_cast<uint4*>(vs + n * S::kLdT + c * 8) = vv;
    }
    __syncthreads();

    // S = Q K^T for this warp's 16 rows.
#pragma unroll
    for (int nt = 0; nt < kKeys / 16; ++nt) {
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
      wmma::fill_fragment(acc, 0.f);
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> bk;
        wmma::load_matrix_sync(a, qs + mrow * S::kLdT + kk * 16, S::kLdT);
        wmma::load_matrix_sync(bk, ks + nt * 16 * S::kLdT + kk * 16, S::kLdT);
        wmma::mma_sync(acc, a, bk, acc);
      }
      wmma::store_matrix_sync(ss + mrow * S::kLdS + nt * 16, acc, S::kLdS, wmma::mem_row_major);
    }
    __syncwarp();

    // Online softmax, one row at a time across the warp (two keys per lane).
    for (int r = mrow; r < mrow + 16; ++r) {
      const int64_t limit = row_limit[r];
      float sv[2];
      float mx = -INFINITY;
#pragma unroll
      for (int u = 0; u < 2; ++u) {
        const int n = lane + 32 * u;
        sv[u] = (t0 + n <= limit) ? ss[r * S::kLdS + n] * p.scale_log2 : -INFINITY;
        mx = fmaxf(mx, sv[u]);
      }
#pragma unroll
      for (int w = 16; w > 0; w /= 2) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, w));
      const float m_old = row_m[r];
      const float m_new = fmaxf(m_old, mx);
      float sum = 0.f;
#pragma unroll
      for (int u = 0; u < 2; ++u) {
        const float pr = (sv[u] == -INFINITY) ? 0.f : exp2f(sv[u] - m_new);
        sum += pr;
        ps[r * S::kLdP + lane + 32 * u] = Convert<T>::from_float(pr);
      }
#pragma unroll
      for (int w = 16; w > 0; w /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, w);
      const float alpha = (m_new == -INFINITY) ? 1.f : exp2f(m_old - m_new);
      __syncwarp();
      if (lane == 0) {
        row_l[r] = row_l[r] * alpha + sum;
        row_m[r] = m_new;
        row_alpha[r] = alpha;
      }
    }
    __syncwarp();
    for (int idx = lane; idx < 16 * D; idx += 32) {
      const int r = mrow + idx / D, e = idx % D;
      os[r * S::kLdO + e] *= row_alpha[r];
    }
    __syncwarp();

    // O += P V for this warp's rows.
#pragma unroll
    for (int dt = 0; dt < D / 16; ++dt) {
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
      wmma::load_matrix_sync(acc, os + mrow * S::kLdO + dt * 16, S::kLdO, wmma::mem_row_major);
#pragma unroll
      for (int kk = 0; kk < kKeys / 16; ++kk) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> bv;
        wmma::load_matrix_sync(a, ps + mrow * S::kLdP + kk * 16, S::kLdP);
        wmma::load_matrix_sync(bv, vs + kk * 16 * S::kLdT + dt * 16, S::kLdT);
        wmma::mma_sync(acc, a, bv, acc);
      }
      wmma::store_matrix_sync(os + mrow * S::kLdO + dt * 16, acc, S::kLdO, wmma::mem_row_major);
    }
    __syncwarp();
  }

  // Write this warp's rows: normalised output (zeros past q_lens) and the natural-log LSE.
  for (int idx = lane; idx < 16 * kChunks; idx += 32) {
    const int r = mrow + idx / kChunks, c = idx % kChunks;
    const int64_t row = row0 + r, g = row / p.sq, s = row % p.sq;
    if (g >= p.group) continue;  // padding rows of the last tile
    const int64_t h = hk * p.group + g;
    const bool valid = row_limit[r] >= 0;
    const float l = row_l[r];
    const float inv = (valid && l > 0.f) ? 1.f / l : 0.f;
    float vals[8];
#pragma unroll
    for (int e = 0; e < 8; ++e) vals[e] = os[r * S::kLdO + c * 8 + e] * inv;
    T* dst = static_cast<T*>(p.out) + ((b * p.sq + s) * p.hq + h) * D + c * 8;
    *reinterpret_cast<uint4*>(dst) = pack8<T>(vals);
    if (c == 0) {
      p.lse[(b * p.hq + h) * p.sq + s] =
          (valid && l > 0.f) ? (row_m[r] + log2f(l)) * kLn2 : -INFINITY;
    }
  }
}

template <typename T, int D>
void launch_prefill(const PrefillParams& p, int64_t batch, cudaStream_t stream) {
  using S = Smem<T, D>;
  auto kernel = prefill_kernel<T, D>;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(S::kBytes)));
  const int64_t tiles = (p.group * p.sq + kRows - 1) / kRows;
  const dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>(p.hkv),
                  static_cast<unsigned>(batch));
  kernel<<<grid, kThreads, S::kBytes, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

void prefill_attention_cuda(const at::Tensor& q_in, const at::Tensor& k_cache,
                            const at::Tensor& v_cache, const at::Tensor& kv_lens,
                            const at::Tensor& ring_offset, const std::optional<at::Tensor>& q_lens,
                            int64_t sink, double scale, at::Tensor& out, at::Tensor& lse) {
  const int64_t batch = q_in.size(0), hq = q_in.size(1), sq = q_in.size(2), d = q_in.size(3);
  const bool aligned = q_in.stride(0) % 8 == 0 && q_in.stride(1) % 8 == 0 &&
                       q_in.stride(2) % 8 == 0 &&
                       reinterpret_cast<uintptr_t>(q_in.data_ptr()) % 16 == 0;
  const at::Tensor q = aligned ? q_in : q_in.clone(at::MemoryFormat::Contiguous);
  PrefillParams p{};
  p.q = q.data_ptr();
  p.q_stride_b = q.stride(0);
  p.q_stride_h = q.stride(1);
  p.q_stride_s = q.stride(2);
  p.k_cache = k_cache.data_ptr();
  p.v_cache = v_cache.data_ptr();
  p.kv_lens = kv_lens.data_ptr<int32_t>();
  p.ring_offset = ring_offset.data_ptr<int32_t>();
  p.q_lens = q_lens.has_value() ? q_lens->data_ptr<int32_t>() : nullptr;
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  p.hq = hq;
  p.hkv = k_cache.size(1);
  p.group = hq / p.hkv;
  p.sq = sq;
  p.capacity = k_cache.size(2);
  p.sink = sink;
  p.scale_log2 = static_cast<float>(scale) * kLog2e;
  auto stream = c10::cuda::getCurrentCUDAStream();
  const bool half = q.scalar_type() == at::kHalf;
  if (d == 64) {
    half ? launch_prefill<__half, 64>(p, batch, stream)
         : launch_prefill<__nv_bfloat16, 64>(p, batch, stream);
  } else {
    half ? launch_prefill<__half, 128>(p, batch, stream)
         : launch_prefill<__nv_bfloat16, 128>(p, batch, stream);
  }
}

}  // namespace cuda
}  // namespace flashback
