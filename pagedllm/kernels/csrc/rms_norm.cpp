// RMSNorm as transformers' Llama computes it: normalized in float32, rounded to the activation dtype, then
// scaled by the weight in the result dtype of weight and activation. add_rms_norm_ first adds the layer's output
// to the residual stream in place, in the activation dtype, as `residual + x` would.
#include "norm_row.h"
#include "vec.h"

#include <ATen/Parallel.h>

#include <cmath>

namespace pagedllm {
namespace {

// Normalizes every row of `input` into a new tensor, after adding `addend`'s row to it in place where given.
at::Tensor rms_norm_rows(at::Tensor& input, const at::Tensor* addend, const at::Tensor& weight, double eps) {
  const int64_t hidden = input.size(-1);
  TORCH_CHECK(weight.numel() == hidden, "rms_norm: weight has ", weight.numel(), " values, input ", hidden);
  const at::Tensor w = weight.to(at::kFloat).contiguous();
  at::Tensor out = at::empty(input.sizes(), input.options().dtype(at::result_type(input, weight)));
  const int64_t rows = input.numel() / hidden;
  const float* wp = w.const_data_ptr<float>();
  const at::Tensor added = addend == nullptr ? at::Tensor() : addend->to(input.scalar_type()).contiguous();
  PAGEDLLM_DISPATCH_FLOAT_TYPES(input.scalar_type(), "rms_norm", [&] {
    using in_t = scalar_t;
    in_t* xp = input.data_ptr<in_t>();
    const in_t* ap = added.defined() ? added.const_data_ptr<in_t>() : nullptr;
    PAGEDLLM_DISPATCH_FLOAT_TYPES(out.scalar_type(), "rms_norm_out", [&] {
      scalar_t* op = out.data_ptr<scalar_t>();
      at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r)
          add_and_normalize_row(xp + r * hidden, ap == nullptr ? nullptr : ap + r * hidden, wp, hidden,
                                static_cast<float>(eps), op + r * hidden);
      });
    });
  });
  return out;
}

}  // namespace

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  at::Tensor input = x.contiguous();
  return rms_norm_rows(input, nullptr, weight, eps);
}

at::Tensor add_rms_norm_(at::Tensor& residual, const at::Tensor& x, const at::Tensor& weight, double eps) {
  TORCH_CHECK(residual.is_contiguous() && residual.sizes() == x.sizes(), "add_rms_norm_: a contiguous residual of x's shape");
  return rms_norm_rows(residual, &x, weight, eps);
}

}  // namespace pagedllm
