// The one seam between convkit's CUDA code and the two compilers that build it.
//
// Under nvcc this is CUDA: kernels run on the GPU, on the current stream. Under a host C++
// compiler it is the CPU emulation of CUDA's execution model (csrc/cuda_emu/emulator.h): the
// same kernels and the same host code (launch plans, chunking, GEMM calls through at::mm) run
// on CPU tensors, which is how the test suite runs the CUDA path on machines without a GPU.
// Everything that differs between the two lives here:
//   CONVKIT_CUDA_NAMESPACE      the namespace the CUDA code is compiled into (cuda, or
//                               cuda_emulated: both builds link into one library)
//   launch<kernel>(grid, block, shared_bytes, args...)   kernel<<<...>>> on the current stream
//                               and its launch check; or the emulated launch
//   SharedArray<T, N>           a __shared__ array (declare it `__shared__ SharedArray<T, N> x;`)
//   dynamic_shared<T>(offset)   the launch's dynamic shared memory as values of T
//   load_aligned / store_aligned   a vector access (float4, Vector<T, 4>, ...), alignment-checked
//                               under the emulator
//   DeviceGuard                 c10::cuda::CUDAGuard, or nothing
//   empty_device(sizes, options)   at::empty; under the emulator junk-filled, with guard bytes
//   grid_stride_block_cap()     the most blocks a grid-stride loop launches: 2^20, or lower
//                               under the emulator when a test asks (to run the loops' later
//                               rounds on small tensors)
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <cstdint>

#if defined(__CUDACC__)

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#define CONVKIT_CUDA_NAMESPACE cuda

namespace convkit::cuda {

template <auto Kernel, typename... Args>
void launch(dim3 grid, dim3 block, size_t shared_bytes, Args... args) {
  Kernel<<<grid, block, shared_bytes, c10::cuda::getCurrentCUDAStream()>>>(args...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, int64_t N>
struct SharedArray {
  __device__ __forceinline__ T& operator[](int64_t i) { return values[i]; }
  static constexpr int64_t size() { return N; }
  alignas(16) T values[N];
};

template <typename T>
struct SharedSpan {
  __device__ __forceinline__ T& operator[](int64_t i) const { return values[i]; }
  T* values;
};

template <typename T>
__device__ __forceinline__ SharedSpan<T> dynamic_shared(size_t byte_offset = 0) {
  extern __shared__ __align__(16) unsigned char convkit_dynamic_shared[];
  return SharedSpan<T>{reinterpret_cast<T*>(convkit_dynamic_shared + byte_offset)};
}

template <typename V>
__device__ __forceinline__ V load_aligned(const V* address) {
  return *address;
}

template <typename V>
__device__ __forceinline__ void store_aligned(V* address, const V& value) {
  *address = value;
}

using DeviceGuard = c10::cuda::CUDAGuard;

inline at::Tensor empty_device(at::IntArrayRef sizes, const at::TensorOptions& options) {
  return at::empty(sizes, options);
}

inline int64_t grid_stride_block_cap() { return int64_t(1) << 20; }

}  // namespace convkit::cuda

#else  // the CPU emulation

#include "../cuda_emu/device_memory.h"
#include "../cuda_emu/emulator.h"

#define CONVKIT_CUDA_NAMESPACE cuda_emulated

namespace convkit::cuda_emulated {

using cuda_emu::dynamic_shared;
using cuda_emu::launch;
using cuda_emu::load_aligned;
using cuda_emu::SharedArray;
using cuda_emu::store_aligned;

// The CPU has no device to select.
struct DeviceGuard {
  explicit DeviceGuard(const c10::Device&) {}
};

using cuda_emu::empty_device;
using cuda_emu::grid_stride_block_cap;

}  // namespace convkit::cuda_emulated

#endif
