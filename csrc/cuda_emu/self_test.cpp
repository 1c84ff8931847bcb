// The emulator's self-tests: small kernels, each either carrying one deliberate bug of a class
// the emulator must catch (the case names a fragment of the error it must raise), or being the
// correct twin of one (which must run and give the right result, so that the checks are not
// simply refusing everything; a wrong result throws "wrong result"). Run through the ops
// convkit::cuda_emulator_self_tests (the table) and cuda_emulator_self_test(name), by
// tests/test_cuda_emulator.py and by the sanitizer build's driver (csrc/tools/).
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>

#include <cstring>
#include <functional>
#include <string>
#include <vector>

#include "device_memory.h"
#include "emulator.h"
#include "routing.h"
#include "self_test.h"

namespace convkit {
namespace {

using cuda_emu::dynamic_shared;
using cuda_emu::launch;
using cuda_emu::load_aligned;
using cuda_emu::SharedArray;

void expect(bool ok, const std::string& what) {
  TORCH_CHECK(ok, "CUDA emulator self-test: wrong result: ", what);
}

// ---- shared memory and barriers

// out[t] = the value its right neighbour wrote; correct only with the barrier.
template <bool kBarrier>
__global__ void neighbour_kernel(float* out) {
  __shared__ SharedArray<float, 256> tile;
  tile[threadIdx.x] = float(threadIdx.x);
  if (kBarrier) __syncthreads();
  out[threadIdx.x] = tile[(threadIdx.x + 1) % blockDim.x];
}

// Reads, then overwrites, a neighbour's slot: the write must wait for the neighbour's read.
template <bool kBarrier>
__global__ void overwrite_kernel(float* out) {
  __shared__ SharedArray<float, 256> tile;
  tile[threadIdx.x] = 1.0f;
  __syncthreads();
  const float left = tile[(threadIdx.x + blockDim.x - 1) % blockDim.x];
  if (kBarrier) __syncthreads();
  tile[threadIdx.x] = left + 1.0f;
  __syncthreads();
  out[threadIdx.x] = tile[threadIdx.x];
}

// Reads a slot no thread writes (the array is larger than the block).
__global__ void unwritten_kernel(float* out) {
  __shared__ SharedArray<float, 64> tile;
  tile[threadIdx.x] = 1.0f;
  __syncthreads();
  out[threadIdx.x] = tile[threadIdx.x + 32];
}

__global__ void shared_past_end_kernel(float* out) {
  __shared__ SharedArray<float, 32> tile;
  tile[threadIdx.x + 1] = 1.0f;  // thread 31 writes tile[32]
  out[threadIdx.x] = 0.0f;
}

// Threads past n return before the barrier; the barrier then waits only for the others.
__global__ void early_exit_kernel(int64_t n, float* out) {
  __shared__ SharedArray<float, 64> tile;
  if (threadIdx.x >= n) return;
  tile[threadIdx.x] = float(threadIdx.x);
  __syncthreads();
  out[threadIdx.x] = tile[n - 1 - threadIdx.x];
}

__global__ void barrier_variants_kernel(int* out) {
  const int odd = threadIdx.x % 2;
  const int count = __syncthreads_count(odd);
  const int all = __syncthreads_and(threadIdx.x < 1000);
  const int any = __syncthreads_or(threadIdx.x == 7);
  const int none = __syncthreads_or(0);
  if (threadIdx.x == 0) {
    out[0] = count;
    out[1] = all;
    out[2] = any;
    out[3] = none;
  }
}

__global__ void dynamic_shared_kernel(float* out) {
  auto tile = dynamic_shared<float>();
  tile[threadIdx.x] = 2.0f * threadIdx.x;
  __syncthreads();
  out[threadIdx.x] = tile[blockDim.x - 1 - threadIdx.x];
}

__global__ void big_static_shared_kernel(float* out) {
  __shared__ SharedArray<float, 13000> tile;  // 52,000 bytes: above the 48 KB of static shared
  tile[threadIdx.x] = 1.0f;
  out[threadIdx.x] = tile[threadIdx.x];
}

// ---- warp collectives

// Every shuffle kind on a full warp, and within segments of 8 lanes.
__global__ void collectives_kernel(int* out) {
  const int lane = threadIdx.x % 32;
  int sum = lane;
  for (int mask = 16; mask > 0; mask /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, mask);
  int prefix = lane;
  for (int delta = 1; delta < 32; delta *= 2) {
    const int other = __shfl_up_sync(0xffffffffu, prefix, delta);
    if (lane >= delta) prefix += other;
  }
  const int broadcast = __shfl_sync(0xffffffffu, lane * 10, 5);
  const int below = __shfl_down_sync(0xffffffffu, lane, 3, 8);
  const unsigned odd = __ballot_sync(0xffffffffu, lane % 2);
  const int all = __all_sync(0xffffffffu, lane < 32);
  const int any = __any_sync(0xffffffffu, lane == 31);
  const double wide = __shfl_sync(0xffffffffu, 0.5 + lane, 31);
  __syncwarp();
  int* row = out + threadIdx.x * 8;
  row[0] = sum;
  row[1] = prefix;
  row[2] = broadcast;
  row[3] = below;
  row[4] = static_cast<int>(odd);
  row[5] = all;
  row[6] = any;
  row[7] = static_cast<int>(wide * 2);
}

// A lane leaves before the shuffle its warp waits at.
__global__ void lane_missing_kernel(float* out) {
  if (threadIdx.x == 3) return;
  out[threadIdx.x] = __shfl_down_sync(0xffffffffu, 1.0f, 1);
}

// The mask names lanes 0-15 only, but lane 20 calls it.
__global__ void caller_not_in_mask_kernel(float* out) {
  out[threadIdx.x] = __shfl_sync(0x0000ffffu, 1.0f, 0);
}

// Lanes 0-15 shuffle among themselves but read lane 20, which is not in the mask.
__global__ void source_outside_mask_kernel(float* out) {
  if (threadIdx.x < 16) out[threadIdx.x] = __shfl_sync(0x0000ffffu, 1.0f, 20);
}

// Half the warp names one mask, the other half another that overlaps it.
__global__ void masks_disagree_kernel(float* out) {
  const unsigned mask = threadIdx.x < 16 ? 0xffffffffu : 0xffff0000u;
  out[threadIdx.x] = __shfl_sync(mask, 1.0f, 16);
}

// Warp 0 waits at a shuffle for a lane that waits at __syncthreads.
__global__ void deadlock_kernel(float* out) {
  float v = 1.0f;
  if (threadIdx.x == 5) __syncthreads();
  if (threadIdx.x < 32) v = __shfl_down_sync(0xffffffffu, v, 1);
  if (threadIdx.x != 5) __syncthreads();
  out[threadIdx.x] = v;
}

// ---- vector accesses and global memory

__global__ void float4_kernel(const float* in, int64_t offset, float* out) {
  const float4 v = load_aligned(reinterpret_cast<const float4*>(in + offset) + threadIdx.x);
  out[threadIdx.x] = v.x + v.y + v.z + v.w;
}

__global__ void write_kernel(int64_t n, float* out) {
  for (int64_t i = threadIdx.x; i <= n; i += blockDim.x) {
    if (i < n || blockIdx.x == 0) out[i] = 1.0f;  // block 0 also writes out[n]
  }
}

#if CONVKIT_EMU_HAS_CUDA_HEADERS
__global__ void half_types_kernel(const float* in, float* out) {
  const __half h = __float2half(in[threadIdx.x]);
  const __nv_bfloat16 b = __float2bfloat16(in[threadIdx.x]);
  const __half h2 = __shfl_xor_sync(0xffffffffu, h, 1);
  out[threadIdx.x] = __half2float(h * h2) + __bfloat162float(b + b);
}
#endif

// Each thread takes a ticket as it runs, before and after a barrier: the order of the
// schedule, which the seed decides.
__global__ void ticket_kernel(int* counter, int* tickets) {
  const int64_t t = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  const int64_t threads = int64_t(gridDim.x) * blockDim.x;
  tickets[t] = atomicAdd(counter, 1);
  __syncthreads();
  tickets[threads + t] = atomicAdd(counter, 1);
}

at::Tensor floats(int64_t n) { return cuda_emu::empty_device({n}, at::TensorOptions().dtype(at::kFloat)); }

std::vector<float> values(const at::Tensor& t) {
  const float* p = t.const_data_ptr<float>();
  return std::vector<float>(p, p + t.numel());
}

at::Tensor none() { return at::Tensor(); }

}  // namespace

const std::vector<SelfTestCase>& self_test_cases() {
  static const std::vector<SelfTestCase> all = {
      // Shared memory and barriers.
      {"neighbour_with_barrier", "", [] {
         at::Tensor out = floats(256);
         launch<neighbour_kernel<true>>(1, 256, 0, out.mutable_data_ptr<float>());
         const std::vector<float> v = values(out);
         for (int t = 0; t < 256; ++t) expect(v[t] == float((t + 1) % 256), "neighbour");
         return none();
       }},
      {"neighbour_missing_barrier", "which no thread of this block has written", [] {
         at::Tensor out = floats(256);
         launch<neighbour_kernel<false>>(1, 256, 0, out.mutable_data_ptr<float>());
         return none();
       }},
      {"overwrite_with_barrier", "", [] {
         at::Tensor out = floats(256);
         launch<overwrite_kernel<true>>(2, 256, 0, out.mutable_data_ptr<float>());
         for (float v : values(out)) expect(v == 2.0f, "overwrite");
         return none();
       }},
      {"overwrite_missing_barrier", "with no __syncthreads between the two", [] {
         at::Tensor out = floats(256);
         launch<overwrite_kernel<false>>(2, 256, 0, out.mutable_data_ptr<float>());
         return none();
       }},
      {"unwritten_shared_read", "which no thread of this block has written", [] {
         at::Tensor out = floats(64);
         launch<unwritten_kernel>(1, 32, 0, out.mutable_data_ptr<float>());
         return none();
       }},
      {"shared_index_past_end", "past its end", [] {
         at::Tensor out = floats(32);
         launch<shared_past_end_kernel>(1, 32, 0, out.mutable_data_ptr<float>());
         return none();
       }},
      {"early_exit_before_barrier", "", [] {
         at::Tensor out = floats(64);
         launch<early_exit_kernel>(3, 64, 0, int64_t(40), out.mutable_data_ptr<float>());
         const std::vector<float> v = values(out);
         for (int t = 0; t < 40; ++t) expect(v[t] == float(39 - t), "early exit");
         return none();
       }},
      {"barrier_variants", "", [] {
         at::Tensor out = at::empty({4}, at::TensorOptions().dtype(at::kInt));
         launch<barrier_variants_kernel>(1, dim3(16, 4, 2), 0, out.mutable_data_ptr<int>());
         const int* v = out.const_data_ptr<int>();
         expect(v[0] == 64 && v[1] == 1 && v[2] == 1 && v[3] == 0, "__syncthreads_count/and/or");
         return none();
       }},
      {"dynamic_shared", "", [] {
         at::Tensor out = floats(128);
         launch<dynamic_shared_kernel>(2, 128, 128 * sizeof(float), out.mutable_data_ptr<float>());
         const std::vector<float> v = values(out);
         for (int t = 0; t < 128; ++t) expect(v[t] == 2.0f * (127 - t), "dynamic shared");
         return none();
       }},
      {"dynamic_shared_past_end", "past its end", [] {
         at::Tensor out = floats(128);
         launch<dynamic_shared_kernel>(1, 128, 64 * sizeof(float), out.mutable_data_ptr<float>());
         return none();
       }},
      {"static_shared_over_48kb", "a block has at most 48 KB of it", [] {
         at::Tensor out = floats(32);
         launch<big_static_shared_kernel>(1, 32, 0, out.mutable_data_ptr<float>());
         return none();
       }},
      {"dynamic_shared_over_48kb", "bytes of dynamic shared memory; at most 49152", [] {
         at::Tensor out = floats(128);
         launch<dynamic_shared_kernel>(1, 128, 64 << 10, out.mutable_data_ptr<float>());
         return none();
       }},
      // Warp collectives.
      {"warp_collectives", "", [] {
         at::Tensor out = at::empty({64 * 8}, at::TensorOptions().dtype(at::kInt));
         launch<collectives_kernel>(1, 64, 0, out.mutable_data_ptr<int>());
         const int* v = out.const_data_ptr<int>();
         for (int t = 0; t < 64; ++t) {
           const int lane = t % 32;
           const int* row = v + t * 8;
           const int below = lane % 8 + 3 < 8 ? lane + 3 : lane;
           expect(row[0] == 496 && row[1] == lane * (lane + 1) / 2 && row[2] == 50 &&
                      row[3] == below && static_cast<unsigned>(row[4]) == 0xaaaaaaaau &&
                      row[5] == 1 && row[6] == 1 && row[7] == 63,
                  "warp collectives of lane " + std::to_string(lane));
         }
         return none();
       }},
      {"shuffle_lane_missing", "every lane named in the mask must reach the collective", [] {
         at::Tensor out = floats(32);
         launch<lane_missing_kernel>(1, 32, 0, out.mutable_data_ptr<float>());
         return none();
       }},
      {"shuffle_caller_not_in_mask", "which does not name its own lane", [] {
         at::Tensor out = floats(32);
         launch<caller_not_in_mask_kernel>(1, 32, 0, out.mutable_data_ptr<float>());
         return none();
       }},
      {"shuffle_source_outside_mask", "reads the value of lane 20, which is not in the mask", [] {
         at::Tensor out = floats(32);
         launch<source_outside_mask_kernel>(1, 32, 0, out.mutable_data_ptr<float>());
         return none();
       }},
      {"shuffle_masks_disagree", "must agree on it and on its mask", [] {
         at::Tensor out = floats(32);
         launch<masks_disagree_kernel>(1, 32, 0, out.mutable_data_ptr<float>());
         return none();
       }},
      {"shuffle_mask_beyond_block", "which this warp does not have", [] {
         at::Tensor out = floats(48);
         launch<lane_missing_kernel>(1, 20, 0, out.mutable_data_ptr<float>());
         return none();
       }},
      {"deadlock", "deadlock", [] {
         at::Tensor out = floats(64);
         launch<deadlock_kernel>(1, 64, 0, out.mutable_data_ptr<float>());
         return none();
       }},
      // Vector accesses and global memory.
      {"aligned_float4_load", "", [] {
         at::Tensor in = floats(64).fill_(1.0f);
         at::Tensor out = floats(16);
         launch<float4_kernel>(1, 16, 0, in.const_data_ptr<float>(), int64_t(0),
                               out.mutable_data_ptr<float>());
         for (float v : values(out)) expect(v == 4.0f, "float4 load");
         return none();
       }},
      {"misaligned_float4_load", "(address % 16 = 4)", [] {
         at::Tensor in = floats(68).fill_(1.0f);
         at::Tensor out = floats(16);
         launch<float4_kernel>(1, 16, 0, in.const_data_ptr<float>(), int64_t(1),
                               out.mutable_data_ptr<float>());
         return none();
       }},
      {"write_in_bounds", "", [] {
         at::Tensor out = floats(100);
         launch<write_kernel>(1, 64, 0, int64_t(99), out.mutable_data_ptr<float>());
         return none();
       }},
      {"write_past_end", "wrote byte 400 of a 400-byte buffer the op allocated", [] {
         at::Tensor out = floats(100);
         launch<write_kernel>(1, 64, 0, int64_t(100), out.mutable_data_ptr<float>());
         return none();
       }},
      // Launch limits.
      {"grid_y_70000", "gridDim.y is at most 65535, but got 70000", [] {
         at::Tensor out = floats(1);
         launch<write_kernel>(dim3(1, 70000), 32, 0, int64_t(0), out.mutable_data_ptr<float>());
         return none();
       }},
      {"grid_z_70000", "gridDim.z is at most 65535, but got 70000", [] {
         at::Tensor out = floats(1);
         launch<write_kernel>(dim3(1, 1, 70000), 32, 0, int64_t(0), out.mutable_data_ptr<float>());
         return none();
       }},
      {"block_1025_threads", "a block has at most 1024 threads, but got 1025", [] {
         at::Tensor out = floats(1);
         launch<write_kernel>(1, 1025, 0, int64_t(0), out.mutable_data_ptr<float>());
         return none();
       }},
      {"zero_blocks", "a launch needs at least one block", [] {
         at::Tensor out = floats(1);
         launch<write_kernel>(0, 32, 0, int64_t(0), out.mutable_data_ptr<float>());
         return none();
       }},
      {"zero_threads", "a launch needs at least one thread", [] {
         at::Tensor out = floats(1);
         launch<write_kernel>(1, 0, 0, int64_t(0), out.mutable_data_ptr<float>());
         return none();
       }},
      // The schedule itself: returns the tickets [2, blocks * threads] of ticket_kernel.
      {"ticket_order", "", [] {
         at::Tensor counter = at::zeros({1}, at::TensorOptions().dtype(at::kInt));
         at::Tensor tickets = at::empty({2, 4 * 64}, at::TensorOptions().dtype(at::kInt));
         launch<ticket_kernel>(4, 64, 0, counter.mutable_data_ptr<int>(),
                               tickets.mutable_data_ptr<int>());
         return tickets;
       }},
#if CONVKIT_EMU_HAS_CUDA_HEADERS
      {"half_types", "", [] {
         at::Tensor in = floats(32);
         float* p = in.mutable_data_ptr<float>();
         for (int t = 0; t < 32; ++t) p[t] = 0.25f * t;
         at::Tensor out = floats(32);
         launch<half_types_kernel>(1, 32, 0, in.const_data_ptr<float>(), out.mutable_data_ptr<float>());
         const std::vector<float> v = values(out);
         for (int t = 0; t < 32; ++t) {
           expect(v[t] == 0.25f * t * 0.25f * (t ^ 1) + 0.5f * t, "half types at " + std::to_string(t));
         }
         return none();
       }},
#endif
  };
  return all;
}

at::Tensor cuda_emulator_self_test(const std::string& name) {
  for (const SelfTestCase& test : self_test_cases()) {
    if (test.name == name) return test.run();
  }
  std::string names;
  for (const SelfTestCase& test : self_test_cases()) names += (names.empty() ? "" : ", ") + test.name;
  TORCH_CHECK(false, "convkit::cuda_emulator_self_test: no case named '", name,
              "'; the cases are: ", names);
}

std::tuple<std::vector<std::string>, std::vector<std::string>> cuda_emulator_self_tests() {
  std::vector<std::string> names;
  std::vector<std::string> errors;
  for (const SelfTestCase& test : self_test_cases()) {
    names.push_back(test.name);
    errors.push_back(test.expected_error);
  }
  return {names, errors};
}

}  // namespace convkit
