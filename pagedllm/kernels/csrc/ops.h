// The CPU kernels' entry points, registered as torch.ops.pagedllm.* by ops.cpp.
#pragma once

#include <ATen/ATen.h>

namespace pagedllm {
at::Tensor int4_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale_min, int64_t group_size);
at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scales);
at::Tensor paged_decode_attention(const at::Tensor& q, const at::Tensor& k_pool, const at::Tensor& v_pool,
                                  const at::Tensor& block_tables, const at::Tensor& seq_lens, double scale);
at::Tensor prefill_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                             at::IntArrayRef query_starts, at::IntArrayRef key_starts, at::IntArrayRef key_lens,
                             double scale);
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps);
at::Tensor add_rms_norm_(at::Tensor& residual, const at::Tensor& x, const at::Tensor& weight, double eps);
void rotate_heads_(at::Tensor& x, const at::Tensor& positions, const at::Tensor& cos, const at::Tensor& signed_sin,
                   int64_t rotated_heads);
void write_kv_(const at::Tensor& k, const at::Tensor& v, at::Tensor& k_pool, at::Tensor& v_pool,
               const at::Tensor& slots);
at::Tensor silu_and_mul(const at::Tensor& gate_up);
// Group size codes of fused_decode's weight kinds that have no int4 groups (Python reads them through
// fused_decode_weight_kinds, so they are defined here alone).
constexpr int64_t kDense = -1, kInt8 = 0;

at::Tensor fused_decode(const at::Tensor& hidden, const at::Tensor& positions, const at::Tensor& cos,
                         const at::Tensor& signed_sin, at::TensorList norms, at::TensorList weights,
                         at::TensorList scales, at::IntArrayRef group_sizes,
                         const c10::List<std::optional<at::Tensor>>& biases, at::TensorList k_pools,
                         at::TensorList v_pools, const at::Tensor& slots, const at::Tensor& block_tables,
                         const at::Tensor& seq_lens, int64_t num_heads, int64_t num_kv_heads, double eps,
                         double scale, int64_t dense_rows);
}  // namespace pagedllm
