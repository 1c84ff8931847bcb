// The threads of the CPU kernels: one team per op call, of the size the caller set for its own
// thread (torch.set_num_threads, per OS thread), read once when the op plans its per-thread
// buffers, and never changed by the op.
//
// Why not at::parallel_for: it is inline, so this library carries its own copy of ATen's
// per-thread "threads initialised" flag. The first at::parallel_for of an OS thread in this
// library re-applied the process-wide thread count (the last torch.set_num_threads of any
// thread) even when libtorch had already initialised that thread: an op that had sized its
// per-thread buffers for the thread's 1 thread then ran on 4, two threads sharing one buffer,
// and the thread was left reporting 4. Here the team size comes from at::get_num_threads()
// (libtorch's own flag and the thread's own setting, as torch's ops see it), the loop runs on
// at most `team` threads whatever OpenMP would start, and every slot it hands out is < team.
#pragma once

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <exception>
#include <utility>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace convkit {

// The threads an op may use from here: the calling thread's setting, or 1 inside a parallel
// region (nested loops run serially, as ATen's do).
inline int64_t team_size() {
  if (at::in_parallel_region()) return 1;
  return std::max<int64_t>(1, at::get_num_threads());
}

// The chunk [first, last) of [begin, end) that slot `slot` of `workers` takes in
// parallel_for_slots: ceil((end - begin) / workers) elements a slot, in slot order (the last
// slots may get fewer, or none: first >= last).
inline std::pair<int64_t, int64_t> slot_chunk(int64_t begin, int64_t end, int64_t workers,
                                              int64_t slot) {
  const int64_t chunk = (end - begin + workers - 1) / workers;
  const int64_t first = std::min(end, begin + slot * chunk);
  return {first, std::min(end, first + chunk)};
}

// f(chunk_begin, chunk_end, slot) over [begin, end) in at most `team` chunks of at least `grain`
// elements (the last may be smaller), one per thread; `slot` in [0, team) names the thread's
// per-thread buffers. The first exception thrown by f is rethrown after the loop.
template <typename F>
void parallel_for_slots(int64_t begin, int64_t end, int64_t grain, int64_t team, const F& f) {
  TORCH_INTERNAL_ASSERT(team >= 1, "convkit parallel_for_slots: a team of ", team);
  if (begin >= end) return;
  const int64_t tasks = grain > 0 ? (end - begin + grain - 1) / grain : end - begin;
  if (team == 1 || tasks <= 1 || at::in_parallel_region()) {
    f(begin, end, int64_t(0));
    return;
  }
#ifdef _OPENMP
  std::atomic_flag failed = ATOMIC_FLAG_INIT;
  std::exception_ptr error;
  // No num_threads clause: a team size that changes from region to region makes GOMP rebuild
  // its thread pool (pytorch/pytorch#32008). Threads beyond the plan get no chunk.
#pragma omp parallel
  {
    const int64_t workers = std::min<int64_t>({int64_t(omp_get_num_threads()), team, tasks});
    const int64_t slot = omp_get_thread_num();
    const auto [chunk_begin, chunk_end] = slot_chunk(begin, end, workers, slot);
    if (slot < workers && chunk_begin < chunk_end) {
      try {
        at::internal::ThreadIdGuard thread_id(static_cast<int>(slot));
        f(chunk_begin, chunk_end, slot);
      } catch (...) {
        if (!failed.test_and_set()) error = std::current_exception();
      }
    }
  }
  if (error) std::rethrow_exception(error);
#else
  f(begin, end, int64_t(0));
#endif
}

// The same for loops without per-thread buffers: f(chunk_begin, chunk_end) on the caller's team.
template <typename F>
void parallel_for(int64_t begin, int64_t end, int64_t grain, const F& f) {
  parallel_for_slots(begin, end, grain, team_size(),
                     [&](int64_t chunk_begin, int64_t chunk_end, int64_t) { f(chunk_begin, chunk_end); });
}

}  // namespace convkit
