// Sum and gather among the ranks of one host through the segment that distributed/shared_memory.py maps: this
// file alone runs its protocol.
//
// Layout: world_size lines of 64 bytes (rank r's line holds its flag at [0] and its process id at [1], as int64),
// then world_size x 2 slots of slot_bytes, rank-major. A collective call (one per slot-sized chunk of a tensor)
// numbered g: the rank copies its chunk into its slot g % 2, stores g in its flag (release), waits until every
// flag reaches g (acquire), then reads every rank's slot g % 2. A rank's flag is its count of calls: the next
// call's number is read from it, so Python and the fused decode kernel share one count.
//
// Invariant: a rank writes slot g % 2 again only in call g + 2, after every flag reached g + 1; a rank stores
// g + 1 only once it has finished reading call g. So one flag store per call is the only synchronization, and no
// rank ever overwrites data another still reads. Every rank sums the slots in rank order, so all ranks hold the
// same bits.
#include "ops.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>
#include <sched.h>
#include <signal.h>

#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

namespace pagedllm {
namespace {

constexpr int64_t kFlagLineBytes = 64, kSlotsPerRank = 2;
// A waiting rank polls this many times before it yields its core to other threads between polls.
constexpr int kBusyPolls = 2000;
// How often a waiting rank checks that the ranks it waits for still exist.
constexpr double kLivenessCheckS = 0.1;
// Values summed per task when a sum is spread over threads.
constexpr int64_t kSumGrain = 1 << 15;

void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  _mm_pause();
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

  int64_t* flag(int64_t r) const { return reinterpret_cast<int64_t*>(base + r * kFlagLineBytes); }
  int64_t pid(int64_t r) const { return flag(r)[1]; }
  uint8_t* slot(int64_t r, int64_t s) const {
    return base + world_size * kFlagLineBytes + (r * kSlotsPerRank + s) * slot_bytes;
  }

  int64_t lowest_flag() const {
    int64_t lowest = __atomic_load_n(flag(0), __ATOMIC_ACQUIRE);
    for (int64_t r = 1; r < world_size; ++r) lowest = std::min(lowest, __atomic_load_n(flag(r), __ATOMIC_ACQUIRE));
    return lowest;
  }

  // Publishes this rank's `bytes` as the next call's and waits for every rank's; returns the slot to read.
  int64_t exchange(const void* data, int64_t bytes) const {
    const int64_t generation = __atomic_load_n(flag(rank), __ATOMIC_RELAXED) + 1;
    const int64_t s = generation % kSlotsPerRank;
    if (bytes > 0) std::memcpy(slot(rank, s), data, bytes);
    __atomic_store_n(flag(rank), generation, __ATOMIC_RELEASE);
    if (lowest_flag() < generation) wait(generation);
    return s;
  }

  void wait(int64_t generation) const {
    using Clock = std::chrono::steady_clock;
    const auto started = Clock::now();
    auto last_check = started;
    for (int polls = 0; lowest_flag() < generation; ++polls) {
      if (polls < kBusyPolls) {
        cpu_relax();
        continue;
      }
      sched_yield();
      const auto now = Clock::now();
      if (std::chrono::duration<double>(now - last_check).count() >= kLivenessCheckS) {
        last_check = now;
        check_peers(generation, std::chrono::duration<double>(now - started).count());
      }
    }
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

// out = the sum of every rank's slot s, in rank order, accumulated in the op-math type and rounded once.
template <typename T>
void sum_slots(const Segment& segment, int64_t s, T* out, int64_t count) {
  using Acc = at::opmath_type<T>;
  std::vector<const T*> parts(segment.world_size);
  for (int64_t r = 0; r < segment.world_size; ++r) parts[r] = reinterpret_cast<const T*>(segment.slot(r, s));
  at::parallel_for(0, count, kSumGrain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      Acc sum = static_cast<Acc>(parts[0][i]);
      for (size_t r = 1; r < parts.size(); ++r) sum += static_cast<Acc>(parts[r][i]);
      out[i] = static_cast<T>(sum);
    }
  });
}

template <typename T>
void all_reduce_values(const Segment& segment, T* values, int64_t count) {
  const int64_t per_call = segment.slot_bytes / static_cast<int64_t>(sizeof(T));
  for (int64_t start = 0; start < count; start += per_call) {
    const int64_t n = std::min(per_call, count - start);
    sum_slots(segment, segment.exchange(values + start, n * sizeof(T)), values + start, n);
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
