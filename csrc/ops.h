// Declarations of the per-device implementations registered in registration.cpp / *.cu.
#pragma once

#include <ATen/ATen.h>
#include <optional>
#include <tuple>

namespace flashback {

std::tuple<at::Tensor, at::Tensor> append_attention_cpu(
    const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
    const at::Tensor& kv_lens, const at::Tensor& ring_offset, int64_t sink, double scale,
    const std::optional<at::Tensor>& q_lens);

void kv_append_cpu(const at::Tensor& k_new, const at::Tensor& v_new, at::Tensor& k_cache,
                   at::Tensor& v_cache, const at::Tensor& write_pos,
                   const at::Tensor& ring_offset, int64_t sink);

// y [M, sum N_i] = x [M, K] . concat(W_i [N_i, K])^T, bf16; fast for a few rows (decode).
at::Tensor decode_linear_cpu(const at::Tensor& x, at::TensorList weights);

}  // namespace flashback
