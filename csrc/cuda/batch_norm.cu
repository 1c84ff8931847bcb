// Fused BatchNorm(+ReLU) on CUDA: the CPU algorithm (csrc/cpu/batch_norm.cpp) as kernels.
//
// The input is viewed as [N, C, S] (contiguous). Per-channel reductions use a two-level
// grid: blockIdx.y is the channel, blockIdx.x one of P slices of its N * S values; each block
// writes a partial result and a one-thread-per-channel kernel merges the P partials in a
// fixed order (deterministic, no atomics).
//   forward, training  partial_stats_kernel: Welford (count, mean, M2) per thread, merged
//                      across the block (Chan's formula) -> finalize_stats_kernel: mean and
//                      biased variance -> coefficients_kernel: scale, shift
//                      -> apply_kernel: y = x * scale + shift (+ ReLU), vectorised by 4 when
//                      S % 4 == 0 and the pointers are aligned.
//   forward, eval      coefficients_kernel from the running statistics -> apply_kernel.
//   backward           backward_partial_kernel: sum(dy') and sum(dy' * (x - mean)), dy' masked
//                      by the recomputed ReLU -> backward_finalize_kernel: grad_weight,
//                      grad_bias and the dx coefficients -> grad_input_kernel.
// Memory passes: forward 1 read (stats) + 1 read/1 write; backward 2 reads of (x, dy) + 1
// write. Accumulation in float (double for float64).
// Version 1 (this file). It has not yet been run on a GPU: the per-element arithmetic is
// shared with the CPU kernels (csrc/batch_norm.h) and tested there.
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/full.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <array>
#include <cstdint>
#include <tuple>

#include "../batch_norm.h"
#include "../checks.h"
#include "common.cuh"

namespace convkit {
namespace {

using cuda::blocks_for;
using cuda::kThreads;

constexpr int64_t kElementsPerThread = 16;
constexpr int64_t kMaxSlices = 1024;

__device__ inline float inverse_sqrt(float v) { return 1.0f / sqrtf(v); }
__device__ inline double inverse_sqrt(double v) { return 1.0 / sqrt(v); }

// Slices per channel so that each block has about kThreads * kElementsPerThread values.
int64_t slices_for(int64_t per_channel) {
  const int64_t per_block = kThreads * kElementsPerThread;
  return std::max<int64_t>(1, std::min<int64_t>(kMaxSlices, (per_channel + per_block - 1) / per_block));
}

template <typename acc_t>
struct Welford {
  acc_t count;
  acc_t mean;
  acc_t m2;
};

template <typename acc_t>
__device__ inline Welford<acc_t> welford_merge(Welford<acc_t> a, Welford<acc_t> b) {
  const acc_t count = a.count + b.count;
  if (count == acc_t(0)) return a;
  const acc_t delta = b.mean - a.mean;
  const acc_t fraction = b.count / count;
  return {count, a.mean + delta * fraction, a.m2 + b.m2 + delta * delta * a.count * fraction};
}

template <typename scalar_t, typename acc_t>
__global__ void partial_stats_kernel(const scalar_t* __restrict__ x, int64_t N, int64_t C,
                                     int64_t S, int64_t per_slice, acc_t* __restrict__ partial) {
  __shared__ acc_t counts[kThreads];
  __shared__ acc_t means[kThreads];
  __shared__ acc_t m2s[kThreads];
  const int64_t c = blockIdx.y;
  const int64_t M = N * S;
  const int64_t begin = int64_t(blockIdx.x) * per_slice;
  const int64_t end = begin + per_slice < M ? begin + per_slice : M;
  Welford<acc_t> w{acc_t(0), acc_t(0), acc_t(0)};
  for (int64_t j = begin + threadIdx.x; j < end; j += blockDim.x) {
    const int64_t n = j / S;
    const acc_t v = static_cast<acc_t>(x[(n * C + c) * S + (j - n * S)]);
    w.count += acc_t(1);
    const acc_t delta = v - w.mean;
    w.mean += delta / w.count;
    w.m2 += delta * (v - w.mean);
  }
  counts[threadIdx.x] = w.count;
  means[threadIdx.x] = w.mean;
  m2s[threadIdx.x] = w.m2;
  __syncthreads();
  for (int stride = blockDim.x / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride) {
      const Welford<acc_t> merged = welford_merge(
          Welford<acc_t>{counts[threadIdx.x], means[threadIdx.x], m2s[threadIdx.x]},
          Welford<acc_t>{counts[threadIdx.x + stride], means[threadIdx.x + stride],
                         m2s[threadIdx.x + stride]});
      counts[threadIdx.x] = merged.count;
      means[threadIdx.x] = merged.mean;
      m2s[threadIdx.x] = merged.m2;
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    acc_t* out = partial + (c * gridDim.x + blockIdx.x) * 3;
    out[0] = counts[0];
    out[1] = means[0];
    out[2] = m2s[0];
  }
}

template <typename acc_t>
__global__ void finalize_stats_kernel(const acc_t* __restrict__ partial, int64_t C, int64_t slices,
                                      acc_t* __restrict__ mean, acc_t* __restrict__ var) {
  for (int64_t c = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; c < C;
       c += int64_t(blockDim.x) * gridDim.x) {
    Welford<acc_t> w{acc_t(0), acc_t(0), acc_t(0)};
    for (int64_t p = 0; p < slices; ++p) {
      const acc_t* in = partial + (c * slices + p) * 3;
      w = welford_merge(w, Welford<acc_t>{in[0], in[1], in[2]});
    }
    mean[c] = w.mean;
    var[c] = w.count > acc_t(0) ? w.m2 / w.count : acc_t(0);
  }
}

// scale = weight * invstd, shift = bias - mean * scale (weight 1 and bias 0 when absent).
template <typename acc_t>
__global__ void coefficients_kernel(const acc_t* __restrict__ mean, const acc_t* __restrict__ var,
                                    const acc_t* __restrict__ weight, const acc_t* __restrict__ bias,
                                    double eps, int64_t C, acc_t* __restrict__ scale,
                                    acc_t* __restrict__ shift) {
  for (int64_t c = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; c < C;
       c += int64_t(blockDim.x) * gridDim.x) {
    const acc_t invstd = inverse_sqrt(var[c] + static_cast<acc_t>(eps));
    const acc_t s = (weight != nullptr ? weight[c] : acc_t(1)) * invstd;
    scale[c] = s;
    shift[c] = (bias != nullptr ? bias[c] : acc_t(0)) - mean[c] * s;
  }
}

template <typename scalar_t, int kVec>
struct alignas(sizeof(scalar_t) * kVec) Vector {
  scalar_t values[kVec];
};

// y = batch_norm_output(x): kVec consecutive elements per thread (all in one channel, as
// S % kVec == 0 whenever kVec > 1).
template <typename scalar_t, typename acc_t, int kVec>
__global__ void apply_kernel(const scalar_t* __restrict__ x, const acc_t* __restrict__ scale,
                             const acc_t* __restrict__ shift, int64_t C, int64_t S, int64_t total,
                             bool relu, scalar_t* __restrict__ y) {
  const int64_t vectors = total / kVec;
  for (int64_t v = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; v < vectors;
       v += int64_t(blockDim.x) * gridDim.x) {
    const int64_t c = (v * kVec / S) % C;
    const acc_t sc = scale[c];
    const acc_t sh = shift[c];
    Vector<scalar_t, kVec> in = reinterpret_cast<const Vector<scalar_t, kVec>*>(x)[v];
    Vector<scalar_t, kVec> out;
#pragma unroll
    for (int k = 0; k < kVec; ++k) out.values[k] = batch_norm_output(in.values[k], sc, sh, relu);
    reinterpret_cast<Vector<scalar_t, kVec>*>(y)[v] = out;
  }
}

template <typename scalar_t, typename acc_t>
__global__ void backward_partial_kernel(const scalar_t* __restrict__ x,
                                        const scalar_t* __restrict__ dy,
                                        const acc_t* __restrict__ mean,
                                        const acc_t* __restrict__ scale,
                                        const acc_t* __restrict__ shift, bool relu, int64_t N,
                                        int64_t C, int64_t S, int64_t per_slice,
                                        acc_t* __restrict__ partial) {
  __shared__ acc_t scratch[kThreads / 32];
  const int64_t c = blockIdx.y;
  const int64_t M = N * S;
  const int64_t begin = int64_t(blockIdx.x) * per_slice;
  const int64_t end = begin + per_slice < M ? begin + per_slice : M;
  const acc_t mu = mean[c];
  const acc_t sc = scale[c];
  const acc_t sh = shift[c];
  acc_t sum_dy = acc_t(0);
  acc_t sum_dy_xmu = acc_t(0);
  for (int64_t j = begin + threadIdx.x; j < end; j += blockDim.x) {
    const int64_t n = j / S;
    const int64_t index = (n * C + c) * S + (j - n * S);
    const scalar_t xv = x[index];
    acc_t g = static_cast<acc_t>(dy[index]);
    if (relu && !batch_norm_relu_passes(xv, sc, sh)) g = acc_t(0);
    sum_dy += g;
    sum_dy_xmu += g * (static_cast<acc_t>(xv) - mu);
  }
  sum_dy = cuda::block_sum(sum_dy, scratch);
  sum_dy_xmu = cuda::block_sum(sum_dy_xmu, scratch);
  if (threadIdx.x == 0) {
    acc_t* out = partial + (c * gridDim.x + blockIdx.x) * 2;
    out[0] = sum_dy;
    out[1] = sum_dy_xmu;
  }
}

// Per channel: grad_weight, grad_bias, and the coefficients of grad_input (mean_dy, proj).
template <typename acc_t>
__global__ void backward_finalize_kernel(const acc_t* __restrict__ partial, int64_t C,
                                         int64_t slices, const acc_t* __restrict__ var,
                                         double eps, bool training, int64_t count,
                                         acc_t* __restrict__ grad_weight,
                                         acc_t* __restrict__ grad_bias,
                                         acc_t* __restrict__ mean_dy, acc_t* __restrict__ proj) {
  for (int64_t c = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; c < C;
       c += int64_t(blockDim.x) * gridDim.x) {
    acc_t sum_dy = acc_t(0);
    acc_t sum_dy_xmu = acc_t(0);
    for (int64_t p = 0; p < slices; ++p) {
      sum_dy += partial[(c * slices + p) * 2];
      sum_dy_xmu += partial[(c * slices + p) * 2 + 1];
    }
    const acc_t invstd = inverse_sqrt(var[c] + static_cast<acc_t>(eps));
    grad_weight[c] = sum_dy_xmu * invstd;
    grad_bias[c] = sum_dy;
    const bool batch_stats = training && count > 0;
    mean_dy[c] = batch_stats ? sum_dy / static_cast<acc_t>(count) : acc_t(0);
    proj[c] = batch_stats ? sum_dy_xmu / static_cast<acc_t>(count) * invstd * invstd : acc_t(0);
  }
}

template <typename scalar_t, typename acc_t>
__global__ void grad_input_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ dy,
                                  const acc_t* __restrict__ mean, const acc_t* __restrict__ scale,
                                  const acc_t* __restrict__ shift,
                                  const acc_t* __restrict__ mean_dy,
                                  const acc_t* __restrict__ proj, bool relu, int64_t C, int64_t S,
                                  int64_t total, scalar_t* __restrict__ dx) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total;
       i += int64_t(blockDim.x) * gridDim.x) {
    const int64_t c = (i / S) % C;
    const scalar_t xv = x[i];
    acc_t g = static_cast<acc_t>(dy[i]);
    if (relu && !batch_norm_relu_passes(xv, scale[c], shift[c])) g = acc_t(0);
    dx[i] = static_cast<scalar_t>(batch_norm_grad_input(g, static_cast<acc_t>(xv) - mean[c],
                                                        mean_dy[c], proj[c], scale[c]));
  }
}

// running = (1 - momentum) * running + momentum * factor * batch (factor: 1 for the mean,
// count / (count - 1) for the variance).
template <typename running_t>
__global__ void update_stat_kernel(running_t* __restrict__ running, const double* __restrict__ batch,
                                   double momentum, double factor, int64_t C) {
  for (int64_t c = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; c < C;
       c += int64_t(blockDim.x) * gridDim.x) {
    running[c] = static_cast<running_t>(
        updated_running_stat(static_cast<double>(running[c]), batch[c], momentum, factor));
  }
}

at::Tensor acc_or_empty(const std::optional<at::Tensor>& t, at::ScalarType acc_type) {
  if (t.has_value() && t->defined()) return t->to(acc_type).contiguous();
  return at::Tensor();
}

template <typename acc_t>
const acc_t* data_or_null(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<acc_t>() : nullptr;
}

template <typename scalar_t, typename acc_t>
void launch_apply(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift, int64_t C,
                  int64_t S, bool relu, at::Tensor& y, cudaStream_t stream) {
  const int64_t total = x.numel();
  const scalar_t* x_ptr = x.const_data_ptr<scalar_t>();
  scalar_t* y_ptr = y.mutable_data_ptr<scalar_t>();
  constexpr int kVec = 4;
  const bool aligned = reinterpret_cast<uintptr_t>(x_ptr) % (sizeof(scalar_t) * kVec) == 0 &&
                       reinterpret_cast<uintptr_t>(y_ptr) % (sizeof(scalar_t) * kVec) == 0;
  if (S % kVec == 0 && aligned) {
    apply_kernel<scalar_t, acc_t, kVec><<<blocks_for(total / kVec), kThreads, 0, stream>>>(
        x_ptr, scale.const_data_ptr<acc_t>(), shift.const_data_ptr<acc_t>(), C, S, total, relu,
        y_ptr);
  } else {
    apply_kernel<scalar_t, acc_t, 1><<<blocks_for(total), kThreads, 0, stream>>>(
        x_ptr, scale.const_data_ptr<acc_t>(), shift.const_data_ptr<acc_t>(), C, S, total, relu,
        y_ptr);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_forward_cuda(
    const at::Tensor& input, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& running_mean,
    const std::optional<at::Tensor>& running_var, bool training, double eps, bool relu) {
  const char* op = "convkit::batch_norm_forward";
  at::AutoDispatchBelowADInplaceOrView below_autograd;  // internal ATen calls need no autograd
  const auto [N, C, S, count] = check_batch_norm_forward(op, input, weight, bias, running_mean,
                                                         running_var, training, eps);
  TORCH_CHECK(C <= 65535, op, ": at most 65535 channels are supported on CUDA, but got ", C);
  const c10::cuda::CUDAGuard device_guard(input.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  const at::Tensor x = input.contiguous();
  const at::ScalarType acc_type = at::toOpMathType(x.scalar_type());
  const at::TensorOptions acc_options = x.options().dtype(acc_type);
  at::Tensor output = at::empty_like(x);
  at::Tensor save_mean = at::empty({C}, acc_options);
  at::Tensor save_var = at::empty({C}, acc_options);
  at::Tensor coefficients = at::empty({2, C}, acc_options);  // scale, shift
  const at::Tensor w = acc_or_empty(weight, acc_type);
  const at::Tensor b = acc_or_empty(bias, acc_type);
  if (!training) {
    save_mean.copy_(*running_mean);
    save_var.copy_(*running_var);
  }

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(),
                                  "batch_norm_forward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    if (training) {
      const int64_t slices = slices_for(count);
      const int64_t per_slice = (count + slices - 1) / slices;
      at::Tensor partial = at::empty({C, slices, 3}, acc_options);
      if (count > 0) {
        partial_stats_kernel<scalar_t, acc_t>
            <<<dim3(static_cast<unsigned int>(slices), static_cast<unsigned int>(C)), kThreads, 0,
               stream>>>(x.const_data_ptr<scalar_t>(), N, C, S, per_slice,
                         partial.mutable_data_ptr<acc_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      } else {
        partial.zero_();
      }
      finalize_stats_kernel<acc_t><<<blocks_for(C), kThreads, 0, stream>>>(
          partial.const_data_ptr<acc_t>(), C, slices, save_mean.mutable_data_ptr<acc_t>(),
          save_var.mutable_data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    at::Tensor scale = coefficients[0];
    at::Tensor shift = coefficients[1];
    coefficients_kernel<acc_t><<<blocks_for(C), kThreads, 0, stream>>>(
        save_mean.const_data_ptr<acc_t>(), save_var.const_data_ptr<acc_t>(), data_or_null<acc_t>(w),
        data_or_null<acc_t>(b), eps, C, scale.mutable_data_ptr<acc_t>(),
        shift.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (x.numel() > 0) launch_apply<scalar_t, acc_t>(x, scale, shift, C, S, relu, output, stream);
  });
  return std::make_tuple(output.view(input.sizes()), save_mean, save_var);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_backward_cuda(
    const at::Tensor& grad_output, const at::Tensor& input, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& save_mean, const at::Tensor& save_var,
    bool training, double eps, bool relu, std::array<bool, 3> output_mask) {
  const char* op = "convkit::batch_norm_backward";
  at::AutoDispatchBelowADInplaceOrView below_autograd;  // internal ATen calls need no autograd
  const auto [N, C, S, count] =
      check_batch_norm_backward(op, grad_output, input, weight, bias, save_mean, save_var);
  TORCH_CHECK(C <= 65535, op, ": at most 65535 channels are supported on CUDA, but got ", C);
  const c10::cuda::CUDAGuard device_guard(input.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  const at::Tensor x = input.contiguous();
  const at::Tensor dy = grad_output.contiguous();
  const at::ScalarType acc_type = at::toOpMathType(x.scalar_type());
  const at::TensorOptions acc_options = x.options().dtype(acc_type);
  const at::Tensor w = acc_or_empty(weight, acc_type);
  const at::Tensor b = acc_or_empty(bias, acc_type);
  const at::Tensor mean = save_mean.to(acc_type).contiguous();
  const at::Tensor var = save_var.to(acc_type).contiguous();
  // Rows: scale, shift, grad_weight, grad_bias, mean_dy, proj.
  at::Tensor per_channel = at::empty({6, C}, acc_options);
  at::Tensor grad_input = output_mask[0] ? at::empty_like(x) : at::empty({0}, x.options());

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(),
                                  "batch_norm_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    acc_t* rows = per_channel.mutable_data_ptr<acc_t>();
    acc_t* scale = rows;
    acc_t* shift = rows + C;
    acc_t* grad_weight = rows + 2 * C;
    acc_t* grad_bias = rows + 3 * C;
    acc_t* mean_dy = rows + 4 * C;
    acc_t* proj = rows + 5 * C;
    coefficients_kernel<acc_t><<<blocks_for(C), kThreads, 0, stream>>>(
        mean.const_data_ptr<acc_t>(), var.const_data_ptr<acc_t>(), data_or_null<acc_t>(w),
        data_or_null<acc_t>(b), eps, C, scale, shift);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const int64_t slices = slices_for(count);
    const int64_t per_slice = (count + slices - 1) / slices;
    at::Tensor partial = at::empty({C, slices, 2}, acc_options);
    if (count > 0) {
      backward_partial_kernel<scalar_t, acc_t>
          <<<dim3(static_cast<unsigned int>(slices), static_cast<unsigned int>(C)), kThreads, 0,
             stream>>>(x.const_data_ptr<scalar_t>(), dy.const_data_ptr<scalar_t>(),
                       mean.const_data_ptr<acc_t>(), scale, shift, relu, N, C, S, per_slice,
                       partial.mutable_data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    } else {
      partial.zero_();
    }
    backward_finalize_kernel<acc_t><<<blocks_for(C), kThreads, 0, stream>>>(
        partial.const_data_ptr<acc_t>(), C, slices, var.const_data_ptr<acc_t>(), eps, training,
        count, grad_weight, grad_bias, mean_dy, proj);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (output_mask[0] && x.numel() > 0) {
      grad_input_kernel<scalar_t, acc_t><<<blocks_for(x.numel()), kThreads, 0, stream>>>(
          x.const_data_ptr<scalar_t>(), dy.const_data_ptr<scalar_t>(), mean.const_data_ptr<acc_t>(),
          scale, shift, mean_dy, proj, relu, C, S, x.numel(), grad_input.mutable_data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });

  const at::ScalarType weight_type =
      weight.has_value() && weight->defined() ? weight->scalar_type() : x.scalar_type();
  const at::ScalarType bias_type =
      bias.has_value() && bias->defined() ? bias->scalar_type() : x.scalar_type();
  at::Tensor grad_weight =
      output_mask[1] ? per_channel[2].to(weight_type, /*non_blocking=*/false, /*copy=*/true)
                     : at::empty({0}, x.options());
  at::Tensor grad_bias = output_mask[2]
                             ? per_channel[3].to(bias_type, /*non_blocking=*/false, /*copy=*/true)
                             : at::empty({0}, x.options());
  if (output_mask[0]) grad_input = grad_input.view(input.sizes());
  return std::make_tuple(grad_input, grad_weight, grad_bias);
}

void batch_norm_update_stats_cuda(const at::Tensor& running_mean, const at::Tensor& running_var,
                                  const at::Tensor& batch_mean, const at::Tensor& batch_var,
                                  double momentum, int64_t count) {
  const char* op = "convkit::batch_norm_update_stats";
  at::AutoDispatchBelowADInplaceOrView below_autograd;  // internal ATen calls need no autograd
  check_batch_norm_update_stats(op, running_mean, running_var, batch_mean, batch_var, count);
  const int64_t C = batch_mean.numel();
  if (count == 0 || C == 0) return;
  const c10::cuda::CUDAGuard device_guard(running_mean.device());
  const at::Tensor mean = batch_mean.to(at::kDouble).contiguous();
  const at::Tensor var = batch_var.to(at::kDouble).contiguous();
  const double unbias = running_var_unbias(count);
  const std::array<std::tuple<const at::Tensor*, const at::Tensor*, double>, 2> updates{
      std::make_tuple(&running_mean, &mean, 1.0), std::make_tuple(&running_var, &var, unbias)};
  for (const auto& [running, batch, factor] : updates) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, running->scalar_type(),
                                    "batch_norm_update_stats_cuda", [&] {
      update_stat_kernel<scalar_t><<<blocks_for(C), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
          running->mutable_data_ptr<scalar_t>(), batch->const_data_ptr<double>(), momentum, factor, C);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(convkit, CUDA, m) {
  m.impl("batch_norm_forward", &batch_norm_forward_cuda);
  m.impl("batch_norm_backward", &batch_norm_backward_cuda);
  m.impl("batch_norm_update_stats", &batch_norm_update_stats_cuda);
}

}  // namespace convkit
