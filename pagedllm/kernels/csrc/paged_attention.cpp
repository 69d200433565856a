// Decode attention over a paged KV cache: one query token per sequence, keys and values read in place from
// the block pools through each sequence's block table (nothing is gathered into a new tensor).
#include "vec.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace pagedllm {
namespace {

constexpr int64_t kMinParallelKeys = 1 << 11;  // (query head, key) pairs below which one thread does it all

template <typename T>
inline void prefetch_entries(const T* first, int64_t tokens, int64_t token_stride, int64_t head_dim) {
  constexpr int64_t kLine = 64 / sizeof(T);
  for (int64_t i = 0; i < tokens; ++i)
    for (int64_t d = 0; d < head_dim; d += kLine) __builtin_prefetch(first + i * token_stride + d);
}

// Calls fn(t, entry) for the first context_len tokens of a sequence in order, entry pointing at token t's
// vector for kv_head in the pool: block by block, with no division per token.
template <typename T, typename Fn>
inline void for_each_token(const T* pool, const int64_t* block_table, int64_t context_len, int64_t block_size,
                           int64_t num_kv_heads, int64_t kv_head, int64_t head_dim, const Fn& fn) {
  const int64_t token_stride = num_kv_heads * head_dim;
  const auto block_entries = [&](int64_t b) {
    return pool + (block_table[b] * block_size * num_kv_heads + kv_head) * head_dim;
  };
  for (int64_t start = 0, b = 0; start < context_len; start += block_size, ++b) {
    const int64_t tokens = std::min(block_size, context_len - start);
    // The next block lies anywhere in the pool, out of the hardware prefetcher's sight: ask for it now.
    if (start + block_size < context_len) prefetch_entries(block_entries(b + 1), block_size, token_stride, head_dim);
    const T* entry = block_entries(b);
    for (int64_t i = 0; i < tokens; ++i, entry += token_stride) fn(start + i, entry);
  }
}

template <typename T>
void attend_kv_head(const T* q, const T* k_pool, const T* v_pool, const int64_t* block_table, int64_t context_len,
                    int64_t block_size, int64_t num_kv_heads, int64_t kv_head, int64_t group, int64_t head_dim,
                    float scale, T* out) {
  // q and out: this kv head's `group` query heads, [group, head_dim] each contiguous.
  std::vector<float> queries(group * head_dim), scores(group * context_len), acc(group * head_dim, 0.f);
  for (int64_t h = 0; h < group; ++h)
    for (int64_t d = 0; d < head_dim; ++d) queries[h * head_dim + d] = to_float(q[h * head_dim + d]) * scale;
  for_each_token(k_pool, block_table, context_len, block_size, num_kv_heads, kv_head, head_dim,
                 [&](int64_t t, const T* key) {
                   for (int64_t h = 0; h < group; ++h)
                     scores[h * context_len + t] = dot(queries.data() + h * head_dim, key, head_dim);
                 });
  for (int64_t h = 0; h < group; ++h) {
    float* s = scores.data() + h * context_len;
    const float inverse = 1.f / exp_shifted_sum(s, context_len, *std::max_element(s, s + context_len));
    for (int64_t t = 0; t < context_len; ++t) s[t] *= inverse;
  }
  for_each_token(v_pool, block_table, context_len, block_size, num_kv_heads, kv_head, head_dim,
                 [&](int64_t t, const T* value) {
                   for (int64_t h = 0; h < group; ++h)
                     axpy(acc.data() + h * head_dim, scores[h * context_len + t], value, head_dim);
                 });
  for (int64_t i = 0; i < group * head_dim; ++i) out[i] = static_cast<T>(acc[i]);
}

}  // namespace

at::Tensor paged_decode_attention(const at::Tensor& q, const at::Tensor& k_pool, const at::Tensor& v_pool,
                                  const at::Tensor& block_tables, const at::Tensor& seq_lens, double scale) {
  TORCH_CHECK(q.dim() == 3 && k_pool.dim() == 4, "paged_decode_attention: q [seqs, heads, dim], pools 4-D");
  TORCH_CHECK(q.scalar_type() == k_pool.scalar_type() && k_pool.scalar_type() == v_pool.scalar_type(),
              "paged_decode_attention: q and the pools must share a dtype");
  TORCH_CHECK(k_pool.is_contiguous() && v_pool.is_contiguous(), "paged_decode_attention: pools must be contiguous");
  const int64_t num_seqs = q.size(0), num_heads = q.size(1), head_dim = q.size(2);
  const int64_t block_size = k_pool.size(1), num_kv_heads = k_pool.size(2);
  TORCH_CHECK(num_heads % num_kv_heads == 0 && k_pool.size(3) == head_dim, "paged_decode_attention: head shapes");
  const at::Tensor queries = q.contiguous();
  const at::Tensor tables = block_tables.to(at::kLong).contiguous();
  const at::Tensor lens = seq_lens.to(at::kLong).contiguous();
  at::Tensor out = at::empty_like(queries);
  const int64_t group = num_heads / num_kv_heads, max_blocks = tables.size(1);
  const int64_t* table = tables.const_data_ptr<int64_t>();
  const int64_t* len = lens.const_data_ptr<int64_t>();
  // A few short sequences are cheaper on one thread than waking the others.
  const int64_t keys = lens.sum().item<int64_t>() * num_heads;
  const int64_t grain = keys < kMinParallelKeys ? num_seqs * num_kv_heads : 1;
  PAGEDLLM_DISPATCH_FLOAT_TYPES(q.scalar_type(), "paged_decode_attention", [&] {
    const scalar_t* qp = queries.const_data_ptr<scalar_t>();
    const scalar_t* kp = k_pool.const_data_ptr<scalar_t>();
    const scalar_t* vp = v_pool.const_data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, num_seqs * num_kv_heads, grain, [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) {
        const int64_t seq = task / num_kv_heads, kv_head = task % num_kv_heads;
        const int64_t offset = (seq * num_heads + kv_head * group) * head_dim;
        attend_kv_head(qp + offset, kp, vp, table + seq * max_blocks, len[seq], block_size, num_kv_heads, kv_head,
                       group, head_dim, static_cast<float>(scale), op + offset);
      }
    });
  });
  return out;
}

}  // namespace pagedllm
