// The emulator's internal state: one Emulator per OS thread, which runs that thread's launches
// (see scheduler.cpp for the invariants, shared_memory.cpp for the shadow of shared memory).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "emulator.h"
#include "fiber.h"

namespace convkit::cuda_emu {

enum class ThreadState { kRunnable, kAtBarrier, kAtCollective, kExited, kFailed };

struct EmulatedThread {
  Fiber fiber;
  uint3 index{0, 0, 0};
  uint32_t linear = 0;  // x + y * blockDim.x + z * blockDim.x * blockDim.y; lane = linear % 32
  ThreadState state = ThreadState::kRunnable;
  // The value of its warp's __syncwarp counter when it last took part in one: accesses of two
  // lanes are ordered when both took part in a __syncwarp after the first of them.
  uint32_t warp_epoch = 0;
  int barrier_result = 0;
  // While in kAtCollective: what it waits at, and what it brought.
  Collective kind = Collective::kSyncWarp;
  uint32_t mask = 0;
  uint64_t value = 0;
  int argument = 0;
  int width = 32;
  uint64_t collective_result = 0;
};

// A collective some lanes of a warp wait at, until every lane of its mask has come.
struct PendingCollective {
  Collective kind;
  uint32_t mask;
  uint32_t arrived;
};

// A warp's lanes: which have exited, and the collectives in flight (disjoint masks; usually
// at most one).
struct WarpRun {
  uint32_t exited = 0;
  uint32_t sync_count = 0;  // __syncwarp calls completed
  std::vector<PendingCollective> pending;
};

struct BlockRun {
  uint3 index{0, 0, 0};
  uint64_t serial = 0;  // unique per block run: shared memory's shadow is valid for one serial
  uint32_t thread_count = 0;
  uint32_t live = 0;        // threads that have not exited
  uint32_t at_barrier = 0;  // threads waiting at __syncthreads
  uint32_t barrier_count = 0;
  BarrierReduction barrier_reduction = BarrierReduction::kNone;
  uint32_t barrier_epoch = 1;  // completed barriers + 1
  size_t static_shared_bytes = 0;
  std::vector<WarpRun> warps;
};

// One record per byte of shared memory: who last wrote and read it, and when.
struct ShadowByte {
  uint64_t block_serial;  // the block that wrote it; any other value: never written by this one
  int32_t writer;
  uint32_t write_barrier;
  uint32_t write_warp_epoch;
  int32_t reader;  // -1: not read since written
  uint32_t read_barrier;
  uint32_t read_warp_epoch;
};

class Emulator {
 public:
  static Emulator& instance();

  void launch(const LaunchConfig& config, void (*body)(void*), void* parameters);
  [[noreturn]] void fail_current(const std::string& what);
  int barrier(BarrierReduction reduction, int predicate);
  uint64_t collective(Collective kind, uint32_t mask, uint64_t value, int argument, int width);
  unsigned int active_lanes();
  void shared_access(SharedRegionState& state, unsigned char* data, size_t size, int64_t offset,
                     size_t bytes, bool write, bool is_dynamic, SourceLocation where);
  SharedRegionState& dynamic_shared(unsigned char** data, size_t* size);

  int64_t launches() const { return launches_; }
  // Also restarts the launch count, so that a schedule depends only on the seed and on the
  // launches made since it was set.
  void set_seed(uint64_t seed) {
    seed_ = seed;
    launch_number_ = 0;
  }
  uint64_t seed() const { return seed_; }
  int64_t grid_stride_block_cap() const { return grid_stride_block_cap_; }
  void set_grid_stride_block_cap(int64_t blocks) { grid_stride_block_cap_ = blocks; }

 private:
  static void thread_main();
  EmulatedThread& require_thread(const char* primitive);
  void yield(EmulatedThread& t);
  void make_runnable(EmulatedThread& t);
  void thread_exit(EmulatedThread& t);
  void complete_barrier();
  void complete_collective(uint32_t base, const PendingCollective& done);
  void run_block(uint64_t linear);
  bool ordered(int32_t other, uint32_t other_barrier, uint32_t other_warp_epoch,
               const EmulatedThread& me) const;
  std::string where(const EmulatedThread& t) const;
  std::string schedule_note() const;
  std::string deadlock_report() const;
  std::string thread_name(int32_t linear) const;

  std::unique_ptr<EmulatedThread[]> threads_;  // kMaxThreadsPerBlock of them, reused by every block
  std::vector<uint32_t> runnable_;
  EmulatedThread* current_ = nullptr;
  BlockRun block_;
  const LaunchConfig* config_ = nullptr;
  void (*body_)(void*) = nullptr;
  void* parameters_ = nullptr;
  std::string error_;  // the first failure of the launch
  bool in_launch_ = false;
  uint64_t seed_ = 0;
  uint64_t launch_number_ = 0;
  uint64_t rng_ = 0;
  uint64_t next_block_serial_ = 1;
  int64_t launches_ = 0;
  int64_t grid_stride_block_cap_ = int64_t(1) << 20;
  std::vector<unsigned char> dynamic_bytes_;
  SharedRegionState dynamic_state_;
  std::vector<std::unique_ptr<ShadowByte[]>> shadows_;  // what SharedRegionState::shadow points to
};

const char* collective_name(Collective kind);

// Dynamic shared memory a kernel may use: 48 KB, or what allow_dynamic_shared granted it.
size_t dynamic_shared_limit(const char* kernel_name);

// Checks run after every successful launch (device_memory.cpp's guard bytes).
using AfterLaunchCheck = void (*)(const char* kernel_name);
void add_after_launch_check(AfterLaunchCheck check);
void run_after_launch_checks(const char* kernel_name);

}  // namespace convkit::cuda_emu
