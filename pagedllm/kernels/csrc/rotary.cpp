// Rotary position embedding in place, rotate-half layout: for each token, the first `rotated_heads` heads of
// x [tokens, heads, head_dim] have each channel pair (d, d + head_dim / 2) turned by the token's angle of pair d:
// x_d cos - x_{d+half} sin and x_{d+half} cos + x_d sin, the tables holding one row of head_dim / 2 per position.
#include "vec.h"

#include <ATen/Parallel.h>

#include <vector>

namespace pagedllm {

void rotate_heads_(at::Tensor& x, const at::Tensor& positions, const at::Tensor& cos, const at::Tensor& sin,
                   int64_t rotated_heads) {
  TORCH_CHECK(x.dim() == 3 && x.stride(2) == 1 && x.stride(1) == x.size(2), "rotate_heads_: x [tokens, heads, dim]");
  TORCH_CHECK(rotated_heads <= x.size(1), "rotate_heads_: more heads to rotate than x has");
  TORCH_CHECK(cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat && cos.is_contiguous() &&
                  sin.is_contiguous() && x.size(2) % 2 == 0 && cos.size(1) * 2 == x.size(2) &&
                  sin.sizes() == cos.sizes(),
              "rotate_heads_: float32 tables [positions, head_dim / 2]");
  const int64_t tokens = x.size(0), head_dim = x.size(2), half = head_dim / 2, token_stride = x.stride(0);
  const at::Tensor pos = positions.to(at::kLong).contiguous();
  const int64_t* pp = pos.const_data_ptr<int64_t>();
  const float* cp = cos.const_data_ptr<float>();
  const float* sp = sin.const_data_ptr<float>();
  PAGEDLLM_DISPATCH_FLOAT_TYPES(x.scalar_type(), "rotate_heads_", [&] {
    scalar_t* xp = x.data_ptr<scalar_t>();
    at::parallel_for(0, tokens, 16, [&](int64_t begin, int64_t end) {
      std::vector<float> head(head_dim);
      for (int64_t t = begin; t < end; ++t) {
        const float* c = cp + pp[t] * half;
        const float* s = sp + pp[t] * half;
        for (int64_t h = 0; h < rotated_heads; ++h) {
          scalar_t* v = xp + t * token_stride + h * head_dim;
          for (int64_t d = 0; d < head_dim; ++d) head[d] = to_float(v[d]);
          for (int64_t d = 0; d < half; ++d) {
            v[d] = static_cast<scalar_t>(head[d] * c[d] + head[d + half] * -s[d]);
            v[d + half] = static_cast<scalar_t>(head[d + half] * c[d] + head[d] * s[d]);
          }
        }
      }
    });
  });
}

}  // namespace pagedllm
