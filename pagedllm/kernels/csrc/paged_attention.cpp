// Decode attention over a paged KV cache: one query token per sequence, keys and values read in place from
// the block pools through each sequence's block table (nothing is gathered into a new tensor).
//
// A task attends one chunk (whole blocks) of one sequence's context with every query head: a token's entries for
// all kv heads are contiguous in the pool, so each block is one sequential read. Where a batch has too few
// sequences to keep every thread busy, contexts are cut into several chunks whose softmax partials are merged
// afterwards, as flash-decoding does. Threads take the next chunk when done: contexts differ in length, and the
// batch comes longest first. With a sliding window of w, a sequence of length L attends its last min(L, w) tokens
// only: the blocks before them are never read (their block-table entries may name freed blocks). bfloat16 pools
// take bfloat16 dot products where the CPU has them (attend_chunk_bf16), which leaves a batch's decode attention
// bound by reading the cache from memory.
#include "ops.h"
#include "parallel.h"
#include "vec.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

namespace pagedllm {
namespace {

constexpr int64_t kMinParallelKeys = 1 << 11;  // (query head, key) pairs below which one thread does it all
constexpr int64_t kChunksPerThread = 2;  // chunks a thread gets, at the least, where contexts are cut
constexpr int64_t kMinChunkTokens = 32;

// Tokens [begin, end) of one sequence's context.
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
  for (int64_t start = begin; start < end; start = (start / block_size + 1) * block_size) {
    const int64_t b = start / block_size, offset = start % block_size;
    const int64_t tokens = std::min(block_size - offset, end - start);
    // The next block lies anywhere in the pool, out of the hardware prefetcher's sight: each token asks for the
    // same token of the next block.
    const T* next = (b + 1) * block_size < end ? block_start(b + 1) : nullptr;
    const T* entry = block_start(b) + offset * token_stride;
    for (int64_t i = 0; i < tokens; ++i, entry += token_stride) {
      if (next != nullptr) prefetch_token(next + i * token_stride, token_stride);
      fn(start + i, entry);
    }
  }
}

template <typename T>
void attend_chunk(const T* q, const T* k_pool, const T* v_pool, const int64_t* block_table, const Chunk& chunk,
                  int64_t block_size, int64_t num_kv_heads, const HeadGroups& groups, float scale,
                  const PartialLayout& layout, float* partial) {
  // q: the sequence's query heads, [groups.num_heads, head_dim]; head h reads kv head groups.kv_head(h).
  const int64_t head_dim = layout.head_dim, heads = groups.num_heads, tokens = chunk.end - chunk.begin;
  thread_local std::vector<float> queries, scores;
  queries.resize(heads * head_dim);
  scores.resize(heads * tokens);
  for (int64_t i = 0; i < heads * head_dim; ++i) queries[i] = to_float(q[i]) * scale;
  const int64_t token_stride = num_kv_heads * head_dim;
  for_each_token(k_pool, block_table, chunk.begin, chunk.end, block_size, token_stride, [&](int64_t t, const T* keys) {
    for (int64_t head = 0; head < heads; ++head)
      scores[head * tokens + t - chunk.begin] =
          dot(queries.data() + head * head_dim, keys + groups.kv_head(head) * head_dim, head_dim);
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
      axpy(layout.acc(partial, head), scores[head * tokens + t - chunk.begin],
           values + groups.kv_head(head) * head_dim, head_dim);
  });
}

#ifdef PAGEDLLM_AVX512_BF16
// Up to this many tokens are scored at once: one 512-bit vector of scores per query head.
constexpr int64_t kTokenTile = 16;

// Lane i of the result is the sum of v[i]'s 16 lanes: three rounds of adding interleaved halves, 45 instructions
// for what 16 horizontal sums would take over 100.
inline __m512 sum_lanes16(const __m512* v) {
  __m512 pairs[8], quads[4];
  for (int i = 0; i < 8; ++i)  // each 128-bit block: [a0+a2, b0+b2, a1+a3, b1+b3] of v[2i] = a, v[2i+1] = b
    pairs[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < 4; ++i) {  // each 128-bit block: one partial sum of each of v[4i..4i+3], in order
    const __m512d a = _mm512_castps_pd(pairs[2 * i]), b = _mm512_castps_pd(pairs[2 * i + 1]);
    quads[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
  }
  // Add up the four 128-bit blocks: [0, 2] + [1, 3] of two vectors, twice.
  const __m512 low = _mm512_add_ps(_mm512_shuffle_f32x4(quads[0], quads[1], 0x88),
                                   _mm512_shuffle_f32x4(quads[0], quads[1], 0xDD));
  const __m512 high = _mm512_add_ps(_mm512_shuffle_f32x4(quads[2], quads[3], 0x88),
                                    _mm512_shuffle_f32x4(quads[2], quads[3], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(low, high, 0x88), _mm512_shuffle_f32x4(low, high, 0xDD));
}

// Where each token of [begin, end) keeps its entries for all kv heads, block by block.
inline void token_entries(const c10::BFloat16* pool, const int64_t* block_table, int64_t begin, int64_t end,
                          int64_t block_size, int64_t token_stride, const c10::BFloat16** entries) {
  for (int64_t start = begin; start < end; start = (start / block_size + 1) * block_size) {
    const int64_t block_end = std::min(end, (start / block_size + 1) * block_size);
    const c10::BFloat16* entry =
        pool + (block_table[start / block_size] * block_size + start % block_size) * token_stride;
    for (int64_t t = start; t < block_end; ++t, entry += token_stride) entries[t - begin] = entry;
  }
}

inline void prefetch_entries(const c10::BFloat16* const* entries, int64_t n, int64_t token_stride) {
  for (int64_t i = 0; i < n; ++i) prefetch_token(entries[i], token_stride);
}

// attend_chunk for bfloat16 pools with head_dim = 32 * C, on bfloat16 dot products: each query head scores 16
// tokens at a time, one vector of partial products per token summed by sum_lanes16; the values are taken two
// tokens at a time, their entries interleaved so that one dot product adds both tokens' weighted values (the
// weights rounded to bfloat16, as the prefill kernel and PyTorch's flash attention round them).
template <int C>
void attend_chunk_bf16(const c10::BFloat16* q, const c10::BFloat16* k_pool, const c10::BFloat16* v_pool,
                       const int64_t* block_table, const Chunk& chunk, int64_t block_size, int64_t num_kv_heads,
                       const HeadGroups& groups, float scale, const PartialLayout& layout, float* partial) {
  constexpr int64_t head_dim = 32 * C;
  const int64_t heads = groups.num_heads, tokens = chunk.end - chunk.begin;
  const int64_t padded = (tokens + kTokenTile - 1) / kTokenTile * kTokenTile;
  const int64_t token_stride = num_kv_heads * head_dim;
  thread_local std::vector<const c10::BFloat16*> keys, values;
  thread_local std::vector<float> scores;
  thread_local std::vector<uint16_t> weights;
  keys.resize(tokens);
  values.resize(tokens);
  scores.resize(heads * padded);
  weights.resize(padded + 1);
  token_entries(k_pool, block_table, chunk.begin, chunk.end, block_size, token_stride, keys.data());
  token_entries(v_pool, block_table, chunk.begin, chunk.end, block_size, token_stride, values.data());
  const __m512 scale_v = _mm512_set1_ps(scale);
  for (int64_t tile = 0; tile < tokens; tile += kTokenTile) {
    const int64_t n = std::min(kTokenTile, tokens - tile);
    // The next tile's keys, and this tile's values for the second pass, are read while this tile is scored.
    if (tile + kTokenTile < tokens)
      prefetch_entries(keys.data() + tile + kTokenTile, std::min(kTokenTile, tokens - tile - kTokenTile), token_stride);
    prefetch_entries(values.data() + tile, n, token_stride);
    for (int64_t head = 0; head < heads; ++head) {
      const int64_t offset = groups.kv_head(head) * head_dim;
      __m512bh query[C];
      for (int c = 0; c < C; ++c) query[c] = (__m512bh)_mm512_loadu_si512(q + head * head_dim + 32 * c);
      __m512 products[kTokenTile];
      for (int64_t i = 0; i < kTokenTile; ++i) {
        products[i] = _mm512_setzero_ps();
        if (i >= n) continue;
        const c10::BFloat16* key = keys[tile + i] + offset;
        for (int c = 0; c < C; ++c)
          products[i] = _mm512_dpbf16_ps(products[i], query[c], (__m512bh)_mm512_loadu_si512(key + 32 * c));
      }
      _mm512_storeu_ps(scores.data() + head * padded + tile, _mm512_mul_ps(sum_lanes16(products), scale_v));
    }
  }
  // Lanes 4k..4k+3 of the low (high) accumulator hold dims 8k..8k+3 (8k+4..8k+7) of each 32: back in order.
  const __m512i low_dims = _mm512_set_epi32(23, 22, 21, 20, 7, 6, 5, 4, 19, 18, 17, 16, 3, 2, 1, 0);
  const __m512i high_dims = _mm512_set_epi32(31, 30, 29, 28, 15, 14, 13, 12, 27, 26, 25, 24, 11, 10, 9, 8);
  for (int64_t head = 0; head < heads; ++head) {
    float* s = scores.data() + head * padded;
    const float largest = max_of(s, tokens);
    layout.max(partial, head) = largest;
    layout.sum(partial, head) = exp_shifted_sum(s, tokens, largest);
    for (int64_t i = 0; i < padded; i += 16)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(weights.data() + i),
                          (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(s + i)));
    weights[tokens] = 0;  // the partner of an odd last token
    const int64_t offset = groups.kv_head(head) * head_dim;
    __m512 acc[2 * C];
    for (int c = 0; c < 2 * C; ++c) acc[c] = _mm512_setzero_ps();
    for (int64_t t = 0; t < tokens; t += 2) {
      uint32_t pair;
      std::memcpy(&pair, weights.data() + t, sizeof(pair));
      const __m512bh weight = (__m512bh)_mm512_set1_epi32(static_cast<int>(pair));
      const c10::BFloat16* first = values[t] + offset;
      const c10::BFloat16* second = t + 1 < tokens ? values[t + 1] + offset : nullptr;
      for (int c = 0; c < C; ++c) {
        const __m512i a = _mm512_loadu_si512(first + 32 * c);
        const __m512i b = second != nullptr ? _mm512_loadu_si512(second + 32 * c) : _mm512_setzero_si512();
        acc[2 * c] = _mm512_dpbf16_ps(acc[2 * c], (__m512bh)_mm512_unpacklo_epi16(a, b), weight);
        acc[2 * c + 1] = _mm512_dpbf16_ps(acc[2 * c + 1], (__m512bh)_mm512_unpackhi_epi16(a, b), weight);
      }
    }
    float* out = layout.acc(partial, head);
    for (int c = 0; c < C; ++c) {
      _mm512_storeu_ps(out + 32 * c, _mm512_permutex2var_ps(acc[2 * c], low_dims, acc[2 * c + 1]));
      _mm512_storeu_ps(out + 32 * c + 16, _mm512_permutex2var_ps(acc[2 * c], high_dims, acc[2 * c + 1]));
    }
  }
}
#endif

// The chunk's partials: on bfloat16 dot products where the CPU has them and head_dim is 32, 64, 96 or 128.
template <typename T>
void attend(const T* q, const T* k_pool, const T* v_pool, const int64_t* block_table, const Chunk& chunk,
            int64_t block_size, int64_t num_kv_heads, const HeadGroups& groups, float scale,
            const PartialLayout& layout, float* partial) {
#ifdef PAGEDLLM_AVX512_BF16
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    const auto run = [&](auto dim32) {
      attend_chunk_bf16<decltype(dim32)::value>(q, k_pool, v_pool, block_table, chunk, block_size, num_kv_heads,
                                                 groups, scale, layout, partial);
    };
    switch (layout.head_dim) {
      case 32: return run(std::integral_constant<int, 1>{});
      case 64: return run(std::integral_constant<int, 2>{});
      case 96: return run(std::integral_constant<int, 3>{});
      case 128: return run(std::integral_constant<int, 4>{});
      default: break;
    }
  }
#endif
  attend_chunk(q, k_pool, v_pool, block_table, chunk, block_size, num_kv_heads, groups, scale, layout, partial);
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

// Each sequence's visible context (its last `window` tokens; all where window is 0) in chunks of whole blocks' size,
// about `threads` * kChunksPerThread of them. A sequence's chunks depend on its own length and the thread count only,
// never on the other sequences of the batch or on whether the step runs in parallel: the chunks set the order of the
// float sums, so a row attends bit for bit the same alone or beside others (a speculative step's verification rows
// give the tokens one-row decodes would).
std::vector<Chunk> split_contexts(const int64_t* lens, int64_t num_seqs, int64_t block_size, int64_t threads,
                                  int64_t window) {
  const int64_t wanted = threads > 1 ? threads * kChunksPerThread : 1;
  std::vector<Chunk> chunks;
  for (int64_t s = 0; s < num_seqs; ++s) {
    const int64_t first = window > 0 ? std::max<int64_t>(0, lens[s] - window) : 0;
    int64_t chunk_tokens = std::max(kMinChunkTokens, (lens[s] - first + wanted - 1) / wanted);
    chunk_tokens = (chunk_tokens + block_size - 1) / block_size * block_size;
    for (int64_t begin = first; begin < lens[s]; begin += chunk_tokens)
      chunks.push_back({s, begin, std::min(lens[s], begin + chunk_tokens)});
  }
  return chunks;
}

}  // namespace

HeadGroups head_groups(int64_t num_heads, int64_t num_kv_heads, int64_t queries_per_kv, int64_t query_offset,
                       const char* op) {
  TORCH_CHECK(num_heads >= 1 && num_kv_heads >= 1 && queries_per_kv >= 0, op, ": head counts");
  if (queries_per_kv == 0) {
    TORCH_CHECK(num_heads % num_kv_heads == 0 && query_offset == 0, op, ": ", num_heads,
                " query heads do not read ", num_kv_heads, " K/V heads in whole groups");
    queries_per_kv = num_heads / num_kv_heads;
  }
  const HeadGroups groups{num_heads, queries_per_kv, query_offset};
  TORCH_CHECK(query_offset >= 0 && query_offset < queries_per_kv && groups.kv_head(num_heads - 1) == num_kv_heads - 1,
              op, ": ", num_heads, " query heads from ", query_offset, " in groups of ", queries_per_kv,
              " do not read exactly ", num_kv_heads, " K/V heads");
  return groups;
}

at::Tensor paged_decode_attention(const at::Tensor& q, const at::Tensor& k_pool, const at::Tensor& v_pool,
                                  const at::Tensor& block_tables, const at::Tensor& seq_lens, double scale,
                                  int64_t sliding_window, int64_t queries_per_kv, int64_t query_offset) {
  TORCH_CHECK(q.dim() == 3 && k_pool.dim() == 4, "paged_decode_attention: q [seqs, heads, dim], pools 4-D");
  TORCH_CHECK(q.scalar_type() == k_pool.scalar_type() && k_pool.scalar_type() == v_pool.scalar_type(),
              "paged_decode_attention: q and the pools must share a dtype");
  TORCH_CHECK(k_pool.is_contiguous() && v_pool.is_contiguous(), "paged_decode_attention: pools must be contiguous");
  const int64_t num_seqs = q.size(0), num_heads = q.size(1), head_dim = q.size(2);
  const int64_t block_size = k_pool.size(1), num_kv_heads = k_pool.size(2);
  TORCH_CHECK(k_pool.size(3) == head_dim, "paged_decode_attention: head shapes");
  const HeadGroups groups =
      head_groups(num_heads, num_kv_heads, queries_per_kv, query_offset, "paged_decode_attention");
  const at::Tensor queries = q.contiguous();
  const at::Tensor tables = block_tables.to(at::kLong).contiguous();
  const at::Tensor lens = seq_lens.to(at::kLong).contiguous();
  at::Tensor out = at::empty_like(queries);
  const int64_t max_blocks = tables.size(1);
  const int64_t* table = tables.const_data_ptr<int64_t>();
  const int64_t* len = lens.const_data_ptr<int64_t>();
  TORCH_CHECK(sliding_window >= 0, "paged_decode_attention: sliding_window must be >= 0 (0: none)");
  int64_t total_tokens = 0;
  for (int64_t s = 0; s < num_seqs; ++s) {
    TORCH_CHECK(len[s] >= 1, "paged_decode_attention: every sequence needs a context");
    total_tokens += sliding_window > 0 ? std::min(len[s], sliding_window) : len[s];
  }
  // A few short sequences are cheaper on one thread than waking the others.
  const bool parallel = total_tokens * num_heads >= kMinParallelKeys;
  const std::vector<Chunk> chunks = split_contexts(len, num_seqs, block_size, at::get_num_threads(), sliding_window);
  const int64_t num_chunks = static_cast<int64_t>(chunks.size());
  const PartialLayout layout{head_dim};
  std::vector<float> partials(num_chunks * num_heads * layout.stride());
  PAGEDLLM_DISPATCH_FLOAT_TYPES(q.scalar_type(), "paged_decode_attention", [&] {
    const scalar_t* qp = queries.const_data_ptr<scalar_t>();
    const scalar_t* kp = k_pool.const_data_ptr<scalar_t>();
    const scalar_t* vp = v_pool.const_data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const auto attend_one = [&](int64_t c) {
      const Chunk& chunk = chunks[c];
      attend(qp + chunk.seq * num_heads * head_dim, kp, vp, table + chunk.seq * max_blocks, chunk, block_size,
             num_kv_heads, groups, static_cast<float>(scale), layout,
             partials.data() + c * num_heads * layout.stride());
    };
    if (parallel)
      run_balanced(num_chunks, attend_one);
    else
      for (int64_t c = 0; c < num_chunks; ++c) attend_one(c);
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
