// group_norm_silu on CPU: y = silu(group_norm(x + channel_bias[n, c], num_groups, weight, bias)).
//
// Two passes over x, both parallel (at::parallel_for) and SIMD (at::vec::Vectorized):
//  1. statistics, x read once from memory: x is cut into L1/L2-sized blocks; each block gets
//     an exact two-pass mean/M2 per channel (the second pass hits cache), and blocks, channels
//     and groups are merged with Chan's formula in fp64. No E[x^2] - E[x]^2 cancellation, so
//     x = 1e4 + noise and fp16 inputs near 6e4 are exact.
//  2. normalise + affine + SiLU, folded per (n, c) into y = (x - center) * scale + shift.
//     center is the group mean (minus channel_bias) rounded to fp32; what it loses in rounding
//     goes into shift, so a large common offset costs no precision.
// Layouts: contiguous [N, C, S] (one task per (n, group); the group is normalised right after
// its statistics, while it is in L2), channels_last(_3d) = [N, S, C] (tasks over ranges of
// spatial rows with per-channel partial moments, merged afterwards). The normalise pass walks
// each task's data backwards, so the part the statistics pass read last comes from cache.
// fp16/bf16 are converted to fp32 on load and back on store.
#include <ATen/ATen.h>

#include <optional>

#include "../kernels.h"
#include "kernels.h"

namespace diffkernels {
namespace {

std::optional<at::Tensor> as_float_param(const std::optional<at::Tensor>& t) {
  if (!t.has_value()) return std::nullopt;
  return t->to(at::kFloat).contiguous();
}

}  // namespace

// Called by csrc/group_norm_silu.cpp with checked, non-empty arguments: x contiguous or
// channels_last(_3d), parameters contiguous.
at::Tensor group_norm_silu_cpu(const at::Tensor& x, int64_t num_groups,
                               const std::optional<at::Tensor>& weight,
                               const std::optional<at::Tensor>& bias, double eps, bool silu,
                               const std::optional<at::Tensor>& channel_bias) {
  const bool channels_last = !x.is_contiguous();
  const auto format = !channels_last ? at::MemoryFormat::Contiguous
                      : x.dim() == 4 ? at::MemoryFormat::ChannelsLast
                                     : at::MemoryFormat::ChannelsLast3d;
  at::Tensor y = at::empty_like(x, x.options(), format);
  const auto w = as_float_param(weight), b = as_float_param(bias),
             cb = as_float_param(channel_bias);
  const cpu::GroupNormParams p{w ? w->const_data_ptr<float>() : nullptr,
                               b ? b->const_data_ptr<float>() : nullptr,
                               cb ? cb->const_data_ptr<float>() : nullptr, eps};
  DK_CPU_KERNEL(group_norm_silu_kernel)(x, y, channels_last, num_groups, silu, p);
  return y;
}

}  // namespace diffkernels
