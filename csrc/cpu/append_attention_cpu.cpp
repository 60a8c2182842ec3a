// CPU append-attention: bottom-right causal attention of a query block over a ring KV cache.
//
// Work decomposition: one work item = (sequence b, kv head, block of packed query rows, KV split).
// The query rows of all Hq/Hkv heads that share a kv head are packed into one matrix, so every KV
// tile is read once per kv head (GQA packing). Each item runs an online softmax over tiles of
// up to kKeyTile keys: S = Q K^T and O += P V are tile GEMMs, fp32 ones (tile_gemm.h) that read
// K/V rows in place, or for bf16 on CPUs with AMX, bf16 ones on packed K/V tiles
// (tile_gemm_amx.h), or for bf16 decode-sized items on CPUs with AVX512-BF16, dot products on
// the K/V rows in place (tile_dot_bf16.h); elsewhere bf16 rows are widened to fp32. The softmax
// in between is AVX2 (cpu_math.h).
// No [Sq, L] score matrix is ever materialised. Decode-sized problems have few items, so the KV
// range is split and the partial results merged by their log-sum-exp.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "../checks.h"
#include "cpu_math.h"
#include "tile_gemm.h"
#include "tile_dot_bf16.h"
#include "tile_gemm_amx.h"

namespace flashback {
namespace {

constexpr int64_t kRowBlock = 64;   // packed query rows per work item
constexpr int64_t kKeyTile = 128;   // keys per softmax tile
constexpr int64_t kDecodeKeyTile = 512;  // longer tiles when few rows: fewer, larger GEMM calls
constexpr int64_t kMinSplitKeys = 512;  // never split the KV range finer than this
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

struct SeqInfo {
  int64_t kv_len, q_len, ring_offset;
};

// Physical slot of logical token j (see docs/DESIGN.md, ring layout).
inline int64_t slot_of(int64_t j, int64_t sink, int64_t ring, int64_t offset) {
  return j < sink ? j : sink + (j - sink + offset) % ring;
}

template <typename scalar_t>
inline void load_row_f32(const scalar_t* src, float* dst, int64_t d) {
  for (int64_t i = 0; i < d; ++i) dst[i] = static_cast<float>(src[i]);
}

// Round-to-nearest-even of finite floats (probabilities are in [0, 1]): plain integer ops, so
// the loop vectorises, unlike c10::BFloat16's NaN-checking conversion.
inline void probabilities_to_bf16(const float* src, uint16_t* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    uint32_t bits;
    std::memcpy(&bits, src + i, sizeof(bits));
    bits += 0x7FFFu + ((bits >> 16) & 1u);
    dst[i] = static_cast<uint16_t>(bits >> 16);
  }
}

// Partial result of one work item: unnormalised O rows plus running max (log2 units) and sum.
struct Partial {
  float* o;  // [rows, D]
  float* m;  // [rows]
  float* l;  // [rows]
};

// Per-thread working memory of a work item, reused across items.
struct Scratch {
  std::vector<float> f;          // fp32 path: Q, scores, widened K/V; AMX path: scores
  std::vector<c10::BFloat16> h;  // AMX path: Q, packed K and V, probabilities
};

template <typename scalar_t>
class AttentionCpu {
 public:
  AttentionCpu(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
               std::vector<SeqInfo> seqs, int64_t sink, double scale)
      : q_(q), kc_(k_cache.data_ptr<scalar_t>()), vc_(v_cache.data_ptr<scalar_t>()),
        seqs_(std::move(seqs)), sink_(sink), batch_(q.size(0)), hq_(q.size(1)), sq_(q.size(2)),
        d_(q.size(3)), hkv_(k_cache.size(1)), cap_(k_cache.size(2)),
        group_(hq_ / hkv_), scale_log2_(static_cast<float>(scale) * kLog2e),
        amx_(!std::is_same_v<scalar_t, float> && d_ % 2 == 0 && AmxTileGemm::available()),
        dot_(!std::is_same_v<scalar_t, float> && Bf16DotTiles::available()) {}

  // Runs rows [r0, r0+rows) of (b, hk) over logical keys [k0, k1), writing into `part`.
  void run_item(int64_t b, int64_t hk, int64_t r0, int64_t rows, int64_t k0, int64_t k1,
                Partial part, Scratch& scratch) const {
    const int64_t tile = rows <= 16 ? kDecodeKeyTile : kKeyTile;
    std::vector<int64_t> limit(rows);
    const int64_t max_limit = start_rows(b, r0, rows, part, limit);
    k1 = std::min(k1, max_limit + 1);
    if constexpr (!std::is_same_v<scalar_t, float>) {
      if (dot_ && Bf16DotTiles::handles(rows, d_))
        return run_tiles_dot(b, hk, r0, rows, k0, k1, tile, limit, part, scratch);
      // decode-sized items (a few rows) stay on the fp32 path: there the tile packing costs
      // more than AMX saves (measured: Sq 1 at L 1024-4096 ran 1.3x slower on AMX)
      if (amx_ && rows > 16)
        return run_tiles_amx(b, hk, r0, rows, k0, k1, tile, limit, part, scratch);
    }
    run_tiles_fp32(b, hk, r0, rows, k0, k1, tile, limit, part, scratch.f);
  }

  // Normalises merged rows and writes out [B, Sq, Hq, D] and lse [B, Hq, Sq].
  void write_rows(int64_t b, int64_t hk, int64_t r0, int64_t rows, const float* o,
                  const float* m, const float* l, at::Tensor& out, at::Tensor& lse) const {
    const SeqInfo& s = seqs_[b];
    scalar_t* out_p = out.data_ptr<scalar_t>();
    float* lse_p = lse.data_ptr<float>();
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t row = r0 + r, g = row / s.q_len, pos = row % s.q_len, h = hk * group_ + g;
      scalar_t* dst = out_p + ((b * sq_ + pos) * hq_ + h) * d_;
      const float inv = l[r] > 0.f ? 1.f / l[r] : 0.f;
      for (int64_t i = 0; i < d_; ++i) dst[i] = static_cast<scalar_t>(o[r * d_ + i] * inv);
      lse_p[(b * hq_ + h) * sq_ + pos] = l[r] > 0.f ? (m[r] + std::log2(l[r])) * kLn2 : kNegInf;
    }
  }

  int64_t rows_of(int64_t b) const { return group_ * seqs_[b].q_len; }
  int64_t d() const { return d_; }

 private:
  // Causal limit of each row and a fresh partial; returns the largest limit.
  int64_t start_rows(int64_t b, int64_t r0, int64_t rows, Partial part,
                     std::vector<int64_t>& limit) const {
    const SeqInfo& s = seqs_[b];
    int64_t max_limit = -1;
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t pos = (r0 + r) % s.q_len;
      limit[r] = s.kv_len - s.q_len + pos;
      max_limit = std::max(max_limit, limit[r]);
      part.m[r] = kNegInf;
      part.l[r] = 0.f;
    }
    std::fill(part.o, part.o + rows * d_, 0.f);
    return max_limit;
  }

  const scalar_t* q_row(int64_t b, int64_t hk, int64_t row) const {
    const int64_t g = row / seqs_[b].q_len, pos = row % seqs_[b].q_len;
    return q_.data_ptr<scalar_t>() + b * q_.stride(0) + (hk * group_ + g) * q_.stride(1) +
           pos * q_.stride(2);
  }

  // The next tile from logical key t0: it never crosses the sink boundary or the ring's wrap
  // point, so its K/V rows are consecutive in memory and are read in place.
  struct Tile {
    const scalar_t* k;
    const scalar_t* v;
    int64_t n;
  };
  Tile tile_at(int64_t b, int64_t hk, int64_t t0, int64_t k1, int64_t tile) const {
    const int64_t ring = cap_ - sink_;
    const int64_t first = slot_of(t0, sink_, ring, seqs_[b].ring_offset);
    const int64_t run = t0 < sink_ ? sink_ - t0 : cap_ - first;
    const int64_t base = ((b * hkv_ + hk) * cap_ + first) * d_;
    return {kc_ + base, vc_ + base, std::min({tile, k1 - t0, run})};
  }

  // Online softmax over one tile of log2-unit scores sp[rows, lds]: turns the visible scores
  // into unnormalised probabilities (zeros after them, up to nt), updates m and l, and rescales
  // the output rows for the new maximum.
  void softmax_tile(int64_t rows, int64_t t0, int64_t nt, const std::vector<int64_t>& limit,
                    float* sp, int64_t lds, Partial part) const {
    for (int64_t r = 0; r < rows; ++r) {
      float* srow = sp + r * lds;
      const int64_t visible = std::clamp<int64_t>(limit[r] - t0 + 1, 0, nt);
      const float tile_max = row_max(srow, visible);
      const float m_new = std::max(part.m[r], tile_max);
      if (m_new == kNegInf) {  // nothing visible yet for this row
        std::fill(srow, srow + nt, 0.f);
        continue;
      }
      const float sum = exp2_shift_sum(srow, visible, m_new);
      std::fill(srow + visible, srow + nt, 0.f);
      const float alpha = fast_exp2(part.m[r] - m_new);  // 0 when m was -inf
      part.l[r] = part.l[r] * alpha + sum;
      part.m[r] = m_new;
      if (alpha != 1.f) {
        float* orow = part.o + r * d_;
        for (int64_t i = 0; i < d_; ++i) orow[i] *= alpha;
      }
    }
  }

  // fp32 tile GEMMs; a bf16 cache is widened to fp32 tile by tile.
  void run_tiles_fp32(int64_t b, int64_t hk, int64_t r0, int64_t rows, int64_t k0, int64_t k1,
                      int64_t tile, const std::vector<int64_t>& limit, Partial part,
                      std::vector<float>& scratch) const {
    const int64_t d = d_;
    scratch.resize(rows * d + rows * tile + 3 * tile * d);
    float* qs = scratch.data();          // [rows, D] queries, pre-scaled into log2 units
    float* sp = qs + rows * d;           // [rows, tile] scores, then probabilities
    float* kbuf = sp + rows * tile;      // [tile, D] K rows converted to fp32 (bf16 only)
    float* vbuf = kbuf + tile * d;       // [tile, D] V rows converted to fp32 (bf16 only)
    float* gemm_scratch = vbuf + tile * d;  // K^T for the brgemm fallback
    for (int64_t r = 0; r < rows; ++r) {
      const scalar_t* src = q_row(b, hk, r0 + r);
      for (int64_t i = 0; i < d; ++i) qs[r * d + i] = static_cast<float>(src[i]) * scale_log2_;
    }
    for (int64_t t0 = k0; t0 < k1;) {
      const Tile t = tile_at(b, hk, t0, k1, tile);
      const float* kf;
      const float* vf;
      if constexpr (std::is_same_v<scalar_t, float>) {
        kf = t.k;
        vf = t.v;
      } else {
        for (int64_t i = 0; i < t.n * d; ++i) kbuf[i] = static_cast<float>(t.k[i]);
        for (int64_t i = 0; i < t.n * d; ++i) vbuf[i] = static_cast<float>(t.v[i]);
        kf = kbuf;
        vf = vbuf;
      }
      gemm_.qk(rows, t.n, d, qs, d, kf, d, sp, tile, gemm_scratch);
      softmax_tile(rows, t0, t.n, limit, sp, tile, part);
      gemm_.pv_accumulate(rows, d, t.n, sp, tile, vf, d, part.o, d);
      t0 += t.n;
    }
  }

  // bf16 decode-sized items on AVX512-BF16: scores and P.V straight from the K/V rows.
  void run_tiles_dot(int64_t b, int64_t hk, int64_t r0, int64_t rows, int64_t k0, int64_t k1,
                     int64_t tile, const std::vector<int64_t>& limit, Partial part,
                     Scratch& scratch) const {
    const int64_t d = d_;
    scratch.f.resize(rows * tile);
    scratch.h.resize(rows * d);
    float* sp = scratch.f.data();          // [rows, tile] scores, then probabilities
    c10::BFloat16* qb = scratch.h.data();  // [rows, D] queries as stored
    for (int64_t r = 0; r < rows; ++r)
      std::memcpy(qb + r * d, q_row(b, hk, r0 + r), d * sizeof(c10::BFloat16));
    for (int64_t t0 = k0; t0 < k1;) {
      const Tile t = tile_at(b, hk, t0, k1, tile);
      Bf16DotTiles::qk(rows, t.n, d, qb, d, t.k, scale_log2_, sp, tile);
      softmax_tile(rows, t0, t.n, limit, sp, tile, part);
      Bf16DotTiles::pv_accumulate(rows, t.n, d, sp, tile, t.v, part.o);
      t0 += t.n;
    }
  }

  // bf16 on AMX: Q and the packed K/V tiles stay bf16, scores and O accumulate in fp32, and
  // the probabilities are rounded to bf16 for P.V (as FlashAttention does on tensor cores).
  void run_tiles_amx(int64_t b, int64_t hk, int64_t r0, int64_t rows, int64_t k0, int64_t k1,
                     int64_t tile, const std::vector<int64_t>& limit, Partial part,
                     Scratch& scratch) const {
    const int64_t d = d_;
    scratch.f.resize(rows * tile);
    scratch.h.resize(rows * d + 2 * tile * d + rows * tile);
    float* sp = scratch.f.data();         // [rows, tile] scores, then probabilities
    c10::BFloat16* qb = scratch.h.data();  // [rows, D] queries as stored
    c10::BFloat16* kp = qb + rows * d;     // K^T tile, VNNI
    c10::BFloat16* vp = kp + tile * d;     // V tile, VNNI
    c10::BFloat16* pb = vp + tile * d;     // [rows, np] probabilities in bf16
    for (int64_t r = 0; r < rows; ++r)
      std::memcpy(qb + r * d, q_row(b, hk, r0 + r), d * sizeof(c10::BFloat16));
    for (int64_t t0 = k0; t0 < k1;) {
      const Tile t = tile_at(b, hk, t0, k1, tile);
      const int64_t np = AmxTileGemm::padded(t.n);
      AmxTileGemm::pack_k(t.k, t.n, np, d, kp);
      AmxTileGemm::pack_v(t.v, t.n, np, d, vp);
      AmxTileGemm::qk(rows, np, d, qb, kp, sp, tile);
      for (int64_t r = 0; r < rows; ++r) {  // into log2 units
        float* srow = sp + r * tile;
        for (int64_t i = 0; i < t.n; ++i) srow[i] *= scale_log2_;
      }
      softmax_tile(rows, t0, t.n, limit, sp, tile, part);
      for (int64_t r = 0; r < rows; ++r) {
        const float* srow = sp + r * tile;
        c10::BFloat16* prow = pb + r * np;
        probabilities_to_bf16(srow, reinterpret_cast<uint16_t*>(prow), t.n);
        std::fill(prow + t.n, prow + np, c10::BFloat16(0.f));
      }
      AmxTileGemm::pv_accumulate(rows, d, np, pb, vp, part.o);
      t0 += t.n;
    }
  }

  const at::Tensor& q_;
  const scalar_t* kc_;
  const scalar_t* vc_;
  std::vector<SeqInfo> seqs_;
  int64_t sink_, batch_, hq_, sq_, d_, hkv_, cap_, group_;
  float scale_log2_;
  bool amx_;  // bf16 tiles on AMX (run_tiles_amx) instead of widening to fp32
  bool dot_;  // bf16 decode-sized items by AVX512-BF16 dot products (run_tiles_dot)
  TileGemm gemm_;
};

template <typename scalar_t>
void run_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                   const std::vector<SeqInfo>& seqs, int64_t sink, double scale, at::Tensor& out,
                   at::Tensor& lse) {
  const int64_t batch = q.size(0), hkv = k_cache.size(1), d = q.size(3);
  const int64_t group = q.size(1) / hkv;
  AttentionCpu<scalar_t> attn(q, k_cache, v_cache, seqs, sink, scale);
  int64_t max_rows = 0, max_len = 0;
  for (const auto& s : seqs) {
    max_rows = std::max(max_rows, group * s.q_len);
    max_len = std::max(max_len, s.kv_len);
  }
  if (max_rows == 0) return;
  const int64_t row_blocks = (max_rows + kRowBlock - 1) / kRowBlock;
  // Split the KV range only when the other dimensions cannot keep every thread busy.
  const int64_t base_items = batch * hkv * row_blocks;
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t max_splits = std::max<int64_t>(1, max_len / kMinSplitKeys);
  int64_t splits = std::max<int64_t>(1, (4 * threads + base_items - 1) / base_items);
  // prefer a split count that hands every thread the same number of items
  while (splits > 1 && splits < max_splits && (base_items * splits) % threads != 0) ++splits;
  splits = std::min(splits, max_splits);
  const int64_t items = base_items * splits;
  // Split partials: [items, kRowBlock, D] plus m and l; merged afterwards in item order,
  // so the result does not depend on which thread ran which item.
  std::vector<float> part_o(splits > 1 ? items * kRowBlock * d : 0);
  std::vector<float> part_ml(splits > 1 ? items * kRowBlock * 2 : 0);

  at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
    Scratch scratch;
    std::vector<float> own_o(kRowBlock * d), own_m(kRowBlock), own_l(kRowBlock);
    for (int64_t it = begin; it < end; ++it) {
      const int64_t split = it % splits, rb = (it / splits) % row_blocks;
      const int64_t hk = (it / splits / row_blocks) % hkv, b = it / splits / row_blocks / hkv;
      const int64_t total_rows = attn.rows_of(b), r0 = rb * kRowBlock;
      if (r0 >= total_rows) continue;
      const int64_t rows = std::min(kRowBlock, total_rows - r0);
      const int64_t len = seqs[b].kv_len;
      const int64_t chunk = (len + splits - 1) / splits;
      const int64_t k0 = std::min(len, split * chunk), k1 = std::min(len, k0 + chunk);
      Partial part = splits > 1
          ? Partial{part_o.data() + it * kRowBlock * d, part_ml.data() + it * kRowBlock * 2,
                    part_ml.data() + it * kRowBlock * 2 + kRowBlock}
          : Partial{own_o.data(), own_m.data(), own_l.data()};
      attn.run_item(b, hk, r0, rows, k0, k1, part, scratch);
      if (splits == 1) attn.write_rows(b, hk, r0, rows, part.o, part.m, part.l, out, lse);
    }
    TileGemm::release();
    if (AmxTileGemm::available()) AmxTileGemm::release();
  });
  if (splits == 1) return;

  at::parallel_for(0, base_items, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> o(kRowBlock * d), m(kRowBlock), l(kRowBlock);
    for (int64_t base = begin; base < end; ++base) {
      const int64_t rb = base % row_blocks, hk = (base / row_blocks) % hkv;
      const int64_t b = base / row_blocks / hkv;
      const int64_t total_rows = attn.rows_of(b), r0 = rb * kRowBlock;
      if (r0 >= total_rows) continue;
      const int64_t rows = std::min(kRowBlock, total_rows - r0);
      for (int64_t r = 0; r < rows; ++r) {
        float mx = kNegInf;
        for (int64_t sp = 0; sp < splits; ++sp)
          mx = std::max(mx, part_ml[(base * splits + sp) * kRowBlock * 2 + r]);
        float lsum = 0.f;
        std::fill(o.begin() + r * d, o.begin() + (r + 1) * d, 0.f);
        for (int64_t sp = 0; sp < splits && mx != kNegInf; ++sp) {
          const int64_t it = base * splits + sp;
          const float pm = part_ml[it * kRowBlock * 2 + r];
          if (pm == kNegInf) continue;
          const float w = fast_exp2(pm - mx);
          lsum += w * part_ml[it * kRowBlock * 2 + kRowBlock + r];
          const float* po = part_o.data() + (it * kRowBlock + r) * d;
          for (int64_t i = 0; i < d; ++i) o[r * d + i] += w * po[i];
        }
        m[r] = mx;
        l[r] = lsum;
      }
      attn.write_rows(b, hk, r0, rows, o.data(), m.data(), l.data(), out, lse);
    }
  });
}

std::vector<SeqInfo> read_lengths(const at::Tensor& kv_lens, const at::Tensor& ring_offset,
                                  const std::optional<at::Tensor>& q_lens, int64_t sq,
                                  int64_t capacity, int64_t sink) {
  const int64_t batch = kv_lens.size(0);
  auto lens = kv_lens.contiguous();
  auto offs = ring_offset.contiguous();
  std::optional<at::Tensor> qls;
  if (q_lens.has_value()) qls = q_lens->contiguous();
  std::vector<SeqInfo> seqs(batch);
  for (int64_t b = 0; b < batch; ++b) {
    SeqInfo s{lens.data_ptr<int32_t>()[b], qls ? qls->data_ptr<int32_t>()[b] : sq,
              offs.data_ptr<int32_t>()[b]};
    TORCH_CHECK(s.q_len >= 0 && s.q_len <= sq, "q_lens[", b, "]=", s.q_len,
                " must be in [0, Sq=", sq, "]");
    TORCH_CHECK(s.kv_len >= 0 && s.kv_len <= capacity, "kv_lens[", b, "]=", s.kv_len,
                " must be in [0, capacity=", capacity, "]");
    TORCH_CHECK(s.q_len <= s.kv_len, "q is longer than kv for sequence ", b, ": q_len ",
                s.q_len, " > kv_len ", s.kv_len, " (kv_lens counts the new block too)");
    TORCH_CHECK(s.ring_offset >= 0 && (s.ring_offset < capacity - sink),
                "ring_offset[", b, "]=", s.ring_offset, " must be in [0, capacity - sink=",
                capacity - sink, ")");
    seqs[b] = s;
  }
  return seqs;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> append_attention_cpu(
    const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
    const at::Tensor& kv_lens, const at::Tensor& ring_offset, int64_t sink, double scale,
    const std::optional<at::Tensor>& q_lens) {
  check_append_attention_args(q, k_cache, v_cache, kv_lens, ring_offset, sink, q_lens);
  TORCH_CHECK(q.device().is_cpu(), "append_attention_cpu called with ", q.device());
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16,
              "CPU append_attention supports float32 and bfloat16, got ", q.scalar_type());
  const int64_t batch = q.size(0), hq = q.size(1), sq = q.size(2), d = q.size(3);
  auto seqs = read_lengths(kv_lens, ring_offset, q_lens, sq, k_cache.size(2), sink);
  auto out = at::empty({batch, sq, hq, d}, q.options());
  auto lse = at::empty({batch, hq, sq}, q.options().dtype(at::kFloat));
  // the kernel writes every row below q_lens[b]; the rows past it are zero / -inf by contract
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t live = seqs[b].q_len;
    if (live == sq) continue;
    out[b].narrow(0, live, sq - live).zero_();
    lse[b].narrow(1, live, sq - live).fill_(-std::numeric_limits<float>::infinity());
  }
  if (q.scalar_type() == at::kFloat) {
    run_attention<float>(q, k_cache, v_cache, seqs, sink, scale, out, lse);
  } else {
    run_attention<at::BFloat16>(q, k_cache, v_cache, seqs, sink, scale, out, lse);
  }
  return {out, lse};
}

}  // namespace flashback
