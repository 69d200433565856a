// RMSNorm as transformers' Llama computes it: normalized in float32, rounded to the activation dtype, then
// scaled by the weight in the result dtype of weight and activation.
#include "vec.h"

#include <ATen/Parallel.h>

#include <cmath>

namespace pagedllm {

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  const int64_t hidden = x.size(-1);
  TORCH_CHECK(weight.numel() == hidden, "rms_norm: weight has ", weight.numel(), " values, input ", hidden);
  const at::Tensor input = x.contiguous();
  const at::Tensor w = weight.to(at::kFloat).contiguous();
  at::Tensor out = at::empty(x.sizes(), x.options().dtype(at::result_type(x, weight)));
  const int64_t rows = input.numel() / hidden;
  const float* wp = w.const_data_ptr<float>();
  PAGEDLLM_DISPATCH_FLOAT_TYPES(x.scalar_type(), "rms_norm", [&] {
    using in_t = scalar_t;
    const in_t* xp = input.const_data_ptr<in_t>();
    PAGEDLLM_DISPATCH_FLOAT_TYPES(out.scalar_type(), "rms_norm_out", [&] {
      scalar_t* op = out.data_ptr<scalar_t>();
      at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) {
          const in_t* row = xp + r * hidden;
          float squares = 0.f;
          for (int64_t i = 0; i < hidden; ++i) {
            const float v = to_float(row[i]);
            squares += v * v;
          }
          const float inverse_rms = 1.f / std::sqrt(squares / static_cast<float>(hidden) + static_cast<float>(eps));
          for (int64_t i = 0; i < hidden; ++i) {
            const float normalized = to_float(static_cast<in_t>(to_float(row[i]) * inverse_rms));
            op[r * hidden + i] = static_cast<scalar_t>(wp[i] * normalized);
          }
        }
      });
    });
  });
  return out;
}

}  // namespace pagedllm
