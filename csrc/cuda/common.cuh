// Helpers shared by convkit's CUDA kernels: launch sizes and reductions within a block.
#pragma once

#include <algorithm>
#include <cstdint>

#include "device.cuh"

namespace convkit::CONVKIT_CUDA_NAMESPACE {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
// Blocks for a grid-stride loop over n elements: at most grid_stride_block_cap() (device.cuh:
// 2^20, enough to fill any GPU; the loops cover the rest of the elements).
inline unsigned int blocks_for(int64_t n, int threads = kThreads) {
  const int64_t blocks = (n + threads - 1) / threads;
  return static_cast<unsigned int>(std::max<int64_t>(1, std::min(blocks, grid_stride_block_cap())));
}

// Sum over the block (blockDim.x == kThreads) of one value per thread; every thread gets the
// total, summed in the same order by all (so all get the same bits).
template <typename T>
__device__ inline T block_sum(T value, SharedArray<T, kWarps>& scratch) {
  for (int offset = 16; offset > 0; offset /= 2) value += __shfl_down_sync(0xffffffffu, value, offset);
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  __syncthreads();  // scratch may still be read from a previous call
  if (lane == 0) scratch[warp] = value;
  __syncthreads();
  T total = T(0);
  for (int w = 0; w < kWarps; ++w) total += scratch[w];
  return total;
}

}  // namespace convkit::CONVKIT_CUDA_NAMESPACE
