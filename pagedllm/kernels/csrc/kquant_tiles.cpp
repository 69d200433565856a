// Matmuls by Q4_K and Q6_K weights repacked once, at load, into tiles whose vector lanes are outputs, with activations
// rounded to int8: the same kernel at every row count it is given (layers/gguf_linear.py hands prefill-sized steps of
// some types to a dense matmul of the weights dequantized here instead).
//
// The weights are the file's, bit for bit: Q4_K's w = (d * sc_j) * q - dmin * m_j, q 4 bits, per sub-block j of 32
// values 6-bit sc_j and m_j, d and dmin float16 per super-block of 256; Q6_K's w = (d * sc_s) * (q - 32), q 6 bits,
// a signed 8-bit sc_s per sub-block s of 16, d float16 per super-block.
//
// Tile layout: output rows in tiles of 8; a tile row [out / 8, super-blocks * bytes] holds, per super-block of 256
// inputs, the 8 outputs' (bytes: Q4_K 1184, 8 * 148; Q6_K 1680, 8 * 210, the file's):
//   d        float16 [8]
//   dmin     float16 [8] (Q4_K)
//   scales   [pairs][8][2]: sub-blocks 2 p and 2 p + 1 of output o at bytes 16 p + 2 o and + 1 (Q4_K: 4 pairs of
//            sub-blocks of 32, unsigned; Q6_K: 8 pairs of sub-blocks of 16, signed)
//   mins     [4][8][2] (Q4_K), as the scales
//   nibbles  [32][32]: per step of 8 inputs k = 8 s .. 8 s + 7, byte 4 o + j holds q(o, 8 s + j) in its low nibble
//            and q(o, 8 s + 4 + j) in its high one (the int4 kernel's steps, quantized_linear.cpp); Q6_K's low 4 bits
//   high     [16][32] (Q6_K): per two steps 2 g, 2 g + 1, byte 4 o + j holds the top 2 bits of q(o, 16 g + 4 i + j)
//            in its bits 2 i, 2 i + 1
// so one 32-byte load is a step's 64 weights, 8 outputs in 8 lanes, and one broadcast of 4 activation bytes meets
// all of them (with AVX-512, tiles t and t + 1 fill the two halves of a 512-bit vector).
//
// Activations are rounded to int8 with one scale (max |x| / 127) per 32 inputs (as the int4 kernel's groups: a
// scale per 256, as llama.cpp's q8_K, lets one outlier coarsen 255 others), with the integer sums of each 16. Per
// sub-block, output lane and activation row, the products q * x are summed exactly in int32 (VNNI's dpbusd, or
// AVX2's maddubs and madd), from Q6_K's offset term -32 sum(x over s); that sum is scaled to float once, by the
// sub-block's d * sc (exact in float32) times the activations' scale, and Q4_K's minimum term dmin * m_j (exact)
// times the activations' scaled sum over j is taken away. A row's result is computed by the same operations in the
// same order whatever the number of rows beside it.
#include "ops.h"
#include "row_tiles.h"
#include "vec.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

namespace pagedllm {
namespace {

// GGML's type codes, as GGUF files store them.
constexpr int64_t kQ4_K = 12, kQ6_K = 14;

constexpr int64_t kTile = 8;  // outputs per tile
constexpr int64_t kSuper = 256;  // inputs per super-block
constexpr int64_t kStep = 8;  // inputs per 32 bytes of a tile's nibbles
constexpr int64_t kRun = 32;  // activations per rounding scale
constexpr int64_t kRowGrain = 16;  // outputs per parallel task, at the least
constexpr int64_t kRowBlock = 60;  // activation rows that meet a tile before the next rows do
constexpr int64_t kRoundGrain = 16384;  // activations per parallel task of rounding, at the least
constexpr float kActivationLevels = 127.f;
#ifdef PAGEDLLM_AVX512_VNNI
// Activation rows sharing each unpacked step of weights, and pairs of tiles sharing each broadcast of activations: the
// sums and results take 4 kPairsPerCall kRowTile of the 32 vector registers.
constexpr int64_t kRowTile = 5;
constexpr int64_t kPairsPerCall = 2;
constexpr int64_t kTilesPerCall = 2;  // tiles side by side in a vector (the last of a task's may be alone)
#else
constexpr int64_t kRowTile = 4;
constexpr int64_t kPairsPerCall = 1;
constexpr int64_t kTilesPerCall = 1;
#endif

// Where each part of a tile's super-block lies, in bytes.
struct TileFormat {
  int64_t bytes, block_bytes;  // per tile and super-block; the file's per output and super-block
  int64_t dmin, scales, mins, nibbles, high;
  int64_t pairs, steps_per_sub;  // scale pairs per super-block; steps of 8 inputs per sub-block
};

constexpr TileFormat kQ4KTiles{1184, 144, 16, 32, 96, 160, 0, 4, 4};
constexpr TileFormat kQ6KTiles{1680, 210, 0, 16, 0, 144, 1168, 8, 2};

constexpr TileFormat tile_format(int64_t type) { return type == kQ4_K ? kQ4KTiles : kQ6KTiles; }

void check_type(int64_t type, const char* name) {
  TORCH_CHECK(type == kQ4_K || type == kQ6_K, name, ": unsupported GGML type ", type, " (Q4_K and Q6_K only)");
}

inline float half_at(const uint8_t* p) {
  uint16_t bits;
  std::memcpy(&bits, p, 2);
  return half_bits_to_float(bits);
}

// ---- Repacking, and reading a tile one weight at a time ----

// A super-block of one output decoded from the file: q per input, sc (and m) per sub-block, d (and dmin).
struct DecodedBlock {
  uint8_t q[kSuper];
  int16_t scales[16], mins[8];
  uint8_t d[2], dmin[2];  // float16 bits, as stored
};

void decode_q4_k(const uint8_t* block, DecodedBlock& out) {
  std::memcpy(out.d, block, 2);
  std::memcpy(out.dmin, block + 2, 2);
  // Sub-block j < 4 keeps sc and m in the low 6 bits of bytes j and j + 4; j >= 4 in the nibbles of byte j + 4, with
  // their top two bits in the top bits of bytes j - 4 and j.
  const uint8_t* packed = block + 4;
  for (int j = 0; j < 8; ++j) {
    if (j < 4) {
      out.scales[j] = packed[j] & 63;
      out.mins[j] = packed[j + 4] & 63;
    } else {
      out.scales[j] = (packed[j + 4] & 0x0F) | ((packed[j - 4] >> 6) << 4);
      out.mins[j] = (packed[j + 4] >> 4) | ((packed[j] >> 6) << 4);
    }
  }
  // Each 64 values: 32 bytes, the first 32 values in their low nibbles, the next 32 in their high ones.
  const uint8_t* qs = block + 16;
  for (int g = 0; g < 4; ++g)
    for (int l = 0; l < 32; ++l) {
      out.q[64 * g + l] = qs[32 * g + l] & 0x0F;
      out.q[64 * g + 32 + l] = qs[32 * g + l] >> 4;
    }
}

void decode_q6_k(const uint8_t* block, DecodedBlock& out) {
  // Per half of 128 values: value 32 k + l is nibble k / 2 of ql[l + 32 (k % 2)] and bits 2 k, 2 k + 1 of qh[l].
  for (int h = 0; h < 2; ++h) {
    const uint8_t *ql = block + 64 * h, *qh = block + 128 + 32 * h;
    for (int k = 0; k < 4; ++k)
      for (int l = 0; l < 32; ++l) {
        const int low = (ql[l + 32 * (k % 2)] >> (4 * (k / 2))) & 0x0F;
        out.q[128 * h + 32 * k + l] = static_cast<uint8_t>(low | (((qh[l] >> (2 * k)) & 3) << 4));
      }
  }
  for (int s = 0; s < 16; ++s) out.scales[s] = static_cast<int8_t>(block[192 + s]);
  std::memcpy(out.d, block + 208, 2);
}

// Writes output o's decoded super-block into its tile's super-block.
void write_tile(const TileFormat& f, bool q6_k, const DecodedBlock& in, int64_t o, uint8_t* tile) {
  std::memcpy(tile + 2 * o, in.d, 2);
  if (!q6_k) std::memcpy(tile + f.dmin + 2 * o, in.dmin, 2);
  for (int64_t p = 0; p < f.pairs; ++p)
    for (int64_t e = 0; e < 2; ++e) {
      tile[f.scales + 16 * p + 2 * o + e] = static_cast<uint8_t>(in.scales[2 * p + e]);
      if (!q6_k) tile[f.mins + 16 * p + 2 * o + e] = static_cast<uint8_t>(in.mins[2 * p + e]);
    }
  for (int64_t s = 0; s < kSuper / kStep; ++s)
    for (int64_t j = 0; j < 4; ++j)
      tile[f.nibbles + 32 * s + 4 * o + j] =
          static_cast<uint8_t>((in.q[8 * s + j] & 0x0F) | ((in.q[8 * s + 4 + j] & 0x0F) << 4));
  if (q6_k)
    for (int64_t g = 0; g < kSuper / 16; ++g)
      for (int64_t j = 0; j < 4; ++j) {
        uint8_t high = 0;
        for (int64_t i = 0; i < 4; ++i) high |= static_cast<uint8_t>((in.q[16 * g + 4 * i + j] >> 4) << (2 * i));
        tile[f.high + 32 * g + 4 * o + j] = high;
      }
}

// Weight i of output o in a tile's super-block: q, its sub-block's scale and (Q4_K) min.
struct TileWeight {
  int32_t q, scale, min;
};

inline TileWeight tile_weight(const TileFormat& f, bool q6_k, const uint8_t* tile, int64_t o, int64_t i) {
  const int64_t within = i % kStep;
  int32_t q = (tile[f.nibbles + 32 * (i / kStep) + 4 * o + within % 4] >> (4 * (within / 4))) & 0x0F;
  const int64_t sub = q6_k ? i / 16 : i / 32, at = 16 * (sub / 2) + 2 * o + sub % 2;
  if (q6_k) {
    const int64_t r = i % 16;
    q |= ((tile[f.high + 32 * (i / 16) + 4 * o + r % 4] >> (2 * (r / 4))) & 3) << 4;
    return {q, static_cast<int8_t>(tile[f.scales + at]), 0};
  }
  return {q, tile[f.scales + at], tile[f.mins + at]};
}

// ---- Activations ----

// Activation rows rounded to int8 per 32, with each 32's scale and scaled sum, and the integer sums of each 16.
struct RoundedRows {
  const int8_t* values;  // [rows, in]
  const float* scales;  // [rows, in / 32]
  const float* scaled_sums;  // [rows, in / 32]
  const int16_t* sums;  // [rows, in / 16]
};

// The largest |x| of 32 activations.
template <typename T>
inline float abs_max(const T* in) {
#ifdef PAGEDLLM_AVX2
  const __m256 magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  __m256 max = _mm256_setzero_ps();
  for (int64_t j = 0; j < 32; j += 8) max = _mm256_max_ps(max, _mm256_and_ps(load8(in + j), magnitude));
  __m128 half = _mm_max_ps(_mm256_castps256_ps128(max), _mm256_extractf128_ps(max, 1));
  half = _mm_max_ps(half, _mm_movehl_ps(half, half));
  return _mm_cvtss_f32(_mm_max_ss(half, _mm_movehdup_ps(half)));
#else
  float max = 0.f;
  for (int64_t j = 0; j < 32; ++j) max = std::max(max, std::abs(to_float(in[j])));
  return max;
#endif
}

// Rounds 32 activations to int8 (nearest, ties to even) at `inverse` levels per unit; returns the sums of each 16.
template <typename T>
inline std::pair<int32_t, int32_t> round_run(const T* in, float inverse, int8_t* out) {
#ifdef PAGEDLLM_AVX2
  const __m256 scale = _mm256_set1_ps(inverse);
  __m256i q[4];
  for (int64_t i = 0; i < 4; ++i) q[i] = _mm256_cvtps_epi32(_mm256_mul_ps(load8(in + 8 * i), scale));
  // The packs interleave 128-bit lanes; the permutation puts the 32 bytes back in order.
  const __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out),
                      _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
  const auto sum = [](__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
    return _mm_cvtsi128_si32(_mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1)));
  };
  return {sum(_mm256_add_epi32(q[0], q[1])), sum(_mm256_add_epi32(q[2], q[3]))};
#else
  int32_t sums[2] = {0, 0};
  for (int64_t j = 0; j < 32; ++j) {
    out[j] = static_cast<int8_t>(std::nearbyint(to_float(in[j]) * inverse));
    sums[j / 16] += out[j];
  }
  return {sums[0], sums[1]};
#endif
}

template <typename T>
RoundedRows round_rows(const at::Tensor& x) {
  thread_local std::vector<int8_t> values;
  thread_local std::vector<float> scales, scaled_sums;
  thread_local std::vector<int16_t> sums;
  const int64_t size = x.numel(), runs = size / kRun;
  values.resize(size);
  scales.resize(runs);
  scaled_sums.resize(runs);
  sums.resize(size / 16);
  const T* xp = x.const_data_ptr<T>();
  int8_t* vp = values.data();
  float *sp = scales.data(), *ssp = scaled_sums.data();
  int16_t* sump = sums.data();
  at::parallel_for(0, runs, kRoundGrain / kRun, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const float max = abs_max(xp + i * kRun);
      sp[i] = max / kActivationLevels;
      const float inverse = max > 0.f ? kActivationLevels / max : 0.f;
      const auto [first, second] = round_run(xp + i * kRun, inverse, vp + i * kRun);
      sump[2 * i] = static_cast<int16_t>(first);
      sump[2 * i + 1] = static_cast<int16_t>(second);
      ssp[i] = static_cast<float>(first + second) * sp[i];
    }
  });
  return {vp, sp, ssp, sump};
}

// The operands of one call.
struct Operands {
  const uint8_t* tiles;
  RoundedRows x;
  int64_t in_features, out_features, blocks, tile_row_bytes;
};

// Pointers to activation rows [m, m + Rows).
template <int64_t Rows>
struct RowTile {
  const int8_t* values[Rows];
  const float *scales[Rows], *scaled_sums[Rows];
  const int16_t* sums[Rows];

  RowTile(const Operands& a, int64_t m) {
    for (int64_t r = 0; r < Rows; ++r) {
      const int64_t at = (m + r) * a.in_features;
      values[r] = a.x.values + at;
      scales[r] = a.x.scales + at / kRun;
      scaled_sums[r] = a.x.scaled_sums + at / kRun;
      sums[r] = a.x.sums + at / 16;
    }
  }
};

// ---- Vector kernels ----
#ifdef PAGEDLLM_AVX2
inline int32_t four_bytes(const void* x) {
  int32_t bytes;
  std::memcpy(&bytes, x, sizeof bytes);
  return bytes;
}

inline __m128i load16(const uint8_t* p) { return _mm_loadu_si128(reinterpret_cast<const __m128i*>(p)); }
inline __m256i load32(const uint8_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }

#endif

#ifdef PAGEDLLM_AVX512_VNNI
// Tiles a and b side by side in 16 lanes (a's outputs first); b may be a again, for a last tile alone.
struct Lanes {
  using I = __m512i;
  using F = __m512;
  const uint8_t *a, *b;

  I bytes32(int64_t at) const { return _mm512_inserti64x4(_mm512_castsi256_si512(load32(a + at)), load32(b + at), 1); }
  I widen_unsigned(int64_t at) const { return _mm512_cvtepu8_epi16(_mm256_set_m128i(load16(b + at), load16(a + at))); }
  I widen_signed(int64_t at) const { return _mm512_cvtepi8_epi16(_mm256_set_m128i(load16(b + at), load16(a + at))); }
  F halves(int64_t at) const { return _mm512_cvtph_ps(_mm256_set_m128i(load16(b + at), load16(a + at))); }

  static I zero() { return _mm512_setzero_si512(); }
  static I set1(int8_t v) { return _mm512_set1_epi8(v); }
  static I band(I x, I y) { return _mm512_and_si512(x, y); }
  static I bor(I x, I y) { return _mm512_or_si512(x, y); }
  static I set32(int32_t v) { return _mm512_set1_epi32(v); }
  template <int N>
  static I left16(I x) { return _mm512_slli_epi16(x, N); }
  template <int N>
  static I right16(I x) { return _mm512_srli_epi16(x, N); }
  static I low_word(I x) { return _mm512_srai_epi32(_mm512_slli_epi32(x, 16), 16); }
  static I high_word(I x) { return _mm512_srai_epi32(x, 16); }
  static I broadcast4(const int8_t* x) { return _mm512_set1_epi32(four_bytes(x)); }
  // acc plus the sums of each lane's 4 products of unsigned bytes u with the signed bytes of x (4 per lane).
  static I dot_bytes(I acc, I u, I x) { return _mm512_dpbusd_epi32(acc, u, x); }
  static F fzero() { return _mm512_setzero_ps(); }
  static F scaled(I x, F s) { return _mm512_mul_ps(_mm512_cvtepi32_ps(x), s); }
  static F fma(I x, F s, F acc) { return _mm512_fmadd_ps(_mm512_cvtepi32_ps(x), s, acc); }
  static F fmul(F x, float s) { return _mm512_mul_ps(x, _mm512_set1_ps(s)); }
  static F fnma(F x, float s, F acc) { return _mm512_fnmadd_ps(x, _mm512_set1_ps(s), acc); }
  template <typename Out>
  static void store(Out* out, F v, int64_t tiles) {
    if (tiles == 2)
      store16(out, v);
    else
      store8(out, _mm512_castps512_ps256(v));
  }
};
#elif defined(PAGEDLLM_AVX2)
// One tile in 8 lanes.
struct Lanes {
  using I = __m256i;
  using F = __m256;
  const uint8_t *a, *b;

  I bytes32(int64_t at) const { return load32(a + at); }
  I widen_unsigned(int64_t at) const { return _mm256_cvtepu8_epi16(load16(a + at)); }
  I widen_signed(int64_t at) const { return _mm256_cvtepi8_epi16(load16(a + at)); }
  F halves(int64_t at) const { return _mm256_cvtph_ps(load16(a + at)); }

  static I zero() { return _mm256_setzero_si256(); }
  static I set1(int8_t v) { return _mm256_set1_epi8(v); }
  static I band(I x, I y) { return _mm256_and_si256(x, y); }
  static I bor(I x, I y) { return _mm256_or_si256(x, y); }
  static I set32(int32_t v) { return _mm256_set1_epi32(v); }
  template <int N>
  static I left16(I x) { return _mm256_slli_epi16(x, N); }
  template <int N>
  static I right16(I x) { return _mm256_srli_epi16(x, N); }
  static I low_word(I x) { return _mm256_srai_epi32(_mm256_slli_epi32(x, 16), 16); }
  static I high_word(I x) { return _mm256_srai_epi32(x, 16); }
  static I broadcast4(const int8_t* x) { return _mm256_set1_epi32(four_bytes(x)); }
  static I dot_bytes(I acc, I u, I x) {
#ifdef PAGEDLLM_VNNI
    return add_byte_products(acc, u, x);
#else
    // A pair of products is at most 2 * 63 * 127: no int16 saturation.
    return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, x), _mm256_set1_epi16(1)));
#endif
  }
  static F fzero() { return _mm256_setzero_ps(); }
  static F scaled(I x, F s) { return _mm256_mul_ps(_mm256_cvtepi32_ps(x), s); }
  static F fma(I x, F s, F acc) { return _mm256_fmadd_ps(_mm256_cvtepi32_ps(x), s, acc); }
  static F fmul(F x, float s) { return _mm256_mul_ps(x, _mm256_set1_ps(s)); }
  static F fnma(F x, float s, F acc) { return _mm256_fnmadd_ps(x, _mm256_set1_ps(s), acc); }
  template <typename Out>
  static void store(Out* out, F v, int64_t) {
    store8(out, v);
  }
};
#endif

#ifdef PAGEDLLM_AVX2
// One sub-block's d * sc or (Q4_K) dmin * m in each lane (a struct, so that vectors of them keep its alignment).
struct SubBlockScale {
  Lanes::F lanes;
};

// Bits 2 Field and 2 Field + 1 of each byte at bits 4 and 5, every other bit zero: Q6_K's top bits of a step's values,
// from the two steps' bytes of top bits (field i of byte 4 o + j: input 16 g + 4 i + j), to be ORed over the low 4.
template <int Field>
inline Lanes::I field_at_bits45(Lanes::I x) {
#if defined(PAGEDLLM_AVX512_VNNI) && defined(__GFNI__)
  // One instruction: GFNI's affine map of each byte, whose output bit 7 - k is the parity of the matrix's byte k ANDed
  // with the input byte; bytes 3 and 2 (output bits 4 and 5) pick input bits 2 Field and 2 Field + 1.
  constexpr int64_t matrix = (int64_t{1} << (2 * Field + 24)) | (int64_t{2} << (2 * Field + 16));
  return _mm512_gf2p8affine_epi64_epi8(x, _mm512_set1_epi64(matrix), 0);
#else
  if constexpr (Field < 2)
    return Lanes::band(Lanes::left16<4 - 2 * Field>(x), Lanes::set1(0x30));
  else
    return Lanes::band(Lanes::right16<2 * Field - 4>(x), Lanes::set1(0x30));
#endif
}

template <int64_t Type>
constexpr int64_t scales_per_block() {
  constexpr TileFormat f = tile_format(Type);
  return Type == kQ6_K ? 2 * f.pairs : 4 * f.pairs;
}

// The sub-block scales of one super-block of a group of lanes into scales[scales_per_block]: d * sc and dmin * m,
// exact in float32 (11 bits times 8 or 6). Always inlined: as a call it slows one-row steps by several percent.
template <int64_t Type>
[[gnu::always_inline]] inline void sub_block_scales(const Lanes& w, SubBlockScale* scales) {
  using I = Lanes::I;
  using F = Lanes::F;
  constexpr TileFormat f = tile_format(Type);
  constexpr bool q6_k = Type == kQ6_K;
  const F d = w.halves(0);
  for (int64_t pair = 0; pair < f.pairs; ++pair) {
    const I scale_pair = q6_k ? w.widen_signed(f.scales + 16 * pair) : w.widen_unsigned(f.scales + 16 * pair);
    scales[2 * pair].lanes = Lanes::scaled(Lanes::low_word(scale_pair), d);
    scales[2 * pair + 1].lanes = Lanes::scaled(Lanes::high_word(scale_pair), d);
  }
  if constexpr (!q6_k) {
    const F dmin = w.halves(f.dmin);
    for (int64_t pair = 0; pair < f.pairs; ++pair) {
      const I min_pair = w.widen_unsigned(f.mins + 16 * pair);
      scales[2 * f.pairs + 2 * pair].lanes = Lanes::scaled(Lanes::low_word(min_pair), dmin);
      scales[2 * f.pairs + 2 * pair + 1].lanes = Lanes::scaled(Lanes::high_word(min_pair), dmin);
    }
  }
}

// The outputs of Pairs groups of lanes from tile t on (with AVX-512 each pair of lanes holds tiles t + 2 p and
// t + 2 p + 1, the second only where `tiles` counts it) for activation rows [m, m + Rows). Shared: several row tiles
// meet the tiles, and block_scales holds their sub_block_scales per super-block and group of lanes,
// [blocks][Pairs][scales_per_block], which the first row tile finds (`find_scales`) and the next ones reuse; else
// each super-block's are found as it comes. Each lane's sums and float steps are those of its own tile, whatever
// Pairs and Rows are, so a row's result does not depend on the grouping. ahead_bytes (without Shared) of the tile
// rows after these are prefetched into L2 on the way: a decode step reads each weight once, from memory, and the
// hardware prefetcher, restarting at each 4 KiB page of each of a call's tile rows, leaves the loads waiting.
template <int64_t Type, int64_t Pairs, int64_t Rows, bool Shared, typename Out>
void tile_rows(const Operands& a, int64_t t, int64_t tiles, SubBlockScale* block_scales, bool find_scales, int64_t m,
               Out* out, int64_t ahead_bytes) {
  using I = Lanes::I;
  using F = Lanes::F;
  constexpr TileFormat f = tile_format(Type);
  constexpr bool q6_k = Type == kQ6_K;
  constexpr int64_t sub_blocks = 2 * f.pairs;
  const uint8_t* first = a.tiles + t * a.tile_row_bytes;
  const RowTile<Rows> x(a, m);
  const I low4 = Lanes::set1(0x0F);
  F acc[Rows][Pairs];
  for (int64_t r = 0; r < Rows; ++r)
    for (int64_t p = 0; p < Pairs; ++p) acc[r][p] = Lanes::fzero();
  // The next call's tile rows (ahead_bytes from the end of these: tile rows lie one after another), a slice per
  // sub-block, into L2: requests spread evenly over the call (a slice per super-block, 6.7 KB of Q6_K at once, kept
  // the loads waiting).
  const SpreadPrefetch<kIntoL2> ahead(first + tiles * a.tile_row_bytes, ahead_bytes, a.blocks * sub_blocks);
  for (int64_t b = 0; b < a.blocks; ++b) {
    Lanes w[Pairs];
    for (int64_t p = 0; p < Pairs; ++p) {
      const uint8_t* pair = first + 2 * p * a.tile_row_bytes + b * f.bytes;
      w[p] = {pair, tiles > 2 * p + 1 ? pair + a.tile_row_bytes : pair};
      // The next super-block into L1: met by several row tiles, a block takes long enough that loads would otherwise
      // wait. (A few rows read the next call's tiles into L2 instead, a stream of bytes in order.)
      if (Shared && b + 1 < a.blocks) {
        prefetch(w[p].a + f.bytes, f.bytes);
        if (tiles > 2 * p + 1) prefetch(w[p].b + f.bytes, f.bytes);
      }
    }
    SubBlockScale found[Pairs * scales_per_block<Type>()];
    SubBlockScale* scales = Shared ? block_scales + b * Pairs * scales_per_block<Type>() : found;
    if (!Shared || find_scales)
      for (int64_t p = 0; p < Pairs; ++p) sub_block_scales<Type>(w[p], scales + p * scales_per_block<Type>());
    for (int64_t sub_block = 0; sub_block < sub_blocks; ++sub_block) {
      ahead(b * sub_blocks + sub_block);
      const int64_t run = q6_k ? 8 * b + sub_block / 2 : 8 * b + sub_block;
      I sub[Rows][Pairs];
      for (int64_t r = 0; r < Rows; ++r) {
        const I start = q6_k ? Lanes::set32(-32 * x.sums[r][16 * b + sub_block]) : Lanes::zero();
        for (int64_t p = 0; p < Pairs; ++p) sub[r][p] = start;
      }
      const int64_t first_step = sub_block * f.steps_per_sub;
      // Q6_K: the sub-block's top 2 bits (one load for its two steps).
      I top[Pairs];
      if constexpr (q6_k)
        for (int64_t p = 0; p < Pairs; ++p) top[p] = w[p].bytes32(f.high + 32 * sub_block);
#pragma GCC unroll 1
      for (int64_t s = first_step; s < first_step + f.steps_per_sub; ++s) {
        I low[Pairs], high[Pairs];
        for (int64_t p = 0; p < Pairs; ++p) {
          const I nibbles = w[p].bytes32(f.nibbles + 32 * s);
          low[p] = Lanes::band(nibbles, low4);
          high[p] = Lanes::band(Lanes::right16<4>(nibbles), low4);
          if constexpr (q6_k) {
            // Fields 2 (s % 2) and 2 (s % 2) + 1 of each top byte: this step's low-nibble values, then its high ones.
            if (s % 2 == 0) {
              low[p] = Lanes::bor(low[p], field_at_bits45<0>(top[p]));
              high[p] = Lanes::bor(high[p], field_at_bits45<1>(top[p]));
            } else {
              low[p] = Lanes::bor(low[p], field_at_bits45<2>(top[p]));
              high[p] = Lanes::bor(high[p], field_at_bits45<3>(top[p]));
            }
          }
        }
        for (int64_t r = 0; r < Rows; ++r) {
          const int8_t* xv = x.values[r] + kSuper * b + kStep * s;
          const I low_x = Lanes::broadcast4(xv), high_x = Lanes::broadcast4(xv + 4);
          for (int64_t p = 0; p < Pairs; ++p)
            sub[r][p] = Lanes::dot_bytes(Lanes::dot_bytes(sub[r][p], low[p], low_x), high[p], high_x);
        }
      }
      for (int64_t p = 0; p < Pairs; ++p) {
        const SubBlockScale* pair_scales = scales + p * scales_per_block<Type>();
        for (int64_t r = 0; r < Rows; ++r)
          acc[r][p] = Lanes::fma(sub[r][p], Lanes::fmul(pair_scales[sub_block].lanes, x.scales[r][run]), acc[r][p]);
        if constexpr (!q6_k)
          for (int64_t r = 0; r < Rows; ++r)
            acc[r][p] = Lanes::fnma(pair_scales[sub_blocks + sub_block].lanes, x.scaled_sums[r][run], acc[r][p]);
      }
    }
  }
  for (int64_t r = 0; r < Rows; ++r)
    for (int64_t p = 0; p < Pairs; ++p)
      Lanes::store(out + (m + r) * a.out_features + (t + 2 * p) * kTile, acc[r][p],
                   std::min<int64_t>(2, tiles - 2 * p));
}
#else
// The scalar kernel: the same integers, summed in the same way, one output at a time.
struct SubBlockScale {};  // the scalar kernel finds each scale as it goes

template <int64_t Type>
constexpr int64_t scales_per_block() {
  return 0;
}

template <int64_t Type, int64_t Pairs, int64_t Rows, bool Shared, typename Out>
void tile_rows(const Operands& a, int64_t t, int64_t, SubBlockScale*, bool, int64_t m, Out* out, int64_t) {
  constexpr TileFormat f = tile_format(Type);
  constexpr bool q6_k = Type == kQ6_K;
  constexpr int64_t sub_values = q6_k ? 16 : 32;
  const RowTile<Rows> x(a, m);
  for (int64_t o = 0; o < kTile; ++o)
    for (int64_t r = 0; r < Rows; ++r) {
      float total = 0.f;
      for (int64_t b = 0; b < a.blocks; ++b) {
        const uint8_t* tile = a.tiles + t * a.tile_row_bytes + b * f.bytes;
        const float d = half_at(tile + 2 * o), dmin = q6_k ? 0.f : half_at(tile + f.dmin + 2 * o);
        for (int64_t s = 0; s < kSuper / sub_values; ++s) {
          int32_t sub = q6_k ? -32 * x.sums[r][16 * b + s] : 0;
          TileWeight w{};
          for (int64_t i = s * sub_values; i < (s + 1) * sub_values; ++i) {
            w = tile_weight(f, q6_k, tile, o, i);
            sub += w.q * x.values[r][kSuper * b + i];
          }
          const int64_t run = (kSuper * b + s * sub_values) / kRun;
          total += static_cast<float>(sub) * (d * static_cast<float>(w.scale) * x.scales[r][run]);
          if (!q6_k) total -= dmin * static_cast<float>(w.min) * x.scaled_sums[r][run];
        }
      }
      out[(m + r) * a.out_features + t * kTile + o] = static_cast<Out>(total);
    }
}
#endif

template <int64_t Type, typename Out>
void multiply(const Operands& a, int64_t num_rows, Out* out) {
  const int64_t tiles = a.out_features / kTile;
  at::parallel_for(0, tiles, kRowGrain / kTile, [&](int64_t begin, int64_t end) {
    // A block of several row tiles shares its tiles' sub-block scales, found by its first row tile, in this buffer.
    thread_local std::vector<SubBlockScale> scales;
    if (num_rows > kRowTile) scales.resize(a.blocks * kPairsPerCall * scales_per_block<Type>());
    for (int64_t first = 0; first < num_rows; first += kRowBlock)
      for (int64_t t = begin; t < end;) {
        // Four tiles at a time (AVX-512), then what is left: a pair, or one alone.
        const bool wide = kPairsPerCall > 1 && end - t >= 2 * kPairsPerCall;
        const int64_t tiles = wide ? 2 * kPairsPerCall : std::min(kTilesPerCall, end - t);
        const int64_t rows = std::min(kRowBlock, num_rows - first);
        // A few rows stream the weights from memory: this task's next tiles are prefetched during these.
        const int64_t ahead = rows <= kRowTile ? std::min(tiles, end - t - tiles) * a.tile_row_bytes : 0;
        for_row_tiles<kRowTile>(rows, [&](auto tile_rows_count, int64_t m) {
          constexpr int64_t R = decltype(tile_rows_count)::value;
          if (rows <= kRowTile)
            wide ? tile_rows<Type, kPairsPerCall, R, false>(a, t, tiles, nullptr, true, first + m, out, ahead)
                 : tile_rows<Type, 1, R, false>(a, t, tiles, nullptr, true, first + m, out, ahead);
          else if (wide)
            tile_rows<Type, kPairsPerCall, R, true>(a, t, tiles, scales.data(), m == 0, first + m, out, 0);
          else
            tile_rows<Type, 1, R, true>(a, t, tiles, scales.data(), m == 0, first + m, out, 0);
        });
        t += tiles;
      }
  });
}

int64_t checked_blocks(const at::Tensor& tiles, int64_t type, const char* name) {
  check_type(type, name);
  TORCH_CHECK(tiles.dim() == 2 && tiles.scalar_type() == at::kByte && tiles.is_contiguous(), name,
              ": tiles must be a contiguous uint8 [out / 8, row bytes] tensor");
  const int64_t bytes = tile_format(type).bytes;
  TORCH_CHECK(tiles.size(1) % bytes == 0, name, ": tile rows not a whole number of super-blocks");
  return tiles.size(1) / bytes;
}

}  // namespace

at::Tensor kquant_tiles(const at::Tensor& blocks, int64_t ggml_type) {
  check_type(ggml_type, "kquant_tiles");
  const TileFormat f = tile_format(ggml_type);
  TORCH_CHECK(blocks.dim() == 2 && blocks.scalar_type() == at::kByte,
              "kquant_tiles: blocks must be uint8 [out, row bytes]");
  TORCH_CHECK(blocks.size(1) % f.block_bytes == 0, "kquant_tiles: row bytes not a whole number of blocks");
  TORCH_CHECK(blocks.size(0) % kTile == 0, "kquant_tiles: output rows must be a multiple of ", kTile);
  const at::Tensor rows = blocks.contiguous();
  const int64_t num_blocks = rows.size(1) / f.block_bytes, tiles = rows.size(0) / kTile;
  at::Tensor out = at::empty({tiles, num_blocks * f.bytes}, rows.options());
  const uint8_t* in = rows.const_data_ptr<uint8_t>();
  uint8_t* op = out.data_ptr<uint8_t>();
  const bool q6_k = ggml_type == kQ6_K;
  at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
    DecodedBlock decoded;
    for (int64_t t = begin; t < end; ++t)
      for (int64_t b = 0; b < num_blocks; ++b) {
        uint8_t* tile = op + (t * num_blocks + b) * f.bytes;
        std::memset(tile, 0, f.bytes);
        for (int64_t o = 0; o < kTile; ++o) {
          const uint8_t* block = in + (t * kTile + o) * rows.size(1) + b * f.block_bytes;
          if (q6_k)
            decode_q6_k(block, decoded);
          else
            decode_q4_k(block, decoded);
          write_tile(f, q6_k, decoded, o, tile);
        }
      }
  });
  return out;
}

at::Tensor kquant_linear(const at::Tensor& x, const at::Tensor& tiles, int64_t ggml_type) {
  const int64_t blocks = checked_blocks(tiles, ggml_type, "kquant_linear");
  const int64_t in_features = blocks * kSuper, out_features = tiles.size(0) * kTile;
  TORCH_CHECK(x.size(-1) == in_features, "kquant_linear: input has ", x.size(-1), " features, weight ", in_features);
  const at::Tensor rows = x.reshape({-1, in_features}).contiguous();
  const int64_t num_rows = rows.size(0);
  at::Tensor out = at::empty({num_rows, out_features}, x.options());
  PAGEDLLM_DISPATCH_FLOAT_TYPES(x.scalar_type(), "kquant_linear", [&] {
    const Operands a{tiles.const_data_ptr<uint8_t>(), round_rows<scalar_t>(rows), in_features, out_features, blocks,
                     tiles.size(1)};
    if (ggml_type == kQ4_K)
      multiply<kQ4_K>(a, num_rows, out.data_ptr<scalar_t>());
    else
      multiply<kQ6_K>(a, num_rows, out.data_ptr<scalar_t>());
  });
  auto sizes = x.sizes().vec();
  sizes.back() = out_features;
  return out.view(sizes);
}

namespace {

// Output o's 256 weights of a tile's super-block, as gguf's reference computes them: Q4_K (d * sc) * q - dmin * m,
// Q6_K (d * sc) * (q - 32), in float32 (d * sc and dmin * m are exact, and so is Q4_K's product, so a contracted
// multiply-add rounds alike), then rounded to Out.
template <typename Out>
void dequantize_tile_block(const TileFormat& f, bool q6_k, const uint8_t* tile, int64_t o, Out* row) {
  const float d = half_at(tile + 2 * o), dmin = q6_k ? 0.f : half_at(tile + f.dmin + 2 * o);
#ifdef PAGEDLLM_AVX2
  const __m128i low_bits = _mm_set1_epi8(0x0F), two_bits = _mm_set1_epi8(3);
  for (int64_t g = 0; g < kSuper / 16; ++g) {
    // Steps 2 g and 2 g + 1 hold inputs 16 g + j and + 4 + j (a step's low and high nibbles), then + 8 + j, + 12 + j:
    // the 16 inputs in order are the four 4-byte groups of (first, first >> 4, second, second >> 4).
    const uint8_t* nibbles = tile + f.nibbles + 32 * (2 * g) + 4 * o;
    const int32_t first = four_bytes(nibbles), second = four_bytes(nibbles + 32);
    __m128i q = _mm_and_si128(
        _mm_srlv_epi32(_mm_set_epi32(second, second, first, first), _mm_set_epi32(4, 0, 4, 0)), low_bits);
    float scale, min = 0.f;
    if (q6_k) {
      // Byte j of the group's 4 holds the top 2 bits of inputs 16 g + 4 i + j in its bits 2 i, 2 i + 1.
      const int32_t high = four_bytes(tile + f.high + 32 * g + 4 * o);
      const __m128i top = _mm_and_si128(_mm_srlv_epi32(_mm_set1_epi32(high), _mm_set_epi32(6, 4, 2, 0)), two_bits);
      q = _mm_or_si128(q, _mm_slli_epi32(top, 4));
      scale = d * static_cast<float>(static_cast<int8_t>(tile[f.scales + 16 * (g / 2) + 2 * o + g % 2]));
    } else {
      const int64_t sub = g / 2, at = f.scales + 16 * (sub / 2) + 2 * o + sub % 2;
      scale = d * static_cast<float>(tile[at]);
      min = dmin * static_cast<float>(tile[at + f.mins - f.scales]);
    }
    const __m256i offset = _mm256_set1_epi32(q6_k ? 32 : 0);
    for (int64_t half = 0; half < 2; ++half) {
      const __m256i values = _mm256_sub_epi32(_mm256_cvtepu8_epi32(half ? _mm_srli_si128(q, 8) : q), offset);
      const __m256 w = _mm256_fmsub_ps(_mm256_set1_ps(scale), _mm256_cvtepi32_ps(values), _mm256_set1_ps(min));
      store8(row + 16 * g + 8 * half, w);
    }
  }
#else
  for (int64_t i = 0; i < kSuper; ++i) {
    const TileWeight w = tile_weight(f, q6_k, tile, o, i);
    const float scale = d * static_cast<float>(w.scale);
    row[i] = static_cast<Out>(q6_k ? scale * static_cast<float>(w.q - 32)
                                   : scale * static_cast<float>(w.q) - dmin * static_cast<float>(w.min));
  }
#endif
}

}  // namespace

at::Tensor kquant_dequantize(const at::Tensor& tiles, int64_t ggml_type, at::ScalarType dtype) {
  const int64_t blocks = checked_blocks(tiles, ggml_type, "kquant_dequantize");
  const TileFormat f = tile_format(ggml_type);
  const bool q6_k = ggml_type == kQ6_K;
  const int64_t in_features = blocks * kSuper;
  at::Tensor out = at::empty({tiles.size(0) * kTile, in_features}, tiles.options().dtype(dtype));
  const uint8_t* tp = tiles.const_data_ptr<uint8_t>();
  PAGEDLLM_DISPATCH_FLOAT_TYPES(dtype, "kquant_dequantize", [&] {
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, tiles.size(0), 1, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t)
        for (int64_t b = 0; b < blocks; ++b)
          for (int64_t o = 0; o < kTile; ++o)
            dequantize_tile_block(f, q6_k, tp + (t * blocks + b) * f.bytes, o,
                                  op + (t * kTile + o) * in_features + b * kSuper);
    });
  });
  return out;
}

}  // namespace pagedllm
