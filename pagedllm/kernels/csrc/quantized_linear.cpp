// Weight-only int4 / int8 matmuls (int4 at any number of rows, int8 at up to 64): activations are rounded to int8 with
// one scale (max |x| / 127) per block of channels, and weights and activations meet in integer dot products (AVX2
// maddubs, 32 products per instruction, or VNNI's dpbusd, which also sums them into int32) summed in integers over
// the block, then scaled back to float32 once per block. Activations come and results go in the model dtype
// (float32 or bfloat16). A block is a run of 32 channels for int8 weights (as llama.cpp's Q8 activations) and an
// int4 weight group for int4, so that larger groups take fewer float steps. The minimum's term of int4 multiplies
// the sums of the rounded activations over each group (as llama.cpp's Q8_1 does), so the result is that of the
// dequantized weights with the rounded activations, and the weights' offset from their minimum does not add to the
// rounding error.
//
// int4 layout: output rows in tiles of 8, each tile's weights interleaved so that the 8 lanes of a vector are its
// 8 outputs and each lane holds 4 consecutive weights of one output; one broadcast of 4 activation bytes then
// meets all 8 outputs, and no sum crosses lanes. Per tile, each step of 8 input channels k = 8 s .. 8 s + 7 is 32
// bytes: byte 4 o + j holds weight (8 t + o, 8 s + j) in its low nibble and (8 t + o, 8 s + 4 + j) in its high
// nibble. scale_min[t, g] holds the float16 scales of the tile's 8 outputs for group g, then their 8 minimums, and
// w = q * scale + min (GGUF's Q4_1 and Q4_0 blocks store theirs so: their weights are kept exactly). With AVX-512
// VNNI, tiles t and t + 1 fill the two halves of a 512-bit vector.
// int8 layout: weight[n, k] int8 with one bfloat16 scale per row, w = q * scale.
#include "vec.h"
#include "row_tiles.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

namespace pagedllm {
namespace {

constexpr int64_t kTile = 8;  // output rows per interleaved int4 tile
constexpr int64_t kStep = 8;  // input channels per 32 bytes of an int4 tile
constexpr int64_t kRun = 32;  // activations per rounding step (and, for int8 weights, per scale)
constexpr int64_t kRowGrain = 16;  // output rows per parallel task, at the least
#ifdef PAGEDLLM_AVX512_VNNI
constexpr int64_t kRowTile = 8;  // int8: activation rows sharing one load of a weight chunk (32 vector registers)
// int4: pairs of tiles a kernel call computes, and the activation rows that meet them: each broadcast of activation
// bytes feeds 2 kInt4Pairs dot products and each unpacked weight vector kInt4RowTile, with their sums and results
// in 4 kInt4Pairs kInt4RowTile of the 32 vector registers.
constexpr int64_t kInt4Pairs = 2;
constexpr int64_t kInt4RowTile = 5;
#else
constexpr int64_t kRowTile = 4;
constexpr int64_t kInt4Pairs = 1;
constexpr int64_t kInt4RowTile = 4;
#endif
constexpr int64_t kRowBlock = 40;  // int4: activation rows that meet each weight tile before the next rows do
static_assert(kRowBlock % kInt4RowTile == 0, "int4 row tiles must each be one panel of activation rows");
constexpr int64_t kPrefetchRows = 4;  // how many output rows ahead weights are prefetched
// int4: how far ahead of a tile's group its weights are asked for. Met by several activation rows, a group takes
// long enough that the hardware prefetcher alone leaves the loads waiting on memory.
constexpr int64_t kPrefetchBytes = 1024;
constexpr int64_t kRoundGrain = 16384;  // activations per parallel task of rounding, at the least

constexpr float kActivationLevels = 127.f;

// Activation rows rounded to int8 per block (a multiple of 32 channels), with each block's scale and (where asked
// for) the sum of its rounded activations, in panels of P rows (the last panel holds the rest, R <= P rows): a
// panel holds, per 4 channels, the 4 bytes of each of its rows in turn, then, per block, the scale (and the sum) of
// each of its rows in turn. A tile of a panel's rows then reaches all their activations through one pointer, at
// offsets known when compiling. P = 1 is plain row-major. The buffers are the calling thread's own, reused from
// call to call: a decode step makes over a hundred calls.
struct QuantizedRows {
  const int8_t* values;  // panel of rows [m, m + R): from values + m * in, [in / 4][R][4]
  const float* scales;  // from scales + m * in / block, [in / block][R]
  const float* sums;  // as scales, or nullptr
  const int32_t* offsets;  // as scales, -8 times the sum of the block's rounded values (in levels), or nullptr
};

// Rounds one run of 32 activations to int8 (nearest, ties to even) at `inverse` levels per unit; returns the sum
// of the rounded values (in levels).
template <typename T>
inline float round_run(const T* in, float inverse, int8_t* out) {
#ifdef PAGEDLLM_AVX2
  const __m256 scale = _mm256_set1_ps(inverse);
  __m256i q[4];
  for (int64_t i = 0; i < 4; ++i) q[i] = _mm256_cvtps_epi32(_mm256_mul_ps(load8(in + 8 * i), scale));
  const __m256i sum = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
  // The packs interleave 128-bit lanes; the permutation puts the 32 bytes back in order.
  const __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out),
                      _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
  return horizontal_sum(_mm256_cvtepi32_ps(sum));
#else
  int32_t sum = 0;
  for (int64_t j = 0; j < kRun; ++j) {
    out[j] = static_cast<int8_t>(std::nearbyint(to_float(in[j]) * inverse));
    sum += out[j];
  }
  return static_cast<float>(sum);
#endif
}

// The largest |x| of n activations, n a multiple of 32.
template <typename T>
inline float abs_max(const T* in, int64_t n) {
#ifdef PAGEDLLM_AVX2
  const __m256 magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  __m256 max = _mm256_setzero_ps();
  for (int64_t j = 0; j < n; j += 8) max = _mm256_max_ps(max, _mm256_and_ps(load8(in + j), magnitude));
  __m128 half = _mm_max_ps(_mm256_castps256_ps128(max), _mm256_extractf128_ps(max, 1));
  half = _mm_max_ps(half, _mm_movehl_ps(half, half));
  return _mm_cvtss_f32(_mm_max_ss(half, _mm_movehdup_ps(half)));
#else
  float max = 0.f;
  for (int64_t j = 0; j < n; ++j) max = std::max(max, std::abs(to_float(in[j])));
  return max;
#endif
}

template <typename T>
QuantizedRows quantize_rows(const at::Tensor& x, int64_t block, bool with_sums, int64_t panel_rows) {
  thread_local std::vector<int8_t> values;
  thread_local std::vector<float> scales, sums;
  thread_local std::vector<int32_t> offsets;
  const int64_t size = x.numel(), blocks = size / block;
  values.resize(size);
  scales.resize(blocks);
  sums.resize(with_sums ? blocks : 0);
  offsets.resize(with_sums ? blocks : 0);
  const T* xp = x.const_data_ptr<T>();
  int8_t* vp = values.data();
  float *sp = scales.data(), *sump = sums.data();
  int32_t* offp = offsets.data();
  const int64_t num_rows = x.size(0), width = x.size(1), row_blocks = width / block;
  // A prefill's activations take a good part of a millisecond to round: the threads share them.
  at::parallel_for(0, num_rows, std::max<int64_t>(1, kRoundGrain / width), [&](int64_t begin, int64_t end) {
    int8_t run[kRun];
    for (int64_t n = begin; n < end; ++n) {
      const int64_t r = n % panel_rows, first = n - r, height = std::min(panel_rows, num_rows - first);
      int8_t* panel = vp + first * width + 4 * r;
      for (int64_t b = 0; b < row_blocks; ++b) {
        const int64_t at = first * row_blocks + b * height + r;
        const T* in = xp + n * width + b * block;
        const float max = abs_max(in, block);
        sp[at] = max / kActivationLevels;
        const float inverse = max > 0.f ? kActivationLevels / max : 0.f;
        float levels = 0.f;  // a whole number below 2^24: exact
        for (int64_t j = 0; j < block; j += kRun) {
          levels += round_run(in + j, inverse, run);
          for (int64_t quad = 0; quad < kRun / 4; ++quad)
            std::memcpy(panel + (b * block + j + 4 * quad) * height, run + 4 * quad, 4);
        }
        if (with_sums) {
          sump[at] = levels * sp[at];
          offp[at] = -8 * static_cast<int32_t>(levels);
        }
      }
    }
  });
  return {vp, sp, with_sums ? sump : nullptr, with_sums ? offp : nullptr};
}

#ifdef PAGEDLLM_AVX2
inline __m256i load_int8x32(const int8_t* x) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x)); }

// The 8 int32 sums of adjacent quadruples of the products of 32 unsigned bytes u with 32 signed bytes s (no pair
// of products may pass 32767: |w| <= 128 times |x| <= 127 for int8 weights).
inline __m256i dot_bytes(__m256i u, __m256i s) {
  return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
}
#endif

// Weight k of output o of one int4 tile.
inline int32_t int4_at(const uint8_t* tile, int64_t o, int64_t k) {
  const int64_t within = k % kStep;
  return (tile[32 * (k / kStep) + 4 * o + within % 4] >> (4 * (within / 4))) & 0x0F;
}

#ifdef PAGEDLLM_AVX2
inline int32_t four_bytes(const int8_t* x) {
  int32_t bytes;
  std::memcpy(&bytes, x, sizeof bytes);
  return bytes;
}

// Four activation bytes in every 32-bit lane.
inline __m256i broadcast4(const int8_t* x) { return _mm256_set1_epi32(four_bytes(x)); }
#endif
#ifdef PAGEDLLM_AVX512_VNNI
inline __m512i broadcast4x16(const int8_t* x) { return _mm512_set1_epi32(four_bytes(x)); }
#endif

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
  const uint16_t* scales;  // int4: float16 (scale, min) per group of each output row; int8: a bfloat16 scale per row
  const int8_t* x;
  const float* x_scales;  // per group of int4, per run of 32 for int8
  const float* x_sums;  // int4 only
  const int32_t* x_offsets;  // int4 only
  int64_t in_features, out_features, group_size;
};

// The 8 outputs of int4 tile t for activation rows [m, m + Rows), into out [rows, out_features]: per group, the
// integer sums of products, scaled once by the outputs' scales times the row's activation scale, plus the
// minimum's term. GroupsAreRuns: groups of 32, which the compiler then knows.
template <int64_t Rows, bool GroupsAreRuns, typename Out>
void int4_tile(const Operands& a, int64_t t, int64_t m, Out* out) {
  const int64_t groups = a.in_features / a.group_size;
  const auto* tile = static_cast<const uint8_t*>(a.weight) + t * kTile * a.in_features / 2;
  const uint16_t* scale_min = a.scales + t * groups * 2 * kTile;
  // The tile's rows are one panel: Rows bytes of 4 per 4 channels, Rows scales and sums per group.
  const int8_t* x = a.x + m * a.in_features;
  const float *x_scales = a.x_scales + m * groups, *x_sums = a.x_sums + m * groups;
#ifdef PAGEDLLM_AVX2
  const int64_t group_size = GroupsAreRuns ? kRun : a.group_size;
  const __m256i mask = _mm256_set1_epi8(0x0F);
  __m256 acc[Rows];
  for (int64_t r = 0; r < Rows; ++r) acc[r] = _mm256_setzero_ps();
  for (int64_t g = 0, k = 0; g < groups; ++g) {
    prefetch(tile + 4 * k + kPrefetchBytes, 4 * group_size);
    __m256i group_sum[Rows];
    for (int64_t r = 0; r < Rows; ++r) group_sum[r] = _mm256_setzero_si256();
#ifdef PAGEDLLM_VNNI
#pragma GCC unroll 1
    for (int64_t step = 0; step < group_size / kStep; ++step, k += kStep) {
      const __m256i bytes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(tile + 4 * k));
      const __m256i low = _mm256_and_si256(bytes, mask), high = _mm256_and_si256(_mm256_srli_epi16(bytes, 4), mask);
      for (int64_t r = 0; r < Rows; ++r) {
        group_sum[r] = add_byte_products(group_sum[r], low, broadcast4(x + Rows * k + 4 * r));
        group_sum[r] = add_byte_products(group_sum[r], high, broadcast4(x + Rows * (k + 4) + 4 * r));
      }
    }
#else
    const __m256i ones = _mm256_set1_epi16(1);
    for (int64_t run = 0; run < group_size / kRun; ++run) {
      // A run's int16 sums add 8 pairs of products, each pair at most 2 * 15 * 127 in size: they cannot overflow.
      __m256i run_sum[Rows];
      for (int64_t r = 0; r < Rows; ++r) run_sum[r] = _mm256_setzero_si256();
      // Not unrolled: unrolled, GCC computes all of a run's products before summing them, and spills them.
#pragma GCC unroll 1
      for (int64_t step = 0; step < kRun / kStep; ++step, k += kStep) {
        const __m256i bytes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(tile + 4 * k));
        const __m256i low = _mm256_and_si256(bytes, mask), high = _mm256_and_si256(_mm256_srli_epi16(bytes, 4), mask);
        for (int64_t r = 0; r < Rows; ++r) {
          run_sum[r] = _mm256_add_epi16(run_sum[r], _mm256_maddubs_epi16(low, broadcast4(x + Rows * k + 4 * r)));
          run_sum[r] =
              _mm256_add_epi16(run_sum[r], _mm256_maddubs_epi16(high, broadcast4(x + Rows * (k + 4) + 4 * r)));
        }
      }
      for (int64_t r = 0; r < Rows; ++r) group_sum[r] = _mm256_add_epi32(group_sum[r], _mm256_madd_epi16(run_sum[r], ones));
    }
#endif
    const auto* pair = reinterpret_cast<const c10::Half*>(scale_min + 2 * kTile * g);
    const __m256 scale = load8(pair), min = load8(pair + kTile);
    for (int64_t r = 0; r < Rows; ++r) {
      const __m256 combined = _mm256_mul_ps(scale, _mm256_set1_ps(x_scales[Rows * g + r]));
      acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(group_sum[r]), combined, acc[r]);
      acc[r] = _mm256_fmadd_ps(min, _mm256_set1_ps(x_sums[Rows * g + r]), acc[r]);
    }
  }
  for (int64_t r = 0; r < Rows; ++r) store8(out + (m + r) * a.out_features + t * kTile, acc[r]);
#else
  for (int64_t r = 0; r < Rows; ++r)
    for (int64_t o = 0; o < kTile; ++o) {
      float total = 0.f;
      for (int64_t g = 0; g < groups; ++g) {
        int32_t sum = 0;
        for (int64_t k = g * a.group_size; k < (g + 1) * a.group_size; ++k)
          sum += int4_at(tile, o, k) * x[Rows * (k - k % 4) + 4 * r + k % 4];
        const float scale = half_bits_to_float(scale_min[2 * kTile * g + o]);
        const float min = half_bits_to_float(scale_min[2 * kTile * g + kTile + o]);
        total += scale * x_scales[Rows * g + r] * sum + min * x_sums[Rows * g + r];
      }
      out[(m + r) * a.out_features + t * kTile + o] = static_cast<Out>(total);
    }
#endif
}

#ifdef PAGEDLLM_AVX512_VNNI
// Whether all 16 minimums of a group of tiles t and t + 1 are -8 times their scales (GGUF's Q4_0: w = (q - 8) *
// scale). Such a group's integer sums take -8 times the sum of the rounded activations and the minimum's float step
// falls away. It depends on the weights alone, so a row's result does not depend on the rows beside it.
inline bool offset_eight(__m512 scale, __m512 min) {
  return _mm512_cmp_ps_mask(min, _mm512_mul_ps(scale, _mm512_set1_ps(-8.f)), _CMP_EQ_OQ) == __mmask16(0xFFFF);
}

// offset_eight of each group of tiles t and t + 1, into eights[groups]: for a block of many rows, decided once, so
// that no row tile's sums wait on the scales.
void offsets_of_eight(const Operands& a, int64_t t, uint8_t* eights) {
  const int64_t groups = a.in_features / a.group_size;
  const auto* scale_min = reinterpret_cast<const c10::Half*>(a.scales + t * groups * 2 * kTile);
  for (int64_t g = 0; g < groups; ++g) {
    const c10::Half *pair = scale_min + 2 * kTile * g, *next_pair = pair + groups * 2 * kTile;
    eights[g] = offset_eight(join(load8(pair), load8(next_pair)), join(load8(pair + kTile), load8(next_pair + kTile)));
  }
}

// int4_tile for tiles t .. t + 2 Pairs - 1, two side by side in each 512-bit vector: a broadcast of 4 activation
// bytes meets 16 Pairs outputs, and the results are consecutive in the output row. Each lane's sums and float steps
// are those of its own pair of tiles (eights[p * groups + g] for pair p), whatever Pairs and Rows are, so a row's
// result does not depend on how its tiles and rows were grouped. A one-row step reads each weight once, from memory,
// where the hardware prefetcher, restarting at each 4 KiB page of each tile's stream, leaves the loads waiting: the
// ahead_tiles tiles after these are prefetched into L2 on the way.
template <int64_t Pairs, int64_t Rows, bool GroupsAreRuns, typename Out>
void int4_tile_pairs(const Operands& a, int64_t t, int64_t m, const uint8_t* eights, Out* out, int64_t ahead_tiles) {
  const int64_t groups = a.in_features / a.group_size, group_size = GroupsAreRuns ? kRun : a.group_size;
  const int64_t tile_bytes = kTile * a.in_features / 2, tile_scales = groups * 2 * kTile;
  const auto* tiles = static_cast<const uint8_t*>(a.weight) + t * tile_bytes;
  const uint16_t* scale_min = a.scales + t * tile_scales;
  const int8_t* x = a.x + m * a.in_features;
  const float *x_scales = a.x_scales + m * groups, *x_sums = a.x_sums + m * groups;
  const int32_t* x_offsets = a.x_offsets + m * groups;
  const __m512i mask = _mm512_set1_epi8(0x0F);
  __m512 acc[Rows][Pairs];
  for (int64_t r = 0; r < Rows; ++r)
    for (int64_t p = 0; p < Pairs; ++p) acc[r][p] = _mm512_setzero_ps();
  // ahead_tiles tiles after these (weights and scales, each in order after these), a slice per group, into L2.
  const SpreadPrefetch<kIntoL2> ahead(tiles + 2 * Pairs * tile_bytes, ahead_tiles * tile_bytes, groups);
  const SpreadPrefetch<kIntoL2> ahead_scales(scale_min + 2 * Pairs * tile_scales, ahead_tiles * tile_scales * 2,
                                             groups);
  for (int64_t g = 0, k = 0; g < groups; ++g) {
    ahead(g);
    ahead_scales(g);
    __m512 scale[Pairs], min[Pairs];
    bool eight[Pairs];
    for (int64_t p = 0; p < Pairs; ++p) {
      // Without tiles ahead (several row tiles, or a task's last call): kPrefetchBytes ahead in these, into L1.
      for (int64_t i = 0; i < 2 && ahead_tiles == 0; ++i)
        prefetch(tiles + (2 * p + i) * tile_bytes + 4 * k + kPrefetchBytes, 4 * group_size);
      const auto* pair = reinterpret_cast<const c10::Half*>(scale_min + 2 * p * tile_scales + 2 * kTile * g);
      const auto* next_pair = pair + tile_scales;
      scale[p] = join(load8(pair), load8(next_pair));
      min[p] = join(load8(pair + kTile), load8(next_pair + kTile));
      // With `eights` the offsets start the sums; without, they join after the dot products (the same integers), so
      // that the dot products never wait on the scales.
      eight[p] = eights ? eights[p * groups + g] != 0 : offset_eight(scale[p], min[p]);
    }
    __m512i group_sum[Rows][Pairs];
    for (int64_t r = 0; r < Rows; ++r)
      for (int64_t p = 0; p < Pairs; ++p)
        group_sum[r][p] = eights && eight[p] ? _mm512_set1_epi32(x_offsets[Rows * g + r]) : _mm512_setzero_si512();
#pragma GCC unroll 4  // a group of 32 in one piece
    for (int64_t step = 0; step < group_size / kStep; ++step, k += kStep) {
      __m512i low[Pairs], high[Pairs];
      for (int64_t p = 0; p < Pairs; ++p) {
        const uint8_t* at = tiles + 2 * p * tile_bytes + 4 * k;
        const __m512i bytes =
            _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(at))),
                               _mm256_loadu_si256(reinterpret_cast<const __m256i*>(at + tile_bytes)), 1);
        low[p] = _mm512_and_si512(bytes, mask);
        high[p] = _mm512_and_si512(_mm512_srli_epi16(bytes, 4), mask);
      }
      const int8_t* quads = x + Rows * k;
      for (int64_t r = 0; r < Rows; ++r) {
        const __m512i low_x = broadcast4x16(quads + 4 * r), high_x = broadcast4x16(quads + 4 * (Rows + r));
        for (int64_t p = 0; p < Pairs; ++p) {
          group_sum[r][p] = _mm512_dpbusd_epi32(group_sum[r][p], low[p], low_x);
          group_sum[r][p] = _mm512_dpbusd_epi32(group_sum[r][p], high[p], high_x);
        }
      }
    }
    for (int64_t p = 0; p < Pairs; ++p) {
      if (!eights && eight[p])
        for (int64_t r = 0; r < Rows; ++r)
          group_sum[r][p] = _mm512_add_epi32(group_sum[r][p], _mm512_set1_epi32(x_offsets[Rows * g + r]));
      for (int64_t r = 0; r < Rows; ++r) {
        const __m512 combined = _mm512_mul_ps(scale[p], _mm512_set1_ps(x_scales[Rows * g + r]));
        acc[r][p] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(group_sum[r][p]), combined, acc[r][p]);
      }
      if (!eight[p])
        for (int64_t r = 0; r < Rows; ++r)
          acc[r][p] = _mm512_fmadd_ps(min[p], _mm512_set1_ps(x_sums[Rows * g + r]), acc[r][p]);
    }
  }
  for (int64_t r = 0; r < Rows; ++r)
    for (int64_t p = 0; p < Pairs; ++p) store16(out + (m + r) * a.out_features + (t + 2 * p) * kTile, acc[r][p]);
}
#endif

template <int64_t Rows, typename Out>
void int8_tile(const Operands& a, int64_t begin, int64_t end, int64_t m, Out* out) {
  const RowPointers<int8_t> x(a.x, a.in_features, m, Rows);
  const RowPointers<float> scales(a.x_scales, a.in_features / kRun, m, Rows);
  const auto* weight = static_cast<const int8_t*>(a.weight);
  for (int64_t n = begin; n < end; ++n) {
    // The output row kPrefetchRows ahead, so that a parallel task's first rows (a new stream for the hardware
    // prefetcher) do not wait on memory one after another.
    if (n + kPrefetchRows < end) prefetch(weight + (n + kPrefetchRows) * a.in_features, a.in_features);
    float result[Rows];
    int8_row<Rows>(weight + n * a.in_features, a.in_features, x.rows, scales.rows, result);
    const float scale = bf16_bits_to_float(a.scales[n]);
    for (int64_t r = 0; r < Rows; ++r) out[(m + r) * a.out_features + n] = static_cast<Out>(result[r] * scale);
  }
}

// x's rows, [rows, in_features], contiguous in x's dtype.
at::Tensor input_rows(const at::Tensor& x, int64_t in_features) { return x.reshape({-1, in_features}).contiguous(); }

// The result [rows, out_features] in x's leading dimensions.
at::Tensor as_output(const at::Tensor& out, const at::Tensor& x) {
  auto sizes = x.sizes().vec();
  sizes.back() = out.size(1);
  return out.view(sizes);
}

}  // namespace

at::Tensor int4_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale_min, int64_t group_size) {
  const int64_t out_features = packed.size(0) * kTile, in_features = packed.size(1) / 4;
  TORCH_CHECK(x.size(-1) == in_features, "int4_linear: input has ", x.size(-1), " features, weight ", in_features);
  TORCH_CHECK(in_features % kRun == 0, "int4_linear: in_features must be a multiple of 32");
  TORCH_CHECK(group_size > 0 && group_size % kRun == 0 && in_features % group_size == 0,
              "int4_linear: bad group size ", group_size);
  TORCH_CHECK(packed.scalar_type() == at::kByte && scale_min.scalar_type() == at::kHalf, "int4_linear: dtypes");
  const at::Tensor rows = input_rows(x, in_features);
  const int64_t num_rows = rows.size(0);
  at::Tensor out = at::empty({num_rows, out_features}, x.options());
  PAGEDLLM_DISPATCH_FLOAT_TYPES(x.scalar_type(), "int4_linear", [&] {
    const QuantizedRows q = quantize_rows<scalar_t>(rows, group_size, true, kInt4RowTile);
    const Operands operands{packed.const_data_ptr<uint8_t>(),
                            reinterpret_cast<const uint16_t*>(scale_min.const_data_ptr<at::Half>()),
                            q.values,
                            q.scales,
                            q.sums,
                            q.offsets,
                            in_features,
                            out_features,
                            group_size};
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, out_features / kTile, kRowGrain / kTile, [&](int64_t begin, int64_t end) {
#ifdef PAGEDLLM_AVX512_VNNI
      // Several row tiles take the groups' offsets decided before their dot products, for all of the task's pairs of
      // tiles at once: the scales then stream from memory once per call, in order, not once per block of rows.
      // Fewer rows decide them as they go.
      const int64_t groups = in_features / group_size;
      const bool decided = num_rows > kInt4RowTile;
      thread_local std::vector<uint8_t> eights;
      if (decided) {
        eights.resize((end - begin) / 2 * groups);
        for (int64_t t = begin; t + 1 < end; t += 2)
          offsets_of_eight(operands, t, eights.data() + (t - begin) / 2 * groups);
      }
#endif
      for (int64_t first = 0; first < num_rows; first += kRowBlock)
        for (int64_t t = begin; t < end;) {
          const int64_t rows_left = std::min(kRowBlock, num_rows - first);
#ifdef PAGEDLLM_AVX512_VNNI
          // Four tiles at a time, then a pair, then the last alone.
          const int64_t pairs = std::min(kInt4Pairs, (end - t) / 2);
          if (pairs > 0) {
            const uint8_t* decisions = decided ? eights.data() + (t - begin) / 2 * groups : nullptr;
            // A few rows stream the weights from memory: this task's next tiles are prefetched during these.
            const int64_t ahead = decided ? 0 : std::min(2 * pairs, end - t - 2 * pairs);
            for_row_tiles<kInt4RowTile>(rows_left, [&](auto tile_rows, int64_t m) {
              constexpr int64_t R = decltype(tile_rows)::value;
              if (pairs == kInt4Pairs)
                group_size == kRun
                    ? int4_tile_pairs<kInt4Pairs, R, true>(operands, t, first + m, decisions, op, ahead)
                    : int4_tile_pairs<kInt4Pairs, R, false>(operands, t, first + m, decisions, op, ahead);
              else
                group_size == kRun ? int4_tile_pairs<1, R, true>(operands, t, first + m, decisions, op, ahead)
                                   : int4_tile_pairs<1, R, false>(operands, t, first + m, decisions, op, ahead);
            });
            t += 2 * pairs;
            continue;
          }
#endif
          for_row_tiles<kInt4RowTile>(rows_left, [&](auto tile_rows, int64_t m) {
            constexpr int64_t R = decltype(tile_rows)::value;
            if (group_size == kRun)
              int4_tile<R, true>(operands, t, first + m, op);
            else
              int4_tile<R, false>(operands, t, first + m, op);
          });
          ++t;
        }
    });
  });
  return as_output(out, x);
}

at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scales) {
  const int64_t out_features = weight.size(0), in_features = weight.size(1);
  TORCH_CHECK(x.size(-1) == in_features, "int8_linear: input has ", x.size(-1), " features, weight ", in_features);
  TORCH_CHECK(in_features % kRun == 0, "int8_linear: in_features must be a multiple of 32");
  TORCH_CHECK(weight.scalar_type() == at::kChar && scales.scalar_type() == at::kBFloat16, "int8_linear: dtypes");
  const at::Tensor rows = input_rows(x, in_features);
  const int64_t num_rows = rows.size(0);
  at::Tensor out = at::empty({num_rows, out_features}, x.options());
  PAGEDLLM_DISPATCH_FLOAT_TYPES(x.scalar_type(), "int8_linear", [&] {
    const QuantizedRows q = quantize_rows<scalar_t>(rows, kRun, false, 1);
    const Operands operands{weight.const_data_ptr<int8_t>(),
                            reinterpret_cast<const uint16_t*>(scales.const_data_ptr<at::BFloat16>()),
                            q.values,
                            q.scales,
                            nullptr,
                            nullptr,
                            in_features,
                            out_features,
                            kRun};
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, out_features, kRowGrain, [&](int64_t begin, int64_t end) {
      // kRowGrain output rows at a time meet every activation row, so that their weights are read from memory once.
      for (int64_t first = begin; first < end; first += kRowGrain) {
        const int64_t last = std::min(first + kRowGrain, end);
        for_row_tiles<kRowTile>(num_rows, [&](auto tile_rows, int64_t m) {
          int8_tile<decltype(tile_rows)::value>(operands, first, last, m, op);
        });
      }
    });
  });
  return as_output(out, x);
}

}  // namespace pagedllm
