// The per-channel tensors the CPU batch-norm ops hand their loops (batch_norm.cpp,
// sync_batch_norm.cpp), and the per-channel coefficients they compute from them.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/full.h>

#include <cstdint>
#include <optional>
#include <vector>

#include "../batch_norm.h"

namespace convkit::cpu_batch_norm {

// A per-channel tensor in the accumulation type, contiguous: itself when it already is (the
// usual case), without a trip through the dispatcher. At the chapter's sizes an op's fixed
// cost is a third of its time.
inline at::Tensor as_acc_contiguous(const at::Tensor& t, at::ScalarType acc_type) {
  if (t.scalar_type() == acc_type && t.is_contiguous()) return t;
  return t.to(acc_type).contiguous();
}

// Per-channel parameter in the accumulation type, or `fill` when the tensor is absent.
inline at::Tensor per_channel_or(const std::optional<at::Tensor>& t, int64_t channels,
                                 at::ScalarType acc_type, double fill,
                                 const at::TensorOptions& options) {
  if (t.has_value() && t->defined()) return as_acc_contiguous(*t, acc_type);
  return at::full({channels}, fill, options.dtype(acc_type));
}

// Every channel's ChannelAffine (csrc/batch_norm.h) as three rows: invstd, scale, shift.
template <typename acc_t>
struct AffineRows {
  std::vector<acc_t> invstd, scale, shift;
};

template <typename acc_t>
AffineRows<acc_t> affine_rows(const acc_t* mean, const acc_t* var, const acc_t* weight,
                              const acc_t* bias, int64_t C, double eps) {
  AffineRows<acc_t> rows{std::vector<acc_t>(C), std::vector<acc_t>(C), std::vector<acc_t>(C)};
  for (int64_t c = 0; c < C; ++c) {
    const ChannelAffine<acc_t> affine = channel_affine(mean[c], var[c], weight[c], bias[c], eps);
    rows.invstd[c] = affine.invstd;
    rows.scale[c] = affine.scale;
    rows.shift[c] = affine.shift;
  }
  return rows;
}

}  // namespace convkit::cpu_batch_norm
