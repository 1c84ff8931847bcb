// Helpers shared by convkit's CUDA kernels: launch sizes and block reductions.
#pragma once

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cstdint>

namespace convkit {
namespace cuda {

constexpr int kThreads = 256;

// Blocks for a grid-stride loop over n elements: enough to fill the GPU, never more than
// the grid limit (the loops cover the rest).
inline unsigned int blocks_for(int64_t n, int threads = kThreads) {
  const int64_t blocks = (n + threads - 1) / threads;
  return static_cast<unsigned int>(std::max<int64_t>(1, std::min<int64_t>(blocks, int64_t(1) << 20)));
}

// Sum over the block of one value per thread; every thread gets the total. `scratch` holds
// at least blockDim.x / 32 values.
template <typename T>
__device__ inline T block_sum(T value, T* scratch) {
  for (int offset = 16; offset > 0; offset /= 2) value += __shfl_down_sync(0xffffffffu, value, offset);
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  __syncthreads();  // scratch may still be read from a previous call
  if (lane == 0) scratch[warp] = value;
  __syncthreads();
  const int warps = (blockDim.x + 31) / 32;
  T total = T(0);
  for (int w = 0; w < warps; ++w) total += scratch[w];
  return total;
}

}  // namespace cuda
}  // namespace convkit
