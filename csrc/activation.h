// The activations fused after batch norm, per element, shared by the CPU and CUDA kernels:
// none, relu, hardtanh (ReLU6 is hardtanh(0, 6), as in torch), leaky_relu, silu, hardswish.
//
// Each one mirrors torch's own activation applied to torch's batch-norm output: the input z
// is the normalised value rounded to the tensor's dtype (what F.batch_norm would store), the
// arithmetic is in acc_t, and the result is rounded once. The backward's dy * f'(z) follows
// torch's CPU *_backward kernels as their vectorised loops compute them (their scalar tails
// and CUDA kernels disagree at a NaN z and at hardswish's z = 3; the vectorised loops are
// what nearly every element of a real tensor meets): hardtanh passes dy only for min < z <
// max (0 at the kinks and at NaN); hardswish gives 0 below -3, dy from 3 on and dy * (z / 3 +
// 1/2) between (NaN at NaN); leaky_relu and relu take the z > 0 branch only for z > 0, relu
// passing dy at NaN. A NaN z gives a NaN output for every activation.
//
// Every kernel takes the activation as a compile-time Activation (CPU: a loop with a runtime
// switch inside stays scalar) or, on CUDA, as a runtime value the whole grid shares
// (activate_runtime): the same functions either way, so forward and backward agree bit for bit.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "conv2d.h"  // CONVKIT_HOST_DEVICE

// Forced inline on the host: called from a loop, an out-of-line call leaves it scalar.
#if defined(__CUDACC__)
#define CONVKIT_FORCE_INLINE __forceinline__
#else
#define CONVKIT_FORCE_INLINE inline __attribute__((always_inline))
#endif

namespace convkit {

enum class Activation : int32_t { none, relu, hardtanh, leaky_relu, silu, hardswish };

// The activation's parameters: hardtanh (alpha, beta) = (min_val, max_val); leaky_relu alpha =
// negative_slope; the others have none.
template <typename acc_t>
struct ActivationParams {
  acc_t alpha;
  acc_t beta;
};

// exp(x) for float by range reduction and a degree-7 polynomial: within 2 ulp of the correctly
// rounded value, inf above ~88.7, 0 below ~-103.9, NaN for NaN. Branch-free, so a loop calling
// it vectorises (the C library's expf is a call GCC cannot vectorise without -ffast-math:
// SiLU at 5 ns an element, 20x the memory pass it sits in).
#if !defined(__CUDA_ARCH__)
// 2^k for an integral k in [-126, 127]: the exponent field of (k + 1.5 * 2^23 + 127)'s low bits
// shifted into place.
CONVKIT_FORCE_INLINE float power_of_two(float k) {
  const float biased = k + (12582912.0f + 127.0f);
  uint32_t bits;
  std::memcpy(&bits, &biased, sizeof bits);
  bits <<= 23;
  float result;
  std::memcpy(&result, &bits, sizeof result);
  return result;
}
#endif

CONVKIT_HOST_DEVICE CONVKIT_FORCE_INLINE float exp_float(float x) {
#if defined(__CUDA_ARCH__)
  return expf(x);
#else
  // Clamped so that 2^n stays two normal factors; comparisons keep NaN as it is.
  const float xc = x < -104.0f ? -104.0f : (x > 89.0f ? 89.0f : x);
  // n = round(xc / ln 2): adding 1.5 * 2^23 leaves the integer in the low mantissa bits.
  constexpr float kRound = 12582912.0f;
  const float n = (xc * 1.44269504088896341f + kRound) - kRound;
  // r = xc - n ln 2 in two steps: ln 2's high part has 9 significant bits, so n * hi (|n| <=
  // 150) is exact.
  float r = xc - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  // exp(r) for |r| <= ln(2) / 2: Taylor to r^7 (truncation 5e-9 relative).
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  // 2^n as 2^n1 * 2^n2 (n in [-150, 129]; each half a normal float's exponent).
  const float n1 = (n * 0.5f + kRound) - kRound;
  const float n2 = n - n1;
  return p * power_of_two(n1) * power_of_two(n2);
#endif
}

CONVKIT_HOST_DEVICE CONVKIT_FORCE_INLINE double exp_acc(double x) {
#if defined(__CUDA_ARCH__)
  return ::exp(x);
#else
  return std::exp(x);
#endif
}
CONVKIT_HOST_DEVICE CONVKIT_FORCE_INLINE float exp_acc(float x) { return exp_float(x); }

// f(z).
template <Activation kAct, typename acc_t>
CONVKIT_HOST_DEVICE CONVKIT_FORCE_INLINE acc_t activate(acc_t z, ActivationParams<acc_t> p) {
  if constexpr (kAct == Activation::relu) {
    return z < acc_t(0) ? acc_t(0) : z;
  } else if constexpr (kAct == Activation::hardtanh) {
    return z < p.alpha ? p.alpha : (z > p.beta ? p.beta : z);
  } else if constexpr (kAct == Activation::leaky_relu) {
    return z > acc_t(0) ? z : z * p.alpha;
  } else if constexpr (kAct == Activation::silu) {
    return z / (acc_t(1) + exp_acc(-z));
  } else if constexpr (kAct == Activation::hardswish) {
    const acc_t shifted = z + acc_t(3);
    const acc_t clamped =
        shifted < acc_t(0) ? acc_t(0) : (shifted > acc_t(6) ? acc_t(6) : shifted);
    return z * clamped / acc_t(6);
  } else {
    return z;
  }
}

// dy * f'(z), with torch's choices at the kinks.
template <Activation kAct, typename acc_t>
CONVKIT_HOST_DEVICE CONVKIT_FORCE_INLINE acc_t activation_gradient(acc_t z, acc_t dy,
                                                           ActivationParams<acc_t> p) {
  if constexpr (kAct == Activation::relu) {
    return z <= acc_t(0) ? acc_t(0) : dy;
  } else if constexpr (kAct == Activation::hardtanh) {
    return z > p.alpha && z < p.beta ? dy : acc_t(0);
  } else if constexpr (kAct == Activation::leaky_relu) {
    return z > acc_t(0) ? dy : dy * p.alpha;
  } else if constexpr (kAct == Activation::silu) {
    const acc_t sigmoid = acc_t(1) / (acc_t(1) + exp_acc(-z));
    return dy * sigmoid * (acc_t(1) + z * (acc_t(1) - sigmoid));
  } else if constexpr (kAct == Activation::hardswish) {
    return z < acc_t(-3) ? acc_t(0) : (z >= acc_t(3) ? dy : dy * (z / acc_t(3) + acc_t(0.5)));
  } else {
    return dy;
  }
}

// The batch-norm output z = x * scale + shift rounded to scalar_t, as an acc_t: the value the
// unfused torch activation would read.
template <typename scalar_t, typename acc_t>
CONVKIT_HOST_DEVICE CONVKIT_FORCE_INLINE acc_t normalized_value(scalar_t x, acc_t scale,
                                                              acc_t shift) {
  return static_cast<acc_t>(static_cast<scalar_t>(static_cast<acc_t>(x) * scale + shift));
}

// Runtime forms for kernels that take the activation as an argument (CUDA): a switch over the
// compile-time functions, uniform across a launch.
template <typename acc_t>
CONVKIT_HOST_DEVICE inline acc_t activate_runtime(Activation kind, acc_t z,
                                                  ActivationParams<acc_t> p) {
  switch (kind) {
    case Activation::relu: return activate<Activation::relu>(z, p);
    case Activation::hardtanh: return activate<Activation::hardtanh>(z, p);
    case Activation::leaky_relu: return activate<Activation::leaky_relu>(z, p);
    case Activation::silu: return activate<Activation::silu>(z, p);
    case Activation::hardswish: return activate<Activation::hardswish>(z, p);
    default: return z;
  }
}

template <typename acc_t>
CONVKIT_HOST_DEVICE inline acc_t activation_gradient_runtime(Activation kind, acc_t z, acc_t dy,
                                                             ActivationParams<acc_t> p) {
  switch (kind) {
    case Activation::relu: return activation_gradient<Activation::relu>(z, dy, p);
    case Activation::hardtanh: return activation_gradient<Activation::hardtanh>(z, dy, p);
    case Activation::leaky_relu: return activation_gradient<Activation::leaky_relu>(z, dy, p);
    case Activation::silu: return activation_gradient<Activation::silu>(z, dy, p);
    case Activation::hardswish: return activation_gradient<Activation::hardswish>(z, dy, p);
    default: return dy;
  }
}

// The activation an op was asked for, checked (activation_spec in checks.h): its kind and
// parameters in double, converted to acc_t by each kernel.
struct ActivationSpec {
  Activation kind;
  double alpha;
  double beta;

  template <typename acc_t>
  ActivationParams<acc_t> params() const {
    return {static_cast<acc_t>(alpha), static_cast<acc_t>(beta)};
  }
};

// Runs body(std::integral_constant<Activation, kind>{}) for a runtime kind: the host-side
// switch that picks each CPU loop's compile-time activation.
template <typename Body>
inline void dispatch_activation(Activation kind, Body&& body) {
  switch (kind) {
    case Activation::none: body(std::integral_constant<Activation, Activation::none>{}); break;
    case Activation::relu: body(std::integral_constant<Activation, Activation::relu>{}); break;
    case Activation::hardtanh:
      body(std::integral_constant<Activation, Activation::hardtanh>{});
      break;
    case Activation::leaky_relu:
      body(std::integral_constant<Activation, Activation::leaky_relu>{});
      break;
    case Activation::silu: body(std::integral_constant<Activation, Activation::silu>{}); break;
    case Activation::hardswish:
      body(std::integral_constant<Activation, Activation::hardswish>{});
      break;
  }
}

}  // namespace convkit
