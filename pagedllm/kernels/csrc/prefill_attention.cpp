// Causal attention of every prefill of a step (fresh prompts and chunks after cached context) in one call, over
// ragged queries and keys: flash attention's online softmax over blocks of keys, the softmax in float32.
//
// Each sequence's keys and values are first packed per kv head into blocks of kKeyBlock tokens laid out for the two
// products; then a task attends kQueryTokens query tokens with all the query heads of one kv head (HeadGroups), so
// that every key block it loads serves all their rows. Float32 inputs, or any input on a CPU without AVX512-BF16, take
// float32 products; bfloat16 inputs on one with it take bfloat16 dot products (the weights of the values rounded to
// bfloat16, as PyTorch's flash attention does), at twice the multiplies per instruction, and on AMX tiles where
// the CPU has them (2.6x the vector dot products on a 2,048-token prompt).
//
// With a sliding window of w, the query at position p sees the keys at p - w + 1 .. p: key blocks before the first
// query's window are neither packed nor read, and the keys before a row's window inside a block it reads get a
// score of kMaskedScore below the row's running maximum, whose exponential is 0 in float32.
//
// Key blocks start at a sequence's first key, and every sum of a row runs in one fixed order over its keys
// whichever task holds the row: a query's output does not depend on how its prompt was cut into chunks.
#include "ops.h"
#include "parallel.h"
#include "row_tiles.h"
#include "vec.h"

#include <ATen/Parallel.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <memory>
#include <vector>

namespace pagedllm {
namespace {

constexpr int64_t kKeyBlock = 64;
constexpr int64_t kQueryTokens = 16;
constexpr int kRowTile = 6;  // rows of a matmul tile
constexpr float kMaskedScore = 200.f;  // e^-200 is below float32's smallest subnormal

inline int64_t round_up(int64_t x, int64_t multiple) { return (x + multiple - 1) / multiple * multiple; }

// c[r][0:8 * V] (+)= a[r][0:k] . b[0:k][0:8 * V] for the R rows of a tile, each sum over i = 0..k-1 in order.
template <int R, int V>
inline void float_tile(const float* a, int64_t lda, const float* b, int64_t ldb, float* c, int64_t ldc, int64_t k,
                       bool accumulate) {
#ifdef PAGEDLLM_AVX2
  // One flat array, every loop over it unrolled: GCC then keeps it in registers (a 2-D one it spills each step).
  __m256 acc[R * V];
#pragma GCC unroll 32
  for (int i = 0; i < R * V; ++i)
    acc[i] = accumulate ? _mm256_loadu_ps(c + i / V * ldc + 8 * (i % V)) : _mm256_setzero_ps();
  for (int64_t i = 0; i < k; ++i) {
    __m256 bv[V];
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) bv[v] = _mm256_loadu_ps(b + i * ldb + 8 * v);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m256 ar = _mm256_broadcast_ss(a + r * lda + i);
#pragma GCC unroll 4
      for (int v = 0; v < V; ++v) acc[r * V + v] = _mm256_fmadd_ps(ar, bv[v], acc[r * V + v]);
    }
  }
#pragma GCC unroll 32
  for (int i = 0; i < R * V; ++i) _mm256_storeu_ps(c + i / V * ldc + 8 * (i % V), acc[i]);
#else
  for (int r = 0; r < R; ++r)
    for (int64_t j = 0; j < 8 * V; ++j) {
      float sum = accumulate ? c[r * ldc + j] : 0.f;
      for (int64_t i = 0; i < k; ++i) sum = std::fma(a[r * lda + i], b[i * ldb + j], sum);
      c[r * ldc + j] = sum;
    }
#endif
}

// c[0:m][0:n] (+)= a[0:m][0:k] . b[0:k][0:n] in float32, n a multiple of 8.
void float_matmul(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b, int64_t ldb, float* c,
                  int64_t ldc, bool accumulate) {
  for_row_tiles<kRowTile>(m, [&](auto tile_rows, int64_t r) {
    constexpr int R = decltype(tile_rows)::value;
    int64_t j = 0;
    for (; j + 16 <= n; j += 16) float_tile<R, 2>(a + r * lda, lda, b + j, ldb, c + r * ldc + j, ldc, k, accumulate);
    if (j < n) float_tile<R, 1>(a + r * lda, lda, b + j, ldb, c + r * ldc + j, ldc, k, accumulate);
  });
}

// What a task holds while it runs where its products need no matrix tiles.
struct NoTiles {};

// Products in float32: a key block is [head_dim][kKeyBlock] (keys transposed), a value block [kKeyBlock][value_dim].
struct FloatProducts {
  using Packed = float;
  int64_t head_dim;

  int64_t query_size() const { return head_dim; }
  int64_t value_dim() const { return round_up(head_dim, 8); }
  int64_t padded_rows(int64_t rows) const { return rows; }
  NoTiles tiles() const { return {}; }
  int64_t key_block_size() const { return head_dim * kKeyBlock; }
  int64_t value_block_size() const { return kKeyBlock * value_dim(); }

  // Key j of a block, or zeros where key is null (past the sequence's end).
  template <typename T>
  void pack_key(float* block, int64_t j, const T* key) const {
    for (int64_t d = 0; d < head_dim; ++d) block[d * kKeyBlock + j] = key != nullptr ? to_float(key[d]) : 0.f;
  }
  template <typename T>
  void pack_value(float* block, int64_t j, const T* value) const {
    float* row = block + j * value_dim();
    for (int64_t d = 0; d < value_dim(); ++d) row[d] = value != nullptr && d < head_dim ? to_float(value[d]) : 0.f;
  }
  template <typename T>
  void pack_query(float* row, const T* query) const {
    for (int64_t d = 0; d < head_dim; ++d) row[d] = to_float(query[d]);
  }
  // s[r][0:keys] = queries[r] . key j for the block's first `keys` keys (a few more are computed).
  void scores(int64_t rows, int64_t keys, const float* queries, const float* key_block, float* s) const {
    float_matmul(rows, round_up(keys, 8), head_dim, queries, head_dim, key_block, kKeyBlock, s, kKeyBlock, false);
  }
  // p[0:visible] = e^(p * scale - shift), zeros up to `keys`: the weights add_weighted_values reads. Returns their
  // sum.
  float exponentiate(float* p, int64_t visible, int64_t keys, float scale, float shift) const {
    for (int64_t j = 0; j < visible; ++j) p[j] *= scale;
    const float sum = exp_shifted_sum(p, visible, shift);
    std::fill(p + visible, p + keys, 0.f);
    return sum;
  }
  // acc[r] += sum over the block's first `keys` keys of weight p[r][j] * value j.
  void add_weighted_values(int64_t rows, int64_t keys, const float* p, const float* value_block, float* acc) const {
    float_matmul(rows, value_dim(), keys, p, kKeyBlock, value_block, value_dim(), acc, value_dim(), true);
  }
};

#ifdef PAGEDLLM_AVX512_BF16
// c[r][0:16 * V] (+)= sum over i of the dot products of the bfloat16 pairs a[r][i] and b[i][0:16 * V], each 32 bits.
template <int R, int V>
inline void pair_tile(const uint32_t* a, int64_t lda, const uint32_t* b, int64_t ldb, float* c, int64_t ldc, int64_t k,
                      bool accumulate) {
  __m512 acc[R * V];
#pragma GCC unroll 32
  for (int i = 0; i < R * V; ++i)
    acc[i] = accumulate ? _mm512_loadu_ps(c + i / V * ldc + 16 * (i % V)) : _mm512_setzero_ps();
  for (int64_t i = 0; i < k; ++i) {
    __m512bh bv[V];
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) bv[v] = (__m512bh)_mm512_loadu_si512(b + i * ldb + 16 * v);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m512bh ar = (__m512bh)_mm512_set1_epi32(static_cast<int>(a[r * lda + i]));
#pragma GCC unroll 4
      for (int v = 0; v < V; ++v) acc[r * V + v] = _mm512_dpbf16_ps(acc[r * V + v], ar, bv[v]);
    }
  }
#pragma GCC unroll 32
  for (int i = 0; i < R * V; ++i) _mm512_storeu_ps(c + i / V * ldc + 16 * (i % V), acc[i]);
}

// c[0:m][0:n] (+)= a[0:m][0:k] . b[0:k][0:n] over bfloat16 pairs, n a multiple of 16.
void pair_matmul(int64_t m, int64_t n, int64_t k, const uint32_t* a, int64_t lda, const uint32_t* b, int64_t ldb,
                 float* c, int64_t ldc, bool accumulate) {
  for_row_tiles<kRowTile>(m, [&](auto tile_rows, int64_t r) {
    constexpr int R = decltype(tile_rows)::value;
    int64_t j = 0;
    for (; j + 64 <= n; j += 64) pair_tile<R, 4>(a + r * lda, lda, b + j, ldb, c + r * ldc + j, ldc, k, accumulate);
    for (; j < n; j += 16) pair_tile<R, 1>(a + r * lda, lda, b + j, ldb, c + r * ldc + j, ldc, k, accumulate);
  });
}

inline uint16_t bits(c10::BFloat16 x) { return x.x; }

// The first n lanes of 16 (none for n <= 0).
inline __mmask16 first_lanes(int64_t n) { return n >= 16 ? 0xFFFF : n <= 0 ? 0 : (1u << n) - 1; }

// e^x for 16 floats x <= 0, to about 5e-5 relative error, for weights rounded to bfloat16 (2^-9) next: x = n ln 2 +
// r with |r| <= ln 2 / 2, e^r by its degree-4 Taylor polynomial, then scaled by 2^n.
inline __m512 exp16_coarse(__m512 x) {
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.f / 24.f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 6.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
}

#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
#define PAGEDLLM_AMX 1
// Rows of an AMX tile, and bfloat16 values in one of its rows.
constexpr int64_t kTileRows = 16;
constexpr int64_t kTileDepth = 32;

// Whether this process may use AMX tiles: Linux hands their state out only on request.
inline bool matrix_units_granted() {
  constexpr long kRequestPermission = 0x1023, kTileData = 18;  // ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA
  static const bool granted = syscall(SYS_arch_prctl, kRequestPermission, kTileData) == 0;
  return granted;
}

// Tiles 0 (sums), 1 (left) and 2 (right), each 16 rows of 64 bytes; loaded on a thread before its tiles are used,
// since other code (oneDNN) configures the tiles its own way in between.
struct TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t row_bytes[16] = {64, 64, 64};
  uint8_t rows[16] = {16, 16, 16};
};

// The tiles configured for the scope of a task (none where `on` is false); after it the thread's configuration is
// the one before it (released where there was none), whatever another library on the thread assumes of it.
class TileScope {
 public:
  explicit TileScope(bool on) : on_(on) {
    static const TileConfig config;
    if (!on_) return;
    _tile_storeconfig(&saved_);
    _tile_loadconfig(&config);
  }
  ~TileScope() {
    if (!on_) return;
    if (saved_.palette != 0)
      _tile_loadconfig(&saved_);
    else
      _tile_release();
  }
  TileScope(const TileScope&) = delete;
  TileScope& operator=(const TileScope&) = delete;

 private:
  bool on_;
  TileConfig saved_;
};

// c[16 rows][16] (+)= a[16 rows][0:32 * depth] . b over bfloat16 pairs, b in depth tiles of [16 pairs][16][2].
inline void amx_tile(const void* a, int64_t a_row_bytes, const void* b, int64_t b_row_bytes, int64_t b_tile_bytes,
                     float* c, int64_t c_row_bytes, int64_t depth, bool accumulate) {
  if (accumulate)
    _tile_loadd(0, c, c_row_bytes);
  else
    _tile_zero(0);
  for (int64_t i = 0; i < depth; ++i) {
    _tile_loadd(1, static_cast<const char*>(a) + 64 * i, a_row_bytes);
    _tile_loadd(2, static_cast<const char*>(b) + b_tile_bytes * i, b_row_bytes);
    _tile_dpbf16ps(0, 1, 2);
  }
  _tile_stored(0, c, c_row_bytes);
}
#endif

// Products of bfloat16 pairs: a key block is [head_dim / 2][kKeyBlock][2] (pairs of channels per key), a value
// block [kKeyBlock / 2][value_dim][2] (pairs of keys per channel); odd head dims end with a zero channel.
//
// Where the CPU has AMX and head_dim is a multiple of 32, both products run on its tiles, 16 rows at a time (the
// rows of a task padded to a multiple of 16): the packed layouts are the ones its bfloat16 tiles read.
struct Bfloat16Products {
  using Packed = uint16_t;
  int64_t head_dim;
  bool matrix_units = false;

  int64_t padded_rows(int64_t rows) const { return matrix_units ? round_up(rows, 16) : rows; }
#ifdef PAGEDLLM_AMX
  TileScope tiles() const { return TileScope(matrix_units); }
#else
  NoTiles tiles() const { return {}; }
#endif

  int64_t pairs() const { return (head_dim + 1) / 2; }
  int64_t query_size() const { return 2 * pairs(); }
  int64_t value_dim() const { return round_up(head_dim, 16); }
  int64_t key_block_size() const { return pairs() * kKeyBlock * 2; }
  int64_t value_block_size() const { return kKeyBlock * value_dim(); }

  void pack_key(uint16_t* block, int64_t j, const c10::BFloat16* key) const {
    for (int64_t d = 0; d < 2 * pairs(); ++d)
      block[(d / 2 * kKeyBlock + j) * 2 + d % 2] = key != nullptr && d < head_dim ? bits(key[d]) : 0;
  }
  void pack_value(uint16_t* block, int64_t j, const c10::BFloat16* value) const {
    uint16_t* pair_row = block + j / 2 * value_dim() * 2 + j % 2;
    for (int64_t d = 0; d < value_dim(); ++d) pair_row[2 * d] = value != nullptr && d < head_dim ? bits(value[d]) : 0;
  }
  void pack_query(uint16_t* row, const c10::BFloat16* query) const {
    for (int64_t d = 0; d < 2 * pairs(); ++d) row[d] = d < head_dim ? bits(query[d]) : 0;
  }
  void scores(int64_t rows, int64_t keys, const uint16_t* queries, const uint16_t* key_block, float* s) const {
#ifdef PAGEDLLM_AMX
    if (matrix_units) {
      // Tile i of a key block's 16 keys from j: pairs 16 i.. of those keys, rows of kKeyBlock pairs apart.
      for (int64_t r = 0; r < rows; r += kTileRows)
        for (int64_t j = 0; j < keys; j += kTileRows)
          amx_tile(queries + r * query_size(), 2 * query_size(), key_block + 2 * j, 4 * kKeyBlock,
                   4 * kKeyBlock * kTileRows, s + r * kKeyBlock + j, 4 * kKeyBlock, head_dim / kTileDepth, false);
      return;
    }
#endif
    pair_matmul(rows, round_up(keys, 16), pairs(), reinterpret_cast<const uint32_t*>(queries), pairs(),
                reinterpret_cast<const uint32_t*>(key_block), kKeyBlock, s, kKeyBlock, false);
  }
  // The weights e^(p * scale - shift), rounded to bfloat16, written over the start of the row p itself (each store
  // lands on floats already read) and zero up to an even count, so that the last pair is whole. Returns their sum.
  float exponentiate(float* p, int64_t visible, int64_t keys, float scale, float shift) const {
    auto* weights = reinterpret_cast<uint16_t*>(p);
    const __m512 scale_v = _mm512_set1_ps(scale), shift_v = _mm512_set1_ps(shift);
    __m512 sum = _mm512_setzero_ps();
    const int64_t count = round_up(keys, 2);
    for (int64_t j = 0; j < count; j += 16) {
      const __mmask16 live = first_lanes(visible - j), stored = first_lanes(count - j);
      const __m512 x = _mm512_fmsub_ps(_mm512_maskz_loadu_ps(live, p + j), scale_v, shift_v);
      const __m512 e = _mm512_maskz_mov_ps(live, exp16_coarse(x));
      sum = _mm512_add_ps(sum, e);
      _mm256_mask_storeu_epi16(weights + j, stored, (__m256i)_mm512_cvtneps_pbh(e));
    }
    return _mm512_reduce_add_ps(sum);
  }
  void add_weighted_values(int64_t rows, int64_t keys, float* p, const uint16_t* value_block, float* acc) const {
#ifdef PAGEDLLM_AMX
    if (matrix_units) {
      // A tile reads 32 weights of a row: those past the even count exponentiate left are zeroed first.
      const int64_t depth = round_up(keys, kTileDepth) / kTileDepth;
      for (int64_t r = 0; r < rows; ++r) {
        auto* weights = reinterpret_cast<uint16_t*>(p + r * kKeyBlock);
        std::fill(weights + round_up(keys, 2), weights + depth * kTileDepth, uint16_t{0});
      }
      for (int64_t r = 0; r < rows; r += kTileRows)
        for (int64_t d = 0; d < value_dim(); d += kTileRows)
          amx_tile(p + r * kKeyBlock, 4 * kKeyBlock, value_block + 2 * d, 4 * value_dim(), 4 * value_dim() * kTileRows,
                   acc + r * value_dim() + d, 4 * value_dim(), depth, true);
      return;
    }
#endif
    pair_matmul(rows, value_dim(), (keys + 1) / 2, reinterpret_cast<const uint32_t*>(p), kKeyBlock,
                reinterpret_cast<const uint32_t*>(value_block), value_dim(), acc, value_dim(), true);
  }
};
#endif

// One sequence of the batch: its queries are the last query_len of its key_len positions; window 0 sees them all.
struct Sequence {
  int64_t query_start, query_len, key_start, key_len, window;
  int64_t key_blocks() const { return (key_len + kKeyBlock - 1) / kKeyBlock; }
  // The first key position the query at `position` sees.
  int64_t first_visible(int64_t position) const {
    return window > 0 ? std::max<int64_t>(0, position - window + 1) : 0;
  }
  int64_t first_key_block() const { return first_visible(key_len - query_len) / kKeyBlock; }
};

// One key block of a sequence's kv head, to pack.
struct Pack {
  int64_t seq, kv_head, block;
};

// A task: query tokens [first, first + tokens) of a sequence, with the query heads of one kv head.
struct Task {
  int64_t seq, kv_head, first, tokens, cost;
};

// Where the packed key and value blocks of each (sequence, kv head) lie in one buffer.
template <typename Products>
struct PackedLayout {
  Products products;
  int64_t num_kv_heads;
  int64_t token_stride;  // between the keys (and the values) of consecutive tokens in k and v
  std::vector<int64_t> offsets;  // per sequence, where its kv heads' packs start

  int64_t keys_size(const Sequence& s) const { return s.key_blocks() * products.key_block_size(); }
  int64_t pack_size(const Sequence& s) const {
    return s.key_blocks() * (products.key_block_size() + products.value_block_size());
  }
  int64_t keys(const Sequence& s, int64_t seq, int64_t kv_head) const { return offsets[seq] + kv_head * pack_size(s); }
  int64_t values(const Sequence& s, int64_t seq, int64_t kv_head) const {
    return keys(s, seq, kv_head) + keys_size(s);
  }
};

// Packs key block `block` of a sequence's kv head (tokens past the sequence's end as zeros).
template <typename Products, typename T>
void pack_block(const T* k, const T* v, const Sequence& s, int64_t kv_head, int64_t block,
                const PackedLayout<Products>& layout, typename Products::Packed* keys,
                typename Products::Packed* values) {
  const Products& products = layout.products;
  const int64_t token_stride = layout.token_stride;
  keys += block * products.key_block_size();
  values += block * products.value_block_size();
  for (int64_t j = 0, t = block * kKeyBlock; j < kKeyBlock; ++j, ++t) {
    const int64_t entry = (s.key_start + t) * token_stride + kv_head * products.head_dim;
    products.pack_key(keys, j, t < s.key_len ? k + entry : nullptr);
    products.pack_value(values, j, t < s.key_len ? v + entry : nullptr);
  }
}

template <typename Products, typename T>
void attend_task(const T* q, int64_t q_token_stride, const Task& task, const Sequence& s, const HeadGroups& groups,
                 float scale, const typename Products::Packed* keys, const typename Products::Packed* values,
                 const Products& products, T* out) {
  // The query heads [first_head, first_head + heads) read the task's kv head.
  const int64_t first_head = groups.first_query(task.kv_head), heads = groups.end_query(task.kv_head) - first_head;
  const int64_t head_dim = products.head_dim, value_dim = products.value_dim(), rows = task.tokens * heads;
  const int64_t padded_rows = products.padded_rows(rows);  // rows past `rows` are computed and left unread
  const auto tiles = products.tiles();
  thread_local std::vector<typename Products::Packed> queries;
  thread_local std::vector<float> scores, acc, largest, sums;
  queries.assign(padded_rows * products.query_size(), 0);
  scores.resize(padded_rows * kKeyBlock);
  acc.assign(padded_rows * value_dim, 0.f);
  largest.assign(rows, -INFINITY);
  sums.assign(rows, 0.f);
  // Row t * heads + h: query token first + t, query head first_head + h.
  const auto head_offset = [&](int64_t row, int64_t token_stride) {
    const int64_t token = s.query_start + task.first + row / heads;
    return token * token_stride + (first_head + row % heads) * head_dim;
  };
  for (int64_t row = 0; row < rows; ++row)
    products.pack_query(queries.data() + row * products.query_size(), q + head_offset(row, q_token_stride));
  const int64_t first_position = s.key_len - s.query_len + task.first;
  const int64_t last_position = first_position + task.tokens - 1;
  for (int64_t block = s.first_visible(first_position) / kKeyBlock; block * kKeyBlock <= last_position; ++block) {
    const int64_t block_start = block * kKeyBlock;
    const int64_t block_keys = std::min(kKeyBlock, last_position - block_start + 1);
    products.scores(padded_rows, block_keys, queries.data(), keys + block * products.key_block_size(), scores.data());
    for (int64_t row = 0; row < rows; ++row) {
      float* p = scores.data() + row * kKeyBlock;
      const int64_t position = first_position + row / heads;
      const int64_t visible = std::min(block_keys, position - block_start + 1);
      const int64_t hidden = std::max<int64_t>(0, s.first_visible(position) - block_start);
      if (visible <= hidden) {
        std::fill_n(p, block_keys, 0.f);
        continue;
      }
      // The running maximum is of the unscaled scores (scale > 0 keeps their order).
      const float new_max = std::max(largest[row], max_of(p + hidden, visible - hidden));
      std::fill_n(p, hidden, new_max - kMaskedScore / scale);
      const float rescale = std::exp((largest[row] - new_max) * scale);
      sums[row] = sums[row] * rescale + products.exponentiate(p, visible, block_keys, scale, new_max * scale);
      largest[row] = new_max;
      if (rescale != 1.f)
        for (int64_t d = 0; d < value_dim; ++d) acc[row * value_dim + d] *= rescale;
    }
    products.add_weighted_values(padded_rows, block_keys, scores.data(), values + block * products.value_block_size(),
                                 acc.data());
  }
  for (int64_t row = 0; row < rows; ++row) {
    const float inverse = 1.f / sums[row];
    for (int64_t d = 0; d < head_dim; ++d)
      out[head_offset(row, groups.num_heads * head_dim) + d] = static_cast<T>(acc[row * value_dim + d] * inverse);
  }
}

// The products attention over T takes on this CPU.
template <typename T>
FloatProducts products_for(const T*, int64_t head_dim) {
  return {head_dim};
}
#ifdef PAGEDLLM_AVX512_BF16
inline Bfloat16Products products_for(const c10::BFloat16*, int64_t head_dim) {
#ifdef PAGEDLLM_AMX
  if (head_dim % kTileDepth == 0 && matrix_units_granted()) return {head_dim, true};
#endif
  return {head_dim};
}
#endif

// q's tokens lie q_token_stride apart, k's and v's kv_token_stride apart; out is contiguous.
template <typename Products, typename T>
void attend(const T* q, int64_t q_token_stride, const T* k, const T* v, int64_t kv_token_stride, T* out,
            const std::vector<Sequence>& seqs, const HeadGroups& groups, int64_t num_kv_heads, float scale,
            const Products& products) {
  PackedLayout<Products> layout{products, num_kv_heads, kv_token_stride, {}};
  int64_t packed_size = 0;
  std::vector<Pack> packs;
  std::vector<Task> tasks;
  for (int64_t i = 0; i < static_cast<int64_t>(seqs.size()); ++i) {
    const Sequence& s = seqs[i];
    layout.offsets.push_back(packed_size);
    packed_size += num_kv_heads * layout.pack_size(s);
    for (int64_t h = 0; h < num_kv_heads; ++h) {
      for (int64_t block = s.first_key_block(); block < s.key_blocks(); ++block) packs.push_back({i, h, block});
      for (int64_t first = 0; first < s.query_len; first += kQueryTokens) {
        const int64_t tokens = std::min(kQueryTokens, s.query_len - first);
        const int64_t last = s.key_len - s.query_len + first + tokens;
        const int64_t heads = groups.end_query(h) - groups.first_query(h);
        tasks.push_back({i, h, first, tokens, heads * tokens * (last - s.first_visible(last - tokens))});
      }
    }
  }
  std::sort(tasks.begin(), tasks.end(), [](const Task& a, const Task& b) { return a.cost > b.cost; });
  const std::unique_ptr<typename Products::Packed[]> buffer(new typename Products::Packed[packed_size]);
  typename Products::Packed* packed = buffer.get();
  run_balanced(static_cast<int64_t>(packs.size()), [&](int64_t i) {
    const Pack& p = packs[i];
    const Sequence& s = seqs[p.seq];
    pack_block(k, v, s, p.kv_head, p.block, layout, packed + layout.keys(s, p.seq, p.kv_head),
               packed + layout.values(s, p.seq, p.kv_head));
  });
  run_balanced(static_cast<int64_t>(tasks.size()), [&](int64_t i) {
    const Task& task = tasks[i];
    const Sequence& s = seqs[task.seq];
    attend_task(q, q_token_stride, task, s, groups, scale,
                packed + layout.keys(s, task.seq, task.kv_head),
                packed + layout.values(s, task.seq, task.kv_head), products, out);
  });
}

}  // namespace

at::Tensor prefill_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                             at::IntArrayRef query_starts, at::IntArrayRef key_starts, at::IntArrayRef key_lens,
                             double scale, int64_t sliding_window, int64_t queries_per_kv, int64_t query_offset) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && k.sizes() == v.sizes(),
              "prefill_attention: q [tokens, heads, dim], k and v [keys, kv_heads, dim]");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && k.scalar_type() == v.scalar_type(),
              "prefill_attention: q, k and v must share a dtype");
  const int64_t num_heads = q.size(1), head_dim = q.size(2), num_kv_heads = k.size(1);
  TORCH_CHECK(k.size(2) == head_dim, "prefill_attention: head shapes");
  const HeadGroups groups = head_groups(num_heads, num_kv_heads, queries_per_kv, query_offset, "prefill_attention");
  TORCH_CHECK(sliding_window >= 0, "prefill_attention: sliding_window must be >= 0 (0: none)");
  const size_t num_seqs = key_starts.size();
  TORCH_CHECK(key_lens.size() == num_seqs && query_starts.size() == num_seqs + 1 && query_starts.back() == q.size(0),
              "prefill_attention: a key start and length per sequence, query starts ending at the query count");
  std::vector<Sequence> seqs;
  for (size_t i = 0; i < num_seqs; ++i) {
    const Sequence s{query_starts[i], query_starts[i + 1] - query_starts[i], key_starts[i], key_lens[i], sliding_window};
    TORCH_CHECK(s.query_len >= 1 && s.key_len >= s.query_len && s.key_start >= 0 && s.key_start + s.key_len <= k.size(0),
                "prefill_attention: every sequence needs a query and at least as many keys, all within k");
    seqs.push_back(s);
  }
  at::Tensor queries = heads_in_token_rows(q), keys = heads_in_token_rows(k), values = heads_in_token_rows(v);
  if (keys.stride(0) != values.stride(0)) keys = keys.contiguous(), values = values.contiguous();
  at::Tensor out = at::empty(q.sizes(), q.options());
  PAGEDLLM_DISPATCH_FLOAT_TYPES(q.scalar_type(), "prefill_attention", [&] {
    const scalar_t* qp = queries.const_data_ptr<scalar_t>();
    attend(qp, queries.stride(0), keys.const_data_ptr<scalar_t>(), values.const_data_ptr<scalar_t>(), keys.stride(0),
           out.data_ptr<scalar_t>(), seqs, groups, num_kv_heads, static_cast<float>(scale), products_for(qp, head_dim));
  });
  return out;
}

}  // namespace pagedllm
