// CPU kv_append: copy a block of new keys/values into the (ring) KV cache.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cstring>
#include <vector>

#include "../checks.h"

namespace flashback {
namespace {

template <typename scalar_t>
void copy_block(const at::Tensor& src, at::Tensor& cache, const std::vector<int64_t>& pos,
                const std::vector<int64_t>& offs, int64_t sink) {
  const int64_t batch = src.size(0), heads = src.size(1), n = src.size(2), d = src.size(3);
  const int64_t cap = cache.size(2), ring = cap - sink;
  const scalar_t* s = src.data_ptr<scalar_t>();
  scalar_t* c = cache.data_ptr<scalar_t>();
  const auto st = src.strides();
  at::parallel_for(0, batch * heads * n, 64, [&](int64_t begin, int64_t end) {
    for (int64_t idx = begin; idx < end; ++idx) {
      const int64_t i = idx % n, h = (idx / n) % heads, b = idx / n / heads;
      const int64_t j = pos[b] + i;  // logical index of this token
      if (j >= cap) continue;        // never wrap onto live tokens
      const int64_t slot = j < sink ? j : sink + (j - sink + offs[b]) % ring;
      scalar_t* dst = c + ((b * heads + h) * cap + slot) * d;
      const scalar_t* row = s + b * st[0] + h * st[1] + i * st[2];
      if (st[3] == 1) {
        std::memcpy(dst, row, d * sizeof(scalar_t));
      } else {
        for (int64_t e = 0; e < d; ++e) dst[e] = row[e * st[3]];
      }
    }
  });
}

}  // namespace

void kv_append_cpu(const at::Tensor& k_new, const at::Tensor& v_new, at::Tensor& k_cache,
                   at::Tensor& v_cache, const at::Tensor& write_pos,
                   const at::Tensor& ring_offset, int64_t sink) {
  check_kv_append_args(k_new, v_new, k_cache, v_cache, write_pos, ring_offset, sink);
  TORCH_CHECK(k_cache.device().is_cpu(), "kv_append_cpu called with ", k_cache.device());
  const int64_t batch = k_cache.size(0), cap = k_cache.size(2);
  auto wp = write_pos.contiguous();
  auto ro = ring_offset.contiguous();
  std::vector<int64_t> pos(batch), offs(batch);
  for (int64_t b = 0; b < batch; ++b) {  // validate everything before writing anything
    pos[b] = wp.data_ptr<int32_t>()[b];
    offs[b] = ro.data_ptr<int32_t>()[b];
    TORCH_CHECK(pos[b] >= 0, "write_pos[", b, "]=", pos[b], " must be >= 0");
    TORCH_CHECK(offs[b] >= 0 && offs[b] < cap - sink, "ring_offset[", b, "]=", offs[b],
                " must be in [0, capacity - sink=", cap - sink, ")");
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, k_cache.scalar_type(),
                                  "kv_append_cpu", [&] {
    copy_block<scalar_t>(k_new, k_cache, pos, offs, sink);
    copy_block<scalar_t>(v_new, v_cache, pos, offs, sink);
  });
}

}  // namespace flashback
