// The CPU kernels' entry points, registered as torch.ops.pagedllm.* by ops.cpp.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>

namespace pagedllm {
// Which K/V head each query head of an attention call reads: query head h reads K/V head
// (h + query_offset) / queries_per_kv. One process holds whole groups (offset 0, num_heads / num_kv_heads queries per
// K/V head); a tensor-parallel rank holding an even share of the query heads may start and end inside a group, and
// holds every K/V head its query heads read.
struct HeadGroups {
  int64_t num_heads, queries_per_kv, query_offset;

  int64_t kv_head(int64_t head) const { return (head + query_offset) / queries_per_kv; }
  // The query heads [first_query(j), end_query(j)) that read K/V head j.
  int64_t first_query(int64_t kv_head) const { return std::max<int64_t>(0, kv_head * queries_per_kv - query_offset); }
  int64_t end_query(int64_t kv_head) const {
    return std::min(num_heads, (kv_head + 1) * queries_per_kv - query_offset);
  }
};
// x [tokens, heads, head_dim] where each token's heads lie contiguous (q, k and v split from one projection's output,
// tokens a row of all heads apart): read in place; else a contiguous copy.
inline at::Tensor heads_in_token_rows(const at::Tensor& x) {
  return x.stride(2) == 1 && x.stride(1) == x.size(2) ? x : x.contiguous();
}
// The groups of num_heads query heads over num_kv_heads K/V heads (queries_per_kv 0: num_heads / num_kv_heads);
// fails, naming `op`, unless every K/V head is read by at least one query head.
HeadGroups head_groups(int64_t num_heads, int64_t num_kv_heads, int64_t queries_per_kv, int64_t query_offset,
                       const char* op);

at::Tensor int4_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale_min, int64_t group_size);
at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scales);
at::Tensor gguf_linear(const at::Tensor& x, const at::Tensor& blocks, int64_t ggml_type);
at::Tensor gguf_dequantize(const at::Tensor& blocks, int64_t ggml_type, at::ScalarType dtype);
at::Tensor kquant_tiles(const at::Tensor& blocks, int64_t ggml_type);
at::Tensor kquant_linear(const at::Tensor& x, const at::Tensor& tiles, int64_t ggml_type);
at::Tensor kquant_dequantize(const at::Tensor& tiles, int64_t ggml_type, at::ScalarType dtype);
at::Tensor q8_0_tiles_linear(const at::Tensor& x, const at::Tensor& tiles, const at::Tensor& scales,
                             int64_t out_features);
at::Tensor q8_0_tiles_dequantize(const at::Tensor& tiles, const at::Tensor& scales, int64_t out_features,
                                 at::ScalarType dtype);
at::Tensor q8_0_tiles_rows(const at::Tensor& tiles, const at::Tensor& scales, int64_t out_features,
                           const at::Tensor& index, at::ScalarType dtype);
at::Tensor paged_decode_attention(const at::Tensor& q, const at::Tensor& k_pool, const at::Tensor& v_pool,
                                  const at::Tensor& block_tables, const at::Tensor& seq_lens, double scale,
                                  int64_t sliding_window, int64_t queries_per_kv, int64_t query_offset);
at::Tensor prefill_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                             at::IntArrayRef query_starts, at::IntArrayRef key_starts, at::IntArrayRef key_lens,
                             double scale, int64_t sliding_window, int64_t queries_per_kv, int64_t query_offset);
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps);
at::Tensor add_rms_norm_(at::Tensor& residual, const at::Tensor& x, const at::Tensor& weight, double eps);
void rotate_heads_(at::Tensor& x, const at::Tensor& positions, const at::Tensor& cos, const at::Tensor& sin,
                   int64_t rotated_heads);
void rms_norm_rotate_heads_(at::Tensor& x, const at::Tensor& positions, const at::Tensor& cos, const at::Tensor& sin,
                            const at::Tensor& query_weight, const at::Tensor& key_weight, double eps,
                            int64_t query_heads, int64_t key_heads);
void write_kv_(const at::Tensor& k, const at::Tensor& v, at::Tensor& k_pool, at::Tensor& v_pool,
               const at::Tensor& slots);
at::Tensor silu_and_mul(const at::Tensor& gate_up);
at::Tensor gelu_tanh_and_mul(const at::Tensor& gate_up);
// The collectives over distributed/shared_memory.py's segment (a uint8 tensor over all of it).
void shared_memory_all_reduce_(at::Tensor& x, const at::Tensor& segment, int64_t rank, int64_t world_size,
                               double timeout_s);
at::Tensor shared_memory_all_gather(const at::Tensor& x, const at::Tensor& segment, int64_t rank, int64_t world_size,
                                    double timeout_s);
// Kinds of fused_decode's weight parts (Python reads them through fused_decode_weight_kinds, so they are defined
// here alone); a part's kind argument is its int4 group size, its GGUF type (of blocks or K-quant tiles) or its
// Q8_0 tiles' out_features, else unused.
constexpr int64_t kDense = 0, kInt8 = 1, kInt4 = 2, kGGUF = 3, kKQuantTiles = 4, kQ8_0Tiles = 5;

at::Tensor fused_decode(const at::Tensor& hidden, const at::Tensor& positions, at::TensorList cos,
                         at::TensorList sin, at::TensorList norms, at::TensorList weights,
                         at::TensorList scales, at::IntArrayRef kinds, at::IntArrayRef kind_args,
                         at::IntArrayRef parts, const c10::List<std::optional<at::Tensor>>& biases,
                         at::TensorList k_pools, at::TensorList v_pools, at::TensorList slots,
                         at::TensorList block_tables, at::TensorList seq_lens, at::IntArrayRef sliding_windows,
                         c10::string_view layer_type, int64_t num_heads, int64_t num_kv_heads, double eps,
                         double scale, int64_t dense_rows, int64_t queries_per_kv, int64_t query_offset,
                         const std::optional<at::Tensor>& segment, int64_t rank, int64_t world_size, double timeout_s);
}  // namespace pagedllm
