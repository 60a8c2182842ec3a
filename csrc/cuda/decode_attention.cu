// CUDA decode attention (one query row per head): split-KV over the LIVE length.
//
// Grid = (splits, kv heads x head chunks, batch). A block owns one kv head and up to kMaxHeads of
// the query heads that read it (GQA packing), so each K/V row is fetched from memory once per
// kv head and reused for all of its query heads. Each group of D/8 lanes walks keys with 16-byte
// loads and keeps an online softmax per head in registers; the groups are merged in shared
// memory and each split writes an unnormalised partial. A second kernel merges the splits.
//
// The split length depends only on the live length kv_lens[b] and the launch width (batch, kv
// heads, SM count), never on the cache capacity, so results do not change with the buffer size.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "../checks.h"
#include "common.cuh"
#include "cuda_ops.h"

namespace flashback {
namespace cuda {
namespace {

constexpr int kThreads = 128;
constexpr int kMaxHeads = 8;       // query heads packed per block
constexpr int kMinSplitLen = 256;  // keys; a split never gets fewer (except the last)

struct DecodeParams {
  const void* q;
  int64_t q_stride_b, q_stride_h;
  const void* k_cache;
  const void* v_cache;
  const int32_t* kv_lens;
  const int32_t* ring_offset;
  const int32_t* q_lens;  // may be null: every sequence has one query row
  float* part_o;          // [B, Hq, max_splits, D]
  float* part_ml;         // [B, Hq, max_splits, 2]: max (log2 units), sum
  void* out;              // [B, 1, Hq, D]
  float* lse;             // [B, Hq, 1]
  int64_t hq, hkv, group, capacity, sink;
  int max_splits;
  float scale_log2;
};

__device__ __forceinline__ int64_t live_length(const DecodeParams& p, int64_t b) {
  const int64_t len = p.kv_lens[b];
  return len < 0 ? 0 : (len > p.capacity ? p.capacity : len);
}

__device__ __forceinline__ int64_t split_length(int64_t len, int max_splits) {
  int64_t per = (len + max_splits - 1) / max_splits;
  per = (per + 63) / 64 * 64;
  return per < kMinSplitLen ? kMinSplitLen : per;
}

template <typename T, int D>
__global__ void __launch_bounds__(kThreads) decode_split_kernel(DecodeParams p) {
  constexpr int kLanes = D / 8;              // lanes sharing one key row
  constexpr int kGroups = kThreads / kLanes;  // keys in flight per block
  const int split = blockIdx.x;
  const int64_t b = blockIdx.z;
  const int64_t chunks = (p.group + kMaxHeads - 1) / kMaxHeads;
  const int64_t hk = blockIdx.y / chunks;
  const int64_t h0 = hk * p.group + (blockIdx.y % chunks) * kMaxHeads;
  const int64_t left = hk * p.group + p.group - h0;
  const int heads = static_cast<int>(left < kMaxHeads ? left : kMaxHeads);
  const int64_t len = live_length(p, b);
  if (p.q_lens != nullptr && p.q_lens[b] <= 0) return;
  const int64_t per = split_length(len, p.max_splits);
  const int64_t k_begin = split * per;
  if (k_begin >= len) return;
  const int64_t k_end = min(len, k_begin + per);

  const int lane = threadIdx.x % kLanes, grp = threadIdx.x / kLanes;
  float q[kMaxHeads][8], o[kMaxHeads][8], m[kMaxHeads], l[kMaxHeads];
#pragma unroll
  for (int g = 0; g < kMaxHeads; ++g) {
    m[g] = -INFINITY;
    l[g] = 0.f;
#pragma unroll
    for (int e = 0; e < 8; ++e) o[g][e] = 0.f, q[g][e] = 0.f;
    if (g < heads) {
      const T* src = static_cast<const T*>(p.q) + b * p.q_stride_b + (h0 + g) * p.q_stride_h;
      unpack8<T>(*reinterpret_cast<const uint4*>(src + lane * 8), q[g]);
#pragma unroll
      for (int e = 0; e < 8; ++e) q[g][e] *= p.scale_log2;
    }
  }
  const int64_t ring = p.capacity - p.sink;
  const int64_t offset = ((static_cast<int64_t>(p.ring_offset[b]) % ring) + ring) % ring;
  const T* kbase = static_cast<const T*>(p.k_cache) + (b * p.hkv + hk) * p.capacity * D;
  const T* vbase = static_cast<const T*>(p.v_cache) + (b * p.hkv + hk) * p.capacity * D;
  // Every lane runs the same number of iterations (the shuffles need the whole warp); a lane
  // group past the end of the split computes on zeros and skips the update.
  const int64_t iters = (k_end - k_begin + kGroups - 1) / kGroups;
  for (int64_t it = 0; it < iters; ++it) {
    const int64_t j = k_begin + it * kGroups + grp;
    const bool valid = j < k_end;
    float kf[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    float vf[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    if (valid) {
      const int64_t row = slot_of(j, p.sink, ring, offset) * D + lane * 8;
      unpack8<T>(__ldg(reinterpret_cast<const uint4*>(kbase + row)), kf);
      unpack8<T>(__ldg(reinterpret_cast<const uint4*>(vbase + row)), vf);
    }
#pragma unroll
    for (int g = 0; g < kMaxHeads; ++g) {
      if (g >= heads) break;  // uniform across the block
      float s = 0.f;
#pragma unroll
      for (int e = 0; e < 8; ++e) s = fmaf(q[g][e], kf[e], s);
#pragma unroll
      for (int w = kLanes / 2; w > 0; w /= 2) s += __shfl_xor_sync(0xffffffffu, s, w);
      if (!valid) continue;
      const float m_new = fmaxf(m[g], s);
      const float alpha = exp2f(m[g] - m_new), pr = exp2f(s - m_new);
      l[g] = l[g] * alpha + pr;
      m[g] = m_new;
#pragma unroll
      for (int e = 0; e < 8; ++e) o[g][e] = fmaf(o[g][e], alpha, pr * vf[e]);
    }
  }

  // Merge the key groups of this block.
  __shared__ float sm_m[kGroups][kMaxHeads], sm_l[kGroups][kMaxHeads];
  __shared__ float sm_o[kGroups][kMaxHeads][D];
#pragma unroll
  for (int g = 0; g < kMaxHeads; ++g) {
    if (lane == 0) sm_m[grp][g] = m[g], sm_l[grp][g] = l[g];
#pragma unroll
    for (int e = 0; e < 8; ++e) sm_o[grp][g][lane * 8 + e] = o[g][e];
  }
  __syncthreads();
  for (int idx = threadIdx.x; idx < heads * D; idx += kThreads) {
    const int g = idx / D, e = idx % D;
    float mx = -INFINITY;
    for (int r = 0; r < kGroups; ++r) mx = fmaxf(mx, sm_m[r][g]);
    float acc = 0.f, sum = 0.f;
    for (int r = 0; r < kGroups; ++r) {
      if (sm_m[r][g] == -INFINITY) continue;
      const float w = exp2f(sm_m[r][g] - mx);
      acc += w * sm_o[r][g][e];
      sum += w * sm_l[r][g];
    }
    const int64_t slot = ((b * p.hq + h0 + g) * p.max_splits + split);
    p.part_o[slot * D + e] = acc;
    if (e == 0) p.part_ml[slot * 2] = mx, p.part_ml[slot * 2 + 1] = sum;
  }
}

// Merges the live splits of each (b, head) and writes out and lse (zero / -inf when q_len is 0).
template <typename T, int D>
__global__ void decode_merge_kernel(DecodeParams p) {
  const int64_t h = blockIdx.x, b = blockIdx.y;
  const int e = threadIdx.x;  // blockDim.x == D
  T* out = static_cast<T*>(p.out) + (b * p.hq + h) * D;
  const int64_t len = live_length(p, b);
  const bool empty = len == 0 || (p.q_lens != nullptr && p.q_lens[b] <= 0);
  if (empty) {
    out[e] = Convert<T>::from_float(0.f);
    if (e == 0) p.lse[b * p.hq + h] = -INFINITY;
    return;
  }
  const int64_t per = split_length(len, p.max_splits);
  const int splits = static_cast<int>((len + per - 1) / per);
  const int64_t base = (b * p.hq + h) * p.max_splits;
  float mx = -INFINITY;
  for (int s = 0; s < splits; ++s) mx = fmaxf(mx, p.part_ml[(base + s) * 2]);
  float acc = 0.f, sum = 0.f;
  for (int s = 0; s < splits; ++s) {
    const float w = exp2f(p.part_ml[(base + s) * 2] - mx);
    acc += w * p.part_o[(base + s) * D + e];
    sum += w * p.part_ml[(base + s) * 2 + 1];
  }
  out[e] = Convert<T>::from_float(acc / sum);
  if (e == 0) p.lse[b * p.hq + h] = (mx + log2f(sum)) * kLn2;
}

template <typename T, int D>
void launch_decode(DecodeParams& p, int64_t batch, cudaStream_t stream) {
  const int64_t chunks = (p.group + kMaxHeads - 1) / kMaxHeads;
  const dim3 grid(p.max_splits, static_cast<unsigned>(p.hkv * chunks), static_cast<unsigned>(batch));
  decode_split_kernel<T, D><<<grid, kThreads, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  decode_merge_kernel<T, D><<<dim3(p.hq, batch), D, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

void decode_attention_cuda(const at::Tensor& q_in, const at::Tensor& k_cache,
                           const at::Tensor& v_cache, const at::Tensor& kv_lens,
                           const at::Tensor& ring_offset, const std::optional<at::Tensor>& q_lens,
                           int64_t sink, double scale, at::Tensor& out, at::Tensor& lse) {
  const int64_t batch = q_in.size(0), hq = q_in.size(1), d = q_in.size(3);
  const int64_t hkv = k_cache.size(1), group = hq / hkv;
  const bool aligned = q_in.stride(0) % 8 == 0 && q_in.stride(1) % 8 == 0 &&
                       reinterpret_cast<uintptr_t>(q_in.data_ptr()) % 16 == 0;
  const at::Tensor q = aligned ? q_in : q_in.clone(at::MemoryFormat::Contiguous);
  // Enough splits to give every SM a few blocks; the live length decides how many run.
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, q.get_device()));
  const int64_t blocks_per_split = batch * hkv * ((group + kMaxHeads - 1) / kMaxHeads);
  int64_t max_splits = (2 * sms + blocks_per_split - 1) / blocks_per_split;
  max_splits = std::max<int64_t>(1, std::min<int64_t>(max_splits, 256));
  auto fopts = q.options().dtype(at::kFloat);
  at::Tensor part_o = at::empty({batch, hq, max_splits, d}, fopts);
  at::Tensor part_ml = at::empty({batch, hq, max_splits, 2}, fopts);
  DecodeParams p{};
  p.q = q.data_ptr();
  p.q_stride_b = q.stride(0);
  p.q_stride_h = q.stride(1);
  p.k_cache = k_cache.data_ptr();
  p.v_cache = v_cache.data_ptr();
  p.kv_lens = kv_lens.data_ptr<int32_t>();
  p.ring_offset = ring_offset.data_ptr<int32_t>();
  p.q_lens = q_lens.has_value() ? q_lens->data_ptr<int32_t>() : nullptr;
  p.part_o = part_o.data_ptr<float>();
  p.part_ml = part_ml.data_ptr<float>();
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  p.hq = hq;
  p.hkv = hkv;
  p.group = group;
  p.capacity = k_cache.size(2);
  p.sink = sink;
  p.max_splits = static_cast<int>(max_splits);
  p.scale_log2 = static_cast<float>(scale) * kLog2e;
  auto stream = c10::cuda::getCurrentCUDAStream();
  const bool half = q.scalar_type() == at::kHalf;
  if (d == 64) {
    half ? launch_decode<__half, 64>(p, batch, stream) : launch_decode<__nv_bfloat16, 64>(p, batch, stream);
  } else {
    half ? launch_decode<__half, 128>(p, batch, stream)
         : launch_decode<__nv_bfloat16, 128>(p, batch, stream);
  }
}

}  // namespace cuda
}  // namespace flashback
