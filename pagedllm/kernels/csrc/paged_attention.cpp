// Decode attention over a paged KV cache: one query token per sequence, keys and values read in place from
// the block pools through each sequence's block table (nothing is gathered into a new tensor).
//
// A task attends one chunk (whole blocks) of one sequence's context with every query head: a token's entries for
// all kv heads are contiguous in the pool, so each block is one sequential read. Where a batch has too few
// sequences to keep every thread busy, contexts are cut into several chunks whose softmax partials are merged
// afterwards, as flash-decoding does.
#include "vec.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace pagedllm {
namespace {

constexpr int64_t kMinParallelKeys = 1 << 11;  // (query head, key) pairs below which one thread does it all
constexpr int64_t kChunksPerThread = 2;  // chunks a thread gets, at the least, where contexts are cut
constexpr int64_t kMinChunkTokens = 32;

// Tokens [begin, end) of one sequence's context; begin is a multiple of the block size.
struct Chunk {
  int64_t seq, begin, end;
};

// Per query head, in `partial`: the chunk's largest score, the sum of e^(score - largest), and the sum of the
// values weighted by e^(score - largest).
struct PartialLayout {
  int64_t head_dim;
  int64_t stride() const { return head_dim + 2; }
  float& max(float* partial, int64_t head) const { return partial[head * stride()]; }
  float& sum(float* partial, int64_t head) const { return partial[head * stride() + 1]; }
  float* acc(float* partial, int64_t head) const { return partial + head * stride() + 2; }
};

template <typename T>
inline void prefetch_token(const T* entry, int64_t length) {
  constexpr int64_t kLine = 64 / sizeof(T);
  for (int64_t d = 0; d < length; d += kLine) __builtin_prefetch(entry + d);
}

// Calls fn(t, entry) for tokens [begin, end) of a sequence in order, entry pointing at token t's entries for all
// kv heads (token_stride values): block by block, with no division per token.
template <typename T, typename Fn>
inline void for_each_token(const T* pool, const int64_t* block_table, int64_t begin, int64_t end, int64_t block_size,
                           int64_t token_stride, const Fn& fn) {
  const auto block_start = [&](int64_t b) { return pool + block_table[b] * block_size * token_stride; };
  for (int64_t start = begin; start < end; start += block_size) {
    const int64_t b = start / block_size, tokens = std::min(block_size, end - start);
    // The next block lies anywhere in the pool, out of the hardware prefetcher's sight: each token asks for the
    // same token of the next block.
    const T* next = start + block_size < end ? block_start(b + 1) : nullptr;
    const T* entry = block_start(b);
    for (int64_t i = 0; i < tokens; ++i, entry += token_stride) {
      if (next != nullptr) prefetch_token(next + i * token_stride, token_stride);
      fn(start + i, entry);
    }
  }
}

template <typename T>
void attend_chunk(const T* q, const T* k_pool, const T* v_pool, const int64_t* block_table, const Chunk& chunk,
                  int64_t block_size, int64_t num_kv_heads, int64_t group, float scale, const PartialLayout& layout,
                  float* partial) {
  // q: the sequence's query heads, [num_kv_heads * group, head_dim]; head j * group + h reads kv head j.
  const int64_t head_dim = layout.head_dim, heads = num_kv_heads * group, tokens = chunk.end - chunk.begin;
  thread_local std::vector<float> queries, scores;
  queries.resize(heads * head_dim);
  scores.resize(heads * tokens);
  for (int64_t i = 0; i < heads * head_dim; ++i) queries[i] = to_float(q[i]) * scale;
  const int64_t token_stride = num_kv_heads * head_dim;
  for_each_token(k_pool, block_table, chunk.begin, chunk.end, block_size, token_stride, [&](int64_t t, const T* keys) {
    for (int64_t head = 0; head < heads; ++head)
      scores[head * tokens + t - chunk.begin] =
          dot(queries.data() + head * head_dim, keys + head / group * head_dim, head_dim);
  });
  for (int64_t head = 0; head < heads; ++head) {
    float* s = scores.data() + head * tokens;
    const float largest = *std::max_element(s, s + tokens);
    layout.max(partial, head) = largest;
    layout.sum(partial, head) = exp_shifted_sum(s, tokens, largest);
    std::fill_n(layout.acc(partial, head), head_dim, 0.f);
  }
  for_each_token(v_pool, block_table, chunk.begin, chunk.end, block_size, token_stride, [&](int64_t t, const T* values) {
    for (int64_t head = 0; head < heads; ++head)
      axpy(layout.acc(partial, head), scores[head * tokens + t - chunk.begin], values + head / group * head_dim,
           head_dim);
  });
}

// out[head] = the softmax-weighted values over all of a sequence's chunks' partials.
template <typename T>
void merge_chunks(float* const* partials, int64_t num_chunks, int64_t heads, const PartialLayout& layout, T* out) {
  const int64_t head_dim = layout.head_dim;
  std::vector<float> acc(head_dim);
  for (int64_t head = 0; head < heads; ++head) {
    float largest = -INFINITY, sum = 0.f;
    for (int64_t c = 0; c < num_chunks; ++c) largest = std::max(largest, layout.max(partials[c], head));
    std::fill(acc.begin(), acc.end(), 0.f);
    for (int64_t c = 0; c < num_chunks; ++c) {
      const float weight = std::exp(layout.max(partials[c], head) - largest);
      sum += weight * layout.sum(partials[c], head);
      axpy(acc.data(), weight, layout.acc(partials[c], head), head_dim);
    }
    for (int64_t d = 0; d < head_dim; ++d) out[head * head_dim + d] = static_cast<T>(acc[d] / sum);
  }
}

// Each sequence's context in chunks of whole blocks: one chunk per sequence unless that leaves threads idle.
std::vector<Chunk> split_contexts(const int64_t* lens, int64_t num_seqs, int64_t block_size, int64_t threads) {
  int64_t total = 0;
  for (int64_t s = 0; s < num_seqs; ++s) total += lens[s];
  const int64_t wanted = threads > 1 ? threads * kChunksPerThread : 1;
  int64_t chunk_tokens = std::max(kMinChunkTokens, (total + wanted - 1) / wanted);
  chunk_tokens = (chunk_tokens + block_size - 1) / block_size * block_size;
  std::vector<Chunk> chunks;
  for (int64_t s = 0; s < num_seqs; ++s)
    for (int64_t begin = 0; begin < lens[s]; begin += chunk_tokens)
      chunks.push_back({s, begin, std::min(lens[s], begin + chunk_tokens)});
  return chunks;
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
  int64_t total_tokens = 0;
  for (int64_t s = 0; s < num_seqs; ++s) {
    TORCH_CHECK(len[s] >= 1, "paged_decode_attention: every sequence needs a context");
    total_tokens += len[s];
  }
  // A few short sequences are cheaper on one thread than waking the others.
  const bool parallel = total_tokens * num_heads >= kMinParallelKeys;
  const std::vector<Chunk> chunks = split_contexts(len, num_seqs, block_size, parallel ? at::get_num_threads() : 1);
  const int64_t num_chunks = static_cast<int64_t>(chunks.size());
  const PartialLayout layout{head_dim};
  std::vector<float> partials(num_chunks * num_heads * layout.stride());
  PAGEDLLM_DISPATCH_FLOAT_TYPES(q.scalar_type(), "paged_decode_attention", [&] {
    const scalar_t* qp = queries.const_data_ptr<scalar_t>();
    const scalar_t* kp = k_pool.const_data_ptr<scalar_t>();
    const scalar_t* vp = v_pool.const_data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, num_chunks, parallel ? 1 : num_chunks, [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) {
        const Chunk& chunk = chunks[c];
        attend_chunk(qp + chunk.seq * num_heads * head_dim, kp, vp, table + chunk.seq * max_blocks, chunk, block_size,
                     num_kv_heads, group, static_cast<float>(scale), layout,
                     partials.data() + c * num_heads * layout.stride());
      }
    });
    std::vector<float*> seq_partials;
    for (int64_t first = 0, next = 0; first < num_chunks; first = next) {
      seq_partials.clear();
      for (next = first; next < num_chunks && chunks[next].seq == chunks[first].seq; ++next)
        seq_partials.push_back(partials.data() + next * num_heads * layout.stride());
      merge_chunks(seq_partials.data(), next - first, num_heads, layout, op + chunks[first].seq * num_heads * head_dim);
    }
  });
  return out;
}

}  // namespace pagedllm
