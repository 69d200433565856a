// Matmuls by weights kept in GGUF's own blocks (Q4_0, Q4_1, Q4_K, Q5_K, Q6_K, Q5_0, Q8_0), bit for bit as the file
// stores them,
// with activations rounded to int8, for small row counts; and their dequantization to a dense matrix.
//
// Every one of these types stores a weight as w = D_s * (q - offset) - M_s in blocks of QK values (QK = 256 for the
// K types, 32 for the others): q an unsigned integer of 4, 5 or 6 bits (Q8_0: a signed byte), and per sub-block
// s of 16 or 32 values D_s = d * sc_s and M_s = dmin * m_s, d and dmin float16 per block, sc_s and m_s small
// integers (Q4_K/Q5_K: 6-bit sc and m per 32 values; Q6_K: a signed 8-bit sc per 16 values, offset 32; Q4_0:
// sc = 1, offset 8; Q5_0: sc = 1, offset 16; Q8_0: sc = 1; Q4_1: sc = 1, m = 1 and dmin the negated float16 min,
// w = d * q + min).
//
// Activations are rounded to int8 with one scale (max |x| / 127) per block of QK values, as llama.cpp's q8_K (and,
// for QK = 32, q8_0) do, with the integer sums of each 16 of them. The rounded rows are laid out in the order in
// which the kernel of the weight's type unpacks a block's bits (see Layout), so that one vector of unpacked weights
// meets one vector of activations with no shuffle per output row.
//
// The kernels unpack each block's bits in vector registers and multiply at once; every unpacked register meets
// row_tile(type) activation rows at most before the next is unpacked. K types: per 64 (AVX-512) or 32 (AVX2) values,
// the byte products q * x summed in int16 pairs (maddubs: at most 2 * 63 * 127), then in int32 weighted by the
// sub-block scales (VNNI's dpwssd or AVX2's madd), exact over the block; the minimums' term sum_s m_s * sum(x over s)
// is an exact integer too (Q6_K's offset, 32 sc_s, joins the products, both scaled by d). Each block's two integers are
// scaled to float once per activation row. Q4_0 and Q4_1 with AVX-512: blocks in groups of 4, their 64 qs bytes
// gathered by one byte permutation, so that a group's low nibbles are one vector (values 0..15 of each block) and its
// high nibbles another (values 16..31); unsigned q times signed x (dpbusd) over both, one float scale per block
// (spread over its 4 lanes), and the offset's or min's term d * (-8) or min times each block's scaled activation sum.
// Q5_0 and Q8_0 with AVX-512: blocks in pairs, their 4-byte groups
// interleaved, so lanes alternate between the two blocks and their scales are two broadcast floats; the weights as
// signed bytes q - offset and the activations as unsigned x + 128 (dpbusd multiplies unsigned by signed bytes), less
// 128 * sum(q - offset) per 4 values, which is the weights' own and so computed once for every row. Without AVX-512
// a block of 32 is one vector: Q8_0 as |q| times x with q's sign, the others as q times x less offset * sum(x) (Q4_1:
// plus min * sum(x), the activations' sum scaled to float when they are rounded).
//
// From kInt4TilesMinRows rows on, Q4_0 and Q4_1 blocks are rewritten for the call into the int4 kernel's tiles
// (quantized_linear.cpp: the same nibbles and float16 scales, Q4_0's min -8 d exact in float16), whose lanes are
// outputs, so a row's activations meet 8 of them per load and its float steps come once per 32 inputs: past a few
// rows that kernel's work per row is a fraction of this one's, and the rewrite costs about as much as one row.
//
// Dequantization computes each weight with the float32 operations, in the order, that gguf's reference
// (gguf.quants.dequantize) uses, so a dense copy holds exactly its values.
#include "ops.h"
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
enum GgmlType : int64_t { kQ4_0 = 2, kQ4_1 = 3, kQ5_0 = 6, kQ8_0 = 8, kQ4_K = 12, kQ5_K = 13, kQ6_K = 14 };

struct Format {
  int64_t block_values;  // QK
  int64_t block_bytes;
  int64_t offset;  // subtracted from q before scaling (Q6_K 32, Q5_0 16), else 0
  bool signed_values;  // Q8_0: q is a signed byte
};

constexpr Format format_of(int64_t type) {
  switch (type) {
    case kQ4_0: return {32, 18, 8, false};
    case kQ4_1: return {32, 20, 0, false};
    case kQ5_0: return {32, 22, 16, false};
    case kQ8_0: return {32, 34, 0, true};
    case kQ4_K: return {256, 144, 0, false};
    case kQ5_K: return {256, 176, 0, false};
    case kQ6_K: return {256, 210, 32, false};
    default: return {0, 0, 0, false};
  }
}

Format checked_format(int64_t type) {
  const Format f = format_of(type);
  TORCH_CHECK(f.block_values > 0, "gguf_linear: unsupported GGML type ", type);
  return f;
}

// How a block's rounded activations are stored (each layout keeps a block's values within its block or pair).
enum class Layout {
  kNatural,  // in order, signed
  kSwapped,  // Q4_K/Q5_K: in each 128 values, 32..63 and 64..95 change places (the order of a 64-byte load's nibbles)
  kPairs,  // Q5_0/Q8_0 with AVX-512: the 4-byte groups of blocks 2 i and 2 i + 1 alternate, as unsigned x + 128;
           // an odd last block stays natural
  kGroups,  // Q4_0/Q4_1 with AVX-512: per group of g blocks (4, then 2 and 1 for a row's last blocks), the g blocks'
            // values 0..15, then their values 16..31
};

constexpr Layout layout_of(int64_t type) {
#if defined(PAGEDLLM_AVX512_VNNI)
  if (type == kQ4_0 || type == kQ4_1) return Layout::kGroups;
  if (type == kQ5_0 || type == kQ8_0) return Layout::kPairs;
#endif
#if defined(PAGEDLLM_AVX2)
  if (type == kQ4_K || type == kQ5_K) return Layout::kSwapped;
#endif
  return Layout::kNatural;
}

constexpr int64_t kSub = 16;  // values per scale entry (sub-blocks of 32 take two equal entries)
constexpr int64_t kRowGrain = 16;  // output rows per parallel task, at the least
constexpr int64_t kRoundGrain = 16384;  // activations per parallel task of rounding, at the least
constexpr float kActivationLevels = 127.f;

// Activation rows that share each unpacked weight register: with AVX-512, 8 for the blocks of 32 (two registers per
// row), 4 for the K types (more keep fewer of a block's 8 unpacked registers).
constexpr int64_t row_tile(int64_t type) {
#ifdef PAGEDLLM_AVX512_VNNI
  return format_of(type).block_values == 32 ? 8 : 4;
#else
  return 4;
#endif
}

inline float half_at(const uint8_t* p) {
  uint16_t bits;
  std::memcpy(&bits, p, 2);
  return half_bits_to_float(bits);
}

inline uint32_t u32_at(const uint8_t* p) {
  uint32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

// The 6-bit scales (low 8 bytes) and minimums (high 8 bytes) of a Q4_K/Q5_K block's 12 packed bytes: sub-block
// j < 4 keeps them in the low 6 bits of bytes j and j + 4; j >= 4 in the nibbles of byte j + 4 with its top two
// bits in the top bits of bytes j - 4 and j.
struct KScales {
  uint64_t scales, mins;
};

inline KScales k_scales(const uint8_t* packed) {
  const uint32_t a = u32_at(packed), b = u32_at(packed + 4), c = u32_at(packed + 8);
  const uint32_t low6 = 0x3F3F3F3F, low4 = 0x0F0F0F0F, low2 = 0x03030303;
  const uint32_t sc_low = a & low6, m_low = b & low6;
  const uint32_t sc_high = (c & low4) | (((a >> 6) & low2) << 4);
  const uint32_t m_high = ((c >> 4) & low4) | (((b >> 6) & low2) << 4);
  return {sc_low | (uint64_t{sc_high} << 32), m_low | (uint64_t{m_high} << 32)};
}

inline int16_t byte_of(uint64_t v, int j) { return static_cast<int16_t>((v >> (8 * j)) & 0xFF); }

// ---- Decoding to bytes, for dequantization and the scalar kernel ----

// One output row decoded: q per value, scales and mins per 16 values, d and dmin per block.
struct DecodedRow {
  std::vector<uint8_t> q;  // [in]
  std::vector<int16_t> scales;  // [in / 16] sc
  std::vector<int16_t> mins;  // [in / 16] m, or offset * sc (with dmin = d)
  std::vector<float> d, dmin;  // [in / QK]

  void resize(int64_t in, int64_t block_values) {
    q.resize(in);
    scales.resize(in / kSub);
    mins.resize(in / kSub);
    d.resize(in / block_values);
    dmin.resize(in / block_values);
  }
};

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

// A Q4_0/Q4_1 block's 32 values, unsigned (0..15), in order, from its 16 qs bytes.
inline __m256i q4_values(const uint8_t* qs) {
  const __m128i packed = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qs));
  return low_nibbles(_mm256_set_m128i(_mm_srli_epi16(packed, 4), packed));
}

// Q5_0's 32 values of a block, unsigned (0..31), in order: byte j of qs holds value j in its low nibble and value
// j + 16 in its high one, and bit i of `high` is value i's 5th bit.
inline __m256i q5_0_values(const uint8_t* block) {
  const uint32_t high = u32_at(block + 2);
  const __m128i packed = _mm_loadu_si128(reinterpret_cast<const __m128i*>(block + 6));
  const __m256i nibbles = _mm256_set_m128i(_mm_srli_epi16(packed, 4), packed);
  // Byte i takes byte i / 8 of `high`, then its bit i % 8.
  const __m256i spread = _mm256_shuffle_epi8(_mm256_set1_epi32(static_cast<int32_t>(high)),
                                             _mm256_setr_epi64x(0, 0x0101010101010101, 0x0202020202020202,
                                                                0x0303030303030303));
  const __m256i bit = _mm256_set1_epi64x(static_cast<int64_t>(0x8040201008040201));
  const __m256i fifth = _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(spread, bit), bit), _mm256_set1_epi8(16));
  return _mm256_or_si256(low_nibbles(nibbles), fifth);
}
#endif

// The per-type decoding of one block: q (QK values, in order), scales and mins (QK / 16 each), d and dmin.
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

// Q4_0 (Min false) and Q4_1 blocks: byte j of qs holds value j in its low nibble and value j + 16 in its high one.
template <bool Min>
inline void decode_q4(const uint8_t* block, uint8_t* q, int16_t* scales, int16_t* mins, float& d, float& dmin) {
  d = half_at(block);
  dmin = Min ? -half_at(block + 2) : d;
  const uint8_t* qs = block + (Min ? 4 : 2);
#ifdef PAGEDLLM_AVX2
  store32(q, q4_values(qs));
#else
  for (int j = 0; j < 16; ++j) {
    q[j] = qs[j] & 0x0F;
    q[j + 16] = qs[j] >> 4;
  }
#endif
  scales[0] = scales[1] = 1;
  mins[0] = mins[1] = Min ? 1 : 8;
}

template <>
inline void decode_block<kQ4_0>(const uint8_t* block, uint8_t* q, int16_t* scales, int16_t* mins, float& d,
                                float& dmin) {
  decode_q4<false>(block, q, scales, mins, d, dmin);
}

template <>
inline void decode_block<kQ4_1>(const uint8_t* block, uint8_t* q, int16_t* scales, int16_t* mins, float& d,
                                float& dmin) {
  decode_q4<true>(block, q, scales, mins, d, dmin);
}

template <>
inline void decode_block<kQ5_0>(const uint8_t* block, uint8_t* q, int16_t* scales, int16_t* mins, float& d,
                                float& dmin) {
  d = dmin = half_at(block);
#ifdef PAGEDLLM_AVX2
  store32(q, q5_0_values(block));
#else
  const uint32_t high = u32_at(block + 2);
  const uint8_t* qs = block + 6;
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
  const KScales packed = k_scales(block + 4);
  for (int j = 0; j < 8; ++j) {
    scales[2 * j] = scales[2 * j + 1] = byte_of(packed.scales, j);
    mins[2 * j] = mins[2 * j + 1] = byte_of(packed.mins, j);
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
void decode_row_of(const uint8_t* row, int64_t in, DecodedRow& out) {
  constexpr Format f = format_of(Type);
  const int64_t blocks = in / f.block_values, subs = f.block_values / kSub;
  for (int64_t b = 0; b < blocks; ++b)
    decode_block<Type>(row + b * f.block_bytes, out.q.data() + b * f.block_values, out.scales.data() + b * subs,
                       out.mins.data() + b * subs, out.d[b], out.dmin[b]);
}

void decode_row(int64_t type, const uint8_t* row, int64_t in, DecodedRow& out) {
  switch (type) {
    case kQ4_0: return decode_row_of<kQ4_0>(row, in, out);
    case kQ4_1: return decode_row_of<kQ4_1>(row, in, out);
    case kQ5_0: return decode_row_of<kQ5_0>(row, in, out);
    case kQ8_0: return decode_row_of<kQ8_0>(row, in, out);
    case kQ4_K: return decode_row_of<kQ4_K>(row, in, out);
    case kQ5_K: return decode_row_of<kQ5_K>(row, in, out);
    case kQ6_K: return decode_row_of<kQ6_K>(row, in, out);
    default: TORCH_CHECK(false, "gguf_linear: unsupported GGML type ", type);
  }
}

// ---- Activations ----

// Activation rows rounded to int8 per block of QK, in the weight type's layout, with each block's scale, the
// integer sums of each 16 (in order) and each block's sum times its scale; for Layout::kGroups also per int32 lane of
// the kernel's vectors (4 per block: values 4 i .. 4 i + 3 and 16 + 4 i .. 16 + 4 i + 3 of the block) the block's
// scale and -offset times the lane's sum, so a row meets a group in vector operations only.
struct QuantizedRows {
  const int8_t* values;  // [rows, in]
  const float* scales;  // [rows, in / QK]
  const int16_t* sums;  // [rows, in / 16]
  const float* block_sums;  // [rows, in / QK]
  const float* lane_scales;  // kGroups: [rows, in / 8]
  const int32_t* lane_offsets;  // kGroups: [rows, in / 8]
  int64_t in_features;
};

constexpr int64_t kLaneValues = 8;  // activations per kGroups lane (4 in each half of the block)

// Rounds the n (a multiple of 16, at most 256) values at `in` to int8 levels in `out`, each 16's sum in `sums`;
// returns their scale.
template <typename T>
inline float round_block(const T* in, int64_t n, int8_t* out, int16_t* sums) {
  float converted[256];
  float max = 0.f;
  for (int64_t j = 0; j < n; ++j) {
    converted[j] = to_float(in[j]);
    max = std::max(max, std::abs(converted[j]));
  }
  const float inverse = max > 0.f ? kActivationLevels / max : 0.f;
  for (int64_t j = 0; j < n; ++j) out[j] = static_cast<int8_t>(std::nearbyint(converted[j] * inverse));
  for (int64_t s = 0; s < n / kSub; ++s) {
    int16_t sum = 0;
    for (int64_t j = 0; j < kSub; ++j) sum += out[s * kSub + j];
    sums[s] = sum;
  }
  return max / kActivationLevels;
}

// Blocks in the next group of Layout::kGroups, of the `values` (a multiple of 32) left in a row.
constexpr int64_t group_blocks(int64_t values) { return values >= 128 ? 4 : values >= 64 ? 2 : 1; }

// Writes n rounded values (a block, for kPairs two blocks, for kGroups up to four) from `in` (in order) to `out` in
// `layout`.
inline void lay_out(Layout layout, const int8_t* in, int64_t n, int8_t* out) {
  if (layout == Layout::kSwapped) {
    for (int64_t c = 0; c < n; c += 128) {
      std::memcpy(out + c, in + c, 32);
      std::memcpy(out + c + 32, in + c + 64, 32);
      std::memcpy(out + c + 64, in + c + 32, 32);
      std::memcpy(out + c + 96, in + c + 96, 32);
    }
  } else if (layout == Layout::kPairs && n == 64) {
    for (int64_t j = 0; j < 16; ++j)
      for (int64_t i = 0; i < 4; ++i) out[4 * j + i] = static_cast<int8_t>(in[32 * (j % 2) + 4 * (j / 2) + i] ^ 0x80);
  } else if (layout == Layout::kGroups) {
    for (int64_t first = 0; first < n;) {
      const int64_t g = group_blocks(n - first);
      for (int64_t k = 0; k < g; ++k) {
        std::memcpy(out + first + 16 * k, in + first + 32 * k, 16);
        std::memcpy(out + first + 16 * (g + k), in + first + 32 * k + 16, 16);
      }
      first += 32 * g;
    }
  } else {
    std::memcpy(out, in, n);
  }
}

template <typename T>
QuantizedRows quantize_rows(const at::Tensor& x, int64_t type) {
  constexpr int64_t kUnitMax = 256;
  const Format f = format_of(type);
  const Layout layout = layout_of(type);
  thread_local std::vector<int8_t> values;
  thread_local std::vector<float> scales;
  thread_local std::vector<int16_t> sums;
  thread_local std::vector<float> block_sums;
  thread_local std::vector<float> lane_scales;
  thread_local std::vector<int32_t> lane_offsets;
  const int64_t rows = x.size(0), in = x.size(1), blocks = in / f.block_values;
  const bool lanes = layout == Layout::kGroups;
  values.resize(rows * in);
  scales.resize(rows * blocks);
  sums.resize(rows * in / kSub);
  block_sums.resize(rows * blocks);
  lane_scales.resize(lanes ? rows * in / kLaneValues : 0);
  lane_offsets.resize(lanes ? rows * in / kLaneValues : 0);
  const int64_t unit_blocks = layout == Layout::kPairs ? 2 : layout == Layout::kGroups ? 4 : 1;
  const int64_t units = (blocks + unit_blocks - 1) / unit_blocks;
  const T* xp = x.const_data_ptr<T>();
  int8_t* vp = values.data();
  float* sp = scales.data();
  int16_t* sump = sums.data();
  float* block_sump = block_sums.data();
  float* lane_scalep = lane_scales.data();
  int32_t* lane_offsetp = lane_offsets.data();
  const int64_t grain = std::max<int64_t>(1, kRoundGrain / (unit_blocks * f.block_values));
  at::parallel_for(0, rows * units, grain, [&](int64_t begin, int64_t end) {
    int8_t rounded[kUnitMax];
    for (int64_t i = begin; i < end; ++i) {
      const int64_t row = i / units, first = i % units * unit_blocks;
      const int64_t count = std::min(unit_blocks, blocks - first), offset = row * in + first * f.block_values;
      for (int64_t k = 0; k < count; ++k) {
        const int64_t start = offset + k * f.block_values, block = row * blocks + first + k;
        sp[block] = round_block(xp + start, f.block_values, rounded + k * f.block_values, sump + start / kSub);
        int32_t sum = 0;
        for (int64_t s = 0; s < f.block_values / kSub; ++s) sum += sump[start / kSub + s];
        block_sump[block] = sp[block] * static_cast<float>(sum);
        if (!lanes) continue;
        const int8_t* r = rounded + k * f.block_values;
        for (int64_t i = 0; i < 4; ++i) {
          int32_t lane_sum = 0;
          for (int64_t j = 0; j < 4; ++j) lane_sum += r[4 * i + j] + r[16 + 4 * i + j];
          lane_scalep[4 * block + i] = sp[block];
          lane_offsetp[4 * block + i] = -static_cast<int32_t>(f.offset) * lane_sum;
        }
      }
      lay_out(layout, rounded, count * f.block_values, vp + offset);
    }
  });
  return {vp, sp, sump, block_sump, lane_scalep, lane_offsetp, in};
}

// Activation rows [m, m + Rows) of a call.
template <int64_t Rows>
struct RowTile {
  const int8_t* values[Rows];
  const float* scales[Rows];
  const int16_t* sums[Rows];
  const float* block_sums[Rows];
  const float* lane_scales[Rows];
  const int32_t* lane_offsets[Rows];

  // From block `first` of each row on.
  RowTile(const QuantizedRows& x, int64_t block_values, int64_t m, int64_t first) {
    const int64_t in = x.in_features, start = first * block_values;
    for (int64_t r = 0; r < Rows; ++r) {
      const int64_t at = (m + r) * in + start;
      values[r] = x.values + at;
      scales[r] = x.scales + at / block_values;
      sums[r] = x.sums + at / kSub;
      block_sums[r] = x.block_sums + at / block_values;
      lane_scales[r] = x.lane_scales + at / kLaneValues;
      lane_offsets[r] = x.lane_offsets + at / kLaneValues;
    }
  }
};

// ---- Scalar kernel: any type, activations in order (every block without AVX2; an odd last block of kPairs) ----

// Adds the dot products of `count` blocks from `first` of a weight row with activation rows to result.
template <int64_t Type, int64_t Rows>
void scalar_blocks(const uint8_t* row, const RowTile<Rows>& x, int64_t first, int64_t count, float* result) {
  constexpr Format f = format_of(Type);
  constexpr int64_t QK = f.block_values, subs = QK / kSub;
  uint8_t q[QK];
  int16_t scales[subs], mins[subs];
  // Typed by signedness: GCC 12 vectorizes a conditional sign extension here into unsigned dot products.
  using Weight = std::conditional_t<f.signed_values, int8_t, uint8_t>;
  const auto* weights = reinterpret_cast<const Weight*>(q);
  for (int64_t b = first; b < first + count; ++b) {
    float d, dmin;
    decode_block<Type>(row + b * f.block_bytes, q, scales, mins, d, dmin);
    for (int64_t r = 0; r < Rows; ++r) {
      const int8_t* xv = x.values[r] + b * QK;
      const int16_t* xs = x.sums[r] + b * subs;
      int32_t products = 0, min_sum = 0;  // exact: at most 256 * 128 * 127 * 128 in size
      for (int64_t s = 0; s < subs; ++s) {
        int32_t sub = 0;
        for (int64_t j = s * kSub; j < (s + 1) * kSub; ++j) sub += int32_t{weights[j]} * xv[j];
        products += scales[s] * sub;
        min_sum += mins[s] * xs[s];
      }
      result[r] += x.scales[r][b] * (d * static_cast<float>(products) - dmin * static_cast<float>(min_sum));
    }
  }
}

// ---- AVX-512 VNNI kernels ----
#ifdef PAGEDLLM_AVX512_VNNI
inline __m512i load64(const void* p) { return _mm512_loadu_si512(p); }
inline __m512i broadcast32(const void* p) { return _mm512_broadcast_i64x4(load32(p)); }

// The scale entry (of a block's 16) that each int16 pair lane j of a 64-value chunk c takes (vpermw indices):
// Q4_K/Q5_K's chunk c holds sub-blocks lo(c) and lo(c) + 2 of 32 (Layout::kSwapped), Q6_K's sub-blocks 4 c .. 4 c + 3
// of 16, one per 128-bit lane.
struct ScaleIndex {
  alignas(64) int16_t lanes[4][32];
};

constexpr int k_low_sub(int c) { return c / 2 * 4 + c % 2; }

constexpr ScaleIndex scale_index(bool sixteen) {
  ScaleIndex index{};
  for (int c = 0; c < 4; ++c)
    for (int j = 0; j < 32; ++j)
      index.lanes[c][j] = static_cast<int16_t>(sixteen ? 4 * c + j / 8 : k_low_sub(c) + 2 * (j / 16));
  return index;
}

constexpr ScaleIndex kKScaleIndex = scale_index(false), kQ6ScaleIndex = scale_index(true);

// A K block unpacked: what every activation row meets.
struct KBlock {
  __m512i q[4];  // 256 unsigned values, in the activations' layout
  __m512i scales[4];  // the int16 scale of each pair lane of q[c]'s maddubs products
  __m256i mins;  // per 16 values in order: m_s (Q4_K/Q5_K), or sc_s (Q6_K: its offset term is 32 sc_s)
  float d, dmin;
};

template <bool FiveBits>
inline void unpack_k4_k5(const uint8_t* block, KBlock& k) {
  k.d = half_at(block);
  k.dmin = half_at(block + 2);
  const KScales packed = k_scales(block + 4);
  const __m512i scales = _mm512_castsi256_si512(_mm256_cvtepu8_epi16(_mm_cvtsi64_si128(packed.scales)));
  const __m128i mins = _mm_cvtsi64_si128(static_cast<int64_t>(packed.mins));
  k.mins = _mm256_cvtepu8_epi16(_mm_unpacklo_epi8(mins, mins));
  const uint8_t* qs = block + (FiveBits ? 48 : 16);
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  for (int h = 0; h < 2; ++h) {
    const __m512i bytes = load64(qs + 64 * h);
    k.q[2 * h] = _mm512_and_si512(bytes, low4);
    k.q[2 * h + 1] = _mm512_and_si512(_mm512_srli_epi16(bytes, 4), low4);
  }
  for (int c = 0; c < 4; ++c) k.scales[c] = _mm512_permutexvar_epi16(load64(kKScaleIndex.lanes[c]), scales);
  if constexpr (FiveBits) {
    // Bit s of high[l] is the 5th bit of value 32 s + l; chunk c holds sub-blocks lo(c) and lo(c) + 2.
    const __m512i high = broadcast32(block + 16);
    for (int c = 0; c < 4; ++c) {
      const int s = k_low_sub(c);
      const __m512i bit = _mm512_inserti64x4(_mm512_set1_epi8(static_cast<char>(1 << s)),
                                             _mm256_set1_epi8(static_cast<char>(1 << (s + 2))), 1);
      k.q[c] = _mm512_mask_add_epi8(k.q[c], _mm512_test_epi8_mask(high, bit), k.q[c], _mm512_set1_epi8(16));
    }
  }
}

template <int64_t Type>
inline void unpack(const uint8_t* block, KBlock& k) {
  if constexpr (Type == kQ4_K) {
    unpack_k4_k5<false>(block, k);
  } else if constexpr (Type == kQ5_K) {
    unpack_k4_k5<true>(block, k);
  } else {
    static_assert(Type == kQ6_K);
    k.d = k.dmin = half_at(block + 208);
    k.mins = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(block + 192)));
    const __m512i scales = _mm512_castsi256_si512(k.mins);
    for (int c = 0; c < 4; ++c) k.scales[c] = _mm512_permutexvar_epi16(load64(kQ6ScaleIndex.lanes[c]), scales);
    // Chunk 2 h (values 128 h + 0..63): the low nibbles of ql[64 h ..], 2-bit pairs 0 and 1 of qh[32 h + l];
    // chunk 2 h + 1: the high nibbles, pairs 2 and 3. Each pair is shifted to bits 4-5 of its byte (the 64-bit
    // shifts bring a neighbour's bits only to the bits the mask drops).
    const __m512i low4 = _mm512_set1_epi8(0x0F), bits45 = _mm512_set1_epi8(0x30);
    const __m512i up = _mm512_setr_epi64(4, 4, 4, 4, 2, 2, 2, 2), down = _mm512_setr_epi64(0, 0, 0, 0, 2, 2, 2, 2);
    for (int h = 0; h < 2; ++h) {
      const __m512i bytes = load64(block + 64 * h), pairs = broadcast32(block + 128 + 32 * h);
      k.q[2 * h] =
          _mm512_or_si512(_mm512_and_si512(bytes, low4), _mm512_and_si512(_mm512_sllv_epi64(pairs, up), bits45));
      k.q[2 * h + 1] = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(bytes, 4), low4),
                                       _mm512_and_si512(_mm512_srlv_epi64(pairs, down), bits45));
    }
  }
}

template <int64_t Type, int64_t Rows>
void k_rows(const uint8_t* row, int64_t blocks, const RowTile<Rows>& x, float* result) {
  constexpr int64_t block_bytes = format_of(Type).block_bytes;
  __m512 acc[Rows];
  for (int64_t r = 0; r < Rows; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t b = 0; b < blocks; ++b) {
    KBlock k;
    unpack<Type>(row + b * block_bytes, k);
    for (int64_t r = 0; r < Rows; ++r) {
      const int8_t* xv = x.values[r] + 256 * b;
      __m512i dot = _mm512_setzero_si512();
      for (int c = 0; c < 4; ++c)
        dot = _mm512_dpwssd_epi32(dot, _mm512_maddubs_epi16(k.q[c], load64(xv + 64 * c)), k.scales[c]);
      const __m256i min_sum = _mm256_madd_epi16(k.mins, load32(x.sums[r] + 16 * b));
      const float scale = x.scales[r][b];
      if constexpr (Type == kQ6_K) {
        dot = _mm512_sub_epi32(dot, _mm512_zextsi256_si512(_mm256_slli_epi32(min_sum, 5)));
      } else {
        acc[r] = _mm512_fmadd_ps(_mm512_zextps256_ps512(_mm256_cvtepi32_ps(min_sum)), _mm512_set1_ps(-k.dmin * scale),
                                 acc[r]);
      }
      acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_set1_ps(k.d * scale), acc[r]);
    }
  }
  for (int64_t r = 0; r < Rows; ++r) result[r] += _mm512_reduce_add_ps(acc[r]);
}

// Two blocks of 32 unpacked (Layout::kPairs): what every activation row meets.
struct PairBlock {
  __m512i q;  // signed q - offset, the two blocks' 4-byte groups alternating
  __m512i bias;  // -128 times the sum of each lane's 4 weights: takes x + 128 back to x
  __m512 d;  // the two blocks' d, alternating
};

inline __m512 alternating(float a, float b) { return _mm512_broadcast_f32x2(_mm_setr_ps(a, b, 0.f, 0.f)); }

// Bits of `value` placed at the set bits of `mask`, lowest first.
inline uint64_t deposit_bits(uint64_t value, uint64_t mask) {
#ifdef __BMI2__
  return _pdep_u64(value, mask);
#else
  uint64_t out = 0;
  for (uint64_t bit = 1; mask; bit <<= 1, mask &= mask - 1)
    if (value & bit) out |= mask & -mask;
  return out;
#endif
}

template <int64_t Type>
inline void unpack_pair(const uint8_t* blocks, PairBlock& p) {
  constexpr int64_t bytes = format_of(Type).block_bytes;
  if constexpr (Type == kQ8_0) {
    const __m512i both = _mm512_inserti64x4(_mm512_castsi256_si512(load32(blocks + 2)), load32(blocks + bytes + 2), 1);
    p.q = _mm512_permutexvar_epi32(_mm512_setr_epi32(0, 8, 1, 9, 2, 10, 3, 11, 4, 12, 5, 13, 6, 14, 7, 15), both);
  } else {
    static_assert(Type == kQ5_0);
    // Values 0..15 of a block are the low nibbles of its 16 qs bytes, 16..31 their high ones: output 4-byte group
    // 2 j + block (j < 4) is qs group j's low nibbles, group 8 + 2 j + block their high ones.
    const __m128i a = _mm_loadu_si128(reinterpret_cast<const __m128i*>(blocks + 6));
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(blocks + bytes + 6));
    const __m256i groups = _mm256_set_m128i(_mm_unpackhi_epi32(a, b), _mm_unpacklo_epi32(a, b));
    const __m512i both = _mm512_inserti64x4(_mm512_castsi256_si512(groups), groups, 1);
    const __m512i nibbles = _mm512_and_si512(_mm512_srlv_epi64(both, _mm512_setr_epi64(0, 0, 0, 0, 4, 4, 4, 4)),
                                             _mm512_set1_epi8(0x0F));
    // Bit i of a block's qh is value i's 5th bit: its 4-bit runs go to the block's alternate nibbles of the mask.
    const uint64_t fifth = deposit_bits(u32_at(blocks + 2), 0x0F0F0F0F0F0F0F0FULL) |
                           deposit_bits(u32_at(blocks + bytes + 2), 0xF0F0F0F0F0F0F0F0ULL);
    p.q = _mm512_mask_sub_epi8(nibbles, _cvtu64_mask64(~fifth), nibbles, _mm512_set1_epi8(16));
  }
  const __m512i zero = _mm512_setzero_si512();
  p.bias = _mm512_sub_epi32(zero, _mm512_dpbusd_epi32(zero, _mm512_set1_epi8(static_cast<char>(0x80)), p.q));
  p.d = alternating(half_at(blocks), half_at(blocks + bytes));
}

template <int64_t Type, int64_t Rows>
void pair_rows(const uint8_t* row, int64_t blocks, const RowTile<Rows>& x, float* result) {
  constexpr int64_t block_bytes = format_of(Type).block_bytes;
  __m512 acc[Rows];
  for (int64_t r = 0; r < Rows; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t b = 0; b + 2 <= blocks; b += 2) {
    PairBlock p;
    unpack_pair<Type>(row + b * block_bytes, p);
    for (int64_t r = 0; r < Rows; ++r) {
      double scales;  // the two blocks' activation scales, broadcast as a pair
      std::memcpy(&scales, x.scales[r] + b, sizeof scales);
      const __m512 x_scales = _mm512_castpd_ps(_mm512_set1_pd(scales));
      const __m512i dot = _mm512_dpbusd_epi32(p.bias, load64(x.values[r] + 32 * b), p.q);
      acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(p.d, x_scales), acc[r]);
    }
  }
  for (int64_t r = 0; r < Rows; ++r) result[r] += _mm512_reduce_add_ps(acc[r]);
  if (blocks % 2) scalar_blocks<Type, Rows>(row, x, blocks - 1, 1, result);
}

// A group of G Q4_0/Q4_1 blocks unpacked (Layout::kGroups): what every activation row meets.
struct Q4Group {
  __m512i low, high;  // unsigned q: values 0..15 of each block, then values 16..31 (blocks past G: 0)
  __m512 d;  // per lane, its block's d (blocks past G: 0)
  __m128 min;  // Q4_1: per block
};

constexpr __mmask64 byte_mask(int64_t bytes) { return bytes >= 64 ? ~__mmask64{0} : (__mmask64{1} << bytes) - 1; }

// Word indices (of the first 64 bytes of a group) that put each block's float16 d in its 4 lanes, and Q4_1's
// minimums in the first 4 words.
template <int64_t Type>
struct HalfIndex {
  alignas(32) int16_t d[16], min[8];
  constexpr HalfIndex() : d{}, min{} {
    constexpr int16_t step = format_of(Type).block_bytes / 2;
    for (int k = 0; k < 16; ++k) d[k] = static_cast<int16_t>(k / 4 * step);
    for (int k = 0; k < 4; ++k) min[k] = static_cast<int16_t>(k * step + 1);
  }
};

#ifdef __AVX512VBMI__
// vpermt2b indices of a group's 64 qs bytes within its first 128 bytes: 16 per block, in block order.
template <int64_t Type>
struct QsIndex {
  alignas(64) uint8_t bytes[64];
  constexpr QsIndex() : bytes{} {
    constexpr int64_t block_bytes = format_of(Type).block_bytes, qs = Type == kQ4_1 ? 4 : 2;
    for (int64_t k = 0; k < 4; ++k)
      for (int64_t i = 0; i < 16; ++i) bytes[16 * k + i] = static_cast<uint8_t>(k * block_bytes + qs + i);
  }
};
#endif

template <int64_t Type, int G>
inline void unpack_group(const uint8_t* group, Q4Group& g) {
  constexpr int64_t block_bytes = format_of(Type).block_bytes, total = G * block_bytes;
  static constexpr HalfIndex<Type> kHalves{};
  // Masked loads read no byte past the group (the last group ends the tensor) and leave blocks past G zero.
  const __m512i first = _mm512_maskz_loadu_epi8(byte_mask(total), group);
#ifdef __AVX512VBMI__
  static constexpr QsIndex<Type> kQs{};
  const __m512i rest =
      total > 64 ? _mm512_maskz_loadu_epi8(byte_mask(total - 64), group + 64) : _mm512_setzero_si512();
  const __m512i qs = _mm512_permutex2var_epi8(first, load64(kQs.bytes), rest);  // block k in 128-bit lane k
#else
  constexpr int64_t qs_at = Type == kQ4_1 ? 4 : 2;
  const auto load16 = [](const uint8_t* p) { return _mm_loadu_si128(reinterpret_cast<const __m128i*>(p)); };
  __m512i qs = _mm512_zextsi128_si512(load16(group + qs_at));
  if constexpr (G > 1) qs = _mm512_inserti32x4(qs, load16(group + block_bytes + qs_at), 1);
  if constexpr (G > 2) {
    qs = _mm512_inserti32x4(qs, load16(group + 2 * block_bytes + qs_at), 2);
    qs = _mm512_inserti32x4(qs, load16(group + 3 * block_bytes + qs_at), 3);
  }
#endif
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  g.low = _mm512_and_si512(qs, low4);
  g.high = _mm512_and_si512(_mm512_srli_epi16(qs, 4), low4);
  const __m512i d = _mm512_permutexvar_epi16(_mm512_castsi256_si512(load32(kHalves.d)), first);
  g.d = _mm512_cvtph_ps(_mm512_castsi512_si256(d));
  if constexpr (Type == kQ4_1) {
    const __m128i index = _mm_load_si128(reinterpret_cast<const __m128i*>(kHalves.min));
    const __m512i min = _mm512_permutexvar_epi16(_mm512_castsi128_si512(index), first);
    g.min = _mm_cvtph_ps(_mm512_castsi512_si128(min));
  }
}

// Adds the products of a group of G blocks from block b with activation rows x to acc (scaled dot products, 16
// lanes) and mins (Q4_1's min terms, a lane per block).
template <int64_t Type, int G, int64_t Rows>
inline void group_rows(const uint8_t* row, int64_t b, const RowTile<Rows>& x, __m512* acc, __m128* mins) {
  Q4Group g;
  unpack_group<Type, G>(row + b * format_of(Type).block_bytes, g);
  const __mmask64 half = byte_mask(16 * G);
  const __mmask16 lanes = static_cast<__mmask16>((1 << (4 * G)) - 1);
  for (int64_t r = 0; r < Rows; ++r) {
    const int8_t* xv = x.values[r] + 32 * b;
    // Q4_0: from -8 times the lane's activation sum (q - 8 = q less 8).
    __m512i dot = Type == kQ4_0 ? _mm512_maskz_loadu_epi32(lanes, x.lane_offsets[r] + 4 * b) : _mm512_setzero_si512();
    dot = _mm512_dpbusd_epi32(dot, g.low, _mm512_maskz_loadu_epi8(half, xv));
    dot = _mm512_dpbusd_epi32(dot, g.high, _mm512_maskz_loadu_epi8(half, xv + 16 * G));
    const __m512 scales = _mm512_mul_ps(g.d, _mm512_maskz_loadu_ps(lanes, x.lane_scales[r] + 4 * b));
    acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), scales, acc[r]);
    if constexpr (Type == kQ4_1)
      mins[r] = _mm_fmadd_ps(g.min, _mm_maskz_loadu_ps(static_cast<__mmask8>((1 << G) - 1), x.block_sums[r] + b),
                             mins[r]);
  }
}

template <int64_t Type, int64_t Rows>
void q4_rows(const uint8_t* row, int64_t blocks, const RowTile<Rows>& x, float* result) {
  // Two sets of sums for few rows, so that consecutive groups' additions do not wait on each other.
  constexpr int64_t sets = Rows <= 2 ? 2 : 1;
  __m512 acc[sets][Rows];
  __m128 mins[Rows];
  for (int64_t r = 0; r < Rows; ++r) {
    for (int64_t k = 0; k < sets; ++k) acc[k][r] = _mm512_setzero_ps();
    mins[r] = _mm_setzero_ps();
  }
  int64_t b = 0;
  for (; b + 4 * sets <= blocks; b += 4 * sets)
    for (int64_t k = 0; k < sets; ++k) group_rows<Type, 4>(row, b + 4 * k, x, acc[k], mins);
  for (; b + 4 <= blocks; b += 4) group_rows<Type, 4>(row, b, x, acc[0], mins);
  if (blocks - b >= 2) {
    group_rows<Type, 2>(row, b, x, acc[0], mins);
    b += 2;
  }
  if (b < blocks) group_rows<Type, 1>(row, b, x, acc[0], mins);
  for (int64_t r = 0; r < Rows; ++r) {
    __m512 sum = _mm512_zextps128_ps512(mins[r]);
    for (int64_t k = 0; k < sets; ++k) sum = _mm512_add_ps(sum, acc[k][r]);
    result[r] += _mm512_reduce_add_ps(sum);
  }
}
#endif

// ---- AVX2 kernels (without AVX-512 VNNI) ----
#if defined(PAGEDLLM_AVX2) && !defined(PAGEDLLM_AVX512_VNNI)
// Each byte's bits shifted from bit `from` to bit `to` by a 16-bit shift (the caller's mask drops a neighbour's).
inline __m256i move_bits(__m256i v, int from, int to) {
  return from < to ? _mm256_sll_epi16(v, _mm_cvtsi32_si128(to - from))
                   : _mm256_srl_epi16(v, _mm_cvtsi32_si128(from - to));
}

// acc plus the products q * x (unsigned times signed bytes) in int16 pairs, weighted by the int16 scales in int32.
inline __m256i add_scaled_products(__m256i acc, __m256i q, __m256i x, __m256i scales) {
  return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(q, x), scales));
}

// The 32 unsigned values of vector t (of 8) of a K block, in the activations' layout, and their scale lanes.
template <int64_t Type>
inline void k_vector(const uint8_t* block, const KScales& packed, int t, __m256i& q, __m256i& scales) {
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  if constexpr (Type == kQ6_K) {
    const int h = t / 4, k = t % 4;  // values 32 t ..: nibble k / 2 of ql[64 h + 32 (k % 2) + l], pair k of qh
    const __m256i bytes = load32(block + 64 * h + 32 * (k % 2));
    const __m256i pairs = _mm256_and_si256(move_bits(load32(block + 128 + 32 * h), 2 * k, 4), _mm256_set1_epi8(0x30));
    q = _mm256_or_si256(_mm256_and_si256(k / 2 ? _mm256_srli_epi16(bytes, 4) : bytes, low4), pairs);
    const auto* sc = reinterpret_cast<const int8_t*>(block + 192);
    scales = _mm256_set_m128i(_mm_set1_epi16(sc[2 * t + 1]), _mm_set1_epi16(sc[2 * t]));
  } else {
    // Layout::kSwapped: vector t is half t % 2 of the nibbles (t / 2) % 2 of qs[64 (t / 4) ..], sub-block s.
    const int s = t / 4 * 4 + t / 2 % 2 + 2 * (t % 2);
    const __m256i bytes = load32(block + (Type == kQ5_K ? 48 : 16) + 64 * (t / 4) + 32 * (t % 2));
    q = _mm256_and_si256(t / 2 % 2 ? _mm256_srli_epi16(bytes, 4) : bytes, low4);
    if constexpr (Type == kQ5_K)  // bit s of high[l] is the 5th bit of value 32 s + l
      q = _mm256_or_si256(q, _mm256_and_si256(move_bits(load32(block + 16), s, 4), _mm256_set1_epi8(0x10)));
    scales = _mm256_set1_epi16(byte_of(packed.scales, s));
  }
}

template <int64_t Type, int64_t Rows>
void k_rows(const uint8_t* row, int64_t blocks, const RowTile<Rows>& x, float* result) {
  constexpr int64_t block_bytes = format_of(Type).block_bytes;
  __m256 acc[Rows];
  for (int64_t r = 0; r < Rows; ++r) acc[r] = _mm256_setzero_ps();
  for (int64_t b = 0; b < blocks; ++b) {
    const uint8_t* block = row + b * block_bytes;
    KScales packed{};
    __m256i mins;  // per 16 values in order: m_s, or Q6_K's sc_s (its offset term is 32 sc_s)
    float d, dmin;
    if constexpr (Type == kQ6_K) {
      d = dmin = half_at(block + 208);
      mins = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(block + 192)));
    } else {
      d = half_at(block);
      dmin = half_at(block + 2);
      packed = k_scales(block + 4);
      const __m128i m = _mm_cvtsi64_si128(static_cast<int64_t>(packed.mins));
      mins = _mm256_cvtepu8_epi16(_mm_unpacklo_epi8(m, m));
    }
    __m256i dot[Rows];
    for (int64_t r = 0; r < Rows; ++r) dot[r] = _mm256_setzero_si256();
    for (int t = 0; t < 8; ++t) {
      __m256i q, scales;
      k_vector<Type>(block, packed, t, q, scales);
      for (int64_t r = 0; r < Rows; ++r)
        dot[r] = add_scaled_products(dot[r], q, load32(x.values[r] + 256 * b + 32 * t), scales);
    }
    for (int64_t r = 0; r < Rows; ++r) {
      const __m256i min_sum = _mm256_madd_epi16(mins, load32(x.sums[r] + 16 * b));
      const float scale = x.scales[r][b];
      if constexpr (Type == kQ6_K)
        dot[r] = _mm256_sub_epi32(dot[r], _mm256_slli_epi32(min_sum, 5));
      else
        acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(min_sum), _mm256_set1_ps(-dmin * scale), acc[r]);
      acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot[r]), _mm256_set1_ps(d * scale), acc[r]);
    }
  }
  for (int64_t r = 0; r < Rows; ++r) result[r] += horizontal_sum(acc[r]);
}

template <int64_t Type>
inline __m256i block32_values(const uint8_t* block) {
  if constexpr (Type == kQ8_0) return load32(block + 2);
  if constexpr (Type == kQ5_0) return q5_0_values(block);
  return q4_values(block + (Type == kQ4_1 ? 4 : 2));
}

// Blocks of 32, one vector each: Q8_0 as |q| times x with q's sign (at most 2 * 128 * 127 per pair), the others as
// q times x less offset * sum(x), Q4_1 plus min * sum(x).
template <int64_t Type, int64_t Rows>
void block32_rows(const uint8_t* row, int64_t blocks, const RowTile<Rows>& x, float* result) {
  constexpr Format f = format_of(Type);
  __m256 acc[Rows];
  for (int64_t r = 0; r < Rows; ++r) acc[r] = _mm256_setzero_ps();
  float min_terms[Rows] = {};
  const __m256i ones = _mm256_set1_epi16(1);
  for (int64_t b = 0; b < blocks; ++b) {
    const uint8_t* block = row + b * f.block_bytes;
    const __m256i q = block32_values<Type>(block);
    const __m256i magnitudes = Type == kQ8_0 ? _mm256_sign_epi8(q, q) : q;
    const float d = half_at(block);
    for (int64_t r = 0; r < Rows; ++r) {
      const __m256i xv = load32(x.values[r] + 32 * b);
      const __m256i signed_x = Type == kQ8_0 ? _mm256_sign_epi8(xv, q) : xv;
      __m256i sums = _mm256_madd_epi16(_mm256_maddubs_epi16(magnitudes, signed_x), ones);
      if constexpr (f.offset != 0) {
        const int32_t offset = f.offset * (x.sums[r][2 * b] + x.sums[r][2 * b + 1]);
        sums = _mm256_sub_epi32(sums, _mm256_castsi128_si256(_mm_cvtsi32_si128(offset)));
      }
      acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), _mm256_set1_ps(d * x.scales[r][b]), acc[r]);
      if constexpr (Type == kQ4_1) min_terms[r] += half_at(block + 2) * x.block_sums[r][b];
    }
  }
  for (int64_t r = 0; r < Rows; ++r) result[r] += horizontal_sum(acc[r]) + min_terms[r];
}
#endif

// Adds the dot products of `blocks` blocks of one weight row with activation rows x to result.
template <int64_t Type, int64_t Rows>
void dot_rows(const uint8_t* row, const RowTile<Rows>& x, int64_t blocks, float* result) {
  constexpr int64_t QK = format_of(Type).block_values;
#if defined(PAGEDLLM_AVX512_VNNI)
  if constexpr (QK == 256)
    k_rows<Type, Rows>(row, blocks, x, result);
  else if constexpr (Type == kQ4_0 || Type == kQ4_1)
    q4_rows<Type, Rows>(row, blocks, x, result);
  else
    pair_rows<Type, Rows>(row, blocks, x, result);
#elif defined(PAGEDLLM_AVX2)
  if constexpr (QK == 256)
    k_rows<Type, Rows>(row, blocks, x, result);
  else
    block32_rows<Type, Rows>(row, blocks, x, result);
#else
  scalar_blocks<Type, Rows>(row, x, 0, blocks, result);
#endif
}

template <int64_t MaxTile, typename TileFn>
void for_row_tiles(int64_t num_rows, const TileFn& tile) {
  int64_t m = 0;
  for (; num_rows - m >= MaxTile; m += MaxTile) tile(std::integral_constant<int64_t, MaxTile>{}, m);
  if constexpr (MaxTile > 4)
    if (num_rows - m >= 4) {
      tile(std::integral_constant<int64_t, 4>{}, m);
      m += 4;
    }
  for (; num_rows - m >= 2; m += 2) tile(std::integral_constant<int64_t, 2>{}, m);
  if (m < num_rows) tile(std::integral_constant<int64_t, 1>{}, m);
}

constexpr int64_t kRowBlock = 64;  // activation rows that meet a task's kRowGrain weight rows before the next do
// Input channels per pass over a task's weight rows when several activation rows meet them: a row tile's
// activations for them (values and their lane data, about 2 bytes each) stay in the L1 cache while every weight row
// meets them, instead of streaming whole rows from L2 once per weight row. A multiple of 4 blocks of every type, so
// no kGroups group or kPairs pair is cut. Every row count sums a row's products chunk by chunk in this order, so a
// row gets the same bits alone as beside others (speculative verification relies on it).
constexpr int64_t kChunkValues = 2048;
// One row: weight rows this many ahead are prefetched into L2, so that the stream does not wait at each 4 KiB page,
// where the hardware prefetcher starts over.
constexpr int64_t kAheadRows = 8;

// One row: whole weight rows in turn, so they stream from memory in order, each summed chunk by chunk.
template <int64_t Type, typename Out>
void multiply_one_row(const uint8_t* weight, const QuantizedRows& x, int64_t out_features, Out* out) {
  constexpr Format f = format_of(Type);
  const int64_t blocks = x.in_features / f.block_values, row_bytes = blocks * f.block_bytes;
  const int64_t chunk_blocks = kChunkValues / f.block_values;
  std::vector<RowTile<1>> tiles;
  for (int64_t first_b = 0; first_b < blocks; first_b += chunk_blocks) tiles.emplace_back(x, f.block_values, 0, first_b);
  at::parallel_for(0, out_features, kRowGrain, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      if (n + kAheadRows < end) prefetch<kIntoL2>(weight + (n + kAheadRows) * row_bytes, row_bytes);
      float sum = 0.f;
      for (size_t c = 0; c < tiles.size(); ++c) {
        const int64_t first_b = static_cast<int64_t>(c) * chunk_blocks;
        dot_rows<Type, 1>(weight + n * row_bytes + first_b * f.block_bytes, tiles[c],
                          std::min(chunk_blocks, blocks - first_b), &sum);
      }
      out[n] = static_cast<Out>(sum);
    }
  });
}

template <int64_t Type, typename Out>
void multiply(const uint8_t* weight, const QuantizedRows& x, int64_t out_features, int64_t num_rows, Out* out) {
  if (num_rows == 1) return multiply_one_row<Type>(weight, x, out_features, out);
  constexpr Format f = format_of(Type);
  const int64_t blocks = x.in_features / f.block_values, row_bytes = blocks * f.block_bytes;
  const int64_t chunk_blocks = kChunkValues / f.block_values;
  at::parallel_for(0, out_features, kRowGrain, [&](int64_t begin, int64_t end) {
    float sums[kRowGrain * kRowBlock];  // [n - first_n, m]
    for (int64_t first_n = begin; first_n < end; first_n += kRowGrain) {
      const int64_t last_n = std::min(end, first_n + kRowGrain);
      for (int64_t first_m = 0; first_m < num_rows; first_m += kRowBlock) {
        const int64_t rows = std::min(kRowBlock, num_rows - first_m);
        std::fill(sums, sums + kRowGrain * kRowBlock, 0.f);
        for (int64_t first_b = 0; first_b < blocks; first_b += chunk_blocks) {
          const int64_t count = std::min(chunk_blocks, blocks - first_b);
          const uint8_t* chunk = weight + first_b * f.block_bytes;
          for_row_tiles<row_tile(Type)>(rows, [&](auto tile_rows, int64_t m) {
            constexpr int64_t R = decltype(tile_rows)::value;
            const RowTile<R> tile(x, f.block_values, first_m + m, first_b);
            for (int64_t n = first_n; n < last_n; ++n)
              dot_rows<Type, R>(chunk + n * row_bytes, tile, count, sums + (n - first_n) * kRowBlock + m);
          });
        }
        for (int64_t m = 0; m < rows; ++m)
          for (int64_t n = first_n; n < last_n; ++n)
            out[(first_m + m) * out_features + n] = static_cast<Out>(sums[(n - first_n) * kRowBlock + m]);
      }
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

#if defined(PAGEDLLM_AVX512_VNNI) && defined(__AVX512VL__)
#define PAGEDLLM_Q5_0_ROWS 1
// A Q5_0 row's weights straight from its blocks, d * (q - 16) as gguf's reference computes them (dequantize_run's
// values, without the decoded row between): value j < 16 is the low nibble of qs[j], value j + 16 its high nibble,
// and bit i of qh is value i's fifth bit.
template <typename Out>
void dequantize_q5_0_row(const uint8_t* row, int64_t blocks, Out* out) {
  const __m128i nibble = _mm_set1_epi8(0x0F), offset = _mm_set1_epi8(16);
  for (int64_t b = 0; b < blocks; ++b, row += 22, out += 32) {
    const __m512 d = _mm512_set1_ps(half_at(row));
    uint32_t fifth;
    std::memcpy(&fifth, row + 2, sizeof fifth);
    const __m128i qs = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + 6));
    const __m128i low = _mm_or_si128(_mm_and_si128(qs, nibble),
                                     _mm_maskz_set1_epi8(static_cast<__mmask16>(fifth & 0xFFFF), 0x10));
    const __m128i high = _mm_or_si128(_mm_and_si128(_mm_srli_epi16(qs, 4), nibble),
                                      _mm_maskz_set1_epi8(static_cast<__mmask16>(fifth >> 16), 0x10));
    store16(out, _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_sub_epi8(low, offset)))));
    store16(out + 16, _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_sub_epi8(high, offset)))));
  }
}
#endif

// The checks and sizes shared by both entry points: returns in_features.
int64_t check_weight(const at::Tensor& blocks, const Format& f, const char* name) {
  TORCH_CHECK(blocks.dim() == 2 && blocks.scalar_type() == at::kByte && blocks.is_contiguous(), name,
              ": blocks must be a contiguous uint8 [out, row bytes] tensor");
  TORCH_CHECK(blocks.size(1) % f.block_bytes == 0, name, ": row bytes not a whole number of blocks");
  return blocks.size(1) / f.block_bytes * f.block_values;
}

template <typename Out>
void multiply_type(int64_t type, const uint8_t* weight, const QuantizedRows& x, int64_t out_features,
                   int64_t num_rows, Out* out) {
  switch (type) {
    case kQ4_0: return multiply<kQ4_0>(weight, x, out_features, num_rows, out);
    case kQ4_1: return multiply<kQ4_1>(weight, x, out_features, num_rows, out);
    case kQ5_0: return multiply<kQ5_0>(weight, x, out_features, num_rows, out);
    case kQ8_0: return multiply<kQ8_0>(weight, x, out_features, num_rows, out);
    case kQ4_K: return multiply<kQ4_K>(weight, x, out_features, num_rows, out);
    case kQ5_K: return multiply<kQ5_K>(weight, x, out_features, num_rows, out);
    case kQ6_K: return multiply<kQ6_K>(weight, x, out_features, num_rows, out);
    default: TORCH_CHECK(false, "gguf_linear: unsupported GGML type ", type);
  }
}

constexpr int64_t kInt4Tile = 8;  // output rows per tile of the int4 kernel's layout
constexpr int64_t kInt4TilesMinRows = 8;

// Block b of a tile's 8 rows of Q4_0/Q4_1 blocks as the int4 layout: its 4 steps of 8 inputs (128 bytes at `steps`),
// step s's 4 bytes at 4 o holding row o's inputs 8 s + j (low nibble) and 8 s + 4 + j (high nibble), and the rows'
// float16 scales (and Q4_1's mins: Q4_0's follow from the scales) at scale_min[0, o] and [1, o].
inline void rewrite_block(const uint8_t* rows, int64_t row_bytes, const Format& f, uint32_t* steps,
                          uint16_t* scale_min) {
  const bool q4_1 = f.offset == 0;
#ifdef PAGEDLLM_AVX512_VNNI
  // Rows 0..3 and 4..7's qs in the 128-bit lanes of two vectors; their dwords k = 0..3 gathered by row.
  const int64_t qs_at = q4_1 ? 4 : 2;
  const auto qs = [&](int64_t o) {
    return _mm_loadu_si128(reinterpret_cast<const __m128i*>(rows + o * row_bytes + qs_at));
  };
  __m512i first = _mm512_zextsi128_si512(qs(0)), second = _mm512_zextsi128_si512(qs(4));
  for (int k = 1; k < 4; ++k) {
    first = _mm512_inserti32x4(first, qs(k), k);
    second = _mm512_inserti32x4(second, qs(4 + k), k);
  }
  const __m512i q01 = _mm512_permutex2var_epi32(
      first, _mm512_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28, 1, 5, 9, 13, 17, 21, 25, 29), second);
  const __m512i q23 = _mm512_permutex2var_epi32(
      first, _mm512_setr_epi32(2, 6, 10, 14, 18, 22, 26, 30, 3, 7, 11, 15, 19, 23, 27, 31), second);
  const __m256i low = _mm256_set1_epi8(0x0F), high = _mm256_set1_epi8(static_cast<char>(0xF0));
  const __m512i pairs[2] = {q01, q23};
  for (int i = 0; i < 2; ++i) {
    const __m256i a = _mm512_castsi512_si256(pairs[i]), b = _mm512_extracti64x4_epi64(pairs[i], 1);
    store32(steps + 8 * i, _mm256_or_si256(_mm256_and_si256(a, low), _mm256_slli_epi32(_mm256_and_si256(b, low), 4)));
    store32(steps + 16 + 8 * i,
            _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi32(a, 4), low), _mm256_and_si256(b, high)));
  }
  // Each row's first dword: d in its low half, Q4_1's min in its high half.
  const __m256i heads = _mm256_i32gather_epi32(reinterpret_cast<const int*>(rows),
                                               _mm256_mullo_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
                                                                  _mm256_set1_epi32(static_cast<int>(row_bytes))),
                                               1);
  const auto words = [](__m256i v) {
    return _mm_packus_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  };
  _mm_storeu_si128(reinterpret_cast<__m128i*>(scale_min), words(_mm256_and_si256(heads, _mm256_set1_epi32(0xFFFF))));
  if (q4_1) _mm_storeu_si128(reinterpret_cast<__m128i*>(scale_min + kInt4Tile), words(_mm256_srli_epi32(heads, 16)));
  return;
#endif
  for (int64_t o = 0; o < kInt4Tile; ++o) {
    const uint8_t* block = rows + o * row_bytes;
    const uint8_t* qs = block + (q4_1 ? 4 : 2);
    // qs byte j holds value j (low nibble) and j + 16 (high): steps 0 and 1 are low nibbles, 2 and 3 high ones.
    const uint32_t q0 = u32_at(qs), q1 = u32_at(qs + 4), q2 = u32_at(qs + 8), q3 = u32_at(qs + 12);
    const uint32_t low = 0x0F0F0F0F, high = 0xF0F0F0F0;
    steps[o] = (q0 & low) | ((q1 & low) << 4);
    steps[kInt4Tile + o] = (q2 & low) | ((q3 & low) << 4);
    steps[2 * kInt4Tile + o] = ((q0 >> 4) & low) | (q1 & high);
    steps[3 * kInt4Tile + o] = ((q2 >> 4) & low) | (q3 & high);
    std::memcpy(scale_min + o, block, 2);
    if (q4_1) std::memcpy(scale_min + kInt4Tile + o, block + 2, 2);
  }
}

// Q4_0's mins of a tile's blocks from their scales: -8 d, the exponent moved by 3 (exact unless |d| > 8191, far
// beyond any weight's scale).
void q4_0_mins(int64_t blocks, uint16_t* scale_min) {
  for (int64_t b = 0; b < blocks; ++b) {
    uint16_t* d = scale_min + b * 2 * kInt4Tile;
#ifdef __F16C__
    const __m256 scaled = _mm256_mul_ps(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(d))),
                                        _mm256_set1_ps(-8.f));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(d + kInt4Tile), _mm256_cvtps_ph(scaled, _MM_FROUND_TO_NEAREST_INT));
#else
    for (int64_t o = 0; o < kInt4Tile; ++o) d[kInt4Tile + o] = c10::Half(-8.f * half_bits_to_float(d[o])).x;
#endif
  }
}

// The rewritten tiles of a weight up to this size go to a buffer the calling thread keeps (a fresh allocation of
// that size costs its page faults, more than the rewrite itself); a larger weight (an lm_head) is rewritten and
// multiplied in slices of outputs that fit it, so no call allocates tiles of the whole weight.
constexpr int64_t kKeptTileBytes = int64_t{8} << 20;

// Bytes of the int4 tiles (packed nibbles, float16 scales and mins) of kInt4Tile outputs of `in_features` inputs.
int64_t int4_tile_bytes(int64_t in_features) { return in_features * 4 + in_features / 32 * 2 * kInt4Tile * 2; }

// Q4_0/Q4_1 blocks [out, row bytes] as the int4 kernel's packed weight and float16 scales and mins.
std::pair<at::Tensor, at::Tensor> int4_tiles(const at::Tensor& blocks, const Format& f, int64_t in_features) {
  const int64_t out_features = blocks.size(0), tiles = out_features / kInt4Tile, groups = in_features / 32;
  const int64_t packed_bytes = tiles * in_features * 4, scale_bytes = tiles * groups * 2 * kInt4Tile * 2;
  at::Tensor packed, scale_min;
  if (packed_bytes + scale_bytes <= kKeptTileBytes) {
    thread_local std::vector<uint8_t> kept;
    kept.resize(std::max<size_t>(kept.size(), packed_bytes + scale_bytes));
    packed = at::from_blob(kept.data(), {tiles, in_features * 4}, blocks.options());
    scale_min = at::from_blob(kept.data() + packed_bytes, {tiles, groups, 2, kInt4Tile},
                              blocks.options().dtype(at::kHalf));
  } else {
    packed = at::empty({tiles, in_features * 4}, blocks.options());
    scale_min = at::empty({tiles, groups, 2, kInt4Tile}, blocks.options().dtype(at::kHalf));
  }
  const uint8_t* weight = blocks.const_data_ptr<uint8_t>();
  uint8_t* pp = packed.data_ptr<uint8_t>();
  auto* sp = reinterpret_cast<uint16_t*>(scale_min.data_ptr<at::Half>());
  const int64_t row_bytes = blocks.size(1);
  at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const uint8_t* rows = weight + t * kInt4Tile * row_bytes;
      auto* steps = reinterpret_cast<uint32_t*>(pp + t * in_features * 4);
      uint16_t* tile_scales = sp + t * groups * 2 * kInt4Tile;
      for (int64_t b = 0; b < groups; ++b)
        rewrite_block(rows + b * f.block_bytes, row_bytes, f, steps + b * 4 * kInt4Tile,
                      tile_scales + b * 2 * kInt4Tile);
      if (f.offset != 0) q4_0_mins(groups, tile_scales);
    }
  });
  return {packed, scale_min};
}

}  // namespace

at::Tensor gguf_linear(const at::Tensor& x, const at::Tensor& blocks, int64_t ggml_type) {
  const Format f = checked_format(ggml_type);
  const int64_t in_features = check_weight(blocks, f, "gguf_linear"), out_features = blocks.size(0);
  TORCH_CHECK(x.size(-1) == in_features, "gguf_linear: input has ", x.size(-1), " features, weight ", in_features);
  const at::Tensor rows = x.reshape({-1, in_features}).contiguous();
  const int64_t num_rows = rows.size(0);
  if ((ggml_type == kQ4_0 || ggml_type == kQ4_1) && num_rows >= kInt4TilesMinRows && out_features % kInt4Tile == 0) {
    // Slices of whole pairs of tiles, which the int4 kernel multiplies together.
    const int64_t slice = std::max<int64_t>(1, kKeptTileBytes / int4_tile_bytes(in_features) / 2) * 2 * kInt4Tile;
    if (slice >= out_features) {
      const auto [packed, scale_min] = int4_tiles(blocks, f, in_features);
      return int4_linear(x, packed, scale_min, 32);
    }
    at::Tensor out = at::empty({num_rows, out_features}, x.options());
    for (int64_t first = 0; first < out_features; first += slice) {
      const int64_t outputs = std::min(slice, out_features - first);
      const auto [packed, scale_min] = int4_tiles(blocks.narrow(0, first, outputs), f, in_features);
      out.narrow(1, first, outputs).copy_(int4_linear(rows, packed, scale_min, 32));
    }
    auto sizes = x.sizes().vec();
    sizes.back() = out_features;
    return out.view(sizes);
  }
  at::Tensor out = at::empty({num_rows, out_features}, x.options());
  PAGEDLLM_DISPATCH_FLOAT_TYPES(x.scalar_type(), "gguf_linear", [&] {
    const QuantizedRows q = quantize_rows<scalar_t>(rows, ggml_type);
    multiply_type(ggml_type, blocks.const_data_ptr<uint8_t>(), q, out_features, num_rows, out.data_ptr<scalar_t>());
  });
  auto sizes = x.sizes().vec();
  sizes.back() = out_features;
  return out.view(sizes);
}

at::Tensor gguf_dequantize(const at::Tensor& blocks, int64_t ggml_type, at::ScalarType dtype) {
  const Format f = checked_format(ggml_type);
  const int64_t in_features = check_weight(blocks, f, "gguf_dequantize"), out_features = blocks.size(0);
  at::Tensor out = at::empty({out_features, in_features}, blocks.options().dtype(dtype));
  const uint8_t* weight = blocks.const_data_ptr<uint8_t>();
  const int64_t row_bytes = blocks.size(1);
  PAGEDLLM_DISPATCH_FLOAT_TYPES(dtype, "gguf_dequantize", [&] {
    scalar_t* op = out.data_ptr<scalar_t>();
#ifdef PAGEDLLM_Q5_0_ROWS
    if (ggml_type == kQ5_0) {
      at::parallel_for(0, out_features, kRowGrain, [&](int64_t begin, int64_t end) {
        for (int64_t n = begin; n < end; ++n)
          dequantize_q5_0_row(weight + n * row_bytes, in_features / f.block_values, op + n * in_features);
      });
      return;
    }
#endif
    at::parallel_for(0, out_features, kRowGrain, [&](int64_t begin, int64_t end) {
      thread_local DecodedRow row;
      row.resize(in_features, f.block_values);
      for (int64_t n = begin; n < end; ++n) {
        decode_row(ggml_type, weight + n * row_bytes, in_features, row);
        scalar_t* o = op + n * in_features;
        for (int64_t s = 0; s < in_features / kSub; ++s) dequantize_run(f, row, s, o + s * kSub);
      }
    });
  });
  return out;
}

}  // namespace pagedllm
