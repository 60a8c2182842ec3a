#include "checks.h"

namespace flashback {
namespace {

void check_cache_pair(const at::Tensor& k_cache, const at::Tensor& v_cache) {
  TORCH_CHECK(k_cache.dim() == 4, "k_cache must be [B, Hkv, C, D], got rank ", k_cache.dim());
  TORCH_CHECK(v_cache.sizes() == k_cache.sizes(), "v_cache shape ", v_cache.sizes(),
              " must equal k_cache shape ", k_cache.sizes());
  TORCH_CHECK(v_cache.dtype() == k_cache.dtype(), "v_cache dtype ", v_cache.dtype(),
              " must equal k_cache dtype ", k_cache.dtype());
  TORCH_CHECK(v_cache.device() == k_cache.device(), "k_cache and v_cache must be on one device");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(),
              "k_cache and v_cache must be contiguous");
  if (k_cache.is_cuda()) {  // the CUDA kernels move 16-byte vectors
    TORCH_CHECK(reinterpret_cast<uintptr_t>(k_cache.data_ptr()) % 16 == 0 &&
                    reinterpret_cast<uintptr_t>(v_cache.data_ptr()) % 16 == 0,
                "k_cache and v_cache must be 16-byte aligned on CUDA");
  }
}

void check_lengths(const at::Tensor& t, const char* name, int64_t batch, const at::Tensor& cache) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == batch, name, " must have shape [", batch, "], got ",
              t.sizes());
  TORCH_CHECK(t.scalar_type() == at::kInt, name, " must be int32, got ", t.scalar_type());
  TORCH_CHECK(t.device() == cache.device(), name, " must be on the cache's device (",
              cache.device(), "), got ", t.device());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous (kernels index it as an array)");
}

void check_sink(int64_t sink, int64_t capacity) {
  TORCH_CHECK(sink >= 0 && sink < capacity, "sink must be in [0, capacity=", capacity, "), got ",
              sink);
}

}  // namespace

void check_append_attention_args(const at::Tensor& q, const at::Tensor& k_cache,
                                 const at::Tensor& v_cache, const at::Tensor& kv_lens,
                                 const at::Tensor& ring_offset, int64_t sink,
                                 const std::optional<at::Tensor>& q_lens) {
  check_cache_pair(k_cache, v_cache);
  TORCH_CHECK(q.dim() == 4, "q must be [B, Hq, Sq, D], got rank ", q.dim());
  TORCH_CHECK(q.device() == k_cache.device(), "q (", q.device(), ") and k_cache (",
              k_cache.device(), ") must be on one device");
  TORCH_CHECK(q.dtype() == k_cache.dtype(), "q dtype ", q.dtype(), " must equal cache dtype ",
              k_cache.dtype());
  const int64_t batch = q.size(0), hq = q.size(1), d = q.size(3);
  TORCH_CHECK(k_cache.size(0) == batch, "cache batch ", k_cache.size(0), " != q batch ", batch);
  TORCH_CHECK(k_cache.size(3) == d, "head dim of q (", d, ") != head dim of cache (",
              k_cache.size(3), ")");
  const int64_t hkv = k_cache.size(1);
  TORCH_CHECK(hkv > 0 && hq % hkv == 0, "Hq (", hq, ") must be a multiple of Hkv (", hkv, ")");
  TORCH_CHECK(q.stride(3) == 1, "q's last dimension must be contiguous");
  check_sink(sink, k_cache.size(2));
  check_lengths(kv_lens, "kv_lens", batch, k_cache);
  check_lengths(ring_offset, "ring_offset", batch, k_cache);
  if (q_lens.has_value()) check_lengths(*q_lens, "q_lens", batch, k_cache);
}

void check_kv_append_args(const at::Tensor& k_new, const at::Tensor& v_new,
                          const at::Tensor& k_cache, const at::Tensor& v_cache,
                          const at::Tensor& write_pos, const at::Tensor& ring_offset,
                          int64_t sink) {
  check_cache_pair(k_cache, v_cache);
  TORCH_CHECK(k_new.dim() == 4, "k_new must be [B, Hkv, n, D], got rank ", k_new.dim());
  TORCH_CHECK(v_new.sizes() == k_new.sizes(), "v_new shape ", v_new.sizes(),
              " must equal k_new shape ", k_new.sizes());
  TORCH_CHECK(k_new.dtype() == k_cache.dtype() && v_new.dtype() == k_cache.dtype(),
              "k_new/v_new dtype must equal the cache dtype ", k_cache.dtype());
  TORCH_CHECK(k_new.device() == k_cache.device() && v_new.device() == k_cache.device(),
              "k_new/v_new must be on the cache's device ", k_cache.device());
  TORCH_CHECK(k_new.size(0) == k_cache.size(0) && k_new.size(1) == k_cache.size(1) &&
                  k_new.size(3) == k_cache.size(3),
              "k_new ", k_new.sizes(), " does not match cache [B, Hkv, *, D] ", k_cache.sizes());
  check_sink(sink, k_cache.size(2));
  check_lengths(write_pos, "write_pos", k_cache.size(0), k_cache);
  check_lengths(ring_offset, "ring_offset", k_cache.size(0), k_cache);
}

}  // namespace flashback
