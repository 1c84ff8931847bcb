// A CPU emulation of CUDA's execution model, so that convkit's CUDA kernels compile with the
// host C++ compiler and run, unchanged, on a machine without a GPU (the test suite does this
// on every machine; see csrc/cuda/device.cuh for the seam that picks nvcc or this).
//
// What is emulated. A launch runs its blocks one after another, in a shuffled order; within a
// block every thread is a fiber (fiber.h) and the threads run one at a time, in a seeded random
// order that is drawn anew whenever a thread stops at a barrier or a warp collective. So a
// kernel that relies on an order the hardware does not promise (a missing __syncthreads, a
// warp assumed to run in lockstep) sees a different interleaving than the one its author
// imagined, and fails reproducibly for a given seed. On top of that, checks a GPU run would
// make (or that compute-sanitizer makes) are errors naming the kernel, the block and the
// thread:
//   - launch limits: no block or no thread, more than 1024 threads per block, gridDim.y or .z
//     above 65535, shared memory beyond 48 KB static / 227 KB in all (an H100's limits);
//   - shared memory (SharedArray, dynamic_shared) starts as 0xFF junk (NaN), and every access
//     is checked against the block's barriers: reading bytes no thread of the block has written,
//     and a read/write or write/write pair of different threads with no __syncthreads (or
//     __syncwarp, within a warp) between them, are reported as compute-sanitizer's racecheck
//     and initcheck would; indices past the end are errors too;
//   - warp collectives (__shfl*_sync, __ballot_sync, __syncwarp, ...) wait for every lane named
//     in the mask: a lane that exits or waits elsewhere instead is an error, as is a caller not
//     in its own mask or a source lane outside it; a block whose threads all wait for each
//     other is reported as a deadlock, with who waits where;
//   - vector loads and stores through load_aligned/store_aligned (and __ldg) check alignment.
// What is not: timing and occupancy, registers, __launch_bounds__, the memory model beyond
// barriers (every access is immediately visible), streams (a launch runs to completion before
// it returns), and accesses to global memory, which are plain host accesses: out-of-bounds
// accesses there are found by the AddressSanitizer build of the emulated kernels
// (CMakeLists.txt: convkit_emu_sanitized) and, for buffers the ops allocate, by guard bytes
// (device_memory.h).
//
// Kernels must declare shared memory as SharedArray<T, N> (static) or dynamic_shared<T>()
// (the `extern __shared__` buffer): these are what make the checks above possible, and under
// nvcc they compile to plain __shared__ arrays.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <tuple>
#include <type_traits>

// ---- CUDA's own types: from the CUDA headers when they are on the include path (they compile
// with a host compiler: vector types, __half, __nv_bfloat16), else the few vector types below.
#if __has_include(<vector_types.h>) && __has_include(<cuda_fp16.h>) && \
    !defined(CONVKIT_EMU_NO_CUDA_HEADERS)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <vector_functions.h>
#include <vector_types.h>
#define CONVKIT_EMU_HAS_CUDA_HEADERS 1
#else
#define CONVKIT_EMU_HAS_CUDA_HEADERS 0
struct uint3 {
  unsigned int x, y, z;
};
struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int vx = 1, unsigned int vy = 1, unsigned int vz = 1)
      : x(vx), y(vy), z(vz) {}
  constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
  constexpr operator uint3() const { return uint3{x, y, z}; }
};
// Same sizes and alignments as CUDA's vector_types.h.
struct alignas(8) int2 { int x, y; };
struct alignas(16) int4 { int x, y, z, w; };
struct alignas(8) uint2 { unsigned int x, y; };
struct alignas(16) uint4 { unsigned int x, y, z, w; };
struct alignas(8) float2 { float x, y; };
struct float3 { float x, y, z; };
struct alignas(16) float4 { float x, y, z, w; };
struct alignas(16) double2 { double x, y; };
inline int2 make_int2(int x, int y) { return {x, y}; }
inline int4 make_int4(int x, int y, int z, int w) { return {x, y, z, w}; }
inline float2 make_float2(float x, float y) { return {x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
inline double2 make_double2(double x, double y) { return {x, y}; }
#endif

// ---- Qualifiers. Kernels are ordinary functions; __shared__ variables are per OS thread
// statics, which the block that runs on that thread owns until it ends.
#undef __global__
#undef __device__
#undef __host__
#undef __shared__
#undef __constant__
#undef __forceinline__
#undef __launch_bounds__
#define __global__
#define __device__
#define __host__
#define __constant__
#define __shared__ static thread_local
#define __forceinline__ inline
#define __launch_bounds__(...)

// ---- Built-in variables, set by the scheduler before it resumes a thread.
inline thread_local uint3 threadIdx{0, 0, 0};
inline thread_local uint3 blockIdx{0, 0, 0};
inline thread_local dim3 blockDim{1, 1, 1};
inline thread_local dim3 gridDim{1, 1, 1};
constexpr int warpSize = 32;

namespace convkit::cuda_emu {

// Ends the current thread's kernel with an error that names the kernel, block and thread (from
// within a kernel), or throws it (from host code). Never returns.
[[noreturn]] void fail(const std::string& what);

// Where an access happens in the kernel source, for error messages.
struct SourceLocation {
  const char* file;
  int line;
};

// The block barrier: every live thread of the block arrives before any continues. Returns the
// combination (count, and, or) of the predicates given, for the __syncthreads_* variants.
enum class BarrierReduction { kNone, kCount, kAnd, kOr };
int block_barrier(BarrierReduction reduction, int predicate);

// One warp collective: waits for every lane in `mask`, then returns this lane's result.
enum class Collective { kShuffleIndex, kShuffleUp, kShuffleDown, kShuffleXor, kBallot, kSyncWarp };
uint64_t warp_collective(Collective kind, unsigned int mask, uint64_t value, int argument,
                         int width);
unsigned int active_lanes();  // __activemask(): the lanes of this warp that have not exited

void check_alignment(const void* address, size_t alignment, size_t bytes, const char* what,
                     SourceLocation where);

// A vector load or store (float4, a struct of 4 halves, ...): checked for its alignment.
template <typename V>
V load_aligned(const V* address, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  check_alignment(address, alignof(V), sizeof(V), "vector load", {file, line});
  return *address;
}
template <typename V>
void store_aligned(V* address, const V& value, const char* file = __builtin_FILE(),
                   int line = __builtin_LINE()) {
  check_alignment(address, alignof(V), sizeof(V), "vector store", {file, line});
  *address = value;
}

// ---- Shared memory with shadow state (see the file comment).
struct SharedRegionState {
  uint64_t block_serial = 0;  // the block whose data this is (0: none yet)
  void* shadow = nullptr;     // one record per byte, owned by the emulator
  size_t shadow_bytes = 0;
};
// Checks and records an access of `bytes` bytes at `offset` of the region [data, data + size).
void shared_access(SharedRegionState& state, unsigned char* data, size_t size, int64_t offset,
                   size_t bytes, bool write, bool is_dynamic, SourceLocation where);

// An index into shared memory that remembers where in the source it was taken.
struct SharedIndex {
  int64_t value;
  SourceLocation where;
  template <typename I, typename = std::enable_if_t<std::is_integral_v<I>>>
  SharedIndex(I i, const char* file = __builtin_FILE(), int line = __builtin_LINE())
      : value(static_cast<int64_t>(i)), where{file, line} {}
};

template <typename T>
class SharedRef {
  static_assert(std::is_trivially_copyable_v<T>, "shared memory holds trivially copyable values");

 public:
  SharedRef(SharedRegionState* state, unsigned char* data, size_t size, int64_t offset,
            bool is_dynamic, SourceLocation where)
      : state_(state), data_(data), size_(size), offset_(offset), dynamic_(is_dynamic),
        where_(where) {}

  operator T() const {
    shared_access(*state_, data_, size_, offset_, sizeof(T), false, dynamic_, where_);
    T value;
    std::memcpy(&value, data_ + offset_, sizeof(T));
    return value;
  }
  SharedRef& operator=(const T& value) {
    shared_access(*state_, data_, size_, offset_, sizeof(T), true, dynamic_, where_);
    std::memcpy(data_ + offset_, &value, sizeof(T));
    return *this;
  }
  SharedRef& operator=(const SharedRef& other) { return *this = static_cast<T>(other); }
  SharedRef& operator+=(const T& v) { return *this = static_cast<T>(*this) + v; }
  SharedRef& operator-=(const T& v) { return *this = static_cast<T>(*this) - v; }
  SharedRef& operator*=(const T& v) { return *this = static_cast<T>(*this) * v; }
  SharedRef& operator/=(const T& v) { return *this = static_cast<T>(*this) / v; }
  SharedRef& operator|=(const T& v) { return *this = static_cast<T>(*this) | v; }
  SharedRef& operator&=(const T& v) { return *this = static_cast<T>(*this) & v; }

 private:
  SharedRegionState* state_;
  unsigned char* data_;
  size_t size_;
  int64_t offset_;
  bool dynamic_;
  SourceLocation where_;
};

// `__shared__ SharedArray<float, 256> tile;` in a kernel: N values of T shared by the block.
template <typename T, int64_t N>
struct SharedArray {
  static_assert(N > 0, "a shared array holds at least one value");
  SharedRef<T> operator[](SharedIndex i) {
    return SharedRef<T>(&state, bytes, sizeof(bytes), i.value * int64_t(sizeof(T)), false, i.where);
  }
  static constexpr int64_t size() { return N; }

  alignas(16) unsigned char bytes[N * sizeof(T)];
  SharedRegionState state;
};

// The block's dynamic shared memory (the launch's shared_bytes) seen as values of T from byte
// `byte_offset` on: `extern __shared__` under nvcc.
template <typename T>
class SharedSpan {
 public:
  SharedSpan(SharedRegionState* state, unsigned char* data, size_t size)
      : state_(state), data_(data), size_(size) {}
  SharedRef<T> operator[](SharedIndex i) const {
    return SharedRef<T>(state_, data_, size_, i.value * int64_t(sizeof(T)), true, i.where);
  }

 private:
  SharedRegionState* state_;
  unsigned char* data_;
  size_t size_;
};
SharedRegionState& dynamic_shared_state(unsigned char** data, size_t* size);
template <typename T>
SharedSpan<T> dynamic_shared(size_t byte_offset = 0) {
  unsigned char* data = nullptr;
  size_t size = 0;
  SharedRegionState& state = dynamic_shared_state(&data, &size);
  if (byte_offset % alignof(T) != 0 || byte_offset > size) {
    fail("dynamic_shared at byte offset " + std::to_string(byte_offset) +
         ": not aligned for its type or past the " + std::to_string(size) +
         " bytes the launch gave");
  }
  return SharedSpan<T>(&state, data + byte_offset, size - byte_offset);
}

// ---- Launches.
struct LaunchConfig {
  dim3 grid;
  dim3 block;
  size_t dynamic_shared_bytes;
  const char* kernel_name;
};
void run_launch(const LaunchConfig& config, void (*thread_body)(void*), void* parameters);

// The kernel's name from a __PRETTY_FUNCTION__ of a template taking it as `auto Kernel`.
std::string kernel_name_from_signature(const char* pretty_function);

// kernel<<<grid, block, shared_bytes>>>(args...), run to completion on the CPU.
template <auto Kernel, typename... Args>
void launch(dim3 grid, dim3 block, size_t shared_bytes, Args... args) {
  static const std::string name = kernel_name_from_signature(__PRETTY_FUNCTION__);
  std::tuple<Args...> parameters(args...);
  // Each thread gets its own copy of the parameters, as on the GPU.
  auto body = [](void* p) { std::apply(Kernel, *static_cast<std::tuple<Args...>*>(p)); };
  run_launch(LaunchConfig{grid, block, shared_bytes, name.c_str()}, body, &parameters);
}

// cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes): lets the
// kernel use up to `bytes` (at most 227 KB) of dynamic shared memory instead of 48 KB.
void set_dynamic_shared_limit(const std::string& kernel_name, size_t bytes);
template <auto Kernel>
void allow_dynamic_shared(size_t bytes) {
  static const std::string name = kernel_name_from_signature(__PRETTY_FUNCTION__);
  set_dynamic_shared_limit(name, bytes);
}

// Kernels launched, per OS thread, since it started (for tests that check they ran at all).
int64_t launches_run();

// A bound on the blocks of grid-stride launches (csrc/cuda/common.cuh), per OS thread: lowered
// by tests so that the loops' later rounds run on small tensors. Default 2^20, as on the GPU.
int64_t grid_stride_block_cap();
void set_grid_stride_block_cap(int64_t blocks);

// The schedule's seed for this OS thread's next launches: every launch draws its orders from
// the seed and its number since the seed was set, so the same seed and the same launches give
// the same interleavings.
void set_seed(uint64_t seed);
uint64_t seed();

template <typename T>
uint64_t to_bits(const T& value) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= 8,
                "warp shuffles move values of at most 8 bytes");
  uint64_t bits = 0;
  std::memcpy(&bits, &value, sizeof(T));
  return bits;
}
template <typename T>
T from_bits(uint64_t bits) {
  T value;
  std::memcpy(static_cast<void*>(&value), &bits, sizeof(T));
  return value;
}

}  // namespace convkit::cuda_emu

// ---- CUDA's device functions.
inline void __syncthreads() {
  convkit::cuda_emu::block_barrier(convkit::cuda_emu::BarrierReduction::kNone, 0);
}
inline int __syncthreads_count(int predicate) {
  return convkit::cuda_emu::block_barrier(convkit::cuda_emu::BarrierReduction::kCount, predicate);
}
inline int __syncthreads_and(int predicate) {
  return convkit::cuda_emu::block_barrier(convkit::cuda_emu::BarrierReduction::kAnd, predicate);
}
inline int __syncthreads_or(int predicate) {
  return convkit::cuda_emu::block_barrier(convkit::cuda_emu::BarrierReduction::kOr, predicate);
}
inline void __syncwarp(unsigned int mask = 0xffffffffu) {
  convkit::cuda_emu::warp_collective(convkit::cuda_emu::Collective::kSyncWarp, mask, 0, 0, 32);
}
inline unsigned int __activemask() { return convkit::cuda_emu::active_lanes(); }
inline void __threadfence() {}        // every access is visible at once: nothing to order
inline void __threadfence_block() {}
[[noreturn]] inline void __trap() { convkit::cuda_emu::fail("__trap() called"); }

template <typename T>
T __shfl_sync(unsigned int mask, T var, int src_lane, int width = warpSize) {
  using namespace convkit::cuda_emu;
  return from_bits<T>(warp_collective(Collective::kShuffleIndex, mask, to_bits(var), src_lane, width));
}
template <typename T>
T __shfl_up_sync(unsigned int mask, T var, unsigned int delta, int width = warpSize) {
  using namespace convkit::cuda_emu;
  return from_bits<T>(warp_collective(Collective::kShuffleUp, mask, to_bits(var), int(delta), width));
}
template <typename T>
T __shfl_down_sync(unsigned int mask, T var, unsigned int delta, int width = warpSize) {
  using namespace convkit::cuda_emu;
  return from_bits<T>(warp_collective(Collective::kShuffleDown, mask, to_bits(var), int(delta), width));
}
template <typename T>
T __shfl_xor_sync(unsigned int mask, T var, int lane_mask, int width = warpSize) {
  using namespace convkit::cuda_emu;
  return from_bits<T>(warp_collective(Collective::kShuffleXor, mask, to_bits(var), lane_mask, width));
}
inline unsigned int __ballot_sync(unsigned int mask, int predicate) {
  using namespace convkit::cuda_emu;
  return static_cast<unsigned int>(
      warp_collective(Collective::kBallot, mask, predicate != 0 ? 1 : 0, 0, warpSize));
}
inline int __all_sync(unsigned int mask, int predicate) {
  return __ballot_sync(mask, predicate) == mask;
}
inline int __any_sync(unsigned int mask, int predicate) {
  return __ballot_sync(mask, predicate) != 0;
}

template <typename T>
T __ldg(const T* address, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  convkit::cuda_emu::check_alignment(address, alignof(T), sizeof(T), "__ldg", {file, line});
  return *address;
}

// Atomics: real atomic read-modify-writes (blocks of different launches may run on different
// OS threads at once).
inline int atomicAdd(int* address, int value) {
  return __atomic_fetch_add(address, value, __ATOMIC_RELAXED);
}
inline unsigned int atomicAdd(unsigned int* address, unsigned int value) {
  return __atomic_fetch_add(address, value, __ATOMIC_RELAXED);
}
inline unsigned long long atomicAdd(unsigned long long* address, unsigned long long value) {
  return __atomic_fetch_add(address, value, __ATOMIC_RELAXED);
}
template <typename F>
F convkit_emu_atomic_add_float(F* address, F value) {
  F old;
  __atomic_load(address, &old, __ATOMIC_RELAXED);
  F desired;
  do {
    desired = old + value;
  } while (!__atomic_compare_exchange(address, &old, &desired, true, __ATOMIC_RELAXED,
                                      __ATOMIC_RELAXED));
  return old;
}
inline float atomicAdd(float* address, float value) {
  return convkit_emu_atomic_add_float(address, value);
}
inline double atomicAdd(double* address, double value) {
  return convkit_emu_atomic_add_float(address, value);
}
inline int atomicMax(int* address, int value) {
  int old = __atomic_load_n(address, __ATOMIC_RELAXED);
  while (old < value && !__atomic_compare_exchange_n(address, &old, value, true, __ATOMIC_RELAXED,
                                                     __ATOMIC_RELAXED)) {
  }
  return old;
}
inline int atomicMin(int* address, int value) {
  int old = __atomic_load_n(address, __ATOMIC_RELAXED);
  while (old > value && !__atomic_compare_exchange_n(address, &old, value, true, __ATOMIC_RELAXED,
                                                     __ATOMIC_RELAXED)) {
  }
  return old;
}
inline int atomicExch(int* address, int value) {
  return __atomic_exchange_n(address, value, __ATOMIC_RELAXED);
}
inline int atomicCAS(int* address, int compare, int value) {
  __atomic_compare_exchange_n(address, &compare, value, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED);
  return compare;
}

// Fast-math intrinsics, at full precision.
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline double rsqrt(double x) { return 1.0 / std::sqrt(x); }
inline float __fdividef(float x, float y) { return x / y; }
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float __fmaf_rn(float x, float y, float z) { return std::fma(x, y, z); }
