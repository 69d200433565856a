// SiLU-and-multiply of a fused gate/up projection: out = silu(x[..., :n]) * x[..., n:], with silu(gate) rounded to
// the activation dtype before the product, as PyTorch's two ops round it.
#include "vec.h"

#include <ATen/Parallel.h>

#include <cmath>
#include <vector>

namespace pagedllm {
namespace {

// silu(gate[i]) for n values into out (float32).
template <typename T>
void silu(const T* gate, int64_t n, float* out) {
  int64_t i = 0;
#ifdef PAGEDLLM_AVX2
  const __m256 one = _mm256_set1_ps(1.f);
  for (; i + 8 <= n; i += 8) {
    const __m256 g = load8(gate + i);
    const __m256 e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), g));
    _mm256_storeu_ps(out + i, _mm256_div_ps(g, _mm256_add_ps(one, e)));
  }
#endif
  for (; i < n; ++i) out[i] = to_float(gate[i]) / (1.f + std::exp(-to_float(gate[i])));
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
      std::vector<float> activated(n);
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t* row = xp + r * width;
        silu(row, n, activated.data());
        for (int64_t i = 0; i < n; ++i)
          op[r * n + i] = static_cast<scalar_t>(to_float(static_cast<scalar_t>(activated[i])) * to_float(row[n + i]));
      }
    });
  });
  return out;
}

}  // namespace pagedllm
