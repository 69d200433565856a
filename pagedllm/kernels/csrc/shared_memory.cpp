// Sum and gather among the ranks of one host through the segment that distributed/shared_memory.py maps: this
// file alone runs its protocol.
//
// Layout: world_size lines of 64 bytes (rank r's line holds, as int64: [0] its flag, [1] its process id, [2] how
// many peers sleep waiting on its flag, [3] the nanoseconds it has spent waiting for peers), then world_size x 2
// slots of slot_bytes, rank-major. A collective call numbered g: the rank writes its data into its slot g % 2,
// stores g in its flag, waits until every flag reaches g, then reads every rank's slot g % 2. A rank's flag is its
// count of calls: the next call's number is read from it, so Python and the fused decode kernel share one count.
//
// Invariant: a rank writes slot g % 2 again only in call g + 2, after every flag reached g + 1; a rank stores
// g + 1 only once it has finished reading call g. So one flag store per call is the only synchronization, and no
// rank ever overwrites data another still reads.
//
// Waiting: a rank spins for a bounded time, then sleeps on a futex over the low half of a late peer's flag. A rank
// that sleeps on peer q first counts itself in q's sleepers, then reads q's flag again; q stores its flag, then
// reads its sleepers and wakes them when there are any. Both sides order their store before their load (seq_cst),
// so either the sleeper sees the new flag or the publisher sees the sleeper; the futex itself refuses to sleep
// once the flag's low half moved. Sleeping rather than yielding matters when other processes want the cores: a
// yielding rank hands its core to them for a whole time slice at every collective, and its peer waits that long.
//
// An all-reduce of a slot-sized chunk takes one call when small: every rank copies its values in and sums every
// rank's slot, in rank order. A large chunk takes two (a reduce-scatter, then an all-gather): every rank copies in
// the values of its peers' shares only; each sums its own share in rank order, its own values read in place, and
// writes the sums, in the second call, into its next slot at their own offsets, where the others copy them from.
// Either way every value is summed in rank order and rounded once, so all ranks hold the same bits whatever the
// path.
#include "ops.h"
#include "vec.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>
#include <signal.h>

#ifdef __linux__
#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include <cerrno>
#include <chrono>
#include <climits>
#include <cstdio>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

namespace pagedllm {
namespace {

constexpr int64_t kFlagLineBytes = 64, kSlotsPerRank = 2;
// Where in a rank's line (in int64) its flag, process id, sleeping peers and time spent waiting are.
constexpr int64_t kFlag = 0, kPid = 1, kSleepers = 2, kWaitedNs = 3;
// How long a waiting rank spins before it sleeps until a peer publishes: long enough for the waits of a step whose
// ranks keep their cores (one rank's heads or channels finishing before the other's) to end within it, since a rank
// that sleeps leaves its core idle, and an idle core (a virtual machine's vCPU above all) can take far longer to
// wake than the peer took to publish; short enough that a rank whose peer lost its core gives its own up soon.
constexpr double kSpinS = 1e-3;
// How often a waiting rank checks that the ranks it waits for still exist (and the longest it sleeps at once).
constexpr double kLivenessCheckS = 0.1;
// Values summed per task when a sum is spread over threads.
constexpr int64_t kSumGrain = 1 << 15;
// Chunks of at least this many bytes are all-reduced in two calls, each rank summing its share of the values:
// below it the second call's synchronization costs more than the share of the sum it saves.
constexpr int64_t kSplitSumBytes = 1 << 14;

using Clock = std::chrono::steady_clock;

void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  _mm_pause();
#endif
}

double seconds_since(Clock::time_point start) { return std::chrono::duration<double>(Clock::now() - start).count(); }

// The low 32 bits of a flag, the word a futex watches.
uint32_t* low_half(int64_t* flag) {
#if __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
  return reinterpret_cast<uint32_t*>(flag) + 1;
#else
  return reinterpret_cast<uint32_t*>(flag);
#endif
}

// Sleeps while *word == expected, for at most timeout_s (across processes: the segment is a shared mapping).
void futex_wait(uint32_t* word, uint32_t expected, double timeout_s) {
#ifdef __linux__
  timespec timeout{static_cast<time_t>(timeout_s), static_cast<long>((timeout_s - static_cast<time_t>(timeout_s)) * 1e9)};
  syscall(SYS_futex, word, FUTEX_WAIT, expected, &timeout, nullptr, 0);
#else
  (void)word, (void)expected, (void)timeout_s;
  std::this_thread::yield();
#endif
}

void futex_wake_all(uint32_t* word) {
#ifdef __linux__
  syscall(SYS_futex, word, FUTEX_WAKE, INT_MAX, nullptr, nullptr, 0);
#else
  (void)word;
#endif
}

// Whether process `pid` runs (a zombie, dead but not yet reaped by its parent, does not).
bool process_alive(int64_t pid) {
  const std::string path = "/proc/" + std::to_string(pid) + "/stat";
  FILE* stat = std::fopen(path.c_str(), "r");
  if (stat == nullptr) return errno != ENOENT && (::kill(static_cast<pid_t>(pid), 0) == 0 || errno != ESRCH);
  char text[512];
  const size_t length = std::fread(text, 1, sizeof(text) - 1, stat);
  std::fclose(stat);
  text[length] = '\0';
  const char* close = std::strrchr(text, ')');  // the command name, in parentheses, may hold anything
  if (close == nullptr) return true;
  for (const char* state = close + 1; *state != '\0'; ++state) {
    if (*state != ' ') return *state != 'Z' && *state != 'X';
  }
  return true;
}

// One rank's view of the segment.
struct Segment {
  uint8_t* base;
  int64_t rank, world_size, slot_bytes;
  double timeout_s;

  Segment(const at::Tensor& segment, int64_t rank, int64_t world_size, double timeout_s)
      : base(segment.data_ptr<uint8_t>()), rank(rank), world_size(world_size), timeout_s(timeout_s) {
    TORCH_CHECK(segment.dtype() == at::kByte && segment.dim() == 1 && segment.is_contiguous(),
                "shared memory: the segment is a contiguous uint8 tensor");
    TORCH_CHECK(world_size >= 1 && rank >= 0 && rank < world_size, "shared memory: rank ", rank, " of ", world_size);
    const int64_t header = world_size * kFlagLineBytes;
    slot_bytes = (segment.numel() - header) / (world_size * kSlotsPerRank);
    TORCH_CHECK(slot_bytes > 0 && slot_bytes % kFlagLineBytes == 0 &&
                    header + world_size * kSlotsPerRank * slot_bytes == segment.numel(),
                "shared memory: a segment of ", segment.numel(), " bytes does not fit ", world_size, " ranks");
  }

  int64_t* line(int64_t r) const { return reinterpret_cast<int64_t*>(base + r * kFlagLineBytes); }
  int64_t* flag(int64_t r) const { return line(r) + kFlag; }
  int64_t pid(int64_t r) const { return line(r)[kPid]; }
  uint8_t* slot(int64_t r, int64_t s) const {
    return base + world_size * kFlagLineBytes + (r * kSlotsPerRank + s) * slot_bytes;
  }

  int64_t lowest_flag() const {
    int64_t lowest = __atomic_load_n(flag(0), __ATOMIC_ACQUIRE);
    for (int64_t r = 1; r < world_size; ++r) lowest = std::min(lowest, __atomic_load_n(flag(r), __ATOMIC_ACQUIRE));
    return lowest;
  }

  // Publishes what `write` writes into this rank's slot as the next call's and waits for every rank's; returns the
  // slot to read.
  template <typename Write>
  int64_t exchange_with(Write&& write) const {
    const int64_t generation = __atomic_load_n(flag(rank), __ATOMIC_RELAXED) + 1;
    const int64_t s = generation % kSlotsPerRank;
    write(slot(rank, s));
    __atomic_store_n(flag(rank), generation, __ATOMIC_SEQ_CST);
    if (__atomic_load_n(line(rank) + kSleepers, __ATOMIC_SEQ_CST) > 0) futex_wake_all(low_half(flag(rank)));
    if (lowest_flag() < generation) wait(generation);
    return s;
  }

  // Publishes this rank's `bytes` as the next call's and waits for every rank's; returns the slot to read.
  int64_t exchange(const void* data, int64_t bytes) const {
    return exchange_with([&](uint8_t* mine) {
      if (bytes > 0) std::memcpy(mine, data, bytes);
    });
  }

  // The first rank whose flag has not reached `generation`, or -1.
  int64_t first_late(int64_t generation) const {
    for (int64_t r = 0; r < world_size; ++r) {
      if (__atomic_load_n(flag(r), __ATOMIC_ACQUIRE) < generation) return r;
    }
    return -1;
  }

  // Spins for kSpinS, then sleeps on each late peer's flag in turn until every flag reaches `generation`.
  void wait(int64_t generation) const {
    const auto started = Clock::now();
    bool ready = false;
    for (int polls = 1; !(ready = lowest_flag() >= generation); ++polls) {
      cpu_relax();
      if (polls % 64 == 0 && seconds_since(started) >= kSpinS) break;
    }
    auto last_check = started;
    for (int64_t late; !ready && (late = first_late(generation)) >= 0;) {
      sleep_on(late, generation);
      if (seconds_since(last_check) >= kLivenessCheckS) {
        last_check = Clock::now();
        check_peers(generation, seconds_since(started));
      }
    }
    const auto waited = std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now() - started).count();
    __atomic_store_n(line(rank) + kWaitedNs, line(rank)[kWaitedNs] + waited, __ATOMIC_RELAXED);
  }

  // Sleeps until rank `late`'s flag moves (it may have moved already), or for kLivenessCheckS at most.
  void sleep_on(int64_t late, int64_t generation) const {
    int64_t* sleepers = line(late) + kSleepers;
    __atomic_fetch_add(sleepers, 1, __ATOMIC_SEQ_CST);
    const int64_t seen = __atomic_load_n(flag(late), __ATOMIC_SEQ_CST);
    if (seen < generation) futex_wait(low_half(flag(late)), static_cast<uint32_t>(seen), kLivenessCheckS);
    __atomic_fetch_sub(sleepers, 1, __ATOMIC_SEQ_CST);
  }

  // A DistBackendError (torch.distributed.DistBackendError in Python) names a rank that exited, or those that did
  // not answer within the timeout.
  void check_peers(int64_t generation, double waited_s) const {
    std::string late;
    for (int64_t r = 0; r < world_size; ++r) {
      if (__atomic_load_n(flag(r), __ATOMIC_ACQUIRE) >= generation) continue;
      if (!process_alive(pid(r))) {
        C10_THROW_ERROR(DistBackendError, "rank " + std::to_string(r) + " of the shared-memory group (pid " +
                                              std::to_string(pid(r)) + ") exited");
      }
      late += (late.empty() ? "" : ", ") + std::to_string(r);
    }
    if (waited_s > timeout_s) {
      C10_THROW_ERROR(DistBackendError, "ranks [" + late + "] of the shared-memory group did not answer");
    }
  }
};

// out[i] (and copy[i], unless copy is null) = the sum of parts[0][i], parts[1][i], ... in that order, accumulated in
// the op-math type and rounded once, for i in [begin, end).
template <typename T>
void sum_range(const std::vector<const T*>& parts, int64_t begin, int64_t end, T* out, T* copy) {
  using Acc = at::opmath_type<T>;
  int64_t i = begin;
#ifdef PAGEDLLM_AVX2
  if constexpr (std::is_same_v<T, float> || std::is_same_v<T, c10::BFloat16>) {
    for (; i + 8 <= end; i += 8) {
      __m256 sum = load8(parts[0] + i);
      for (size_t r = 1; r < parts.size(); ++r) sum = _mm256_add_ps(sum, load8(parts[r] + i));
      store8(out + i, sum);
      if (copy != nullptr) store8(copy + i, sum);
    }
  }
#endif
  for (; i < end; ++i) {
    Acc sum = static_cast<Acc>(parts[0][i]);
    for (size_t r = 1; r < parts.size(); ++r) sum += static_cast<Acc>(parts[r][i]);
    out[i] = static_cast<T>(sum);
    if (copy != nullptr) copy[i] = out[i];
  }
}

template <typename T>
std::vector<const T*> slots_of(const Segment& segment, int64_t s) {
  std::vector<const T*> parts(segment.world_size);
  for (int64_t r = 0; r < segment.world_size; ++r) parts[r] = reinterpret_cast<const T*>(segment.slot(r, s));
  return parts;
}

// Sums values [begin, end) of `parts` (into out, copied into copy unless null), spread over this rank's threads.
template <typename T>
void sum_parts(const std::vector<const T*>& parts, int64_t begin, int64_t end, T* out, T* copy) {
  at::parallel_for(begin, end, kSumGrain, [&](int64_t from, int64_t to) { sum_range(parts, from, to, out, copy); });
}

// The first value of rank r's share of a split sum of n values.
int64_t share_start(int64_t n, int64_t r, int64_t world_size) { return r * n / world_size; }

// One chunk of n values: summed by every rank in one call, or split into shares over two calls (see the top).
template <typename T>
void all_reduce_chunk(const Segment& segment, T* values, int64_t n) {
  const int64_t world_size = segment.world_size, rank = segment.rank;
  if (n * static_cast<int64_t>(sizeof(T)) < kSplitSumBytes || world_size == 1) {
    const int64_t s = segment.exchange(values, n * static_cast<int64_t>(sizeof(T)));
    sum_parts(slots_of<T>(segment, s), 0, n, values, static_cast<T*>(nullptr));
    return;
  }
  const int64_t begin = share_start(n, rank, world_size), end = share_start(n, rank + 1, world_size);
  const int64_t s = segment.exchange_with([&](uint8_t* mine) {  // the values the peers' shares need
    T* slot = reinterpret_cast<T*>(mine);
    std::memcpy(slot, values, begin * sizeof(T));
    std::memcpy(slot + end, values + end, (n - end) * sizeof(T));
  });
  std::vector<const T*> parts = slots_of<T>(segment, s);
  parts[rank] = values;
  const int64_t t = segment.exchange_with(
      [&](uint8_t* mine) { sum_parts(parts, begin, end, values, reinterpret_cast<T*>(mine)); });
  for (int64_t r = 0; r < world_size; ++r) {
    if (r == rank) continue;
    const int64_t from = share_start(n, r, world_size), to = share_start(n, r + 1, world_size);
    std::memcpy(values + from, reinterpret_cast<const T*>(segment.slot(r, t)) + from, (to - from) * sizeof(T));
  }
}

template <typename T>
void all_reduce_values(const Segment& segment, T* values, int64_t count) {
  const int64_t per_call = segment.slot_bytes / static_cast<int64_t>(sizeof(T));
  for (int64_t start = 0; start < count; start += per_call) {
    all_reduce_chunk(segment, values + start, std::min(per_call, count - start));
  }
}

}  // namespace

void shared_memory_all_reduce_(at::Tensor& x, const at::Tensor& segment, int64_t rank, int64_t world_size,
                               double timeout_s) {
  const Segment view(segment, rank, world_size, timeout_s);
  TORCH_CHECK(x.device().is_cpu(), "shared_memory_all_reduce_: a CPU tensor");
  at::Tensor values = x.contiguous();
  AT_DISPATCH_ALL_TYPES_AND2(at::kBFloat16, at::kHalf, values.scalar_type(), "shared_memory_all_reduce_", [&] {
    all_reduce_values(view, values.data_ptr<scalar_t>(), values.numel());
  });
  if (!values.is_same(x)) x.copy_(values);
}

at::Tensor shared_memory_all_gather(const at::Tensor& x, const at::Tensor& segment, int64_t rank, int64_t world_size,
                                    double timeout_s) {
  const Segment view(segment, rank, world_size, timeout_s);
  TORCH_CHECK(x.device().is_cpu(), "shared_memory_all_gather: a CPU tensor");
  const at::Tensor values = x.contiguous();
  std::vector<int64_t> shape{world_size};
  shape.insert(shape.end(), x.sizes().begin(), x.sizes().end());
  at::Tensor out = at::empty(shape, x.options());
  const auto* in = static_cast<const uint8_t*>(values.data_ptr());
  auto* gathered = static_cast<uint8_t*>(out.data_ptr());
  const int64_t bytes = values.numel() * values.element_size();
  int64_t start = 0;
  do {  // an empty tensor still takes one call: a barrier
    const int64_t n = std::min(view.slot_bytes, bytes - start);
    const int64_t s = view.exchange(in + start, n);
    for (int64_t r = 0; r < world_size && n > 0; ++r) std::memcpy(gathered + r * bytes + start, view.slot(r, s), n);
    start += n;
  } while (start < bytes);
  return out;
}

}  // namespace pagedllm
