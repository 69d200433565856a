// One row of RMSNorm as transformers' Llama computes it (rms_norm.cpp's kernels and the fused ones of Gemma's
// QK-norm with RoPE): normalized in float32, rounded to the activation dtype In, then scaled by the weight in the
// result dtype Out; where an addend is given, it is first added to the row in place, in In.
#pragma once

#include "vec.h"

#include <cmath>

namespace pagedllm {

// row += addend (where given, in In), then out = weight * In(row / rms(row)); 8 values at a time where AVX2 has it.
template <typename In, typename Out>
void add_and_normalize_row(In* row, const In* addend, const float* weight, int64_t hidden, float eps, Out* out) {
  int64_t i = 0;
  float squares = 0.f;
#ifdef PAGEDLLM_AVX2
  __m256 acc = _mm256_setzero_ps();
  for (; i + 8 <= hidden; i += 8) {
    __m256 v = load8(row + i);
    if (addend != nullptr) {
      v = round_to<In>(_mm256_add_ps(v, load8(addend + i)));
      store8(row + i, v);
    }
    acc = _mm256_fmadd_ps(v, v, acc);
  }
  squares = horizontal_sum(acc);
#endif
  for (; i < hidden; ++i) {
    if (addend != nullptr) row[i] = static_cast<In>(to_float(row[i]) + to_float(addend[i]));
    const float v = to_float(row[i]);
    squares += v * v;
  }
  const float inverse_rms = 1.f / std::sqrt(squares / static_cast<float>(hidden) + eps);
  i = 0;
#ifdef PAGEDLLM_AVX2
  const __m256 inverse = _mm256_set1_ps(inverse_rms);
  for (; i + 8 <= hidden; i += 8)
    store8(out + i, _mm256_mul_ps(_mm256_loadu_ps(weight + i), round_to<In>(_mm256_mul_ps(load8(row + i), inverse))));
#endif
  for (; i < hidden; ++i) {
    const float normalized = to_float(static_cast<In>(to_float(row[i]) * inverse_rms));
    out[i] = static_cast<Out>(weight[i] * normalized);
  }
}

}  // namespace pagedllm
