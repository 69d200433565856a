// Rotary position embedding in place, rotate-half layout: for each token, the first `rotated_heads` heads of
// x [tokens, heads, head_dim] have each channel pair (d, d + head_dim / 2) turned by the token's angle of pair d:
// x_d cos - x_{d+half} sin and x_{d+half} cos + x_d sin, the tables holding one row of head_dim / 2 per position.
// rms_norm_rotate_heads_ first normalizes each of those heads in place (Gemma's QK-norm: the query heads by one
// weight, the key heads after them by another), as rms_norm does and rounded to x's dtype, then rotates it.
#include "norm_row.h"
#include "vec.h"

#include <ATen/Parallel.h>

namespace pagedllm {
namespace {

// One head turned by the angles whose cos and sin are c and s [half]; 8 channel pairs at a time where AVX2 has it.
template <typename T>
void rotate_head(T* v, const float* c, const float* s, int64_t half) {
  int64_t d = 0;
#ifdef PAGEDLLM_AVX2
  for (; d + 8 <= half; d += 8) {
    const __m256 low = load8(v + d), high = load8(v + d + half);
    const __m256 cv = _mm256_loadu_ps(c + d), sv = _mm256_loadu_ps(s + d);
    store8(v + d, _mm256_sub_ps(_mm256_mul_ps(low, cv), _mm256_mul_ps(high, sv)));
    store8(v + d + half, _mm256_add_ps(_mm256_mul_ps(high, cv), _mm256_mul_ps(low, sv)));
  }
#endif
  for (; d < half; ++d) {
    const float low = to_float(v[d]), high = to_float(v[d + half]);
    v[d] = static_cast<T>(low * c[d] - high * s[d]);
    v[d + half] = static_cast<T>(high * c[d] + low * s[d]);
  }
}

void check_heads_and_tables(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, int64_t rotated_heads,
                            const char* name) {
  TORCH_CHECK(x.dim() == 3 && x.stride(2) == 1 && x.stride(1) == x.size(2), name, ": x [tokens, heads, dim]");
  TORCH_CHECK(rotated_heads <= x.size(1), name, ": more heads to rotate than x has");
  TORCH_CHECK(cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat && cos.is_contiguous() &&
                  sin.is_contiguous() && x.size(2) % 2 == 0 && cos.size(1) * 2 == x.size(2) &&
                  sin.sizes() == cos.sizes(),
              name, ": float32 tables [positions, head_dim / 2]");
}

// Rotates the first `rotated_heads` heads of each token; heads [0, normed_heads) are first normalized in place,
// those below query_heads by query_weight and the rest by key_weight (none where normed_heads is 0).
void rotate(at::Tensor& x, const at::Tensor& positions, const at::Tensor& cos, const at::Tensor& sin,
            int64_t rotated_heads, int64_t normed_heads, int64_t query_heads, const float* query_weight,
            const float* key_weight, float eps) {
  const int64_t tokens = x.size(0), head_dim = x.size(2), half = head_dim / 2, token_stride = x.stride(0);
  const at::Tensor pos = positions.to(at::kLong).contiguous();
  TORCH_CHECK(pos.numel() == tokens, "rotate_heads_: a position per token");
  const int64_t* pp = pos.const_data_ptr<int64_t>();
  const float* cp = cos.const_data_ptr<float>();
  const float* sp = sin.const_data_ptr<float>();
  PAGEDLLM_DISPATCH_FLOAT_TYPES(x.scalar_type(), "rotate_heads_", [&] {
    scalar_t* xp = x.data_ptr<scalar_t>();
    at::parallel_for(0, tokens, 16, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const float* c = cp + pp[t] * half;
        const float* s = sp + pp[t] * half;
        for (int64_t h = 0; h < rotated_heads; ++h) {
          scalar_t* v = xp + t * token_stride + h * head_dim;
          if (h < normed_heads)  // in place: each value is read before it is written
            add_and_normalize_row(v, static_cast<const scalar_t*>(nullptr), h < query_heads ? query_weight : key_weight,
                                  head_dim, eps, v);
          rotate_head(v, c, s, half);
        }
      }
    });
  });
}

}  // namespace

void rotate_heads_(at::Tensor& x, const at::Tensor& positions, const at::Tensor& cos, const at::Tensor& sin,
                   int64_t rotated_heads) {
  check_heads_and_tables(x, cos, sin, rotated_heads, "rotate_heads_");
  rotate(x, positions, cos, sin, rotated_heads, 0, 0, nullptr, nullptr, 0.f);
}

void rms_norm_rotate_heads_(at::Tensor& x, const at::Tensor& positions, const at::Tensor& cos, const at::Tensor& sin,
                            const at::Tensor& query_weight, const at::Tensor& key_weight, double eps,
                            int64_t query_heads, int64_t key_heads) {
  check_heads_and_tables(x, cos, sin, query_heads + key_heads, "rms_norm_rotate_heads_");
  TORCH_CHECK(query_weight.numel() == x.size(2) && key_weight.numel() == x.size(2),
              "rms_norm_rotate_heads_: a weight of head_dim values for queries and for keys");
  const at::Tensor qw = query_weight.to(at::kFloat).contiguous(), kw = key_weight.to(at::kFloat).contiguous();
  const int64_t heads = query_heads + key_heads;
  rotate(x, positions, cos, sin, heads, heads, query_heads, qw.const_data_ptr<float>(), kw.const_data_ptr<float>(),
         static_cast<float>(eps));
}

}  // namespace pagedllm
