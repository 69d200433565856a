// Small helpers shared by the CPU kernels: float conversion of the activation and cache dtypes, and AVX2 loads.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define PAGEDLLM_AVX2 1
#if (defined(__AVX512VNNI__) && defined(__AVX512VL__)) || defined(__AVXVNNI__)
#define PAGEDLLM_VNNI 1
#endif
#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512DQ__)
#define PAGEDLLM_AVX512_VNNI 1
#endif
#if defined(__AVX512BF16__) && defined(__AVX512BW__)
#define PAGEDLLM_AVX512_BF16 1
#endif
#endif

// The activation and cache dtypes the kernels take: float32 and bfloat16.
#define PAGEDLLM_DISPATCH_FLOAT_TYPES(TYPE, NAME, ...) \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

namespace pagedllm {

inline float to_float(float x) { return x; }
inline float to_float(c10::BFloat16 x) { return static_cast<float>(x); }

inline float bf16_bits_to_float(uint16_t bits) {
  return static_cast<float>(c10::BFloat16(bits, c10::BFloat16::from_bits()));
}

inline float half_bits_to_float(uint16_t bits) { return static_cast<float>(c10::Half(bits, c10::Half::from_bits())); }

// Where prefetch asks for the lines: __builtin_prefetch's locality (3: prefetcht0, 2: prefetcht1 on x86).
constexpr int kIntoL1 = 3, kIntoL2 = 2;

// Asks for `bytes` bytes from p into the cache, a line at a time (addresses past the weights are harmless).
template <int Locality = kIntoL1>
inline void prefetch(const void* p, int64_t bytes) {
  for (int64_t offset = 0; offset < bytes; offset += 64)
    __builtin_prefetch(static_cast<const char*>(p) + offset, 0, Locality);
}

// A prefetch of `bytes` bytes from p spread over the `parts` steps of a loop, whole lines per step: step `part`
// asks for its slice, so the requests come evenly rather than in one burst that keeps the loop's loads waiting.
template <int Locality>
class SpreadPrefetch {
 public:
  SpreadPrefetch(const void* p, int64_t bytes, int64_t parts)
      : p_(static_cast<const char*>(p)), bytes_(bytes), slice_((bytes + 64 * parts - 1) / (64 * parts) * 64) {}

  void operator()(int64_t part) const {
    const int64_t start = part * slice_;
    if (bytes_ > start) prefetch<Locality>(p_ + start, std::min(slice_, bytes_ - start));
  }

 private:
  const char* p_;
  int64_t bytes_, slice_;
};

#ifdef PAGEDLLM_AVX2
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }

inline __m256 load8(const c10::BFloat16* p) {
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
}

inline __m256 load8(const c10::Half* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }

#ifdef PAGEDLLM_VNNI
// sums plus the 8 int32 sums of adjacent quadruples of the products of unsigned bytes u with signed bytes s, in one
// instruction and without the int16 saturation of AVX2's maddubs.
inline __m256i add_byte_products(__m256i sums, __m256i u, __m256i s) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return _mm256_dpbusd_epi32(sums, u, s);
#else
  return _mm256_dpbusd_avx_epi32(sums, u, s);
#endif
}
#endif

inline void store8(float* p, __m256 v) { _mm256_storeu_ps(p, v); }

// The bfloat16 bits (in the low half of each 32-bit lane) of 8 floats rounded as c10::BFloat16 rounds them: to
// nearest, ties to even, NaN kept NaN, subnormals kept (AVX512-BF16's conversion flushes them to zero).
inline __m256i bfloat16_bits(__m256 v) {
  const __m256i bits = _mm256_castps_si256(v);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  const __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7FFF))), 16);
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  return _mm256_blendv_epi8(rounded, _mm256_set1_epi32(0x7FC0), nan);
}

// 8 floats rounded to T and back, as static_cast<T> then to_float would.
template <typename T>
inline __m256 round_to(__m256 v) {
  if constexpr (std::is_same_v<T, float>)
    return v;
  else
    return _mm256_castsi256_ps(_mm256_slli_epi32(bfloat16_bits(v), 16));
}

// 8 floats rounded to bfloat16 (bfloat16_bits).
inline void store8(c10::BFloat16* p, __m256 v) {
  const __m256i rounded = bfloat16_bits(v);
  // packus works within 128-bit lanes: the 64-bit permutation brings the two lanes' 4 results together.
  const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(rounded, rounded), 0xD8);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
}

#ifdef PAGEDLLM_AVX512_VNNI
// low in the first 8 lanes, high in the last 8.
inline __m512 join(__m256 low, __m256 high) { return _mm512_insertf32x8(_mm512_castps256_ps512(low), high, 1); }

inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const c10::BFloat16* p) {
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}

// The bfloat16 bits (low half of each lane) of 16 floats, rounded as bfloat16_bits rounds 8.
inline __m512i bfloat16_bits16(__m512 v) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m512i rounded =
      _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF))), 16);
  return _mm512_mask_mov_epi32(rounded, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
}

// 16 floats rounded to T and back, as round_to rounds 8.
template <typename T>
inline __m512 round16_to(__m512 v) {
  if constexpr (std::is_same_v<T, float>)
    return v;
  else
    return _mm512_castsi512_ps(_mm512_slli_epi32(bfloat16_bits16(v), 16));
}

inline void store16(float* p, __m512 v) { _mm512_storeu_ps(p, v); }

// 16 floats rounded to bfloat16 (bfloat16_bits16).
inline void store16(c10::BFloat16* p, __m512 v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(bfloat16_bits16(v)));
}
#endif

inline float horizontal_sum(__m256 v) {
  __m128 sum = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  sum = _mm_add_ps(sum, _mm_movehl_ps(sum, sum));
  sum = _mm_add_ss(sum, _mm_movehdup_ps(sum));
  return _mm_cvtss_f32(sum);
}
// e^x for 8 floats, to about 2 float32 ulp: x = n ln 2 + r with |r| <= ln 2 / 2, e^r by its degree-6 Taylor
// polynomial, 2^n built in the exponent bits. Inputs are clamped to [-87, 88]: e^-87 is about 0 in a sum, and
// e^88 about float32's largest value.
inline __m256 exp8(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.f)), _mm256_set1_ps(88.f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  // r = x - n ln 2, with ln 2 split in two so that n * ln2_high is exact.
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.f / 720.f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 120.f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 24.f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 6.f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
  const __m256i exponent = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(exponent));
}

#ifdef PAGEDLLM_AVX512_VNNI
// exp8's arithmetic on 16 floats: each lane's value is the one exp8 gives.
inline __m512 exp16(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.f)), _mm512_set1_ps(88.f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.f / 720.f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 120.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 24.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 6.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  const __m512i exponent = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
  return _mm512_mul_ps(p, _mm512_castsi512_ps(exponent));
}
#endif
#endif

// x[i] = e^(x[i] - shift) for n floats; returns their sum.
inline float exp_shifted_sum(float* x, int64_t n, float shift) {
  int64_t i = 0;
  float sum = 0.f;
#ifdef PAGEDLLM_AVX2
  const __m256 shift_v = _mm256_set1_ps(shift);
  __m256 acc = _mm256_setzero_ps();
  for (; i + 8 <= n; i += 8) {
    const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(x + i), shift_v));
    _mm256_storeu_ps(x + i, e);
    acc = _mm256_add_ps(acc, e);
  }
  sum = horizontal_sum(acc);
#endif
  for (; i < n; ++i) sum += (x[i] = std::exp(x[i] - shift));
  return sum;
}

// The largest of n floats (-inf for none).
inline float max_of(const float* x, int64_t n) {
  int64_t i = 0;
  float largest = -INFINITY;
#ifdef PAGEDLLM_AVX2
  __m256 max_v = _mm256_set1_ps(-INFINITY);
  for (; i + 8 <= n; i += 8) max_v = _mm256_max_ps(max_v, _mm256_loadu_ps(x + i));
  __m128 half = _mm_max_ps(_mm256_castps256_ps128(max_v), _mm256_extractf128_ps(max_v, 1));
  half = _mm_max_ps(half, _mm_movehl_ps(half, half));
  largest = _mm_cvtss_f32(_mm_max_ss(half, _mm_movehdup_ps(half)));
#endif
  for (; i < n; ++i) largest = std::max(largest, x[i]);
  return largest;
}

// Dot product of n floats with n values of type T (n a multiple of 8 on the AVX2 path).
template <typename T>
inline float dot(const float* a, const T* b, int64_t n) {
  int64_t i = 0;
  float sum = 0.f;
#ifdef PAGEDLLM_AVX2
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  for (; i + 16 <= n; i += 16) {
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), load8(b + i), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), load8(b + i + 8), acc1);
  }
  sum = horizontal_sum(_mm256_add_ps(acc0, acc1));
#endif
  for (; i < n; ++i) sum += a[i] * to_float(b[i]);
  return sum;
}

// out[i] += w * b[i] for n values.
template <typename T>
inline void axpy(float* out, float w, const T* b, int64_t n) {
  int64_t i = 0;
#ifdef PAGEDLLM_AVX2
  const __m256 wv = _mm256_set1_ps(w);
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(out + i, _mm256_fmadd_ps(wv, load8(b + i), _mm256_loadu_ps(out + i)));
#endif
  for (; i < n; ++i) out[i] += w * to_float(b[i]);
}

}  // namespace pagedllm
