// Every decoder layer of an all-decode step in one call: the same kernels the Python layers call, in the same
// order, without a Python frame and a dispatcher round trip per op (at batch 1 those cost as much as the math).
#include "ops.h"

namespace pagedllm {
namespace {

// Linears per layer, in the order the weight lists hold them.
constexpr int64_t kQkv = 0, kOut = 1, kGateUp = 2, kDown = 3, kLinearsPerLayer = 4;

// A dense weight multiplies x padded to dense_rows rows, as the Python layers' dense_linear pads them.
at::Tensor linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scales, int64_t group_size,
                  const std::optional<at::Tensor>& bias, int64_t dense_rows) {
  if (group_size == kDense) {
    const int64_t rows = x.size(0);
    if (dense_rows == rows) return at::linear(x, weight, bias);
    return at::linear(at::constant_pad_nd(x, {0, 0, 0, dense_rows - rows}), weight, bias).narrow(0, 0, rows);
  }
  const at::Tensor y = group_size == kInt8 ? int8_linear(x, weight, scales) : int4_linear(x, weight, scales, group_size);
  return bias.has_value() ? y + *bias : y;
}

}  // namespace

at::Tensor fused_decode(const at::Tensor& hidden, const at::Tensor& positions, const at::Tensor& cos,
                         const at::Tensor& signed_sin, at::TensorList norms, at::TensorList weights,
                         at::TensorList scales, at::IntArrayRef group_sizes,
                         const c10::List<std::optional<at::Tensor>>& biases, at::TensorList k_pools,
                         at::TensorList v_pools, const at::Tensor& slots, const at::Tensor& block_tables,
                         const at::Tensor& seq_lens, int64_t num_heads, int64_t num_kv_heads, double eps,
                         double scale, int64_t dense_rows) {
  const int64_t num_layers = static_cast<int64_t>(k_pools.size());
  const int64_t num_linears = num_layers * kLinearsPerLayer;
  TORCH_CHECK(hidden.dim() == 2 && num_layers > 0, "fused_decode: hidden [tokens, hidden_size] and one pool per layer");
  TORCH_CHECK(static_cast<int64_t>(v_pools.size()) == num_layers && static_cast<int64_t>(norms.size()) == 2 * num_layers,
              "fused_decode: two norms and a K and a V pool per layer");
  TORCH_CHECK(static_cast<int64_t>(weights.size()) == num_linears && static_cast<int64_t>(scales.size()) == num_linears &&
                  static_cast<int64_t>(group_sizes.size()) == num_linears &&
                  static_cast<int64_t>(biases.size()) == num_linears,
              "fused_decode: a weight, scales, group size and bias per linear, four linears per layer");
  TORCH_CHECK(block_tables.size(0) == hidden.size(0) && seq_lens.size(0) == hidden.size(0),
              "fused_decode: one block table and context length per token");
  TORCH_CHECK(dense_rows >= hidden.size(0), "fused_decode: dense_rows below the tokens");
  const int64_t tokens = hidden.size(0), head_dim = k_pools[0].size(3);
  at::Tensor residual = hidden.clone();
  at::Tensor x;
  for (int64_t layer = 0; layer < num_layers; ++layer) {
    const int64_t first = layer * kLinearsPerLayer;
    const auto project = [&](const at::Tensor& input, int64_t which) {
      const int64_t i = first + which;
      return linear(input, weights[i], scales[i], group_sizes[i], biases.get(i), dense_rows);
    };
    x = layer == 0 ? rms_norm(residual, norms[0], eps) : add_rms_norm_(residual, x, norms[2 * layer], eps);
    at::Tensor heads = project(x, kQkv).view({tokens, num_heads + 2 * num_kv_heads, head_dim});
    rotate_heads_(heads, positions, cos, signed_sin, num_heads + num_kv_heads);
    at::Tensor k_pool = k_pools[layer], v_pool = v_pools[layer];
    write_kv_(heads.narrow(1, num_heads, num_kv_heads), heads.narrow(1, num_heads + num_kv_heads, num_kv_heads),
              k_pool, v_pool, slots);
    const at::Tensor attended =
        paged_decode_attention(heads.narrow(1, 0, num_heads), k_pool, v_pool, block_tables, seq_lens, scale);
    x = add_rms_norm_(residual, project(attended.flatten(1), kOut), norms[2 * layer + 1], eps);
    x = project(silu_and_mul(project(x, kGateUp)), kDown);
  }
  return x + residual;
}

}  // namespace pagedllm
