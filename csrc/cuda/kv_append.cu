// CUDA kv_append: scatter a block of new keys/values into the ring KV cache, 16 bytes per thread.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "../checks.h"
#include "common.cuh"
#include "cuda_ops.h"

namespace flashback {
namespace cuda {
namespace {

struct BlockStrides {
  int64_t b, h, i;  // element strides of k_new/v_new; the head dim is contiguous
};

// One thread moves one 16-byte chunk (8 elements) of one token's K row and V row.
template <typename T>
__global__ void kv_append_kernel(const T* __restrict__ k_new, const T* __restrict__ v_new,
                                 BlockStrides ks, BlockStrides vs, T* __restrict__ k_cache,
                                 T* __restrict__ v_cache, const int32_t* __restrict__ write_pos,
                                 const int32_t* __restrict__ ring_offset, int64_t heads,
                                 int64_t n, int64_t d, int64_t capacity, int64_t sink,
                                 int64_t total_chunks) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= total_chunks) return;
  const int64_t chunks = d / 8;
  const int64_t c = idx % chunks, t = idx / chunks;
  const int64_t i = t % n, h = (t / n) % heads, b = t / n / heads;
  const int64_t j = static_cast<int64_t>(write_pos[b]) + i;
  if (j < 0 || j >= capacity) return;  // never write outside the buffer or onto live tokens
  const int64_t ring = capacity - sink;
  const int64_t offset = ((static_cast<int64_t>(ring_offset[b]) % ring) + ring) % ring;
  const int64_t dst = ((b * heads + h) * capacity + slot_of(j, sink, ring, offset)) * d + c * 8;
  const uint4 kv = *reinterpret_cast<const uint4*>(k_new + b * ks.b + h * ks.h + i * ks.i + c * 8);
  const uint4 vv = *reinterpret_cast<const uint4*>(v_new + b * vs.b + h * vs.h + i * vs.i + c * 8);
  *reinterpret_cast<uint4*>(k_cache + dst) = kv;
  *reinterpret_cast<uint4*>(v_cache + dst) = vv;
}

// 16-byte loads need an aligned base and strides that are multiples of 8 elements.
at::Tensor vector_friendly(const at::Tensor& t) {
  const bool ok = t.stride(3) == 1 && t.stride(0) % 8 == 0 && t.stride(1) % 8 == 0 &&
                  t.stride(2) % 8 == 0 && reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
  return ok ? t : t.clone(at::MemoryFormat::Contiguous);  // fresh, aligned storage
}

}  // namespace

void kv_append_cuda(const at::Tensor& k_new, const at::Tensor& v_new, at::Tensor& k_cache,
                    at::Tensor& v_cache, const at::Tensor& write_pos,
                    const at::Tensor& ring_offset, int64_t sink) {
  check_kv_append_args(k_new, v_new, k_cache, v_cache, write_pos, ring_offset, sink);
  TORCH_CHECK(k_cache.is_cuda(), "kv_append_cuda called with ", k_cache.device());
  TORCH_CHECK(k_cache.scalar_type() == at::kHalf || k_cache.scalar_type() == at::kBFloat16,
              "CUDA kv_append supports float16 and bfloat16, got ", k_cache.scalar_type());
  const int64_t d = k_cache.size(3);
  TORCH_CHECK(d % 8 == 0, "CUDA kv_append needs a head dim divisible by 8, got ", d);
  const int64_t batch = k_new.size(0), heads = k_new.size(1), n = k_new.size(2);
  // d == 0 passes the d % 8 check but would launch zero blocks (invalid configuration).
  if (batch * heads * n * d == 0) return;
  const at::cuda::CUDAGuard guard(k_cache.device());
  const at::Tensor kn = vector_friendly(k_new), vn = vector_friendly(v_new);
  const int64_t total = batch * heads * n * (d / 8);
  constexpr int kThreads = 256;
  const int64_t blocks = (total + kThreads - 1) / kThreads;
  auto stream = c10::cuda::getCurrentCUDAStream();
  const BlockStrides ks{kn.stride(0), kn.stride(1), kn.stride(2)};
  const BlockStrides vs{vn.stride(0), vn.stride(1), vn.stride(2)};
  auto launch = [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    kv_append_kernel<T><<<blocks, kThreads, 0, stream>>>(
        reinterpret_cast<const T*>(kn.data_ptr()), reinterpret_cast<const T*>(vn.data_ptr()), ks,
        vs, reinterpret_cast<T*>(k_cache.data_ptr()), reinterpret_cast<T*>(v_cache.data_ptr()),
        write_pos.data_ptr<int32_t>(), ring_offset.data_ptr<int32_t>(), heads, n, d,
        k_cache.size(2), sink, total);
  };
  if (k_cache.scalar_type() == at::kHalf) {
    launch(static_cast<__half*>(nullptr));
  } else {
    launch(static_cast<__nv_bfloat16*>(nullptr));
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace cuda
}  // namespace flashback
