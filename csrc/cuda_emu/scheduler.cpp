// The emulator's scheduler: launches, blocks, barriers and warp collectives (see emulator.h).
//
// Invariants. One launch runs at a time per OS thread, to completion, on that thread. Within a
// block exactly one emulated thread runs at a time (`current`); it runs until it reaches a
// barrier or a warp collective, exits, or fails, and then switches back to the scheduler, which
// picks the next runnable thread at random. A barrier completes when every live (not exited)
// thread of the block waits at one; a warp collective when every lane of its mask waits at it.
// A thread is in exactly one of the states below, and `runnable` lists exactly the threads in
// kRunnable.
#include <algorithm>
#include <cstdlib>
#include <memory>
#include <sstream>
#include <stdexcept>
#include <vector>

#include "emulator.h"
#include "fiber.h"
#include "scheduler.h"

namespace convkit::cuda_emu {

namespace {

constexpr uint64_t kMaxThreadsPerBlock = 1024;
constexpr uint64_t kMaxBlockDimXY = 1024;
constexpr uint64_t kMaxBlockDimZ = 64;
constexpr uint64_t kMaxGridX = 2147483647;
constexpr uint64_t kMaxGridYZ = 65535;
#if defined(__SANITIZE_ADDRESS__)
constexpr size_t kStackBytes = 256 << 10;  // AddressSanitizer's redzones make frames larger
#else
constexpr size_t kStackBytes = 64 << 10;
#endif

std::string lanes_text(uint32_t lanes) {
  std::ostringstream text;
  bool first = true;
  for (int lane = 0; lane < 32; ++lane) {
    if (!((lanes >> lane) & 1u)) continue;
    text << (first ? "" : ", ") << lane;
    first = false;
  }
  return text.str();
}

std::string hex(uint32_t mask) {
  std::ostringstream text;
  text << "0x" << std::hex << mask;
  return text.str();
}

uint64_t splitmix64(uint64_t& state) {
  uint64_t z = (state += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

uint64_t gcd(uint64_t a, uint64_t b) {
  while (b != 0) {
    const uint64_t r = a % b;
    a = b;
    b = r;
  }
  return a;
}

void validate(const LaunchConfig& config) {
  const dim3 g = config.grid;
  const dim3 b = config.block;
  auto refuse = [&](const std::string& why) {
    throw std::runtime_error(std::string("CUDA emulator: launch of ") + config.kernel_name +
                             " with grid (" + std::to_string(g.x) + ", " + std::to_string(g.y) +
                             ", " + std::to_string(g.z) + ") and block (" + std::to_string(b.x) +
                             ", " + std::to_string(b.y) + ", " + std::to_string(b.z) +
                             ") would fail on a GPU: " + why);
  };
  if (g.x == 0 || g.y == 0 || g.z == 0) refuse("a launch needs at least one block in each dimension");
  if (b.x == 0 || b.y == 0 || b.z == 0) refuse("a launch needs at least one thread in each dimension");
  if (g.x > kMaxGridX) refuse("gridDim.x is at most 2^31 - 1");
  if (g.y > kMaxGridYZ) refuse("gridDim.y is at most 65535, but got " + std::to_string(g.y));
  if (g.z > kMaxGridYZ) refuse("gridDim.z is at most 65535, but got " + std::to_string(g.z));
  const uint64_t threads = uint64_t(b.x) * b.y * b.z;
  if (threads > kMaxThreadsPerBlock) {
    refuse("a block has at most 1024 threads, but got " + std::to_string(threads));
  }
  if (b.x > kMaxBlockDimXY || b.y > kMaxBlockDimXY || b.z > kMaxBlockDimZ) {
    refuse("blockDim is at most (1024, 1024, 64)");
  }
  const size_t allowed = dynamic_shared_limit(config.kernel_name);
  if (config.dynamic_shared_bytes > allowed) {
    refuse(std::to_string(config.dynamic_shared_bytes) + " bytes of dynamic shared memory; at most " +
           std::to_string(allowed) + " without cudaFuncSetAttribute" +
           " (cudaFuncAttributeMaxDynamicSharedMemorySize), and 227 KB with it");
  }
}

}  // namespace

Emulator& Emulator::instance() {
  thread_local Emulator emulator;
  return emulator;
}

std::string Emulator::where(const EmulatedThread& t) const {
  std::ostringstream text;
  text << "CUDA emulator: kernel " << config_->kernel_name << ", block (" << block_.index.x
       << ", " << block_.index.y << ", " << block_.index.z << "), thread (" << t.index.x << ", "
       << t.index.y << ", " << t.index.z << "): ";
  return text.str();
}

std::string Emulator::schedule_note() const {
  return " [schedule seed " + std::to_string(seed_) + ", launch " +
         std::to_string(launch_number_) + " on this thread]";
}

void Emulator::fail_current(const std::string& what) {
  if (current_ == nullptr) {
    const std::string context =
        config_ != nullptr ? std::string(" (in a launch of ") + config_->kernel_name + ")" : "";
    throw std::runtime_error("CUDA emulator: " + what + context);
  }
  EmulatedThread& t = *current_;
  if (error_.empty()) error_ = where(t) + what + schedule_note();
  t.state = ThreadState::kFailed;
  Fiber::switch_to(t.fiber, Fiber::for_this_thread());
  std::abort();  // a failed thread is never resumed
}

EmulatedThread& Emulator::require_thread(const char* primitive) {
  if (current_ == nullptr) {
    fail_current(std::string(primitive) + " called outside a kernel");
  }
  return *current_;
}

void Emulator::yield(EmulatedThread& t) { Fiber::switch_to(t.fiber, Fiber::for_this_thread()); }

void Emulator::thread_main() {
  Fiber::entered();
  Emulator& e = instance();
  std::string thrown;
  try {
    e.body_(e.parameters_);
  } catch (const std::exception& error) {
    thrown = error.what();
  } catch (...) {
    thrown = "an exception of unknown type";
  }
  if (!thrown.empty()) e.fail_current("the kernel threw " + thrown);
  e.thread_exit(*e.current_);
  e.yield(*e.current_);
  std::abort();  // an exited thread is never resumed
}

void Emulator::make_runnable(EmulatedThread& t) {
  t.state = ThreadState::kRunnable;
  runnable_.push_back(t.linear);
}

void Emulator::thread_exit(EmulatedThread& t) {
  // A lane that others wait for at a collective will never come: that is the error.
  const uint32_t lane = t.linear % 32;
  WarpRun& warp = block_.warps[t.linear / 32];
  for (const PendingCollective& pending : warp.pending) {
    if ((pending.mask >> lane) & 1u) {
      fail_current("exits while lanes " + lanes_text(pending.arrived) + " of its warp wait for it at " +
                   collective_name(pending.kind) + " (mask " + hex(pending.mask) +
                   "): every lane named in the mask must reach the collective");
    }
  }
  warp.exited |= 1u << lane;
  t.state = ThreadState::kExited;
  --block_.live;
  if (block_.at_barrier > 0 && block_.at_barrier == block_.live) complete_barrier();
}

int Emulator::barrier(BarrierReduction reduction, int predicate) {
  EmulatedThread& t = require_thread("__syncthreads");
  t.state = ThreadState::kAtBarrier;
  ++block_.at_barrier;
  block_.barrier_count += predicate != 0 ? 1 : 0;
  block_.barrier_reduction = reduction;
  if (block_.at_barrier == block_.live) complete_barrier();
  yield(t);
  return t.barrier_result;
}

void Emulator::complete_barrier() {
  int result = 0;
  switch (block_.barrier_reduction) {
    case BarrierReduction::kNone: result = 0; break;
    case BarrierReduction::kCount: result = static_cast<int>(block_.barrier_count); break;
    case BarrierReduction::kAnd: result = block_.barrier_count == block_.at_barrier ? 1 : 0; break;
    case BarrierReduction::kOr: result = block_.barrier_count > 0 ? 1 : 0; break;
  }
  for (uint32_t i = 0; i < block_.thread_count; ++i) {
    EmulatedThread& u = threads_[i];
    if (u.state != ThreadState::kAtBarrier) continue;
    u.barrier_result = result;
    make_runnable(u);
  }
  block_.at_barrier = 0;
  block_.barrier_count = 0;
  ++block_.barrier_epoch;
}

uint64_t Emulator::collective(Collective kind, uint32_t mask, uint64_t value, int argument,
                              int width) {
  EmulatedThread& t = require_thread(collective_name(kind));
  const uint32_t lane = t.linear % 32;
  const uint32_t base = t.linear - lane;
  const uint32_t lanes_here = std::min<uint32_t>(32, block_.thread_count - base);
  const uint32_t existing = lanes_here == 32 ? ~0u : (1u << lanes_here) - 1u;
  const char* name = collective_name(kind);
  if (!((mask >> lane) & 1u)) {
    fail_current(std::string("calls ") + name + " with mask " + hex(mask) + ", which does not name its own lane " +
                 std::to_string(lane));
  }
  if ((mask & ~existing) != 0) {
    fail_current(std::string(name) + "'s mask " + hex(mask) + " names lanes " + lanes_text(mask & ~existing) +
                 ", which this warp does not have (the block has " +
                 std::to_string(block_.thread_count) + " threads)");
  }
  if (width < 1 || width > 32 || (width & (width - 1)) != 0) {
    fail_current(std::string(name) + " with width " + std::to_string(width) +
                 ": the width must be a power of 2 from 1 to 32");
  }
  WarpRun& warp = block_.warps[t.linear / 32];
  if ((warp.exited & mask) != 0) {
    fail_current(std::string("calls ") + name + " with mask " + hex(mask) + ", but lanes " +
                 lanes_text(warp.exited & mask) +
                 " have already exited: every lane named in the mask must reach the collective");
  }
  PendingCollective* group = nullptr;
  for (PendingCollective& pending : warp.pending) {
    if ((pending.mask & mask) == 0) continue;
    if (pending.mask != mask || pending.kind != kind) {
      fail_current(std::string("calls ") + name + " with mask " + hex(mask) + " while lanes " +
                   lanes_text(pending.arrived) + " wait at " + collective_name(pending.kind) +
                   " with mask " + hex(pending.mask) +
                   ": the lanes of a collective must agree on it and on its mask");
    }
    group = &pending;
  }
  if (group == nullptr) {
    warp.pending.push_back(PendingCollective{kind, mask, 0});
    group = &warp.pending.back();
  }
  group->arrived |= 1u << lane;
  t.state = ThreadState::kAtCollective;
  t.kind = kind;
  t.mask = mask;
  t.value = value;
  t.argument = argument;
  t.width = width;
  if (group->arrived == mask) {
    const PendingCollective done = *group;
    *group = warp.pending.back();
    warp.pending.pop_back();
    complete_collective(base, done);
  }
  yield(t);
  return t.collective_result;
}

void Emulator::complete_collective(uint32_t base, const PendingCollective& done) {
  const Collective kind = done.kind;
  const uint32_t mask = done.mask;
  uint64_t ballot = 0;
  for (uint32_t j = 0; j < 32; ++j) {
    if ((mask >> j) & 1u) ballot |= uint64_t(threads_[base + j].value != 0) << j;
  }
  const uint32_t sync_value = kind == Collective::kSyncWarp ? ++block_.warps[base / 32].sync_count : 0;
  for (uint32_t j = 0; j < 32; ++j) {
    if (!((mask >> j) & 1u)) continue;
    EmulatedThread& u = threads_[base + j];
    const uint32_t w = static_cast<uint32_t>(u.width);
    const uint32_t in_segment = j % w;
    uint32_t source = j;
    switch (kind) {
      case Collective::kShuffleIndex:
        source = (j - in_segment) + static_cast<uint32_t>(((u.argument % int(w)) + int(w)) % int(w));
        break;
      case Collective::kShuffleUp:
        if (u.argument >= 0 && in_segment >= static_cast<uint32_t>(u.argument)) source = j - u.argument;
        break;
      case Collective::kShuffleDown:
        if (u.argument >= 0 && in_segment + static_cast<uint32_t>(u.argument) < w) source = j + u.argument;
        break;
      case Collective::kShuffleXor: {
        const uint32_t partner = j ^ static_cast<uint32_t>(u.argument);
        if (partner < 32 && partner / w == j / w) source = partner;
        break;
      }
      case Collective::kBallot:
      case Collective::kSyncWarp:
        break;
    }
    if (kind == Collective::kBallot) {
      u.collective_result = ballot;
    } else if (kind == Collective::kSyncWarp) {
      u.collective_result = 0;
      u.warp_epoch = sync_value;
    } else {
      if (!((mask >> source) & 1u)) {
        // The value of a lane outside the mask is undefined on the GPU.
        fail_current("at " + std::string(collective_name(kind)) + " with mask " + hex(mask) +
                     ", lane " + std::to_string(j) + " reads the value of lane " +
                     std::to_string(source) + ", which is not in the mask");
      }
      u.collective_result = threads_[base + source].value;
    }
  }
  for (uint32_t j = 0; j < 32; ++j) {
    if ((mask >> j) & 1u) make_runnable(threads_[base + j]);
  }
}

unsigned int Emulator::active_lanes() {
  EmulatedThread& t = require_thread("__activemask");
  const uint32_t base = t.linear - t.linear % 32;
  uint32_t lanes = 0;
  for (uint32_t j = 0; j < 32 && base + j < block_.thread_count; ++j) {
    if (threads_[base + j].state != ThreadState::kExited) lanes |= 1u << j;
  }
  return lanes;
}

std::string Emulator::deadlock_report() const {
  std::ostringstream text;
  text << "deadlock: no thread of the block can continue; " << block_.at_barrier << " of its "
       << block_.live << " live threads wait at __syncthreads";
  int reported = 0;
  for (size_t w = 0; w < block_.warps.size() && reported < 4; ++w) {
    for (const PendingCollective& pending : block_.warps[w].pending) {
      if (reported++ == 4) break;
      text << "; lanes " << lanes_text(pending.arrived) << " of warp " << w << " wait at "
           << collective_name(pending.kind) << " (mask " << hex(pending.mask) << ") for lanes "
           << lanes_text(pending.mask & ~pending.arrived);
    }
  }
  return text.str();
}

void Emulator::run_block(uint64_t linear) {
  const dim3 g = config_->grid;
  const dim3 b = config_->block;
  block_.index = uint3{static_cast<unsigned>(linear % g.x),
                       static_cast<unsigned>((linear / g.x) % g.y),
                       static_cast<unsigned>(linear / (uint64_t(g.x) * g.y))};
  blockIdx = block_.index;
  block_.serial = next_block_serial_++;
  block_.live = block_.thread_count;
  block_.at_barrier = 0;
  block_.barrier_count = 0;
  block_.barrier_epoch = 1;
  block_.static_shared_bytes = 0;
  for (WarpRun& warp : block_.warps) {
    warp.exited = 0;
    warp.sync_count = 0;
    warp.pending.clear();
  }
  runnable_.clear();
  for (uint32_t i = 0; i < block_.thread_count; ++i) {
    EmulatedThread& t = threads_[i];
    t.index = uint3{i % b.x, (i / b.x) % b.y, i / (b.x * b.y)};
    t.linear = i;
    t.warp_epoch = 0;
    t.fiber.start(&Emulator::thread_main, kStackBytes);
    make_runnable(t);
  }
  while (!runnable_.empty()) {
    const size_t pick = splitmix64(rng_) % runnable_.size();
    EmulatedThread& t = threads_[runnable_[pick]];
    runnable_[pick] = runnable_.back();
    runnable_.pop_back();
    current_ = &t;
    threadIdx = t.index;
    Fiber::switch_to(Fiber::for_this_thread(), t.fiber);
    current_ = nullptr;
    if (!error_.empty()) return;
  }
  if (block_.live > 0) {
    for (uint32_t i = 0; i < block_.thread_count; ++i) {
      if (threads_[i].state == ThreadState::kExited) continue;
      error_ = where(threads_[i]) + deadlock_report() + schedule_note();
      return;
    }
  }
}

void Emulator::launch(const LaunchConfig& config, void (*body)(void*), void* parameters) {
  if (in_launch_) {
    throw std::runtime_error(std::string("CUDA emulator: launch of ") + config.kernel_name +
                             " from inside a kernel: dynamic parallelism is not emulated");
  }
  validate(config);
  in_launch_ = true;
  config_ = &config;
  body_ = body;
  parameters_ = parameters;
  error_.clear();
  ++launch_number_;
  rng_ = seed_ ^ (launch_number_ * 0xd1342543de82ef95ull);
  block_.thread_count = config.block.x * config.block.y * config.block.z;
  if (threads_ == nullptr) threads_ = std::make_unique<EmulatedThread[]>(kMaxThreadsPerBlock);
  block_.warps.resize((block_.thread_count + 31) / 32);
  blockDim = config.block;
  gridDim = config.grid;
  dynamic_bytes_.assign(config.dynamic_shared_bytes, 0xff);
  dynamic_state_ = SharedRegionState{};

  // Blocks in a shuffled order: linear = (a * i + c) mod n with a coprime to n is a
  // permutation of [0, n).
  const uint64_t n = uint64_t(config.grid.x) * config.grid.y * config.grid.z;
  uint64_t a = 1;
  uint64_t c = 0;
  if (n > 1) {
    do {
      a = 1 + splitmix64(rng_) % (n - 1);
    } while (gcd(a, n) != 1);
    c = splitmix64(rng_) % n;
  }
  for (uint64_t i = 0; i < n && error_.empty(); ++i) {
    run_block(static_cast<uint64_t>((static_cast<unsigned __int128>(a) * i + c) % n));
  }
  threadIdx = uint3{0, 0, 0};
  blockIdx = uint3{0, 0, 0};
  in_launch_ = false;
  const std::string name = config.kernel_name;
  config_ = nullptr;
  ++launches_;
  if (!error_.empty()) throw std::runtime_error(error_);
  run_after_launch_checks(name.c_str());
}

}  // namespace convkit::cuda_emu
