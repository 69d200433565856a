// Registers the CPU kernels as torch.ops.pagedllm.*.
#include <torch/library.h>

#include "vec.h"

namespace pagedllm {
at::Tensor int4_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale_zero, int64_t group_size);
at::Tensor int4_dequantize(const at::Tensor& packed, const at::Tensor& scale_zero, int64_t group_size);
at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scales);
at::Tensor paged_decode_attention(const at::Tensor& q, const at::Tensor& k_pool, const at::Tensor& v_pool,
                                  const at::Tensor& block_tables, const at::Tensor& seq_lens, double scale);
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps);
at::Tensor add_rms_norm_(at::Tensor& residual, const at::Tensor& x, const at::Tensor& weight, double eps);
void rotate_heads_(at::Tensor& x, const at::Tensor& positions, const at::Tensor& cos, const at::Tensor& signed_sin,
                   int64_t rotated_heads);
void write_kv_(const at::Tensor& k, const at::Tensor& v, at::Tensor& k_pool, at::Tensor& v_pool,
               const at::Tensor& slots);
at::Tensor silu_and_mul(const at::Tensor& gate_up);
at::Tensor decode_layers(const at::Tensor& hidden, const at::Tensor& positions, const at::Tensor& cos,
                         const at::Tensor& signed_sin, at::TensorList norms, at::TensorList weights,
                         at::TensorList scales, at::IntArrayRef group_sizes,
                         const c10::List<std::optional<at::Tensor>>& biases, at::TensorList k_pools,
                         at::TensorList v_pools, const at::Tensor& slots, const at::Tensor& block_tables,
                         const at::Tensor& seq_lens, int64_t num_heads, int64_t num_kv_heads, double eps,
                         double scale);
}  // namespace pagedllm

TORCH_LIBRARY(pagedllm, m) {
  m.def("int4_linear(Tensor x, Tensor packed, Tensor scale_zero, int group_size) -> Tensor");
  m.def("int4_dequantize(Tensor packed, Tensor scale_zero, int group_size) -> Tensor");
  m.def("int8_linear(Tensor x, Tensor weight, Tensor scales) -> Tensor");
  m.def("paged_decode_attention(Tensor q, Tensor k_pool, Tensor v_pool, Tensor block_tables, Tensor seq_lens, float scale) -> Tensor");
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("add_rms_norm_(Tensor(a!) residual, Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("rotate_heads_(Tensor(a!) x, Tensor positions, Tensor cos, Tensor signed_sin, int rotated_heads) -> ()");
  m.def("write_kv_(Tensor k, Tensor v, Tensor(a!) k_pool, Tensor(b!) v_pool, Tensor slots) -> ()");
  m.def("silu_and_mul(Tensor gate_up) -> Tensor");
  m.def(
      "decode_layers(Tensor hidden, Tensor positions, Tensor cos, Tensor signed_sin, Tensor[] norms, Tensor[] weights, "
      "Tensor[] scales, int[] group_sizes, Tensor?[] biases, Tensor(a!)[] k_pools, Tensor(b!)[] v_pools, Tensor slots, "
      "Tensor block_tables, Tensor seq_lens, int num_heads, int num_kv_heads, float eps, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(pagedllm, CPU, m) {
  m.impl("int4_linear", &pagedllm::int4_linear);
  m.impl("int4_dequantize", &pagedllm::int4_dequantize);
  m.impl("int8_linear", &pagedllm::int8_linear);
  m.impl("paged_decode_attention", &pagedllm::paged_decode_attention);
  m.impl("rms_norm", &pagedllm::rms_norm);
  m.impl("add_rms_norm_", &pagedllm::add_rms_norm_);
  m.impl("rotate_heads_", &pagedllm::rotate_heads_);
  m.impl("write_kv_", &pagedllm::write_kv_);
  m.impl("silu_and_mul", &pagedllm::silu_and_mul);
  m.impl("decode_layers", &pagedllm::decode_layers);
}
