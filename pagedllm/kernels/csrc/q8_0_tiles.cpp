// Matmuls by GGUF Q8_0 weights kept in tiles of 16 output channels: the one layout a Q8_0 weight is multiplied in at
// every row count, so that an activation row gets the same output bits alone or beside any other rows; and the rows
// a tied embedding table's lookups dequantize from the same tiles.
//
// Layout. Q8_0 stores w = d * c per block of 32 inputs of an output channel (c a signed byte, d a float16). A weight
// of out_features channels, padded with zero channels to whole tiles of 16, is kept as
//   tiles[t, 512 b + 64 s + 4 o + j] = c(16 t + o, 32 b + 4 s + j) + 128   (an unsigned byte; s < 8, j < 4)
//   scales[t, 16 b + o] = d(16 t + o, b)
// which are the file's bytes rearranged (34 per 32 weights). A 64-byte step holds 4 inputs of the tile's 16 outputs:
// one 512-bit vector whose int32 lanes are the outputs (two 256-bit vectors of 8 with AVX2).
//
// Math. Activation rows are rounded to int8 per block of 32 inputs with the scale max|x| / 127, x = s_x * a. Per
// output and block, sum (c + 128) a - 128 sum a = sum c a is an exact int32 (dpbusd: four unsigned weight bytes
// times four signed activation bytes per lane; AVX2 without VNNI: |c| times a with c's sign, in int16 pairs); then
// y = fma(float(sum), d * s_x, y), block after block. Each of a row's steps depends on that row alone: a row's
// outputs have the same bits whatever rows share the call and however the kernel groups rows into tiles. A tile's
// weights are loaded once per step for all the rows of a row tile (up to 8), and a group of tiles stays in the L2
// cache while the next row tiles meet it.
#include "ops.h"
#include "row_tiles.h"
#include "vec.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

namespace pagedllm {
namespace {

constexpr int64_t kTile = 16;  // output channels per tile
constexpr int64_t kBlock = 32;  // inputs per Q8_0 block
constexpr int64_t kStep = 4;  // inputs per step
constexpr int64_t kSteps = kBlock / kStep;
constexpr int64_t kTileBlockBytes = kTile * kBlock;
// Output tiles per parallel task: as many as fit in this many bytes, in the L2 cache, where every row tile after the
// first reads them. Each such pass jumps back, and the hardware prefetcher, which follows a forward stream, starts
// over at the next group: the fewer groups, the fewer restarts.
constexpr int64_t kGroupBytes = int64_t{512} << 10;
constexpr int64_t kGroupsPerThread = 8;  // at the least, so that threads finish within about a group of each other
constexpr int64_t kRoundGrain = 512;  // blocks per parallel task of rounding, at the least
constexpr float kActivationLevels = 127.f;
constexpr int64_t kRowsGrain = 16;  // looked-up rows per parallel task, at the least

// Activation rows rounded to int8 per block of 32, in order.
struct Activations {
  const int8_t* values;  // [rows, in]
  const float* scales;  // [rows, blocks]
  const int32_t* offsets;  // [rows, blocks]: -128 times the block's sum of values
  int64_t in_features, blocks;
};

#if defined(PAGEDLLM_AVX512_VNNI)
// One block of 32 as round_rows' scalar loop rounds it, 16 values a vector: the maximum does not depend on the order
// of its operands, and cvtps_epi32 rounds to nearest even, as nearbyint does in the default rounding mode.
template <typename T>
inline void round_block(const T* x, int8_t* values, float& scale, int32_t& offset) {
  const __m512 v[2] = {join(load8(x), load8(x + 8)), join(load8(x + 16), load8(x + 24))};
  const float max = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v[0]), _mm512_abs_ps(v[1])));
  const __m512 inverse = _mm512_set1_ps(max > 0.f ? kActivationLevels / max : 0.f);
  __m512i levels[2];
  for (int64_t h = 0; h < 2; ++h) {
    levels[h] = _mm512_cvtps_epi32(_mm512_mul_ps(v[h], inverse));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(values + 16 * h), _mm512_cvtepi32_epi8(levels[h]));
  }
  scale = max / kActivationLevels;
  offset = -128 * _mm512_reduce_add_epi32(_mm512_add_epi32(levels[0], levels[1]));
}
#endif

template <typename T>
Activations round_rows(const at::Tensor& x) {
  thread_local std::vector<int8_t> values;
  thread_local std::vector<float> scales;
  thread_local std::vector<int32_t> offsets;
  const int64_t rows = x.size(0), in = x.size(1), blocks = in / kBlock, total = rows * blocks;
  values.resize(rows * in);
  scales.resize(total);
  offsets.resize(total);
  const T* xp = x.const_data_ptr<T>();
  int8_t* vp = values.data();
  float* sp = scales.data();
  int32_t* op = offsets.data();
  at::parallel_for(0, total, kRoundGrain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {  // rows are whole blocks: block i starts at value 32 i
#if defined(PAGEDLLM_AVX512_VNNI)
      round_block(xp + kBlock * i, vp + kBlock * i, sp[i], op[i]);
      continue;
#endif
      float converted[kBlock];
      float max = 0.f;
      for (int64_t j = 0; j < kBlock; ++j) {
        converted[j] = to_float(xp[kBlock * i + j]);
        max = std::max(max, std::abs(converted[j]));
      }
      const float inverse = max > 0.f ? kActivationLevels / max : 0.f;
      int32_t sum = 0;
      for (int64_t j = 0; j < kBlock; ++j) {
        const auto level = static_cast<int8_t>(std::nearbyint(converted[j] * inverse));
        vp[kBlock * i + j] = level;
        sum += level;
      }
      sp[i] = max / kActivationLevels;
      op[i] = -128 * sum;
    }
  });
  return {vp, sp, op, in, blocks};
}

struct TiledWeight {
  const uint8_t* tiles;
  const uint16_t* scales;  // float16 bits
  int64_t blocks, out_features;

  const uint8_t* tile(int64_t t) const { return tiles + t * blocks * kTileBlockBytes; }
  const uint16_t* tile_scales(int64_t t) const { return scales + t * blocks * kTile; }
};

inline int32_t four_bytes(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

// Activation rows m .. m + Rows - 1 of a call.
template <int64_t Rows>
struct RowTile {
  const int8_t* values[Rows];
  const float* scales[Rows];
  const int32_t* offsets[Rows];

  RowTile(const Activations& x, int64_t m) {
    for (int64_t r = 0; r < Rows; ++r) {
      values[r] = x.values + (m + r) * x.in_features;
      scales[r] = x.scales + (m + r) * x.blocks;
      offsets[r] = x.offsets + (m + r) * x.blocks;
    }
  }

  int32_t step(int64_t r, int64_t b, int64_t s) const { return four_bytes(values[r] + kBlock * b + kStep * s); }
};

// Where results go: row m, the outputs of tile t (fewer than 16 in a padded last tile).
template <typename Out>
struct Outputs {
  Out* out;
  int64_t out_features;

  Out* at(int64_t m, int64_t t) const { return out + m * out_features + kTile * t; }
  int64_t width(int64_t t) const { return std::min(kTile, out_features - kTile * t); }
};

template <typename Out>
inline void store_scalar(const float* values, int64_t n, Out* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<Out>(values[i]);
}

#if defined(PAGEDLLM_AVX512_VNNI)
constexpr int64_t kMaxRowTile = 8;  // activation rows that share each weight load

// Output tile t for activation rows m .. m + Rows - 1. With few rows each block's integer sums run in two chains
// (even and odd steps, added exactly), so that one row does not wait on dpbusd's latency; from kOneChainRows rows
// on, the rows' own chains hide it, and the add would cost about one step in eight.
constexpr int64_t kOneChainRows = 4;

template <int64_t Rows, typename Out>
void tile_rows(const TiledWeight& w, int64_t t, const Activations& x, int64_t m, const Outputs<Out>& y) {
  constexpr int64_t kChains = Rows >= kOneChainRows ? 1 : 2;
  const RowTile<Rows> rows(x, m);
  const uint8_t* tile = w.tile(t);
  const auto* scales = reinterpret_cast<const __m256i*>(w.tile_scales(t));
  __m512 acc[Rows];
  for (int64_t r = 0; r < Rows; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t b = 0; b < w.blocks; ++b, tile += kTileBlockBytes) {
    __m512i sums[kChains][Rows];
    for (int64_t r = 0; r < Rows; ++r) {
      sums[0][r] = _mm512_set1_epi32(rows.offsets[r][b]);  // the products below are of c + 128
      if constexpr (kChains == 2) sums[1][r] = _mm512_setzero_si512();
    }
    for (int64_t s = 0; s < kSteps; s += 2) {
      const __m512i q0 = _mm512_loadu_si512(tile + 64 * s), q1 = _mm512_loadu_si512(tile + 64 * (s + 1));
      for (int64_t r = 0; r < Rows; ++r) {
        sums[0][r] = _mm512_dpbusd_epi32(sums[0][r], q0, _mm512_set1_epi32(rows.step(r, b, s)));
        sums[kChains - 1][r] = _mm512_dpbusd_epi32(sums[kChains - 1][r], q1, _mm512_set1_epi32(rows.step(r, b, s + 1)));
      }
    }
    const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256(scales + b));
    for (int64_t r = 0; r < Rows; ++r) {
      const __m512i sum = kChains == 2 ? _mm512_add_epi32(sums[0][r], sums[kChains - 1][r]) : sums[0][r];
      acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), _mm512_mul_ps(d, _mm512_set1_ps(rows.scales[r][b])), acc[r]);
    }
  }
  for (int64_t r = 0; r < Rows; ++r) {
    Out* out = y.at(m + r, t);
    if (y.width(t) == kTile) {
      store16(out, acc[r]);
    } else {
      alignas(64) float spill[kTile];
      _mm512_store_ps(spill, acc[r]);
      store_scalar(spill, y.width(t), out);
    }
  }
}
#elif defined(PAGEDLLM_AVX2)
constexpr int64_t kMaxRowTile = 4;  // 16 vector registers: 4 per row

// Output tile t for activation rows m .. m + Rows - 1, as two vectors of 8 outputs.
template <int64_t Rows, typename Out>
void tile_rows(const TiledWeight& w, int64_t t, const Activations& x, int64_t m, const Outputs<Out>& y) {
  const RowTile<Rows> rows(x, m);
  const uint8_t* tile = w.tile(t);
  const auto* scales = reinterpret_cast<const __m128i*>(w.tile_scales(t));
  __m256 acc[Rows][2];
  for (int64_t r = 0; r < Rows; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
  for (int64_t b = 0; b < w.blocks; ++b, tile += kTileBlockBytes) {
    __m256i sums[Rows][2];
    for (int64_t r = 0; r < Rows; ++r) {
#ifdef PAGEDLLM_VNNI
      sums[r][0] = sums[r][1] = _mm256_set1_epi32(rows.offsets[r][b]);  // the products below are of c + 128
#else
      sums[r][0] = sums[r][1] = _mm256_setzero_si256();  // the products below are of c
#endif
    }
    for (int64_t s = 0; s < kSteps; ++s) {
      const auto* step = reinterpret_cast<const __m256i*>(tile + 64 * s);
      __m256i q[2] = {_mm256_loadu_si256(step), _mm256_loadu_si256(step + 1)};
#ifndef PAGEDLLM_VNNI
      __m256i magnitudes[2];
      for (int64_t h = 0; h < 2; ++h) {
        q[h] = _mm256_xor_si256(q[h], _mm256_set1_epi8(static_cast<char>(0x80)));  // c
        magnitudes[h] = _mm256_abs_epi8(q[h]);  // |c| <= 128 as an unsigned byte
      }
#endif
      for (int64_t r = 0; r < Rows; ++r) {
        const __m256i a = _mm256_set1_epi32(rows.step(r, b, s));
        for (int64_t h = 0; h < 2; ++h) {
#ifdef PAGEDLLM_VNNI
          sums[r][h] = add_byte_products(sums[r][h], q[h], a);
#else
          // |c| times a with c's sign: each int16 pair at most 2 * 128 * 127, no saturation.
          const __m256i pairs = _mm256_maddubs_epi16(magnitudes[h], _mm256_sign_epi8(a, q[h]));
          sums[r][h] = _mm256_add_epi32(sums[r][h], _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
#endif
        }
      }
    }
    for (int64_t h = 0; h < 2; ++h) {
      const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128(scales + 2 * b + h));
      for (int64_t r = 0; r < Rows; ++r)
        acc[r][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums[r][h]), _mm256_mul_ps(d, _mm256_set1_ps(rows.scales[r][b])),
                                    acc[r][h]);
    }
  }
  for (int64_t r = 0; r < Rows; ++r) {
    Out* out = y.at(m + r, t);
    if (y.width(t) == kTile) {
      store8(out, acc[r][0]);
      store8(out + 8, acc[r][1]);
    } else {
      float spill[kTile];
      _mm256_storeu_ps(spill, acc[r][0]);
      _mm256_storeu_ps(spill + 8, acc[r][1]);
      store_scalar(spill, y.width(t), out);
    }
  }
}
#else
constexpr int64_t kMaxRowTile = 4;

template <int64_t Rows, typename Out>
void tile_rows(const TiledWeight& w, int64_t t, const Activations& x, int64_t m, const Outputs<Out>& y) {
  const RowTile<Rows> rows(x, m);
  const uint8_t* tile = w.tile(t);
  const uint16_t* d = w.tile_scales(t);
  for (int64_t r = 0; r < Rows; ++r) {
    float acc[kTile] = {};
    for (int64_t b = 0; b < w.blocks; ++b)
      for (int64_t o = 0; o < kTile; ++o) {
        int32_t sum = 0;
        for (int64_t i = 0; i < kBlock; ++i) {
          const auto c = static_cast<int8_t>(tile[kTileBlockBytes * b + 64 * (i / kStep) + 4 * o + i % kStep] ^ 0x80);
          sum += int32_t{c} * rows.values[r][kBlock * b + i];
        }
        acc[o] = std::fma(static_cast<float>(sum), half_bits_to_float(d[kTile * b + o]) * rows.scales[r][b], acc[o]);
      }
    store_scalar(acc, y.width(t), y.at(m + r, t));
  }
}
#endif

template <typename Out>
void multiply(const TiledWeight& w, const Activations& x, int64_t num_rows, Out* out) {
  const int64_t tiles = (w.out_features + kTile - 1) / kTile;
  const int64_t most = std::max<int64_t>(1, tiles / (kGroupsPerThread * at::get_num_threads()));
  const int64_t per_group = std::clamp<int64_t>(kGroupBytes / (w.blocks * kTileBlockBytes), 1, most);
  const Outputs<Out> y{out, w.out_features};
  at::parallel_for(0, (tiles + per_group - 1) / per_group, 1, [&](int64_t begin, int64_t end) {
    for (int64_t g = begin; g < end; ++g) {
      const int64_t first = g * per_group, last = std::min(tiles, first + per_group);
      for_row_tiles<kMaxRowTile>(num_rows, [&](auto row_tile, int64_t m) {
        for (int64_t t = first; t < last; ++t) tile_rows<decltype(row_tile)::value>(w, t, x, m, y);
      });
    }
  });
}

// The op's tiles and scales as a TiledWeight, after checking that they hold `out_features` outputs.
TiledWeight checked_weight(const char* op, const at::Tensor& tiles, const at::Tensor& scales, int64_t out_features) {
  TORCH_CHECK(tiles.dim() == 2 && tiles.scalar_type() == at::kByte && tiles.is_contiguous(), op,
              ": tiles must be a contiguous uint8 [tiles, in / 32 * 512] tensor");
  TORCH_CHECK(tiles.size(1) % kTileBlockBytes == 0, op, ": a tile's bytes are not whole blocks");
  const int64_t num_tiles = tiles.size(0), blocks = tiles.size(1) / kTileBlockBytes;
  TORCH_CHECK(scales.scalar_type() == at::kHalf && scales.is_contiguous() &&
                  scales.sizes() == at::IntArrayRef({num_tiles, blocks * kTile}),
              op, ": scales must be a contiguous float16 [tiles, in / 32 * 16] tensor");
  TORCH_CHECK(out_features > kTile * (num_tiles - 1) && out_features <= kTile * num_tiles, op, ": ", num_tiles,
              " tiles do not hold ", out_features, " outputs");
  return {tiles.const_data_ptr<uint8_t>(), reinterpret_cast<const uint16_t*>(scales.const_data_ptr()), blocks,
          out_features};
}

// Output channel n's weights into row[0:in], each float32(c) * float32(d), exact (8 by 11 bits), as gguf's
// reference computes it; then rounded to T.
template <typename T>
void dequantize_channel(const TiledWeight& w, int64_t n, T* row) {
  const int64_t t = n / kTile, o = n % kTile;
  for (int64_t b = 0; b < w.blocks; ++b, row += kBlock) {
    const uint8_t* block = w.tile(t) + b * kTileBlockBytes + 4 * o;
    const float d = half_bits_to_float(w.tile_scales(t)[b * kTile + o]);
#ifdef PAGEDLLM_AVX2
    uint8_t stored[kBlock];  // c + 128, in input order
    for (int64_t s = 0; s < kSteps; ++s) std::memcpy(stored + kStep * s, block + 64 * s, kStep);
    for (int64_t e = 0; e < kBlock / 8; ++e) {
      const __m128i c = _mm_xor_si128(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(stored + 8 * e)),
                                      _mm_set1_epi8(static_cast<char>(0x80)));
      store8(row + 8 * e, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(c)), _mm256_set1_ps(d)));
    }
#else
    for (int64_t i = 0; i < kBlock; ++i)
      row[i] = static_cast<T>(static_cast<float>(static_cast<int8_t>(block[64 * (i / kStep) + i % kStep] ^ 0x80)) * d);
#endif
  }
}

}  // namespace

at::Tensor q8_0_tiles_linear(const at::Tensor& x, const at::Tensor& tiles, const at::Tensor& scales,
                             int64_t out_features) {
  const TiledWeight w = checked_weight("q8_0_tiles_linear", tiles, scales, out_features);
  const int64_t in_features = w.blocks * kBlock;
  TORCH_CHECK(x.size(-1) == in_features, "q8_0_tiles_linear: input has ", x.size(-1), " features, weight ",
              in_features);
  const at::Tensor rows = x.reshape({-1, in_features}).contiguous();
  const int64_t num_rows = rows.size(0);
  at::Tensor out = at::empty({num_rows, out_features}, x.options());
  PAGEDLLM_DISPATCH_FLOAT_TYPES(x.scalar_type(), "q8_0_tiles_linear", [&] {
    const Activations a = round_rows<scalar_t>(rows);
    multiply(w, a, num_rows, out.data_ptr<scalar_t>());
  });
  auto sizes = x.sizes().vec();
  sizes.back() = out_features;
  return out.view(sizes);
}

at::Tensor q8_0_tiles_dequantize(const at::Tensor& tiles, const at::Tensor& scales, int64_t out_features,
                                 at::ScalarType dtype) {
  const TiledWeight w = checked_weight("q8_0_tiles_dequantize", tiles, scales, out_features);
  at::Tensor out = at::empty({out_features, w.blocks * kBlock}, tiles.options().dtype(dtype));
  PAGEDLLM_DISPATCH_FLOAT_TYPES(dtype, "q8_0_tiles_dequantize", [&] {
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, out_features, kTile, [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n) dequantize_channel(w, n, op + n * w.blocks * kBlock);
    });
  });
  return out;
}

at::Tensor q8_0_tiles_rows(const at::Tensor& tiles, const at::Tensor& scales, int64_t out_features,
                           const at::Tensor& index, at::ScalarType dtype) {
  const TiledWeight w = checked_weight("q8_0_tiles_rows", tiles, scales, out_features);
  TORCH_CHECK(index.dim() == 1 && index.scalar_type() == at::kLong,
              "q8_0_tiles_rows: index must be a 1-D int64 tensor");
  const at::Tensor channels = index.contiguous();
  const int64_t* cp = channels.const_data_ptr<int64_t>();
  const int64_t count = channels.size(0);
  for (int64_t i = 0; i < count; ++i)
    TORCH_CHECK(cp[i] >= 0 && cp[i] < out_features, "q8_0_tiles_rows: index ", cp[i], " out of [0, ", out_features,
                ")");
  at::Tensor out = at::empty({count, w.blocks * kBlock}, tiles.options().dtype(dtype));
  PAGEDLLM_DISPATCH_FLOAT_TYPES(dtype, "q8_0_tiles_rows", [&] {
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, count, kRowsGrain, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) dequantize_channel(w, cp[i], op + i * w.blocks * kBlock);
    });
  });
  return out;
}

}  // namespace pagedllm
