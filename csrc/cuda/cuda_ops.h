// Host entry points of the CUDA kernels (registered in registration_cuda.cu).
#pragma once

#include <ATen/ATen.h>
#include <optional>
#include <tuple>

namespace flashback {
namespace cuda {

void kv_append_cuda(const at::Tensor& k_new, const at::Tensor& v_new, at::Tensor& k_cache,
                    at::Tensor& v_cache, const at::Tensor& write_pos,
                    const at::Tensor& ring_offset, int64_t sink);

// Sq == 1: split-KV decode over live lengths with the GQA heads of a kv head packed together.
void decode_attention_cuda(const at::Tensor& q, const at::Tensor& k_cache,
                           const at::Tensor& v_cache, const at::Tensor& kv_lens,
                           const at::Tensor& ring_offset, const std::optional<at::Tensor>& q_lens,
                           int64_t sink, double scale, at::Tensor& out, at::Tensor& lse);

// Sq > 1: tensor-core (WMMA / mma.sync) tiled attention of the appended block.
void prefill_attention_cuda(const at::Tensor& q, const at::Tensor& k_cache,
                            const at::Tensor& v_cache, const at::Tensor& kv_lens,
                            const at::Tensor& ring_offset, const std::optional<at::Tensor>& q_lens,
                            int64_t sink, double scale, at::Tensor& out, at::Tensor& lse);

}  // namespace cuda
}  // namespace flashback
