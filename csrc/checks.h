// Argument checks shared by the CPU and CUDA implementations of the flashback ops.
// Every public op validates metadata (rank, dtype, device, layout) before touching memory.
#pragma once

#include <ATen/ATen.h>
#include <optional>

namespace flashback {

// q [B, Hq, Sq, D], caches [B, Hkv, C, D], int32 [B] lengths on the cache's device.
void check_append_attention_args(const at::Tensor& q, const at::Tensor& k_cache,
                                 const at::Tensor& v_cache, const at::Tensor& kv_lens,
                                 const at::Tensor& ring_offset, int64_t sink,
                                 const std::optional<at::Tensor>& q_lens);

// k_new/v_new [B, Hkv, n, D], caches [B, Hkv, C, D], int32 [B] write positions.
void check_kv_append_args(const at::Tensor& k_new, const at::Tensor& v_new,
                          const at::Tensor& k_cache, const at::Tensor& v_cache,
                          const at::Tensor& write_pos, const at::Tensor& ring_offset,
                          int64_t sink);

}  // namespace flashback
