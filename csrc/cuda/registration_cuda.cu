// CUDA implementations of the flashback ops: argument checks, then decode or block kernel.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <limits>

#include "../checks.h"
#include "cuda_ops.h"

namespace flashback {
namespace cuda {
namespace {

std::tuple<at::Tensor, at::Tensor> append_attention_cuda(
    const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
    const at::Tensor& kv_lens, const at::Tensor& ring_offset, int64_t sink, double scale,
    const std::optional<at::Tensor>& q_lens) {
  check_append_attention_args(q, k_cache, v_cache, kv_lens, ring_offset, sink, q_lens);
  TORCH_CHECK(q.is_cuda(), "append_attention_cuda called with ", q.device());
  TORCH_CHECK(q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16,
              "CUDA append_attention supports float16 and bfloat16, got ", q.scalar_type());
  const int64_t d = q.size(3);
  TORCH_CHECK(d == 64 || d == 128, "CUDA append_attention supports head dims 64 and 128, got ", d);
  const at::cuda::CUDAGuard guard(q.device());
  const int64_t batch = q.size(0), hq = q.size(1), sq = q.size(2);
  TORCH_CHECK(batch <= 65535, "CUDA append_attention supports at most 65535 sequences, got ", batch);
  auto out = at::empty({batch, sq, hq, d}, q.options());
  auto lse = at::empty({batch, hq, sq}, q.options().dtype(at::kFloat));
  if (batch * hq * sq == 0) return {out, lse};
  if (sq == 1) {
    decode_attention_cuda(q, k_cache, v_cache, kv_lens, ring_offset, q_lens, sink, scale, out, lse);
  } else {
    prefill_attention_cuda(q, k_cache, v_cache, kv_lens, ring_offset, q_lens, sink, scale, out,
                           lse);
  }
  return {out, lse};
}

}  // namespace
}  // namespace cuda
}  // namespace flashback

TORCH_LIBRARY_IMPL(flashback, CUDA, m) {
  m.impl("kv_append", &flashback::cuda::kv_append_cuda);
  m.impl("append_attention", &flashback::cuda::append_attention_cuda);
}
