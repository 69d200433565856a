// Matmuls by weights kept in GGUF's own blocks (Q4_K, Q5_K, Q6_K, Q5_0, Q8_0), bit for bit as the file stores them,
// with activations rounded to int8, for small row counts; and their dequantization to a dense matrix.
//
// Every one of these types stores a weight as w = D_s * (q - offset) - M_s in blocks of QK values (QK = 256 for the
// K types, 32 for Q5_0 and Q8_0): q an unsigned integer of 4, 5 or 6 bits (Q8_0: a signed byte), and per sub-block
// s of 16 or 32 values D_s = d * sc_s and M_s = dmin * m_s, d and dmin float16 per block, sc_s and m_s small
// integers (Q4_K/Q5_K: 6-bit sc and m per 32 values; Q6_K: a signed 8-bit sc per 16 values, offset 32; Q5_0:
// sc = 1, offset 16; Q8_0: sc = 1). Each output row is decoded once per call into unsigned bytes q, int16 scales
// per pair of values, and int16 "minimums" per 16 values (m_s, or offset * sc_s with dmin = d), a few bytes per
// weight in a thread's own buffer; every activation row then meets it.
//
// Activations are rounded to int8 with one scale (max |x| / 127) per block of QK values, as llama.cpp's q8_K (and,
// for QK = 32, q8_0) do, with the integer sums of each 16 of them. Per block and activation row, the products
// q * x (AVX2 maddubs: unsigned weight bytes times signed activation bytes, pairs summed to int16, at most
// 2 * 63 * 127) are summed to int32 weighted by sc_s (madd by the scale lanes), and the minimums' term is
// sum_s m_s * sum(x over s): both exact integers, scaled back to float once per block by d (or dmin) times the
// activation scale. With AVX-512 the same runs over 64 values per instruction. Q8_0's signed weights multiply as
// |q| times x with q's sign (at most 2 * 128 * 127 per pair).
//
// Dequantization computes each weight with the float32 operations, in the order, that gguf's reference
// (gguf.quants.dequantize) uses, so a dense copy holds exactly its values.
#include "vec.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

namespace pagedllm {
namespace {

// GGML's type codes, as GGUF files store them.
enum GgmlType : int64_t { kQ5_0 = 6, kQ8_0 = 8, kQ4_K = 12, kQ5_K = 13, kQ6_K = 14 };

struct Format {
  int64_t block_values;  // QK
  int64_t block_bytes;
  int64_t offset;  // subtracted from q before scaling (Q6_K 32, Q5_0 16), else 0
  bool signed_values;  // Q8_0: q is a signed byte
};

Format format_of(int64_t type) {
  switch (type) {
    case kQ5_0: return {32, 22, 16, false};
    case kQ8_0: return {32, 34, 0, true};
    case kQ4_K: return {256, 144, 0, false};
    case kQ5_K: return {256, 176, 0, false};
    case kQ6_K: return {256, 210, 32, false};
    default: TORCH_CHECK(false, "gguf_linear: unsupported GGML type ", type);
  }
}

constexpr int64_t kSub = 16;  // values per scale entry (sub-blocks of 32 take two equal entries)
constexpr int64_t kChunk = 32;  // values per AVX2 byte vector
constexpr int64_t kRowGrain = 16;  // output rows per parallel task, at the least
constexpr int64_t kRoundGrain = 16384;  // activations per parallel task of rounding, at the least
constexpr float kActivationLevels = 127.f;
#ifdef PAGEDLLM_AVX512_VNNI
constexpr int64_t kRowTile = 8;  // activation rows sharing one pass over a decoded weight row
#else
constexpr int64_t kRowTile = 4;
#endif

inline float half_at(const uint8_t* p) {
  uint16_t bits;
  std::memcpy(&bits, p, 2);
  return half_bits_to_float(bits);
}

// One output row decoded: q per value, D and M parts per 16 values, d and dmin per block.
struct DecodedRow {
  std::vector<uint8_t> q;  // [in]
  std::vector<int16_t> scale_lanes;  // [in / 2]: sc of values 2 i and 2 i + 1 (the lanes of maddubs' int16 pairs)
  std::vector<int16_t> scales;  // [in / 16] sc
  std::vector<int16_t> mins;  // [in / 16] m, or offset * sc (with dmin = d)
  std::vector<float> d, dmin;  // [in / QK]

  void resize(int64_t in, int64_t block_values) {
    q.resize(in);
    scale_lanes.resize(in / 2);
    scales.resize(in / kSub);
    mins.resize(in / kSub);
    d.resize(in / block_values);
    dmin.resize(in / block_values);
  }
};

// The 6-bit scale and minimum of sub-block j of a Q4_K/Q5_K block's 12 packed bytes.
inline void k_scale_min(const uint8_t* packed, int j, int16_t& sc, int16_t& m) {
  if (j < 4) {
    sc = packed[j] & 63;
    m = packed[j + 4] & 63;
  } else {
    sc = (packed[j + 4] & 0x0F) | ((packed[j - 4] >> 6) << 4);
    m = (packed[j + 4] >> 4) | ((packed[j] >> 6) << 4);
  }
}

#ifdef PAGEDLLM_AVX2
inline __m256i load32(const void* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
inline void store32(void* p, __m256i v) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), v); }

// Bits k, k + 1, ... (`mask` wide) of each byte, shifted to bit 4: a 16-bit shift leaves each byte's own bits at
// the bottom, and the mask drops what came from its neighbour.
inline __m256i bits_to_4(__m256i bytes, int k, int mask) {
  const __m256i field = _mm256_and_si256(_mm256_srli_epi16(bytes, k), _mm256_set1_epi8(static_cast<char>(mask)));
  return _mm256_slli_epi16(field, 4);
}

inline __m256i low_nibbles(__m256i bytes) { return _mm256_and_si256(bytes, _mm256_set1_epi8(0x0F)); }
inline __m256i high_nibbles(__m256i bytes) { return low_nibbles(_mm256_srli_epi16(bytes, 4)); }
#endif

// The per-type decoding of block b: q (QK values), scales and mins (QK / 16 each), d and dmin.
template <int64_t Type>
inline void decode_block(const uint8_t* block, uint8_t* q, int16_t* scales, int16_t* mins, float& d, float& dmin);

template <>
inline void decode_block<kQ8_0>(const uint8_t* block, uint8_t* q, int16_t* scales, int16_t* mins, float& d,
                                float& dmin) {
  d = half_at(block);
  dmin = 0.f;
  std::memcpy(q, block + 2, 32);
  scales[0] = scales[1] = 1;
  mins[0] = mins[1] = 0;
}

template <>
inline void decode_block<kQ5_0>(const uint8_t* block, uint8_t* q, int16_t* scales, int16_t* mins, float& d,
                                float& dmin) {
  d = dmin = half_at(block);
  uint32_t high;
  std::memcpy(&high, block + 2, 4);
  const uint8_t* qs = block + 6;
  // Byte j holds value j in its low nibble and value j + 16 in its high one; bit i of `high` is value i's 5th.
#ifdef PAGEDLLM_AVX2
  const __m128i packed = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qs));
  const __m256i nibbles = _mm256_set_m128i(_mm_srli_epi16(packed, 4), packed);
  // Byte i takes byte i / 8 of `high`, then its bit i % 8.
  const __m256i spread = _mm256_shuffle_epi8(_mm256_set1_epi32(static_cast<int32_t>(high)),
                                             _mm256_setr_epi64x(0, 0x0101010101010101, 0x0202020202020202,
                                                                0x0303030303030303));
  const __m256i bit = _mm256_set1_epi64x(static_cast<int64_t>(0x8040201008040201));
  const __m256i fifth = _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(spread, bit), bit), _mm256_set1_epi8(16));
  store32(q, _mm256_or_si256(low_nibbles(nibbles), fifth));
#else
  for (int j = 0; j < 16; ++j) {
    q[j] = (qs[j] & 0x0F) | (((high >> j) & 1) << 4);
    q[j + 16] = (qs[j] >> 4) | (((high >> (j + 16)) & 1) << 4);
  }
#endif
  scales[0] = scales[1] = 1;
  mins[0] = mins[1] = 16;
}

// Q4_K (FiveBits false) and Q5_K blocks: each 64 values are 32 bytes, the first 32 values in their low nibbles and
// the next 32 in their high ones; Q5_K's bit c of high[l] is the 5th bit of value 32 c + l.
template <bool FiveBits>
inline void decode_k4_k5(const uint8_t* block, uint8_t* q, int16_t* scales, int16_t* mins, float& d, float& dmin) {
  d = half_at(block);
  dmin = half_at(block + 2);
  const uint8_t* packed = block + 4;
  const uint8_t* high = block + 16;
  const uint8_t* qs = block + (FiveBits ? 48 : 16);
#ifdef PAGEDLLM_AVX2
  const __m256i high_bits = FiveBits ? load32(high) : _mm256_setzero_si256();
  for (int g = 0; g < 4; ++g) {
    const __m256i bytes = load32(qs + 32 * g);
    __m256i low = low_nibbles(bytes), upper = high_nibbles(bytes);
    if constexpr (FiveBits) {
      low = _mm256_or_si256(low, bits_to_4(high_bits, 2 * g, 1));
      upper = _mm256_or_si256(upper, bits_to_4(high_bits, 2 * g + 1, 1));
    }
    store32(q + 64 * g, low);
    store32(q + 64 * g + 32, upper);
  }
#else
  for (int g = 0; g < 4; ++g)
    for (int l = 0; l < 32; ++l) {
      const uint8_t byte = qs[32 * g + l];
      uint8_t low = byte & 0x0F, upper = byte >> 4;
      if (FiveBits) {
        low |= ((high[l] >> (2 * g)) & 1) << 4;
        upper |= ((high[l] >> (2 * g + 1)) & 1) << 4;
      }
      q[64 * g + l] = low;
      q[64 * g + 32 + l] = upper;
    }
#endif
  for (int j = 0; j < 8; ++j) {
    int16_t sc, m;
    k_scale_min(packed, j, sc, m);
    scales[2 * j] = scales[2 * j + 1] = sc;
    mins[2 * j] = mins[2 * j + 1] = m;
  }
}

template <>
inline void decode_block<kQ4_K>(const uint8_t* block, uint8_t* q, int16_t* scales, int16_t* mins, float& d,
                                float& dmin) {
  decode_k4_k5<false>(block, q, scales, mins, d, dmin);
}

template <>
inline void decode_block<kQ5_K>(const uint8_t* block, uint8_t* q, int16_t* scales, int16_t* mins, float& d,
                                float& dmin) {
  decode_k4_k5<true>(block, q, scales, mins, d, dmin);
}

template <>
inline void decode_block<kQ6_K>(const uint8_t* block, uint8_t* q, int16_t* scales, int16_t* mins, float& d,
                                float& dmin) {
  const uint8_t *ql = block, *qh = block + 128;
  const auto* sc = reinterpret_cast<const int8_t*>(block + 192);
  d = dmin = half_at(block + 208);
  // Each half of 128 values: 64 low-nibble bytes and 32 bytes of 2-bit pairs; value 32 k + l of the half takes
  // nibble k / 2 of ql[l + 32 (k % 2)] and bits 2 k, 2 k + 1 of qh[l].
  for (int h = 0; h < 2; ++h, ql += 64, qh += 32) {
    uint8_t* out = q + 128 * h;
#ifdef PAGEDLLM_AVX2
    const __m256i first = load32(ql), second = load32(ql + 32), pairs = load32(qh);
    store32(out, _mm256_or_si256(low_nibbles(first), bits_to_4(pairs, 0, 3)));
    store32(out + 32, _mm256_or_si256(low_nibbles(second), bits_to_4(pairs, 2, 3)));
    store32(out + 64, _mm256_or_si256(high_nibbles(first), bits_to_4(pairs, 4, 3)));
    store32(out + 96, _mm256_or_si256(high_nibbles(second), bits_to_4(pairs, 6, 3)));
#else
    for (int l = 0; l < 32; ++l) {
      out[l] = (ql[l] & 0x0F) | ((qh[l] & 3) << 4);
      out[l + 32] = (ql[l + 32] & 0x0F) | (((qh[l] >> 2) & 3) << 4);
      out[l + 64] = (ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4);
      out[l + 96] = (ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4);
    }
#endif
  }
  for (int s = 0; s < 16; ++s) {
    scales[s] = sc[s];
    mins[s] = static_cast<int16_t>(32 * sc[s]);
  }
}

template <int64_t Type>
void decode_row_of(const Format& f, const uint8_t* row, int64_t in, DecodedRow& out) {
  const int64_t blocks = in / f.block_values, subs = f.block_values / kSub;
  uint8_t* q = out.q.data();
  int16_t *scales = out.scales.data(), *mins = out.mins.data();
  float *d = out.d.data(), *dmin = out.dmin.data();
  for (int64_t b = 0; b < blocks; ++b)
    decode_block<Type>(row + b * f.block_bytes, q + b * f.block_values, scales + b * subs, mins + b * subs, d[b],
                       dmin[b]);
  int16_t* lanes = out.scale_lanes.data();
  for (int64_t s = 0; s < in / kSub; ++s) {
#ifdef PAGEDLLM_AVX2
    _mm_storeu_si128(reinterpret_cast<__m128i*>(lanes + s * kSub / 2), _mm_set1_epi16(scales[s]));
#else
    for (int64_t i = 0; i < kSub / 2; ++i) lanes[s * kSub / 2 + i] = scales[s];
#endif
  }
}

void decode_row(int64_t type, const Format& f, const uint8_t* row, int64_t in, DecodedRow& out) {
  switch (type) {
    case kQ5_0: return decode_row_of<kQ5_0>(f, row, in, out);
    case kQ8_0: return decode_row_of<kQ8_0>(f, row, in, out);
    case kQ4_K: return decode_row_of<kQ4_K>(f, row, in, out);
    case kQ5_K: return decode_row_of<kQ5_K>(f, row, in, out);
    case kQ6_K: return decode_row_of<kQ6_K>(f, row, in, out);
    default: TORCH_CHECK(false, "gguf_linear: unsupported GGML type ", type);
  }
}

// Activation rows rounded to int8 per block of QK, with each block's scale and the integer sums of each 16.
struct QuantizedRows {
  const int8_t* values;  // [rows, in]
  const float* scales;  // [rows, in / QK]
  const int16_t* sums;  // [rows, in / 16]
};

template <typename T>
QuantizedRows quantize_rows(const at::Tensor& x, int64_t block) {
  thread_local std::vector<int8_t> values;
  thread_local std::vector<float> scales;
  thread_local std::vector<int16_t> sums;
  const int64_t size = x.numel(), blocks = size / block;
  values.resize(size);
  scales.resize(blocks);
  sums.resize(size / kSub);
  const T* xp = x.const_data_ptr<T>();
  int8_t* vp = values.data();
  float* sp = scales.data();
  int16_t* sump = sums.data();
  at::parallel_for(0, blocks, std::max<int64_t>(1, kRoundGrain / block), [&](int64_t begin, int64_t end) {
    float converted[256];
    for (int64_t i = begin; i < end; ++i) {
      const T* in = xp + i * block;
      float max = 0.f;
      for (int64_t j = 0; j < block; ++j) {
        converted[j] = to_float(in[j]);
        max = std::max(max, std::abs(converted[j]));
      }
      sp[i] = max / kActivationLevels;
      const float inverse = max > 0.f ? kActivationLevels / max : 0.f;
      int8_t* out = vp + i * block;
      for (int64_t j = 0; j < block; ++j) out[j] = static_cast<int8_t>(std::nearbyint(converted[j] * inverse));
      for (int64_t s = 0; s < block / kSub; ++s) {
        int16_t sum = 0;
        for (int64_t j = 0; j < kSub; ++j) sum += out[s * kSub + j];
        sump[i * block / kSub + s] = sum;
      }
    }
  });
  return {vp, sp, sump};
}

// The operands of one call: the decoded weight row and the rounded activations.
struct Operands {
  const DecodedRow* w;
  QuantizedRows x;
  int64_t in_features, block_values;
};

#ifdef PAGEDLLM_AVX2
inline int32_t horizontal_sum_epi32(__m256i v) {
  __m128i sum = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  sum = _mm_add_epi32(sum, _mm_shuffle_epi32(sum, 0x4E));
  sum = _mm_add_epi32(sum, _mm_shuffle_epi32(sum, 0xB1));
  return _mm_cvtsi128_si32(sum);
}
#endif

// The integer sum over block b of sc_s * q * x for activation rows x.rows[0 .. Rows), into sums.
template <int64_t Rows, int64_t QK, bool Signed>
inline void block_products(const Operands& a, int64_t b, const int8_t* const* x, int32_t* sums) {
  const uint8_t* q = a.w->q.data() + b * QK;
  const int16_t* lanes = a.w->scale_lanes.data() + b * QK / 2;
#if defined(PAGEDLLM_AVX512_VNNI)
  if constexpr (QK % 64 == 0 && !Signed) {
    __m512i acc[Rows];
    for (int64_t r = 0; r < Rows; ++r) acc[r] = _mm512_setzero_si512();
    for (int64_t c = 0; c < QK; c += 64) {
      const __m512i w = _mm512_loadu_si512(q + c);
      const __m512i sc = _mm512_loadu_si512(lanes + c / 2);
      for (int64_t r = 0; r < Rows; ++r) {
        const __m512i pairs = _mm512_maddubs_epi16(w, _mm512_loadu_si512(x[r] + b * QK + c));
        acc[r] = _mm512_add_epi32(acc[r], _mm512_madd_epi16(pairs, sc));
      }
    }
    for (int64_t r = 0; r < Rows; ++r) sums[r] = _mm512_reduce_add_epi32(acc[r]);
    return;
  }
#endif
#ifdef PAGEDLLM_AVX2
  __m256i acc[Rows];
  for (int64_t r = 0; r < Rows; ++r) acc[r] = _mm256_setzero_si256();
  for (int64_t c = 0; c < QK; c += kChunk) {
    const __m256i w = load32(q + c);
    const __m256i sc = load32(lanes + c / 2);
    for (int64_t r = 0; r < Rows; ++r) {
      const __m256i xr = load32(x[r] + b * QK + c);
      __m256i pairs;
      if constexpr (Signed)
        pairs = _mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(xr, w));
      else
        pairs = _mm256_maddubs_epi16(w, xr);
      acc[r] = _mm256_add_epi32(acc[r], _mm256_madd_epi16(pairs, sc));
    }
  }
  for (int64_t r = 0; r < Rows; ++r) sums[r] = horizontal_sum_epi32(acc[r]);
#else
  for (int64_t r = 0; r < Rows; ++r) {
    int32_t total = 0;
    for (int64_t j = 0; j < QK; ++j) {
      const int32_t weight = Signed ? static_cast<int8_t>(q[j]) : q[j];
      total += lanes[j / 2] * weight * x[r][b * QK + j];
    }
    sums[r] = total;
  }
#endif
}

// The dot products of the decoded weight row with activation rows [m, m + Rows).
template <int64_t Rows, int64_t QK, bool Signed>
void dot_rows(const Operands& a, int64_t m, float* result) {
  const int64_t blocks = a.in_features / QK, subs = QK / kSub;
  const int8_t* x[Rows];
  const float* x_scales[Rows];
  const int16_t* x_sums[Rows];
  for (int64_t r = 0; r < Rows; ++r) {
    x[r] = a.x.values + (m + r) * a.in_features;
    x_scales[r] = a.x.scales + (m + r) * blocks;
    x_sums[r] = a.x.sums + (m + r) * a.in_features / kSub;
    result[r] = 0.f;
  }
  const int16_t* mins = a.w->mins.data();
#ifdef PAGEDLLM_AVX2
  if constexpr (QK == kChunk) {
    // Blocks of 32 (scale 1): the products stay in a vector of float sums, added across lanes once at the end.
    __m256 acc[Rows];
    for (int64_t r = 0; r < Rows; ++r) acc[r] = _mm256_setzero_ps();
    const __m256i ones = _mm256_set1_epi16(1);
    for (int64_t b = 0; b < blocks; ++b) {
      const __m256i w = load32(a.w->q.data() + b * QK);
      const __m256i magnitudes = Signed ? _mm256_sign_epi8(w, w) : w;
      const float d = a.w->d[b];
      for (int64_t r = 0; r < Rows; ++r) {
        const __m256i xr = load32(x[r] + b * QK);
        const __m256i pairs = _mm256_maddubs_epi16(magnitudes, Signed ? _mm256_sign_epi8(xr, w) : xr);
        __m256i sums = _mm256_madd_epi16(pairs, ones);
        if constexpr (!Signed) {
          // Q5_0: dmin = d, so the minimums' term joins the integer sum (in its first lane) before any rounding.
          const int32_t min_sum = mins[2 * b] * x_sums[r][2 * b] + mins[2 * b + 1] * x_sums[r][2 * b + 1];
          sums = _mm256_sub_epi32(sums, _mm256_castsi128_si256(_mm_cvtsi32_si128(min_sum)));
        }
        acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), _mm256_set1_ps(d * x_scales[r][b]), acc[r]);
      }
    }
    for (int64_t r = 0; r < Rows; ++r) result[r] += horizontal_sum(acc[r]);
    return;
  }
#endif
  for (int64_t b = 0; b < blocks; ++b) {
    int32_t products[Rows];
    block_products<Rows, QK, Signed>(a, b, x, products);
    const float d = a.w->d[b], dmin = a.w->dmin[b];
    for (int64_t r = 0; r < Rows; ++r) {
      int32_t min_sum = 0;  // at most 16 * 4096 * 2032 in size
#ifdef PAGEDLLM_AVX2
      if constexpr (QK == 256)
        min_sum = horizontal_sum_epi32(_mm256_madd_epi16(load32(mins + b * subs), load32(x_sums[r] + b * subs)));
      else
#endif
        if constexpr (!Signed)
          for (int64_t s = 0; s < subs; ++s) min_sum += int32_t{mins[b * subs + s]} * x_sums[r][b * subs + s];
      result[r] += x_scales[r][b] * (d * static_cast<float>(products[r]) - dmin * static_cast<float>(min_sum));
    }
  }
}

template <typename TileFn>
void for_row_tiles(int64_t num_rows, const TileFn& tile) {
  int64_t m = 0;
  for (; num_rows - m >= kRowTile; m += kRowTile) tile(std::integral_constant<int64_t, kRowTile>{}, m);
  if constexpr (kRowTile > 4)
    if (num_rows - m >= 4) {
      tile(std::integral_constant<int64_t, 4>{}, m);
      m += 4;
    }
  for (; num_rows - m >= 2; m += 2) tile(std::integral_constant<int64_t, 2>{}, m);
  if (m < num_rows) tile(std::integral_constant<int64_t, 1>{}, m);
}

// Q8_0 needs no decoding: the dot products of one output row's blocks, read in place, with activation rows
// [m, m + Rows).
template <int64_t Rows>
void q8_0_rows(const uint8_t* blocks, const QuantizedRows& x, int64_t in_features, int64_t m, float* result) {
  const int64_t num_blocks = in_features / kChunk;
  const int8_t* xr[Rows];
  const float* scales[Rows];
  for (int64_t r = 0; r < Rows; ++r) {
    xr[r] = x.values + (m + r) * in_features;
    scales[r] = x.scales + (m + r) * num_blocks;
    result[r] = 0.f;
  }
#ifdef PAGEDLLM_AVX2
  __m256 acc[Rows];
  for (int64_t r = 0; r < Rows; ++r) acc[r] = _mm256_setzero_ps();
  const __m256i ones = _mm256_set1_epi16(1);
  for (int64_t b = 0; b < num_blocks; ++b) {
    const uint8_t* block = blocks + b * 34;
    const __m256i w = load32(block + 2);
    const __m256i magnitudes = _mm256_sign_epi8(w, w);
    const float d = half_at(block);
    for (int64_t r = 0; r < Rows; ++r) {
      const __m256i pairs = _mm256_maddubs_epi16(magnitudes, _mm256_sign_epi8(load32(xr[r] + kChunk * b), w));
      const __m256 sums = _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, ones));
      acc[r] = _mm256_fmadd_ps(sums, _mm256_set1_ps(d * scales[r][b]), acc[r]);
    }
  }
  for (int64_t r = 0; r < Rows; ++r) result[r] = horizontal_sum(acc[r]);
#else
  for (int64_t b = 0; b < num_blocks; ++b) {
    const uint8_t* block = blocks + b * 34;
    const auto* q = reinterpret_cast<const int8_t*>(block + 2);
    for (int64_t r = 0; r < Rows; ++r) {
      int32_t sum = 0;
      for (int64_t j = 0; j < kChunk; ++j) sum += int32_t{q[j]} * xr[r][kChunk * b + j];
      result[r] += half_at(block) * scales[r][b] * static_cast<float>(sum);
    }
  }
#endif
}

template <int64_t QK, bool Signed, typename Out>
void multiply(int64_t type, const Format& f, const uint8_t* weight, const QuantizedRows& x, int64_t in_features,
              int64_t out_features, int64_t num_rows, Out* out) {
  at::parallel_for(0, out_features, kRowGrain, [&](int64_t begin, int64_t end) {
    thread_local DecodedRow row;
    row.resize(in_features, QK);
    const Operands operands{&row, x, in_features, QK};
    const int64_t row_bytes = in_features / QK * f.block_bytes;
    for (int64_t n = begin; n < end; ++n) {
      if (!Signed) decode_row(type, f, weight + n * row_bytes, in_features, row);
      for_row_tiles(num_rows, [&](auto tile_rows, int64_t m) {
        constexpr int64_t R = decltype(tile_rows)::value;
        float result[R];
        if constexpr (Signed)
          q8_0_rows<R>(weight + n * row_bytes, x, in_features, m, result);
        else
          dot_rows<R, QK, Signed>(operands, m, result);
        for (int64_t r = 0; r < R; ++r) out[(m + r) * out_features + n] = static_cast<Out>(result[r]);
      });
    }
  });
}

// Weights 16 s .. 16 s + 15 of a decoded row, computed as gguf's reference computes them (see the top).
template <typename Out>
inline void dequantize_run(const Format& f, const DecodedRow& row, int64_t s, Out* out) {
  const int64_t b = s * kSub / f.block_values;
  const uint8_t* q = row.q.data() + s * kSub;
  const float d = row.d[b];
  const float scale = d * static_cast<float>(row.scales[s]);  // exact: 11 times at most 8 bits
  const float min = row.dmin[b] * static_cast<float>(row.mins[s]);  // Q4_K/Q5_K: exact, 11 times 6 bits
#ifdef PAGEDLLM_AVX2
  for (int64_t i = 0; i < kSub; i += 8) {
    const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + i));
    __m256 w;
    if (f.signed_values) {
      w = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes)), _mm256_set1_ps(d));
    } else {
      const __m256i values = _mm256_cvtepu8_epi32(bytes);
      if (f.offset)
        w = _mm256_mul_ps(_mm256_set1_ps(scale),
                          _mm256_cvtepi32_ps(_mm256_sub_epi32(values, _mm256_set1_epi32(static_cast<int>(f.offset)))));
      else
        w = _mm256_sub_ps(_mm256_mul_ps(_mm256_set1_ps(scale), _mm256_cvtepi32_ps(values)), _mm256_set1_ps(min));
    }
    store8(out + i, w);
  }
#else
  for (int64_t j = 0; j < kSub; ++j) {
    float w;
    if (f.signed_values)
      w = static_cast<float>(static_cast<int8_t>(q[j])) * d;
    else if (f.offset)
      w = scale * static_cast<float>(int32_t{q[j]} - f.offset);
    else
      w = scale * static_cast<float>(q[j]) - min;
    out[j] = static_cast<Out>(w);
  }
#endif
}

// The checks and sizes shared by both entry points: returns in_features.
int64_t check_weight(const at::Tensor& blocks, const Format& f, const char* name) {
  TORCH_CHECK(blocks.dim() == 2 && blocks.scalar_type() == at::kByte && blocks.is_contiguous(), name,
              ": blocks must be a contiguous uint8 [out, row bytes] tensor");
  TORCH_CHECK(blocks.size(1) % f.block_bytes == 0, name, ": row bytes not a whole number of blocks");
  return blocks.size(1) / f.block_bytes * f.block_values;
}

}  // namespace

at::Tensor gguf_linear(const at::Tensor& x, const at::Tensor& blocks, int64_t ggml_type) {
  const Format f = format_of(ggml_type);
  const int64_t in_features = check_weight(blocks, f, "gguf_linear"), out_features = blocks.size(0);
  TORCH_CHECK(x.size(-1) == in_features, "gguf_linear: input has ", x.size(-1), " features, weight ", in_features);
  const at::Tensor rows = x.reshape({-1, in_features}).contiguous();
  const int64_t num_rows = rows.size(0);
  at::Tensor out = at::empty({num_rows, out_features}, x.options());
  const uint8_t* weight = blocks.const_data_ptr<uint8_t>();
  PAGEDLLM_DISPATCH_FLOAT_TYPES(x.scalar_type(), "gguf_linear", [&] {
    const QuantizedRows q = quantize_rows<scalar_t>(rows, f.block_values);
    scalar_t* op = out.data_ptr<scalar_t>();
    if (f.signed_values)
      multiply<32, true>(ggml_type, f, weight, q, in_features, out_features, num_rows, op);
    else if (f.block_values == 32)
      multiply<32, false>(ggml_type, f, weight, q, in_features, out_features, num_rows, op);
    else
      multiply<256, false>(ggml_type, f, weight, q, in_features, out_features, num_rows, op);
  });
  auto sizes = x.sizes().vec();
  sizes.back() = out_features;
  return out.view(sizes);
}

at::Tensor gguf_dequantize(const at::Tensor& blocks, int64_t ggml_type, at::ScalarType dtype) {
  const Format f = format_of(ggml_type);
  const int64_t in_features = check_weight(blocks, f, "gguf_dequantize"), out_features = blocks.size(0);
  at::Tensor out = at::empty({out_features, in_features}, blocks.options().dtype(dtype));
  const uint8_t* weight = blocks.const_data_ptr<uint8_t>();
  const int64_t row_bytes = blocks.size(1);
  PAGEDLLM_DISPATCH_FLOAT_TYPES(dtype, "gguf_dequantize", [&] {
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, out_features, kRowGrain, [&](int64_t begin, int64_t end) {
      thread_local DecodedRow row;
      row.resize(in_features, f.block_values);
      for (int64_t n = begin; n < end; ++n) {
        decode_row(ggml_type, f, weight + n * row_bytes, in_features, row);
        scalar_t* o = op + n * in_features;
        for (int64_t s = 0; s < in_features / kSub; ++s)
          dequantize_run(f, row, s, o + s * kSub);
      }
    });
  });
  return out;
}

}  // namespace pagedllm
