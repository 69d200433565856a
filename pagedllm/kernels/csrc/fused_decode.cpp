// Every decoder layer of an all-decode step in one call: the same kernels the Python layers call, in the same
// order, without a Python frame and a dispatcher round trip per op (at batch 1 those cost as much as the math).
// On a tensor-parallel rank the weights and heads are the rank's shard, and the outputs of o_proj and down_proj
// (row-parallel: partial sums) are summed over the ranks through the shared-memory segment, as
// RowParallelLinear.forward sums them.
#include "ops.h"

namespace pagedllm {
namespace {

// Linears per layer, in the order the parts counts hold them.
constexpr int64_t kQkv = 0, kOut = 1, kGateUp = 2, kDown = 3, kLinearsPerLayer = 4;
// Norm weights per layer, in the order the norm list holds them.
constexpr int64_t kLlamaNorms = 2;   // input, post-attention
constexpr int64_t kGemma3Norms = 6;  // input, q, k, post-attention, pre-feedforward, post-feedforward

// A dense weight multiplies x padded to dense_rows rows, as the Python layers' dense_linear pads them.
at::Tensor linear_part(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scales, int64_t kind,
                       int64_t kind_arg, const std::optional<at::Tensor>& bias, int64_t dense_rows) {
  if (kind == kDense) {
    const int64_t rows = x.size(0);
    if (dense_rows == rows) return at::linear(x, weight, bias);
    return at::linear(at::constant_pad_nd(x, {0, 0, 0, dense_rows - rows}), weight, bias).narrow(0, 0, rows);
  }
  at::Tensor y;
  if (kind == kInt8) {
    y = int8_linear(x, weight, scales);
  } else if (kind == kInt4) {
    y = int4_linear(x, weight, scales, kind_arg);
  } else if (kind == kKQuantTiles) {
    y = kquant_linear(x, weight, kind_arg);
  } else if (kind == kQ8_0Tiles) {
    y = q8_0_tiles_linear(x, weight, scales, kind_arg);
  } else {
    TORCH_CHECK(kind == kGGUF, "fused_decode: unknown weight kind ", kind);
    y = gguf_linear(x, weight, kind_arg);
  }
  return bias.has_value() ? y + *bias : y;
}

// The weights of one decode step: each linear is one part or several (fused projections stored in different
// kinds), whose outputs are joined in order as RowStackedLinear joins them.
struct Linears {
  at::TensorList weights, scales;
  at::IntArrayRef kinds, kind_args, parts;
  const c10::List<std::optional<at::Tensor>>& biases;
  std::vector<int64_t> first_part;  // per linear, its first part's index
  int64_t dense_rows;

  at::Tensor operator()(const at::Tensor& x, int64_t linear) const {
    const int64_t first = first_part[linear], count = parts[linear];
    const auto part = [&](int64_t i) {
      return linear_part(x, weights[i], scales[i], kinds[i], kind_args[i], biases.get(i), dense_rows);
    };
    if (count == 1) return part(first);
    std::vector<at::Tensor> outputs;
    outputs.reserve(count);
    for (int64_t i = first; i < first + count; ++i) outputs.push_back(part(i));
    return at::cat(outputs, -1);
  }
};

// One layer's attention inputs and K/V cache, as its KV-cache group holds them.
struct LayerAttention {
  const at::Tensor &cos, &sin, &slots, &block_tables, &seq_lens;
  at::Tensor k_pool, v_pool;
  int64_t sliding_window;
};

struct Shape {
  int64_t tokens, num_heads, num_kv_heads, head_dim;
  double eps, scale;
  int64_t queries_per_kv, query_offset;  // which K/V head each query head reads (HeadGroups)
};

// The sum over the tensor-parallel ranks of a row-parallel linear's output, in place; nothing with one rank.
struct RowParallelSum {
  const std::optional<at::Tensor>& segment;
  int64_t rank, world_size;
  double timeout_s;

  at::Tensor operator()(at::Tensor x) const {
    if (segment.has_value()) shared_memory_all_reduce_(x, *segment, rank, world_size, timeout_s);
    return x;
  }
};

// Writes the new K/V and attends: [tokens, num_heads * head_dim].
at::Tensor attend(const at::Tensor& heads, const at::Tensor& positions, LayerAttention& a, const Shape& s) {
  const int64_t rotated = s.num_heads + s.num_kv_heads;
  at::Tensor rotating = heads;
  rotate_heads_(rotating, positions, a.cos, a.sin, rotated);
  write_kv_(heads.narrow(1, s.num_heads, s.num_kv_heads), heads.narrow(1, rotated, s.num_kv_heads), a.k_pool,
            a.v_pool, a.slots);
  return paged_decode_attention(heads.narrow(1, 0, s.num_heads), a.k_pool, a.v_pool, a.block_tables, a.seq_lens,
                                s.scale, a.sliding_window, s.queries_per_kv, s.query_offset)
      .flatten(1);
}

// The first layer normalizes the embeddings; each later one adds the previous layer's output `x` to the residual
// stream first.
at::Tensor input_norm(at::Tensor& residual, const at::Tensor& x, const at::Tensor& weight, double eps) {
  return x.defined() ? add_rms_norm_(residual, x, weight, eps) : rms_norm(residual, weight, eps);
}

// LlamaDecoderLayer.forward; `x` is the previous layer's MLP output (undefined before the first layer).
at::Tensor llama_layer(at::Tensor& residual, const at::Tensor& x, const at::Tensor& positions, at::TensorList norms,
                       const Linears& project, int64_t first_linear, LayerAttention& a, const Shape& s,
                       const RowParallelSum& sum) {
  const at::Tensor normed = input_norm(residual, x, norms[0], s.eps);
  const at::Tensor heads =
      project(normed, first_linear + kQkv).view({s.tokens, s.num_heads + 2 * s.num_kv_heads, s.head_dim});
  const at::Tensor attended = attend(heads, positions, a, s);
  const at::Tensor h = add_rms_norm_(residual, sum(project(attended, first_linear + kOut)), norms[1], s.eps);
  return sum(project(silu_and_mul(project(h, first_linear + kGateUp)), first_linear + kDown));
}

// Gemma3DecoderLayer.forward: QK-norm before RoPE, norms after attention and MLP (of the ranks' sums), GeGLU
// (tanh GELU).
at::Tensor gemma3_layer(at::Tensor& residual, const at::Tensor& x, const at::Tensor& positions, at::TensorList norms,
                        const Linears& project, int64_t first_linear, LayerAttention& a, const Shape& s,
                        const RowParallelSum& sum) {
  const at::Tensor normed = input_norm(residual, x, norms[0], s.eps);
  at::Tensor heads =
      project(normed, first_linear + kQkv).view({s.tokens, s.num_heads + 2 * s.num_kv_heads, s.head_dim});
  const int64_t starts[2] = {0, s.num_heads}, counts[2] = {s.num_heads, s.num_kv_heads};
  for (int64_t i = 0; i < 2; ++i) {
    at::Tensor part = heads.narrow(1, starts[i], counts[i]);
    part.copy_(rms_norm(part.reshape({-1, s.head_dim}), norms[1 + i], s.eps).view({s.tokens, counts[i], s.head_dim}));
  }
  const at::Tensor attended = attend(heads, positions, a, s);
  const at::Tensor h = rms_norm(sum(project(attended, first_linear + kOut)), norms[3], s.eps);
  const at::Tensor mlp_in = add_rms_norm_(residual, h, norms[4], s.eps);
  const at::Tensor activated = gelu_tanh_and_mul(project(mlp_in, first_linear + kGateUp));
  return rms_norm(sum(project(activated, first_linear + kDown)), norms[5], s.eps);
}

}  // namespace

at::Tensor fused_decode(const at::Tensor& hidden, const at::Tensor& positions, at::TensorList cos,
                         at::TensorList sin, at::TensorList norms, at::TensorList weights,
                         at::TensorList scales, at::IntArrayRef kinds, at::IntArrayRef kind_args,
                         at::IntArrayRef parts, const c10::List<std::optional<at::Tensor>>& biases,
                         at::TensorList k_pools, at::TensorList v_pools, at::TensorList slots,
                         at::TensorList block_tables, at::TensorList seq_lens, at::IntArrayRef sliding_windows,
                         c10::string_view layer_type, int64_t num_heads, int64_t num_kv_heads, double eps,
                         double scale, int64_t dense_rows, int64_t queries_per_kv, int64_t query_offset,
                         const std::optional<at::Tensor>& segment, int64_t rank, int64_t world_size,
                         double timeout_s) {
  const int64_t num_layers = static_cast<int64_t>(k_pools.size());
  const auto per_layer = [num_layers](size_t size, int64_t count) {
    return static_cast<int64_t>(size) == num_layers * count;
  };
  const bool gemma3 = layer_type == "gemma3";
  TORCH_CHECK(gemma3 || layer_type == "llama", "fused_decode: layer_type is llama or gemma3");
  const int64_t norms_per_layer = gemma3 ? kGemma3Norms : kLlamaNorms;
  TORCH_CHECK(hidden.dim() == 2 && num_layers > 0, "fused_decode: hidden [tokens, hidden_size] and one pool per layer");
  TORCH_CHECK(per_layer(v_pools.size(), 1) && per_layer(norms.size(), norms_per_layer),
              "fused_decode: a K and a V pool and the layer type's norms per layer");
  TORCH_CHECK(per_layer(cos.size(), 1) && per_layer(sin.size(), 1) && per_layer(slots.size(), 1) &&
                  per_layer(block_tables.size(), 1) && per_layer(seq_lens.size(), 1) &&
                  per_layer(sliding_windows.size(), 1),
              "fused_decode: rotary tables, slots, block tables, context lengths and a window per layer");
  TORCH_CHECK(per_layer(parts.size(), kLinearsPerLayer), "fused_decode: a parts count per linear, four per layer");
  const size_t num_parts = weights.size();
  TORCH_CHECK(scales.size() == num_parts && kinds.size() == num_parts && kind_args.size() == num_parts &&
                  biases.size() == num_parts,
              "fused_decode: a weight, scales, kind, kind argument and bias per part");
  TORCH_CHECK(dense_rows >= hidden.size(0), "fused_decode: dense_rows below the tokens");
  std::vector<int64_t> first_part(parts.size());
  int64_t next = 0;
  for (size_t i = 0; i < parts.size(); ++i) {
    TORCH_CHECK(parts[i] >= 1, "fused_decode: a linear without parts");
    first_part[i] = next;
    next += parts[i];
  }
  TORCH_CHECK(next == static_cast<int64_t>(num_parts), "fused_decode: parts counts do not add up to the weights");
  for (int64_t layer = 0; layer < num_layers; ++layer) {
    TORCH_CHECK(block_tables[layer].size(0) == hidden.size(0) && seq_lens[layer].size(0) == hidden.size(0),
                "fused_decode: one block table and context length per token");
  }
  const Linears project{weights, scales, kinds, kind_args, parts, biases, std::move(first_part), dense_rows};
  const Shape shape{hidden.size(0), num_heads, num_kv_heads, k_pools[0].size(3),
                    eps, scale, queries_per_kv, query_offset};
  const RowParallelSum sum{segment, rank, world_size, timeout_s};
  at::Tensor residual = hidden.clone();
  at::Tensor x;
  for (int64_t layer = 0; layer < num_layers; ++layer) {
    LayerAttention attention{cos[layer],      sin[layer],     slots[layer],   block_tables[layer],
                             seq_lens[layer], k_pools[layer], v_pools[layer], sliding_windows[layer]};
    const at::TensorList layer_norms = norms.slice(layer * norms_per_layer, norms_per_layer);
    const int64_t first_linear = layer * kLinearsPerLayer;
    x = gemma3 ? gemma3_layer(residual, x, positions, layer_norms, project, first_linear, attention, shape, sum)
               : llama_layer(residual, x, positions, layer_norms, project, first_linear, attention, shape, sum);
  }
  return x + residual;
}

}  // namespace pagedllm
