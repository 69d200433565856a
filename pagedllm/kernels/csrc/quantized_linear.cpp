// Weight-only int4 / int8 matmuls for few activation rows (decode steps): activations are rounded to int8 with
// one scale (max |x| / 127) per block of channels, and weights and activations meet in integer dot products (AVX2
// maddubs, 32 products per instruction) summed in int32 over the block, then scaled back to float32 once per
// block. A block is a run of 32 channels for int8 weights (as llama.cpp's Q8 activations) and an int4 weight
// group for int4, so that larger groups take fewer float steps. The zero-point term of int4 multiplies the sums
// of the rounded activations over each group (as llama.cpp's Q8_1 does), so the result is that of the dequantized
// weights with the rounded activations, and the weights' offset from their zero point does not add to the
// rounding error.
//
// int4 layout: each run of 64 weights of a row is 32 bytes; byte j holds weight 64 c + j in its low nibble and
// 64 c + 32 + j in its high nibble, so one mask gives the first 32 weights as bytes in the order of the
// activations and one shift and mask the next 32. scale_zero[n, g] is the (scale, zero) bfloat16 pair of group g,
// and w = (q - 8) * scale + zero.
// int8 layout: weight[n, k] int8 with one bfloat16 scale per row, w = q * scale.
#include "vec.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

namespace pagedllm {
namespace {

constexpr int64_t kChunk = 64;  // int4 weights per 32-byte chunk
constexpr int64_t kRun = 32;  // activations per rounding step (and, for int8 weights, per scale)
constexpr int64_t kRowGrain = 16;  // output rows per parallel task, at the least
constexpr int64_t kRowTile = 4;  // activation rows sharing one load of a weight chunk
constexpr int64_t kPrefetchRows = 4;  // how many output rows ahead weights are prefetched

constexpr float kActivationLevels = 127.f;

// Activation rows rounded to int8 per block (a multiple of 32 channels), with each block's scale and (where asked
// for) the sum of its rounded activations. The buffers are the calling thread's own, reused from call to call: a
// decode step makes over a hundred calls.
struct QuantizedRows {
  const int8_t* values;  // [rows, in]
  const float* scales;  // [rows, in / block]
  const float* sums;  // [rows, in / block], or nullptr
};

// Rounds one run of 32 activations to int8 (nearest, ties to even) at `inverse` levels per unit; returns the sum
// of the rounded values (in levels).
inline float round_run(const float* in, float inverse, int8_t* out) {
#ifdef PAGEDLLM_AVX2
  const __m256 scale = _mm256_set1_ps(inverse);
  __m256i q[4];
  for (int64_t i = 0; i < 4; ++i) q[i] = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(in + 8 * i), scale));
  const __m256i sum = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
  // The packs interleave 128-bit lanes; the permutation puts the 32 bytes back in order.
  const __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out),
                      _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
  return horizontal_sum(_mm256_cvtepi32_ps(sum));
#else
  int32_t sum = 0;
  for (int64_t j = 0; j < kRun; ++j) {
    out[j] = static_cast<int8_t>(std::nearbyint(in[j] * inverse));
    sum += out[j];
  }
  return static_cast<float>(sum);
#endif
}

QuantizedRows quantize_rows(const at::Tensor& x, int64_t block, bool with_sums) {
  thread_local std::vector<int8_t> values;
  thread_local std::vector<float> scales, sums;
  const int64_t size = x.numel(), blocks = size / block;
  values.resize(size);
  scales.resize(blocks);
  sums.resize(with_sums ? blocks : 0);
  const float* xp = x.const_data_ptr<float>();
  for (int64_t i = 0; i < blocks; ++i) {
    const float* in = xp + i * block;
    float max = 0.f;
    for (int64_t j = 0; j < block; ++j) max = std::max(max, std::abs(in[j]));
    scales[i] = max / kActivationLevels;
    const float inverse = max > 0.f ? kActivationLevels / max : 0.f;
    float levels = 0.f;  // a whole number below 2^24: exact
    for (int64_t j = 0; j < block; j += kRun) levels += round_run(in + j, inverse, values.data() + i * block + j);
    if (with_sums) sums[i] = levels * scales[i];
  }
  return {values.data(), scales.data(), with_sums ? sums.data() : nullptr};
}

#ifdef PAGEDLLM_AVX2
inline __m256i load_int8x32(const int8_t* x) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x)); }

// The 8 int32 sums of adjacent quadruples of the products of 32 unsigned bytes u with 32 signed bytes s (no pair
// of products may pass 32767: 15 * 127 for int4 weights, 128 * 127 for int8 ones).
inline __m256i dot_bytes(__m256i u, __m256i s) {
  return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
}
#endif

// Weight k of one row in the int4 layout.
inline int32_t int4_at(const uint8_t* row, int64_t k) {
  const int64_t within = k % kChunk;
  return (row[32 * (k / kChunk) + within % 32] >> (4 * (within / 32))) & 0x0F;
}

// Asks for `bytes` bytes from p into the cache, a line at a time: the output row kPrefetchRows ahead, so that a
// parallel task's first rows (a new stream for the hardware prefetcher) do not wait on memory one after another.
inline void prefetch(const void* p, int64_t bytes) {
#ifdef PAGEDLLM_AVX2
  for (int64_t offset = 0; offset < bytes; offset += 64)
    _mm_prefetch(static_cast<const char*>(p) + offset, _MM_HINT_T0);
#endif
}

#ifdef PAGEDLLM_AVX2
// All-ones in the first n of 8 lanes (n >= 8: all of them).
inline __m256i first_lanes(int64_t n) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(std::min<int64_t>(n, 8))),
                            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
#endif

// Groups of one row in `combined`: whole multiples of 8, so that eight groups are stored at a time.
inline int64_t combined_stride(int64_t groups) { return (groups + 7) / 8 * 8; }

// The factors of one output row: the zero-point terms (zero - 8 scale) * the sum of each group's rounded
// activations, summed into total[r], and combined[r * combined_stride(groups) + g], the scale of group g times
// activation row r's scale for the group. Eight groups at a time, the last ones masked: each bfloat16
// (scale, zero) pair is a 32-bit lane, the scale in its low half and the zero in its high.
template <int64_t Rows>
void row_factors(const uint16_t* scale_zero, int64_t groups, const float* const* x_scales, const float* const* x_sums,
                 float* combined, float* total) {
  const int64_t stride = combined_stride(groups);
#ifdef PAGEDLLM_AVX2
  __m256 terms[Rows];
  for (int64_t r = 0; r < Rows; ++r) terms[r] = _mm256_setzero_ps();
  for (int64_t g = 0; g < groups; g += 8) {
    const __m256i lanes = first_lanes(groups - g);
    const __m256i pairs = _mm256_maskload_epi32(reinterpret_cast<const int*>(scale_zero + 2 * g), lanes);
    const __m256 scale = _mm256_castsi256_ps(_mm256_slli_epi32(pairs, 16));
    const __m256 zero = _mm256_castsi256_ps(_mm256_and_si256(pairs, _mm256_set1_epi32(static_cast<int>(0xFFFF0000u))));
    const __m256 min = _mm256_fnmadd_ps(_mm256_set1_ps(8.f), scale, zero);
    for (int64_t r = 0; r < Rows; ++r) {
      terms[r] = _mm256_fmadd_ps(min, _mm256_maskload_ps(x_sums[r] + g, lanes), terms[r]);
      _mm256_storeu_ps(combined + r * stride + g, _mm256_mul_ps(scale, _mm256_maskload_ps(x_scales[r] + g, lanes)));
    }
  }
  for (int64_t r = 0; r < Rows; ++r) total[r] += horizontal_sum(terms[r]);
#else
  for (int64_t g = 0; g < groups; ++g) {
    const float scale = bf16_bits_to_float(scale_zero[2 * g]);
    const float min = bf16_bits_to_float(scale_zero[2 * g + 1]) - 8.f * scale;
    for (int64_t r = 0; r < Rows; ++r) {
      total[r] += min * x_sums[r][g];
      combined[r * stride + g] = scale * x_scales[r][g];
    }
  }
#endif
}

// The dot products of one output row with Rows activation rows, added to total: integer sums over each group,
// times the group's combined scale (row_factors). GroupsAreRuns: groups of 32, which the compiler then knows.
template <int64_t Rows, bool GroupsAreRuns>
void int4_row(const uint8_t* packed, int64_t in_features, int64_t group_size, const int8_t* const* x,
              const float* combined, float* total) {
  const int64_t stride = combined_stride(in_features / group_size);
#ifdef PAGEDLLM_AVX2
  const int64_t runs_per_group = GroupsAreRuns ? 1 : group_size / kRun;
  // Float sums of the groups that end at a chunk's first half and at its second, so that consecutive groups'
  // multiply-adds do not wait on each other where groups are runs.
  __m256 low_acc[Rows], high_acc[Rows];
  __m256i group_sum[Rows];
  for (int64_t r = 0; r < Rows; ++r) {
    low_acc[r] = high_acc[r] = _mm256_setzero_ps();
    group_sum[r] = _mm256_setzero_si256();
  }
  const __m256i mask = _mm256_set1_epi8(0x0F);
  int64_t group = 0, runs_left = runs_per_group;
  // Adds the products of one run of weights to the group's integer sums; at the group's end, moves them to acc.
  auto add_run = [&](__m256i weights, int64_t offset, __m256* acc) {
    if constexpr (GroupsAreRuns) {
      for (int64_t r = 0; r < Rows; ++r)
        acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot_bytes(weights, load_int8x32(x[r] + offset))),
                                 _mm256_broadcast_ss(combined + r * stride + group), acc[r]);
      ++group;
      return;
    }
    for (int64_t r = 0; r < Rows; ++r)
      group_sum[r] = _mm256_add_epi32(group_sum[r], dot_bytes(weights, load_int8x32(x[r] + offset)));
    if (--runs_left > 0) return;
    for (int64_t r = 0; r < Rows; ++r) {
      acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(group_sum[r]), _mm256_broadcast_ss(combined + r * stride + group),
                               acc[r]);
      group_sum[r] = _mm256_setzero_si256();
    }
    ++group;
    runs_left = runs_per_group;
  };
  for (int64_t c = 0; c < in_features / kChunk; ++c) {
    const __m256i bytes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(packed + 32 * c));
    add_run(_mm256_and_si256(bytes, mask), kChunk * c, low_acc);
    add_run(_mm256_and_si256(_mm256_srli_epi16(bytes, 4), mask), kChunk * c + kRun, high_acc);
  }
  for (int64_t r = 0; r < Rows; ++r) total[r] += horizontal_sum(_mm256_add_ps(low_acc[r], high_acc[r]));
#else
  for (int64_t g = 0; g < in_features / group_size; ++g)
    for (int64_t r = 0; r < Rows; ++r) {
      int32_t sum = 0;
      for (int64_t k = g * group_size; k < (g + 1) * group_size; ++k) sum += int4_at(packed, k) * x[r][k];
      total[r] += combined[r * stride + g] * sum;
    }
#endif
}

// The dot products of one int8 output row with Rows activation rows, scaled per run of 32 activations.
template <int64_t Rows>
void int8_row(const int8_t* w, int64_t in_features, const int8_t* const* x, const float* const* x_scales,
              float* result) {
  const int64_t runs = in_features / kRun;
  for (int64_t r = 0; r < Rows; ++r) result[r] = 0.f;
#ifdef PAGEDLLM_AVX2
  __m256 acc[Rows];
  for (int64_t r = 0; r < Rows; ++r) acc[r] = _mm256_setzero_ps();
  for (int64_t b = 0; b < runs; ++b) {
    // Signed times signed as |w| times x with w's sign: |w| <= 128 fits an unsigned byte, and |x| <= 127.
    const __m256i weights = load_int8x32(w + kRun * b);
    const __m256i magnitudes = _mm256_sign_epi8(weights, weights);
    for (int64_t r = 0; r < Rows; ++r) {
      const __m256i sum = dot_bytes(magnitudes, _mm256_sign_epi8(load_int8x32(x[r] + kRun * b), weights));
      acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum), _mm256_set1_ps(x_scales[r][b]), acc[r]);
    }
  }
  for (int64_t r = 0; r < Rows; ++r) result[r] = horizontal_sum(acc[r]);
#else
  for (int64_t b = 0; b < runs; ++b)
    for (int64_t r = 0; r < Rows; ++r) {
      int32_t sum = 0;
      for (int64_t j = kRun * b; j < kRun * (b + 1); ++j) sum += int32_t{w[j]} * x[r][j];
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
  const int8_t* x;
  const float* x_scales;  // per group of int4, per run of 32 for int8
  const float* x_sums;  // int4 only
  int64_t in_features, out_features, group_size;
};

// Output rows [begin, end) for activation rows [m, m + Rows), into out [rows, out_features]. GroupsAreRuns: the
// group size is 32.
template <int64_t Rows, bool GroupsAreRuns>
void int4_tile(const Operands& a, int64_t begin, int64_t end, int64_t m, float* out) {
  const int64_t groups = a.in_features / a.group_size;
  const RowPointers<int8_t> x(a.x, a.in_features, m, Rows);
  const RowPointers<float> scales(a.x_scales, groups, m, Rows), sums(a.x_sums, groups, m, Rows);
  const auto* packed = static_cast<const uint8_t*>(a.weight);
  thread_local std::vector<float> combined;
  combined.resize(Rows * combined_stride(groups));
  for (int64_t n = begin; n < end; ++n) {
    if (n + kPrefetchRows < end) {
      prefetch(packed + (n + kPrefetchRows) * a.in_features / 2, a.in_features / 2);
      prefetch(a.scales + (n + kPrefetchRows) * groups * 2, groups * 4);
    }
    float total[Rows] = {};  // local, so that the compiler keeps it in registers (out might alias the inputs)
    row_factors<Rows>(a.scales + n * groups * 2, groups, scales.rows, sums.rows, combined.data(), total);
    int4_row<Rows, GroupsAreRuns>(packed + n * a.in_features / 2, a.in_features, a.group_size, x.rows,
                                  combined.data(), total);
    for (int64_t r = 0; r < Rows; ++r) out[(m + r) * a.out_features + n] = total[r];
  }
}

template <int64_t Rows>
void int8_tile(const Operands& a, int64_t begin, int64_t end, int64_t m, float* out) {
  const RowPointers<int8_t> x(a.x, a.in_features, m, Rows);
  const RowPointers<float> scales(a.x_scales, a.in_features / kRun, m, Rows);
  const auto* weight = static_cast<const int8_t*>(a.weight);
  for (int64_t n = begin; n < end; ++n) {
    if (n + kPrefetchRows < end) prefetch(weight + (n + kPrefetchRows) * a.in_features, a.in_features);
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
    int64_t m = 0;
    for (; num_rows - m >= kRowTile; m += kRowTile) tile(std::integral_constant<int64_t, kRowTile>{}, begin, end, m, op);
    for (; num_rows - m >= 2; m += 2) tile(std::integral_constant<int64_t, 2>{}, begin, end, m, op);
    if (m < num_rows) tile(std::integral_constant<int64_t, 1>{}, begin, end, m, op);
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
  TORCH_CHECK(group_size > 0 && group_size % kRun == 0 && in_features % group_size == 0,
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
    if (group_size == kRun)
      int4_tile<decltype(rows)::value, true>(operands, begin, end, m, out);
    else
      int4_tile<decltype(rows)::value, false>(operands, begin, end, m, out);
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
  TORCH_CHECK(in_features % kRun == 0, "int8_linear: in_features must be a multiple of 32");
  TORCH_CHECK(weight.scalar_type() == at::kChar && scales.scalar_type() == at::kBFloat16, "int8_linear: dtypes");
  const at::Tensor xf = float_rows(x, in_features);
  const QuantizedRows q = quantize_rows(xf, kRun, false);
  const Operands operands{weight.const_data_ptr<int8_t>(),
                          reinterpret_cast<const uint16_t*>(scales.const_data_ptr<at::BFloat16>()),
                          q.values,
                          q.scales,
                          nullptr,
                          in_features,
                          out_features,
                          kRun};
  return run_tiles(x, xf.size(0), out_features, [&](auto rows, int64_t begin, int64_t end, int64_t m, float* out) {
    int8_tile<decltype(rows)::value>(operands, begin, end, m, out);
  });
}

}  // namespace pagedllm
