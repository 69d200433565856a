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
}  // namespace pagedllm

TORCH_LIBRARY(pagedllm, m) {
  m.def("int4_linear(Tensor x, Tensor packed, Tensor scale_zero, int group_size) -> Tensor");
  m.def("int4_dequantize(Tensor packed, Tensor scale_zero, int group_size) -> Tensor");
  m.def("int8_linear(Tensor x, Tensor weight, Tensor scales) -> Tensor");
  m.def("paged_decode_attention(Tensor q, Tensor k_pool, Tensor v_pool, Tensor block_tables, Tensor seq_lens, float scale) -> Tensor");
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
}

TORCH_LIBRARY_IMPL(pagedllm, CPU, m) {
  m.impl("int4_linear", &pagedllm::int4_linear);
  m.impl("int4_dequantize", &pagedllm::int4_dequantize);
  m.impl("int8_linear", &pagedllm::int8_linear);
  m.impl("paged_decode_attention", &pagedllm::paged_decode_attention);
  m.impl("rms_norm", &pagedllm::rms_norm);
}
