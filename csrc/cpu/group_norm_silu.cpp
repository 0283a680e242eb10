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
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include "kernels.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <numeric>
#include <tuple>
#include <vector>

at::Tensor group_norm_silu_cpu(const at::Tensor& x, int64_t num_groups,
                               const std::optional<at::Tensor>& weight,
                               const std::optional<at::Tensor>& bias, double eps, bool silu,
                               const std::optional<at::Tensor>& channel_bias);

TORCH_LIBRARY_FRAGMENT(diffkernels, m) {
  m.def("group_norm_silu_cxx(Tensor x, int num_groups, Tensor? weight, Tensor? bias, float eps, "
        "bool silu, Tensor? channel_bias) -> Tensor");
}

TORCH_LIBRARY_IMPL(diffkernels, CPU, m) {
  m.impl("group_norm_silu_cxx", &group_norm_silu_cpu);
}

namespace {

void check_param(const std::optional<at::Tensor>& t, const char* name, at::IntArrayRef shape,
                 const at::Tensor& x) {
  if (!t.has_value()) return;
  TORCH_CHECK(t->device() == x.device(), "group_norm_silu_cxx: ", name, " must be on ",
              x.device(), ", got ", t->device());
  TORCH_CHECK(t->sizes() == shape, "group_norm_silu_cxx: ", name, " must have shape ", shape,
              ", got ", t->sizes());
  TORCH_CHECK(t->scalar_type() == x.scalar_type() || t->scalar_type() == at::kFloat,
              "group_norm_silu_cxx: ", name, " must have x's dtype or float32, got ",
              t->scalar_type());
  TORCH_CHECK(t->is_contiguous(), "group_norm_silu_cxx: ", name, " must be contiguous");
}

std::optional<at::Tensor> as_float_param(const std::optional<at::Tensor>& t) {
  if (!t.has_value()) return std::nullopt;
  return t->to(at::kFloat).contiguous();
}

}  // namespace

at::Tensor group_norm_silu_cpu(const at::Tensor& x, int64_t num_groups,
                               const std::optional<at::Tensor>& weight,
                               const std::optional<at::Tensor>& bias, double eps, bool silu,
                               const std::optional<at::Tensor>& channel_bias) {
  TORCH_CHECK(x.dim() >= 3, "group_norm_silu_cxx: x must be [N, C, *spatial] (rank >= 3), got "
              "shape ", x.sizes());
  TORCH_CHECK(x.device().is_cpu(), "group_norm_silu_cxx: x must be a CPU tensor, got ",
              x.device());
  const auto dtype = x.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
              "group_norm_silu_cxx: x must be float32, float16 or bfloat16, got ", dtype);
  const int64_t N = x.size(0), C = x.size(1);
  TORCH_CHECK(num_groups > 0 && C % num_groups == 0, "group_norm_silu_cxx: num_groups must be "
              "positive and divide C=", C, ", got ", num_groups);
  TORCH_CHECK(eps >= 0, "group_norm_silu_cxx: eps must be >= 0, got ", eps);
  check_param(weight, "weight", {C}, x);
  check_param(bias, "bias", {C}, x);
  check_param(channel_bias, "channel_bias", {N, C}, x);

  const bool contiguous = x.is_contiguous();
  at::MemoryFormat format = at::MemoryFormat::Contiguous;
  if (!contiguous) {
    format = x.dim() == 4 ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::ChannelsLast3d;
    TORCH_CHECK((x.dim() == 4 || x.dim() == 5) && x.is_contiguous(format),
                "group_norm_silu_cxx: x must be contiguous, or channels_last (4-D) / "
                "channels_last_3d (5-D), got strides ", x.strides());
  }
  if (x.numel() == 0) return at::empty_like(x, x.options(), format);

  at::Tensor y = at::empty_like(x, x.options(), format);
  const auto w = as_float_param(weight), b = as_float_param(bias),
             cb = as_float_param(channel_bias);
  const diffkernels::cpu::GroupNormParams p{w ? w->const_data_ptr<float>() : nullptr,
                 b ? b->const_data_ptr<float>() : nullptr,
                 cb ? cb->const_data_ptr<float>() : nullptr, eps};
  DK_CPU_KERNEL(group_norm_silu_kernel)(x, y, !contiguous, num_groups, silu, p);
  return y;
}
