// Decode attention over a paged KV cache, for CPUs: one query token per sequence, reading each
// context block where it lies in the cache (no gathered copy), in fp32 with ATen's SIMD types.
//
// Registered as raycake_cpu::paged_decode_attention; raycake/kernels/cpu_kernels.py builds
// this file with torch.utils.cpp_extension for the machine's SIMD level and documents the op.
// Legend: B sequences, H query heads, K kv heads, G = H / K, D head dim, P tokens per block.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "load_float.h"

namespace {

using raycake_cpu::load_float;
using raycake_cpu::Vec;

// Ask for the next block's rows of one kv head (P rows of D values, ``row_len`` apart) while
// this block is computed: blocks lie anywhere in the cache, which the hardware prefetcher
// cannot guess (5-10% faster in bf16 at 32 decodes, neutral in fp32).
template <typename scalar_t, int64_t D>
inline void prefetch_block(const scalar_t* rows, int64_t row_len, int64_t block_size) {
  constexpr int64_t kLine = 64;
  for (int64_t p = 0; p < block_size; ++p) {
    const char* row = reinterpret_cast<const char*>(rows + p * row_len);
    for (int64_t offset = 0; offset < D * static_cast<int64_t>(sizeof(scalar_t)); offset += kLine)
      __builtin_prefetch(row + offset);
  }
}

// Calls fn(row, pos) for the cached positions [0, cached) of kv head ``kvh`` of one sequence,
// block by block; ``row`` holds that position's D values in fp32. ``base`` is the cache's K
// (or V) half, ``table`` the sequence's block ids.
template <typename scalar_t, int64_t D, typename Fn>
inline void for_each_cached_row(const scalar_t* base, const int64_t* table, int64_t cached,
                                int64_t kvh, int64_t row_len, int64_t block_size, Fn&& fn) {
  constexpr int64_t kVecs = D / Vec::size();
  auto block_rows = [&](int64_t block) {
    return base + table[block] * block_size * row_len + kvh * D;
  };
  Vec row[kVecs];
  for (int64_t start = 0; start < cached; start += block_size) {
    const scalar_t* rows = block_rows(start / block_size);
    if (start + block_size < cached)
      prefetch_block<scalar_t, D>(block_rows(start / block_size + 1), row_len, block_size);
    const int64_t count = std::min(block_size, cached - start);
    for (int64_t p = 0; p < count; ++p) {
      for (int64_t i = 0; i < kVecs; ++i)
        row[i] = load_float(rows + p * row_len + i * Vec::size());
      fn(row, start + p);
    }
  }
}

// One sequence: every head's scores against every cached position, block by block, then a
// softmax per head, then the probability-weighted sum of V, block by block. Each cached row
// (one position of one kv head) is loaded and converted once per pass and used by the G query
// heads that share it; the accumulators stay in registers (D is a compile-time constant).
template <typename scalar_t, int64_t D>
void attend_one(const float* q, const float* k_new, const float* v_new, const scalar_t* keys,
                const scalar_t* values, const int64_t* table, int64_t n, int64_t heads,
                int64_t kv_heads, int64_t block_size, int64_t num_blocks, float scale,
                float* scores, Vec* acc, scalar_t* out) {
  constexpr int64_t kVecs = D / Vec::size();
  const int64_t group = heads / kv_heads;
  const int64_t row_len = kv_heads * D;
  const int64_t cached = n - 1;  // the last position is this step's own k/v, not yet cached
  auto sum = [](Vec& a, Vec& b) { return a + b; };
  // Out-of-range block ids would read outside the cache: checked once per block.
  for (int64_t start = 0; start < cached; start += block_size) {
    const int64_t block = table[start / block_size];
    TORCH_CHECK(block >= 0 && block < num_blocks, "block_tables: block id ", block,
                " outside the cache's ", num_blocks, " blocks");
  }

  for (int64_t kvh = 0; kvh < kv_heads; ++kvh) {
    const int64_t first = kvh * group;  // the query heads that read this kv head
    auto score = [&](const Vec* row, int64_t pos) {
      for (int64_t g = 0; g < group; ++g) {
        const float* qh = q + (first + g) * D;
        Vec dot = Vec::loadu(qh) * row[0];
        for (int64_t i = 1; i < kVecs; ++i)
          dot = at::vec::fmadd(Vec::loadu(qh + i * Vec::size()), row[i], dot);
        scores[(first + g) * n + pos] = at::vec::vec_reduce_all<float>(sum, dot) * scale;
      }
    };
    for_each_cached_row<scalar_t, D>(keys, table, cached, kvh, row_len, block_size, score);
    Vec own[kVecs];
    for (int64_t i = 0; i < kVecs; ++i) own[i] = Vec::loadu(k_new + kvh * D + i * Vec::size());
    score(own, cached);
  }

  // Softmax over each head's n scores, normalised here so the V pass is pure multiply-adds.
  for (int64_t h = 0; h < heads; ++h) {
    float* s = scores + h * n;
    const float max = at::vec::reduce_all<float>(
        [](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, s, n);
    at::vec::map([max](Vec x) { return (x - Vec(max)).exp_u20(); }, s, s, n);
    const float inv = 1.0f / at::vec::reduce_all<float>(sum, s, n);
    at::vec::map([inv](Vec x) { return x * Vec(inv); }, s, s, n);
  }

  for (int64_t kvh = 0; kvh < kv_heads; ++kvh) {
    const int64_t first = kvh * group;
    auto accumulate = [&](const Vec* row, int64_t pos) {
      for (int64_t g = 0; g < group; ++g) {
        const Vec weight(scores[(first + g) * n + pos]);
        for (int64_t i = 0; i < kVecs; ++i)
          acc[g * kVecs + i] = at::vec::fmadd(weight, row[i], acc[g * kVecs + i]);
      }
    };
    std::fill(acc, acc + group * kVecs, Vec(0.0f));
    for_each_cached_row<scalar_t, D>(values, table, cached, kvh, row_len, block_size, accumulate);
    Vec own[kVecs];
    for (int64_t i = 0; i < kVecs; ++i) own[i] = Vec::loadu(v_new + kvh * D + i * Vec::size());
    accumulate(own, cached);
    for (int64_t g = 0; g < group; ++g) {
      float result[D];
      for (int64_t i = 0; i < kVecs; ++i) acc[g * kVecs + i].store(result + i * Vec::size());
      scalar_t* dst = out + (first + g) * D;
      for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<scalar_t>(result[d]);
    }
  }
}

template <typename scalar_t, int64_t D>
void attend_all(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                const at::Tensor& kv_cache, const at::Tensor& block_tables,
                const at::Tensor& context_lens, int64_t block_size, double scale,
                at::Tensor& out) {
  const int64_t rows = q.size(0), heads = q.size(1), kv_heads = k.size(1);
  const int64_t max_blocks = block_tables.size(1);
  const int64_t max_len = max_blocks * block_size + 1;
  const int64_t num_blocks = kv_cache.size(1) / block_size;
  const scalar_t* keys = kv_cache.data_ptr<scalar_t>();
  const scalar_t* values = keys + kv_cache.size(1) * kv_heads * D;
  const float* qp = q.data_ptr<float>();
  const float* kp = k.data_ptr<float>();
  const float* vp = v.data_ptr<float>();
  // Rows may be strided (q, k and v are slices of one [B, H + 2K, D] tensor); heads are not.
  const int64_t q_stride = q.stride(0), k_stride = k.stride(0), v_stride = v.stride(0);
  const int64_t* tables = block_tables.data_ptr<int64_t>();
  const int64_t* lens = context_lens.data_ptr<int64_t>();
  scalar_t* op = out.data_ptr<scalar_t>();
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    // Per thread: every head's scores for the longest context, and G x D accumulators.
    std::vector<float> scores(heads * max_len);
    std::vector<Vec> acc(heads / kv_heads * D / Vec::size());
    for (int64_t b = begin; b < end; ++b) {
      TORCH_CHECK(lens[b] >= 1 && lens[b] <= max_len, "context_lens: expected 1 to ", max_len,
                  " (the block table's positions + 1), got ", lens[b]);
      attend_one<scalar_t, D>(qp + b * q_stride, kp + b * k_stride, vp + b * v_stride,
                              keys, values, tables + b * max_blocks, lens[b], heads, kv_heads,
                              block_size, num_blocks, static_cast<float>(scale), scores.data(),
                              acc.data(), op + b * heads * D);
    }
  });
}

template <typename scalar_t>
void dispatch_head_dim(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                       const at::Tensor& kv_cache, const at::Tensor& block_tables,
                       const at::Tensor& context_lens, int64_t block_size, double scale,
                       at::Tensor& out) {
  switch (q.size(2)) {
    case 64:
      return attend_all<scalar_t, 64>(q, k, v, kv_cache, block_tables, context_lens, block_size,
                                      scale, out);
    case 128:
      return attend_all<scalar_t, 128>(q, k, v, kv_cache, block_tables, context_lens, block_size,
                                       scale, out);
    case 256:
      return attend_all<scalar_t, 256>(q, k, v, kv_cache, block_tables, context_lens, block_size,
                                       scale, out);
    default:
      TORCH_CHECK(false, "head_dim: expected 64, 128 or 256, got ", q.size(2));
  }
}

at::Tensor paged_decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                  const at::Tensor& kv_cache, const at::Tensor& block_tables,
                                  const at::Tensor& context_lens, int64_t block_size,
                                  double scale) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.dim() == 3, "q, k, v: expected [B, heads, D]");
  TORCH_CHECK(q.scalar_type() == at::kFloat && k.scalar_type() == at::kFloat &&
                  v.scalar_type() == at::kFloat,
              "q, k, v: expected float32");
  TORCH_CHECK(kv_cache.dim() == 4 && kv_cache.size(0) == 2 && kv_cache.is_contiguous(),
              "kv_cache: expected a contiguous [2, slots, K, D] tensor");
  TORCH_CHECK(block_tables.scalar_type() == at::kLong && context_lens.scalar_type() == at::kLong,
              "block_tables, context_lens: expected int64");
  const int64_t rows = q.size(0), heads = q.size(1), head_dim = q.size(2);
  const int64_t kv_heads = k.size(1);
  TORCH_CHECK(k.sizes() == v.sizes() && k.size(0) == rows && k.size(2) == head_dim,
              "k, v: expected [B, K, D] each, B and D as q's");
  TORCH_CHECK(kv_heads > 0 && heads % kv_heads == 0, "heads: expected a multiple of kv heads");
  TORCH_CHECK(block_tables.dim() == 2 && context_lens.dim() == 1,
              "block_tables, context_lens: expected [B, M] and [B]");
  TORCH_CHECK(kv_cache.size(2) == kv_heads && kv_cache.size(3) == head_dim,
              "kv_cache: expected [2, slots, ", kv_heads, ", ", head_dim, "]");
  TORCH_CHECK(block_tables.size(0) == rows && context_lens.size(0) == rows,
              "block_tables, context_lens: expected one row per query");
  TORCH_CHECK(block_size > 0 && kv_cache.size(1) % block_size == 0,
              "block_size: expected a divisor of the cache's slots");
  // Each row's heads must be packed; the rows themselves may be strided.
  auto rows_packed = [](const at::Tensor& t) {
    return t.stride(2) == 1 && t.stride(1) == t.size(2) ? t : t.contiguous();
  };
  auto qc = rows_packed(q), kc = rows_packed(k), vc = rows_packed(v);
  auto tables = block_tables.contiguous(), lens = context_lens.contiguous();
  auto out = at::empty({rows, heads, head_dim}, kv_cache.options());
  switch (kv_cache.scalar_type()) {
    case at::kFloat:
      dispatch_head_dim<float>(qc, kc, vc, kv_cache, tables, lens, block_size, scale, out);
      break;
    case at::kBFloat16:
      dispatch_head_dim<at::BFloat16>(qc, kc, vc, kv_cache, tables, lens, block_size, scale, out);
      break;
    case at::kHalf:
      dispatch_head_dim<at::Half>(qc, kc, vc, kv_cache, tables, lens, block_size, scale, out);
      break;
    default:
      TORCH_CHECK(false, "kv_cache: expected float32, bfloat16 or float16, got ",
                  kv_cache.scalar_type());
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(raycake_cpu, m) {
  m.def(
      "paged_decode_attention(Tensor q, Tensor k, Tensor v, Tensor kv_cache, "
      "Tensor block_tables, Tensor context_lens, int block_size, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(raycake_cpu, CPU, m) {
  m.impl("paged_decode_attention", &paged_decode_attention);
}
