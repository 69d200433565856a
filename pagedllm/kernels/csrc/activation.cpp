// SiLU-and-multiply of a fused gate/up projection: out = silu(x[..., :n]) * x[..., n:], with silu(gate) rounded to
// the activation dtype before the product, as PyTorch's two ops round it.
#include "vec.h"

#include <ATen/Parallel.h>

#include <cmath>

namespace pagedllm {
namespace {

// out[i] = T(silu(gate[i])) * up[i] for n values, rounded to T.
template <typename T>
void silu_and_mul_row(const T* gate, const T* up, int64_t n, T* out) {
  int64_t i = 0;
#ifdef PAGEDLLM_AVX2
  const __m256 one = _mm256_set1_ps(1.f);
  for (; i + 8 <= n; i += 8) {
    const __m256 g = load8(gate + i);
    const __m256 activated = _mm256_div_ps(g, _mm256_add_ps(one, exp8(_mm256_sub_ps(_mm256_setzero_ps(), g))));
    store8(out + i, _mm256_mul_ps(round_to<T>(activated), load8(up + i)));
  }
#endif
  for (; i < n; ++i) {
    const float activated = to_float(gate[i]) / (1.f + std::exp(-to_float(gate[i])));
    out[i] = static_cast<T>(to_float(static_cast<T>(activated)) * to_float(up[i]));
  }
}

}  // namespace

at::Tensor silu_and_mul(const at::Tensor& gate_up) {
  const int64_t width = gate_up.size(-1), n = width / 2;
  TORCH_CHECK(width % 2 == 0, "silu_and_mul: the last dimension holds gate and up halves");
  const at::Tensor input = gate_up.contiguous();
  auto sizes = input.sizes().vec();
  sizes.back() = n;
  at::Tensor out = at::empty(sizes, input.options());
  const int64_t rows = input.numel() / width;
  PAGEDLLM_DISPATCH_FLOAT_TYPES(input.scalar_type(), "silu_and_mul", [&] {
    const scalar_t* xp = input.const_data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, rows, 8, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) silu_and_mul_row(xp + r * width, xp + r * width + n, n, op + r * n);
    });
  });
  return out;
}

}  // namespace pagedllm
