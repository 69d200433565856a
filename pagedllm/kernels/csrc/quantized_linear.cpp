// Weight-only int4 / int8 matmuls for few activation rows (decode steps): activations are rounded to int16 with
// one scale per run (max |x| / 32767, finer than bfloat16's rounding; a run is an int4 weight group, or 32 channels
// for int8), and weights and activations meet in integer dot products (AVX2 madd) summed in int32 over the run,
// then scaled back to float32 once per run. The zero-point term of int4 multiplies the exact float sums of the
// activations.
//
// int4 layout: each run of 64 weights of a row is 32 bytes, read as 16 little-endian 16-bit lanes; lane l holds
// weights 64 c + l, + 16, + 32 and + 48 in its four nibbles, lowest first, so one shift and one mask per nibble
// give 16 weights as int16 in the order of the activations. scale_zero[n, g] is the (scale, zero) bfloat16 pair of
// group g, and w = (q - 8) * scale + zero.
// int8 layout: weight[n, k] int8 with one bfloat16 scale per row, w = q * scale.
#include "vec.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <type_traits>
#include <vector>

namespace pagedllm {
namespace {

constexpr int64_t kChunk = 64;  // int4 weights per 32-byte chunk
constexpr int64_t kInt8Run = 32;  // int8 weights per activation scale
constexpr int64_t kRowGrain = 16;  // output rows per parallel task, at the least
constexpr int64_t kRowTile = 2;  // activation rows sharing one load of a weight chunk

constexpr float kActivationLevels = 32767.f;

// Activation rows rounded to int16 per run, with each run's scale and (where asked for) exact float sum. The
// buffers are the calling thread's own, reused from call to call: a decode step makes over a hundred calls.
struct QuantizedRows {
  const int16_t* values;  // [rows, in]
  const float* scales;  // [rows, in / run]
  const float* sums;  // [rows, in / run], or nullptr
};

QuantizedRows quantize_rows(const at::Tensor& x, int64_t run, bool with_sums) {
  thread_local std::vector<int16_t> values;
  thread_local std::vector<float> scales, sums;
  const int64_t runs = x.size(0) * (x.size(1) / run);
  values.resize(runs * run);
  scales.resize(runs);
  sums.resize(with_sums ? runs : 0);
  const float* xp = x.const_data_ptr<float>();
  for (int64_t i = 0; i < runs; ++i) {
    const float* in = xp + i * run;
    float max = 0.f;
    for (int64_t j = 0; j < run; ++j) max = std::max(max, std::abs(in[j]));
    const float inverse = max > 0.f ? kActivationLevels / max : 0.f;
    scales[i] = max / kActivationLevels;
    for (int64_t j = 0; j < run; ++j) values[i * run + j] = static_cast<int16_t>(std::nearbyint(in[j] * inverse));
    if (with_sums) sums[i] = std::accumulate(in, in + run, 0.f);
  }
  return {values.data(), scales.data(), with_sums ? sums.data() : nullptr};
}

#ifdef PAGEDLLM_AVX2
inline __m256i load_int16x16(const int16_t* x) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x)); }

// Adds the int32 dot products of one 64-weight chunk with each row's 64 activations: weights 0..31 of the chunk
// to low[r], weights 32..63 to high[r] (the two halves are two groups when the group size is 32).
template <int64_t Rows>
inline void int4_chunk(const uint8_t* chunk, const int16_t* const* x, int64_t offset, __m256i* low, __m256i* high) {
  const __m256i lanes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(chunk));
  const __m256i mask = _mm256_set1_epi16(0x0F);
  const __m256i w0 = _mm256_and_si256(lanes, mask);
  const __m256i w1 = _mm256_and_si256(_mm256_srli_epi16(lanes, 4), mask);
  const __m256i w2 = _mm256_and_si256(_mm256_srli_epi16(lanes, 8), mask);
  const __m256i w3 = _mm256_srli_epi16(lanes, 12);
  for (int64_t r = 0; r < Rows; ++r) {
    const int16_t* xr = x[r] + offset;
    low[r] = _mm256_add_epi32(low[r], _mm256_add_epi32(_mm256_madd_epi16(w0, load_int16x16(xr)),
                                                       _mm256_madd_epi16(w1, load_int16x16(xr + 16))));
    high[r] = _mm256_add_epi32(high[r], _mm256_add_epi32(_mm256_madd_epi16(w2, load_int16x16(xr + 32)),
                                                         _mm256_madd_epi16(w3, load_int16x16(xr + 48))));
  }
}
#endif

// Weight k (0..15) of one row in the int4 layout.
inline int32_t int4_at(const uint8_t* row, int64_t k) {
  const int64_t within = k % kChunk, lane = within % 16, nibble = within / 16;
  return (row[32 * (k / kChunk) + 2 * lane + nibble / 2] >> (4 * (nibble % 2))) & 0x0F;
}

// Per group g of one output row: combined[r * groups + g], the group's scale times activation row r's scale for
// it, and the zero-point term (zero - 8 scale) * sum of the group's activations, summed into total[r]. Eight groups
// at a time: each bfloat16 (scale, zero) pair is a 32-bit lane, the scale in its low half and the zero in its high.
template <int64_t Rows>
void group_factors(const uint16_t* scale_zero, int64_t groups, const float* const* x_scales, const float* const* x_sums,
                   float* combined, float* total) {
  int64_t g = 0;
#ifdef PAGEDLLM_AVX2
  __m256 zero_terms[Rows];
  for (int64_t r = 0; r < Rows; ++r) zero_terms[r] = _mm256_setzero_ps();
  for (; g + 8 <= groups; g += 8) {
    const __m256i pairs = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(scale_zero + 2 * g));
    const __m256 scale = _mm256_castsi256_ps(_mm256_slli_epi32(pairs, 16));
    const __m256 zero = _mm256_castsi256_ps(_mm256_and_si256(pairs, _mm256_set1_epi32(static_cast<int>(0xFFFF0000u))));
    const __m256 min = _mm256_fnmadd_ps(_mm256_set1_ps(8.f), scale, zero);
    for (int64_t r = 0; r < Rows; ++r) {
      _mm256_storeu_ps(combined + r * groups + g, _mm256_mul_ps(scale, _mm256_loadu_ps(x_scales[r] + g)));
      zero_terms[r] = _mm256_fmadd_ps(min, _mm256_loadu_ps(x_sums[r] + g), zero_terms[r]);
    }
  }
  for (int64_t r = 0; r < Rows; ++r) total[r] += horizontal_sum(zero_terms[r]);
#endif
  for (; g < groups; ++g) {
    const float scale = bf16_bits_to_float(scale_zero[2 * g]);
    const float min = bf16_bits_to_float(scale_zero[2 * g + 1]) - 8.f * scale;
    for (int64_t r = 0; r < Rows; ++r) {
      combined[r * groups + g] = scale * x_scales[r][g];
      total[r] += min * x_sums[r][g];
    }
  }
}

// The dot products of one output row with Rows activation rows, added to total: integer sums over each group,
// times the group's combined scale (group_factors). GroupSize is group_size where it is one of the sizes compiled
// for, else 0 (any multiple of 64).
template <int64_t Rows, int64_t GroupSize>
void int4_row(const uint8_t* packed, int64_t in_features, int64_t group_size, const int16_t* const* x,
              const float* combined, float* total) {
  const int64_t groups = in_features / group_size;
#ifdef PAGEDLLM_AVX2
  // Two accumulators per row where groups are short, so that consecutive groups' multiply-adds do not wait on
  // each other.
  __m256 acc[2][Rows];
  for (int64_t r = 0; r < Rows; ++r) acc[0][r] = acc[1][r] = _mm256_setzero_ps();
  const auto add_scaled = [&](__m256* into, int64_t g, const __m256i* sums) {
    for (int64_t r = 0; r < Rows; ++r)
      into[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums[r]), _mm256_broadcast_ss(combined + r * groups + g), into[r]);
  };
  if constexpr (GroupSize == 32) {
    for (int64_t c = 0; c < in_features / kChunk; ++c) {
      __m256i low[Rows], high[Rows];
      for (int64_t r = 0; r < Rows; ++r) low[r] = high[r] = _mm256_setzero_si256();
      int4_chunk<Rows>(packed + 32 * c, x, kChunk * c, low, high);
      add_scaled(acc[0], 2 * c, low);
      add_scaled(acc[1], 2 * c + 1, high);
    }
  } else {
    // A group size known at compile time unrolls the loop over its chunks; a short loop of unknown length costs
    // a mispredicted exit per group.
    const int64_t chunks_per_group = GroupSize > 0 ? GroupSize / kChunk : group_size / kChunk;
    for (int64_t g = 0; g < groups; ++g) {
      __m256i low[Rows], high[Rows];
      for (int64_t r = 0; r < Rows; ++r) low[r] = high[r] = _mm256_setzero_si256();
      for (int64_t c = g * chunks_per_group; c < (g + 1) * chunks_per_group; ++c)
        int4_chunk<Rows>(packed + 32 * c, x, kChunk * c, low, high);
      for (int64_t r = 0; r < Rows; ++r) low[r] = _mm256_add_epi32(low[r], high[r]);
      add_scaled(acc[0], g, low);
    }
  }
  for (int64_t r = 0; r < Rows; ++r) total[r] += horizontal_sum(_mm256_add_ps(acc[0][r], acc[1][r]));
#else
  for (int64_t g = 0; g < groups; ++g)
    for (int64_t r = 0; r < Rows; ++r) {
      int32_t sum = 0;
      for (int64_t k = g * group_size; k < (g + 1) * group_size; ++k) sum += int4_at(packed, k) * x[r][k];
      total[r] += combined[r * groups + g] * sum;
    }
#endif
}

// The dot products of one int8 output row with Rows activation rows, scaled per run of 32 activations.
template <int64_t Rows>
void int8_row(const int8_t* w, int64_t in_features, const int16_t* const* x, const float* const* x_scales,
              float* result) {
  const int64_t runs = in_features / kInt8Run;
  for (int64_t r = 0; r < Rows; ++r) result[r] = 0.f;
#ifdef PAGEDLLM_AVX2
  __m256 acc[Rows];
  for (int64_t r = 0; r < Rows; ++r) acc[r] = _mm256_setzero_ps();
  for (int64_t b = 0; b < runs; ++b) {
    const __m256i w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + kInt8Run * b)));
    const __m256i w1 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + kInt8Run * b + 16)));
    for (int64_t r = 0; r < Rows; ++r) {
      const int16_t* xr = x[r] + kInt8Run * b;
      const __m256i sum =
          _mm256_add_epi32(_mm256_madd_epi16(w0, load_int16x16(xr)), _mm256_madd_epi16(w1, load_int16x16(xr + 16)));
      acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum), _mm256_set1_ps(x_scales[r][b]), acc[r]);
    }
  }
  for (int64_t r = 0; r < Rows; ++r) result[r] = horizontal_sum(acc[r]);
#else
  for (int64_t b = 0; b < runs; ++b)
    for (int64_t r = 0; r < Rows; ++r) {
      int32_t sum = 0;
      for (int64_t j = kInt8Run * b; j < kInt8Run * (b + 1); ++j) sum += int32_t{w[j]} * x[r][j];
      result[r] += x_scales[r][b] * sum;
    }
#endif
}

// Pointers to `rows` consecutive rows of a row-major matrix with `width` columns, from row `first`.
template <typename T>
struct RowPointers {
  const T* rows[kRowTile];
  RowPointers(const T* data, int64_t width, int64_t first, int64_t count) {
    for (int64_t r = 0; r < count; ++r) rows[r] = data + (first + r) * width;
  }
};

// The operands of one quantized matmul: packed weights, their scales, and the quantized activation rows.
struct Operands {
  const void* weight;
  const uint16_t* scales;  // int4: (scale, zero) per group of each output row; int8: one scale per output row
  const int16_t* x;
  const float* x_scales;
  const float* x_sums;  // int4 only
  int64_t in_features, out_features, group_size;
};

// Output rows [begin, end) for activation rows [m, m + Rows), into out [rows, out_features]. GroupSize as int4_row.
template <int64_t Rows, int64_t GroupSize>
void int4_tile(const Operands& a, int64_t begin, int64_t end, int64_t m, float* out) {
  const int64_t groups = a.in_features / a.group_size;
  const RowPointers<int16_t> x(a.x, a.in_features, m, Rows);
  const RowPointers<float> scales(a.x_scales, groups, m, Rows), sums(a.x_sums, groups, m, Rows);
  const auto* packed = static_cast<const uint8_t*>(a.weight);
  std::vector<float> combined(Rows * groups);
  for (int64_t n = begin; n < end; ++n) {
    float total[Rows] = {};  // local, so that the compiler keeps it in registers (out might alias the inputs)
    group_factors<Rows>(a.scales + n * groups * 2, groups, scales.rows, sums.rows, combined.data(), total);
    int4_row<Rows, GroupSize>(packed + n * a.in_features / 2, a.in_features, a.group_size, x.rows, combined.data(),
                              total);
    for (int64_t r = 0; r < Rows; ++r) out[(m + r) * a.out_features + n] = total[r];
  }
}

template <int64_t Rows>
void int4_tile_for_group_size(const Operands& a, int64_t begin, int64_t end, int64_t m, float* out) {
  switch (a.group_size) {
    case 32: return int4_tile<Rows, 32>(a, begin, end, m, out);
    case 64: return int4_tile<Rows, 64>(a, begin, end, m, out);
    case 128: return int4_tile<Rows, 128>(a, begin, end, m, out);
    case 256: return int4_tile<Rows, 256>(a, begin, end, m, out);
    default: return int4_tile<Rows, 0>(a, begin, end, m, out);
  }
}

template <int64_t Rows>
void int8_tile(const Operands& a, int64_t begin, int64_t end, int64_t m, float* out) {
  const RowPointers<int16_t> x(a.x, a.in_features, m, Rows);
  const RowPointers<float> scales(a.x_scales, a.in_features / kInt8Run, m, Rows);
  const auto* weight = static_cast<const int8_t*>(a.weight);
  for (int64_t n = begin; n < end; ++n) {
    float result[Rows];
    int8_row<Rows>(weight + n * a.in_features, a.in_features, x.rows, scales.rows, result);
    const float scale = bf16_bits_to_float(a.scales[n]);
    for (int64_t r = 0; r < Rows; ++r) out[(m + r) * a.out_features + n] = result[r] * scale;
  }
}

// Runs tile(rows, begin, end, m, out) over the output rows in parallel tasks and the activation rows in tiles of
// up to kRowTile, `rows` an std::integral_constant; returns the result in x's dtype and shape.
template <typename TileFn>
at::Tensor run_tiles(const at::Tensor& x, int64_t num_rows, int64_t out_features, const TileFn& tile) {
  at::Tensor out = at::empty({num_rows, out_features}, x.options().dtype(at::kFloat));
  float* op = out.data_ptr<float>();
  at::parallel_for(0, out_features, kRowGrain, [&](int64_t begin, int64_t end) {
    for (int64_t m = 0; m < num_rows; m += kRowTile) {
      if (num_rows - m >= 2)
        tile(std::integral_constant<int64_t, 2>{}, begin, end, m, op);
      else
        tile(std::integral_constant<int64_t, 1>{}, begin, end, m, op);
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
  TORCH_CHECK(in_features % kChunk == 0, "int4_linear: in_features must be a multiple of 64");
  TORCH_CHECK((group_size == 32 || group_size % kChunk == 0) && in_features % group_size == 0,
              "int4_linear: bad group size ", group_size);
  TORCH_CHECK(packed.scalar_type() == at::kByte && scale_zero.scalar_type() == at::kBFloat16, "int4_linear: dtypes");
  const at::Tensor xf = float_rows(x, in_features);
  const QuantizedRows q = quantize_rows(xf, group_size, true);
  const Operands operands{packed.const_data_ptr<uint8_t>(),
                          reinterpret_cast<const uint16_t*>(scale_zero.const_data_ptr<at::BFloat16>()),
                          q.values,
                          q.scales,
                          q.sums,
                          in_features,
                          out_features,
                          group_size};
  return run_tiles(x, xf.size(0), out_features, [&](auto rows, int64_t begin, int64_t end, int64_t m, float* out) {
    int4_tile_for_group_size<decltype(rows)::value>(operands, begin, end, m, out);
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
        const int64_t g = n * groups + k / group_size;
        const float scale = bf16_bits_to_float(sz[2 * g]);
        const float q = static_cast<float>(int4_at(w + n * in_features / 2, k));
        op[n * in_features + k] = q * scale + (bf16_bits_to_float(sz[2 * g + 1]) - 8.f * scale);
      }
    }
  });
  return out;
}

at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scales) {
  const int64_t out_features = weight.size(0), in_features = weight.size(1);
  TORCH_CHECK(x.size(-1) == in_features, "int8_linear: input has ", x.size(-1), " features, weight ", in_features);
  TORCH_CHECK(in_features % kInt8Run == 0, "int8_linear: in_features must be a multiple of 32");
  TORCH_CHECK(weight.scalar_type() == at::kChar && scales.scalar_type() == at::kBFloat16, "int8_linear: dtypes");
  const at::Tensor xf = float_rows(x, in_features);
  const QuantizedRows q = quantize_rows(xf, kInt8Run, false);
  const Operands operands{weight.const_data_ptr<int8_t>(),
                          reinterpret_cast<const uint16_t*>(scales.const_data_ptr<at::BFloat16>()),
                          q.values,
                          q.scales,
                          nullptr,
                          in_features,
                          out_features,
                          kInt8Run};
  return run_tiles(x, xf.size(0), out_features, [&](auto rows, int64_t begin, int64_t end, int64_t m, float* out) {
    int8_tile<decltype(rows)::value>(operands, begin, end, m, out);
  });
}

}  // namespace pagedllm
