// Gated activations of a fused gate/up projection: out = act(x[..., :n]) * x[..., n:], with act(gate) rounded to the
// activation dtype before the product, as PyTorch's two ops round it. act is SiLU (Llama) or tanh-approximated GELU
// (Gemma's GeGLU), which is x * sigmoid(2 u) with u = sqrt(2 / pi) (x + 0.044715 x^3), since
// 0.5 (1 + tanh(u)) = sigmoid(2 u): both are x / (1 + e^(-z)), z = x for SiLU and z = 2 u for GELU.
#include "vec.h"

#include <ATen/Parallel.h>

#include <cmath>

namespace pagedllm {
namespace {

enum class Gate { kSilu, kGeluTanh };

constexpr float kGeluScale = 1.5957691216057308f;  // 2 sqrt(2 / pi): z = kGeluScale (x + kGeluCubic x^3)
constexpr float kGeluCubic = 0.044715f;

// z of x / (1 + e^(-z)) for the gate.
template <Gate G>
inline float sigmoid_argument(float x) {
  return G == Gate::kSilu ? x : kGeluScale * (x + kGeluCubic * x * x * x);
}

// out[i] = T(act(gate[i])) * up[i] for n values, rounded to T; 16 values at a time with AVX-512, 8 with AVX2, each
// lane's arithmetic the same.
template <Gate G, typename T>
void gated_row(const T* gate, const T* up, int64_t n, T* out) {
  int64_t i = 0;
#ifdef PAGEDLLM_AVX512_VNNI
  const __m512 one16 = _mm512_set1_ps(1.f);
  for (; i + 16 <= n; i += 16) {
    const __m512 g = load16(gate + i);
    __m512 z = g;
    if constexpr (G == Gate::kGeluTanh) {
      const __m512 cubic = _mm512_mul_ps(_mm512_mul_ps(g, g), _mm512_set1_ps(kGeluCubic));
      z = _mm512_mul_ps(_mm512_fmadd_ps(cubic, g, g), _mm512_set1_ps(kGeluScale));
    }
    const __m512 activated = _mm512_div_ps(g, _mm512_add_ps(one16, exp16(_mm512_sub_ps(_mm512_setzero_ps(), z))));
    store16(out + i, _mm512_mul_ps(round16_to<T>(activated), load16(up + i)));
  }
#endif
#ifdef PAGEDLLM_AVX2
  const __m256 one = _mm256_set1_ps(1.f);
  for (; i + 8 <= n; i += 8) {
    const __m256 g = load8(gate + i);
    __m256 z = g;
    if constexpr (G == Gate::kGeluTanh) {
      const __m256 cubic = _mm256_mul_ps(_mm256_mul_ps(g, g), _mm256_set1_ps(kGeluCubic));
      z = _mm256_mul_ps(_mm256_fmadd_ps(cubic, g, g), _mm256_set1_ps(kGeluScale));
    }
    const __m256 activated = _mm256_div_ps(g, _mm256_add_ps(one, exp8(_mm256_sub_ps(_mm256_setzero_ps(), z))));
    store8(out + i, _mm256_mul_ps(round_to<T>(activated), load8(up + i)));
  }
#endif
  for (; i < n; ++i) {
    const float g = to_float(gate[i]);
    const float activated = g / (1.f + std::exp(-sigmoid_argument<G>(g)));
    out[i] = static_cast<T>(to_float(static_cast<T>(activated)) * to_float(up[i]));
  }
}

template <Gate G>
at::Tensor gated(const at::Tensor& gate_up, const char* name) {
  const int64_t width = gate_up.size(-1), n = width / 2;
  TORCH_CHECK(width % 2 == 0, name, ": the last dimension holds gate and up halves");
  const at::Tensor input = gate_up.contiguous();
  auto sizes = input.sizes().vec();
  sizes.back() = n;
  at::Tensor out = at::empty(sizes, input.options());
  const int64_t rows = input.numel() / width;
  PAGEDLLM_DISPATCH_FLOAT_TYPES(input.scalar_type(), "gated_activation", [&] {
    const scalar_t* xp = input.const_data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, rows, 8, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) gated_row<G>(xp + r * width, xp + r * width + n, n, op + r * n);
    });
  });
  return out;
}

}  // namespace

at::Tensor silu_and_mul(const at::Tensor& gate_up) { return gated<Gate::kSilu>(gate_up, "silu_and_mul"); }

at::Tensor gelu_tanh_and_mul(const at::Tensor& gate_up) {
  return gated<Gate::kGeluTanh>(gate_up, "gelu_tanh_and_mul");
}

}  // namespace pagedllm
