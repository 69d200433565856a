// Weight-only int4 / int8 matmuls for few activation rows (decode steps): each run of 32 activations is rounded
// to int16 with its own scale (max |x| / 32767, finer than bfloat16's rounding), and weights and activations meet
// in integer dot products (AVX2 madd), scaled back to float32 per run. The zero-point term of int4 multiplies the
// exact float sums of the activations.
//
// int4 layout: packed[n, 16 b + j] holds weight 32 b + j of row n in its low nibble and weight 32 b + 16 + j in
// its high one; scale_zero[n, g] is the (scale, zero) bfloat16 pair of group g, and w = (q - 8) * scale + zero.
// int8 layout: weight[n, k] int8 with one bfloat16 scale per row, w = q * scale.
#include "vec.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>

namespace pagedllm {
namespace {

constexpr int64_t kBlock = 32;  // weights per run sharing one activation scale (16 packed int4 bytes)
constexpr int64_t kRowGrain = 16;  // output rows per parallel task, at the least
constexpr int64_t kRowTile = 2;  // activation rows sharing one load of a weight block

constexpr float kActivationLevels = 32767.f;

// Activation rows rounded to int16 per run of 32, with each run's scale, and each group's exact float sum.
struct QuantizedRows {
  at::Tensor values;  // [rows, in] int16
  at::Tensor scales;  // [rows, in / 32] float32
  at::Tensor group_sums;  // [rows, in / group_size] float32
};

QuantizedRows quantize_rows(const at::Tensor& x, int64_t group_size) {
  const int64_t rows = x.size(0), in_features = x.size(1), blocks = in_features / kBlock;
  const int64_t per_group = group_size / kBlock;
  QuantizedRows q{at::empty({rows, in_features}, x.options().dtype(at::kShort)), at::empty({rows, blocks}, x.options()),
                  at::zeros({rows, in_features / group_size}, x.options())};
  const float* xp = x.const_data_ptr<float>();
  int16_t* qp = q.values.data_ptr<int16_t>();
  float* sp = q.scales.data_ptr<float>();
  float* gp = q.group_sums.data_ptr<float>();
  for (int64_t i = 0; i < rows * blocks; ++i) {
    const float* run = xp + i * kBlock;
    float max = 0.f, sum = 0.f;
    for (int64_t j = 0; j < kBlock; ++j) {
      max = std::max(max, std::abs(run[j]));
      sum += run[j];
    }
    const float inverse = max > 0.f ? kActivationLevels / max : 0.f;
    sp[i] = max / kActivationLevels;
    gp[i / per_group] += sum;  // runs of one row's groups are consecutive: i / per_group is (row, group)
    for (int64_t j = 0; j < kBlock; ++j) qp[i * kBlock + j] = static_cast<int16_t>(std::nearbyint(run[j] * inverse));
  }
  return q;
}

#ifdef PAGEDLLM_AVX2
// Eight float partial sums of the products of 32 int16 weights (two registers) and 32 int16 activations.
inline __m256 dot_run(__m256i w0, __m256i w1, const int16_t* x) {
  const __m256i x0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x));
  const __m256i x1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + 16));
  return _mm256_cvtepi32_ps(_mm256_add_epi32(_mm256_madd_epi16(w0, x0), _mm256_madd_epi16(w1, x1)));
}
#endif

// Σ_k q[k] x[k] over one run of 32 as an int, q from 16 packed int4 bytes (scalar path).
inline int32_t int4_run_dot(const uint8_t* packed, const int16_t* x) {
  int32_t sum = 0;
  for (int64_t j = 0; j < 16; ++j) sum += (packed[j] & 0x0F) * x[j] + (packed[j] >> 4) * x[16 + j];
  return sum;
}

template <int64_t Rows>
void int4_row(const uint8_t* packed, const uint16_t* scale_zero, int64_t in_features, int64_t group_size,
              const int16_t* xq, const float* x_scales, const float* x_group_sums, float* result) {
  const int64_t blocks = in_features / kBlock, groups = in_features / group_size, per_group = group_size / kBlock;
  for (int64_t r = 0; r < Rows; ++r) result[r] = 0.f;
#ifdef PAGEDLLM_AVX2
  const __m128i low_mask = _mm_set1_epi8(0x0F);
  __m256 acc[Rows][2];
  for (int64_t r = 0; r < Rows; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
#endif
  for (int64_t g = 0; g < groups; ++g) {
    const float scale = bf16_bits_to_float(scale_zero[2 * g]);
    const float min = bf16_bits_to_float(scale_zero[2 * g + 1]) - 8.f * scale;
    for (int64_t r = 0; r < Rows; ++r) result[r] += min * x_group_sums[r * groups + g];
    for (int64_t b = g * per_group; b < (g + 1) * per_group; ++b) {
#ifdef PAGEDLLM_AVX2
      const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(packed + 16 * b));
      const __m256i low = _mm256_cvtepu8_epi16(_mm_and_si128(bytes, low_mask));
      const __m256i high = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(bytes, 4), low_mask));
      for (int64_t r = 0; r < Rows; ++r) {
        const __m256 weight = _mm256_set1_ps(scale * x_scales[r * blocks + b]);
        const __m256 dot = dot_run(low, high, xq + r * in_features + kBlock * b);
        acc[r][b & 1] = _mm256_fmadd_ps(dot, weight, acc[r][b & 1]);
      }
#else
      for (int64_t r = 0; r < Rows; ++r)
        result[r] += scale * x_scales[r * blocks + b] * int4_run_dot(packed + 16 * b, xq + r * in_features + kBlock * b);
#endif
    }
  }
#ifdef PAGEDLLM_AVX2
  for (int64_t r = 0; r < Rows; ++r) result[r] += horizontal_sum(_mm256_add_ps(acc[r][0], acc[r][1]));
#endif
}

template <int64_t Rows>
void int8_row(const int8_t* w, int64_t in_features, const int16_t* xq, const float* x_scales, float* result) {
  const int64_t blocks = in_features / kBlock;
  for (int64_t r = 0; r < Rows; ++r) result[r] = 0.f;
#ifdef PAGEDLLM_AVX2
  __m256 acc[Rows][2];
  for (int64_t r = 0; r < Rows; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
  for (int64_t b = 0; b < blocks; ++b) {
    const __m256i w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + kBlock * b)));
    const __m256i w1 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + kBlock * b + 16)));
    for (int64_t r = 0; r < Rows; ++r) {
      const __m256 dot = dot_run(w0, w1, xq + r * in_features + kBlock * b);
      acc[r][b & 1] = _mm256_fmadd_ps(dot, _mm256_set1_ps(x_scales[r * blocks + b]), acc[r][b & 1]);
    }
  }
  for (int64_t r = 0; r < Rows; ++r) result[r] = horizontal_sum(_mm256_add_ps(acc[r][0], acc[r][1]));
#else
  for (int64_t b = 0; b < blocks; ++b)
    for (int64_t r = 0; r < Rows; ++r) {
      int32_t sum = 0;
      for (int64_t j = 0; j < kBlock; ++j) sum += int32_t{w[kBlock * b + j]} * xq[r * in_features + kBlock * b + j];
      result[r] += x_scales[r * blocks + b] * sum;
    }
#endif
}

// Calls row_fn(n, first_activation_row, rows, results) for every output row and tile of activation rows, and
// stores the results.
template <typename RowFn>
at::Tensor for_each_output(const at::Tensor& x, int64_t num_rows, int64_t out_features, const RowFn& row_fn) {
  at::Tensor out = at::empty({num_rows, out_features}, x.options().dtype(at::kFloat));
  float* op = out.data_ptr<float>();
  at::parallel_for(0, out_features, kRowGrain, [&](int64_t begin, int64_t end) {
    for (int64_t m = 0; m < num_rows; m += kRowTile) {
      const int64_t rows = std::min(kRowTile, num_rows - m);
      for (int64_t n = begin; n < end; ++n) {
        float result[kRowTile];
        row_fn(n, m, rows, result);
        for (int64_t r = 0; r < rows; ++r) op[(m + r) * out_features + n] = result[r];
      }
    }
  });
  auto sizes = x.sizes().vec();
  sizes.back() = out_features;
  return out.to(x.scalar_type()).view(sizes);
}

}  // namespace

at::Tensor int4_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale_zero, int64_t group_size) {
  const int64_t out_features = packed.size(0), in_features = packed.size(1) * 2;
  TORCH_CHECK(x.size(-1) == in_features, "int4_linear: input has ", x.size(-1), " features, weight ", in_features);
  TORCH_CHECK(group_size % kBlock == 0 && in_features % group_size == 0, "int4_linear: bad group size ", group_size);
  TORCH_CHECK(packed.scalar_type() == at::kByte && scale_zero.scalar_type() == at::kBFloat16, "int4_linear: dtypes");
  const at::Tensor xf = float_rows(x, in_features);
  const QuantizedRows q = quantize_rows(xf, group_size);
  const int64_t groups = in_features / group_size, blocks = in_features / kBlock;
  const uint8_t* w = packed.const_data_ptr<uint8_t>();
  const auto* sz = reinterpret_cast<const uint16_t*>(scale_zero.const_data_ptr<at::BFloat16>());
  const int16_t* xq = q.values.const_data_ptr<int16_t>();
  const float* xs = q.scales.const_data_ptr<float>();
  const float* sums = q.group_sums.const_data_ptr<float>();
  return for_each_output(x, xf.size(0), out_features, [&](int64_t n, int64_t m, int64_t rows, float* result) {
    const uint8_t* wn = w + n * in_features / 2;
    const uint16_t* szn = sz + n * groups * 2;
    const int16_t* xm = xq + m * in_features;
    if (rows == 2)
      int4_row<2>(wn, szn, in_features, group_size, xm, xs + m * blocks, sums + m * groups, result);
    else
      int4_row<1>(wn, szn, in_features, group_size, xm, xs + m * blocks, sums + m * groups, result);
  });
}

at::Tensor int4_dequantize(const at::Tensor& packed, const at::Tensor& scale_zero, int64_t group_size) {
  const int64_t out_features = packed.size(0), in_features = packed.size(1) * 2, groups = in_features / group_size;
  at::Tensor out = at::empty({out_features, in_features}, at::kFloat);
  const uint8_t* w = packed.const_data_ptr<uint8_t>();
  const auto* sz = reinterpret_cast<const uint16_t*>(scale_zero.const_data_ptr<at::BFloat16>());
  float* op = out.data_ptr<float>();
  at::parallel_for(0, out_features, kRowGrain, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      for (int64_t k = 0; k < in_features; ++k) {
        const int64_t g = n * groups + k / group_size, j = k % kBlock;
        const uint8_t byte = w[n * in_features / 2 + 16 * (k / kBlock) + j % 16];
        const float scale = bf16_bits_to_float(sz[2 * g]);
        const float q = static_cast<float>(j < 16 ? byte & 0x0F : byte >> 4);
        op[n * in_features + k] = q * scale + (bf16_bits_to_float(sz[2 * g + 1]) - 8.f * scale);
      }
    }
  });
  return out;
}

at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scales) {
  const int64_t out_features = weight.size(0), in_features = weight.size(1);
  TORCH_CHECK(x.size(-1) == in_features, "int8_linear: input has ", x.size(-1), " features, weight ", in_features);
  TORCH_CHECK(in_features % kBlock == 0, "int8_linear: in_features must be a multiple of 32");
  TORCH_CHECK(weight.scalar_type() == at::kChar && scales.scalar_type() == at::kBFloat16, "int8_linear: dtypes");
  const at::Tensor xf = float_rows(x, in_features);
  const QuantizedRows q = quantize_rows(xf, in_features);
  const int64_t blocks = in_features / kBlock;
  const int8_t* w = weight.const_data_ptr<int8_t>();
  const auto* s = reinterpret_cast<const uint16_t*>(scales.const_data_ptr<at::BFloat16>());
  const int16_t* xq = q.values.const_data_ptr<int16_t>();
  const float* xs = q.scales.const_data_ptr<float>();
  return for_each_output(x, xf.size(0), out_features, [&](int64_t n, int64_t m, int64_t rows, float* result) {
    const int8_t* wn = w + n * in_features;
    if (rows == 2)
      int8_row<2>(wn, in_features, xq + m * in_features, xs + m * blocks, result);
    else
      int8_row<1>(wn, in_features, xq + m * in_features, xs + m * blocks, result);
    const float scale = bf16_bits_to_float(s[n]);
    for (int64_t r = 0; r < rows; ++r) result[r] *= scale;
  });
}

}  // namespace pagedllm
