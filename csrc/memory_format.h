// The memory format of the ops' outputs, torch's rules, for every backend (the fake kernels
// in convkit/ops.py apply the same ones):
//  * conv2d: channels-last when the input or the weight suggests it (at::suggest_memory_format,
//    as torch's CPU and cuDNN convolutions decide), otherwise contiguous. Its gradients: the
//    input's in that format, the weight's in the weight's own.
//  * batch norm (and the synchronised ops): the input's suggested format (channels_last for
//    4-D, channels_last_3d for 5-D inputs that are laid out so), outputs and input gradient
//    alike.
// A kernel that computes only in contiguous memory (CUDA, the emulator) converts its outputs
// to the format at the end (restride_to); the CPU kernels compute in channels-last memory
// directly.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/MemoryFormat.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace convkit {

inline bool is_channels_last_format(at::MemoryFormat format) {
  return format == at::MemoryFormat::ChannelsLast || format == at::MemoryFormat::ChannelsLast3d;
}

inline at::MemoryFormat conv2d_memory_format(const at::Tensor& input, const at::Tensor& weight) {
  const bool channels_last = input.suggest_memory_format() == at::MemoryFormat::ChannelsLast ||
                             weight.suggest_memory_format() == at::MemoryFormat::ChannelsLast;
  return channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

inline at::MemoryFormat batch_norm_memory_format(const at::Tensor& input) {
  return input.suggest_memory_format();
}

// The strides at::empty gives `sizes` in `format`.
inline std::vector<int64_t> format_strides(at::IntArrayRef sizes, at::MemoryFormat format) {
  switch (format) {
    case at::MemoryFormat::ChannelsLast: return c10::get_channels_last_strides_2d(sizes);
    case at::MemoryFormat::ChannelsLast3d: return c10::get_channels_last_strides_3d(sizes);
    default: {
      std::vector<int64_t> strides(sizes.size());
      int64_t stride = 1;
      for (size_t d = sizes.size(); d-- > 0;) {
        strides[d] = stride;
        stride *= std::max<int64_t>(sizes[d], 1);
      }
      return strides;
    }
  }
}

// t in `format` with torch's strides (those of at::empty in the format): itself when it has
// them, a view of its memory when it is already laid out so and only the strides of size-1
// dimensions differ (a [O, C, 1, 1] weight gradient), a copy otherwise.
inline at::Tensor restride_to(const at::Tensor& t, at::MemoryFormat format) {
  if (!t.is_contiguous(format)) return t.contiguous(format);
  const std::vector<int64_t> strides = format_strides(t.sizes(), format);
  if (t.strides() == at::IntArrayRef(strides)) return t;
  return t.as_strided(t.sizes(), strides, t.storage_offset());
}

// The sizes of a channels-last tensor's memory, outermost first: [N, spatial..., C].
inline std::vector<int64_t> channels_last_memory_sizes(at::IntArrayRef sizes) {
  std::vector<int64_t> memory{sizes[0]};
  for (size_t d = 2; d < sizes.size(); ++d) memory.push_back(sizes[d]);
  memory.push_back(sizes[1]);
  return memory;
}

// The permutation that views memory of channels_last_memory_sizes(sizes) as `sizes`.
inline std::vector<int64_t> channels_last_view_permutation(int64_t dim) {
  std::vector<int64_t> order{0, dim - 1};
  for (int64_t d = 1; d < dim - 1; ++d) order.push_back(d);
  return order;
}

// An uninitialised tensor of `sizes` in `format` from `empty(memory_sizes, options)`, an
// allocator of contiguous tensors (the CPU's block cache): the channels-last one is a permuted
// view of contiguous [N, spatial..., C] memory, with the strides at::empty gives that format.
template <typename Empty>
at::Tensor empty_in_format(at::IntArrayRef sizes, const at::TensorOptions& options,
                           at::MemoryFormat format, Empty empty) {
  if (!is_channels_last_format(format)) return empty(sizes, options);
  const std::vector<int64_t> memory = channels_last_memory_sizes(sizes);
  return empty(at::IntArrayRef(memory), options)
      .permute(channels_last_view_permutation(static_cast<int64_t>(sizes.size())));
}

}  // namespace convkit
