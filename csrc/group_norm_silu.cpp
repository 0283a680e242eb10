// diffkernels::group_norm_silu: silu(group_norm(x + channel_bias[n, c], num_groups, weight,
// bias, eps)), one operator. Checks, layout preparation and the backend route live here; the
// kernels are csrc/cpu/group_norm_silu.cpp and csrc/cuda/group_norm_silu.cu.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "backend.h"
#include "checks.h"
#include "forward_only.h"
#include "kernels.h"

namespace diffkernels {
namespace {

at::MemoryFormat memory_format_of(const at::Tensor& x) {
  // channels_last(_3d) when x is laid out so (and not also plain contiguous): what y keeps.
  if (x.is_contiguous()) return at::MemoryFormat::Contiguous;
  if (x.dim() == 4 && x.is_contiguous(at::MemoryFormat::ChannelsLast))
    return at::MemoryFormat::ChannelsLast;
  if (x.dim() == 5 && x.is_contiguous(at::MemoryFormat::ChannelsLast3d))
    return at::MemoryFormat::ChannelsLast3d;
  return at::MemoryFormat::Contiguous;
}

void check_args(const at::Tensor& x, int64_t num_groups, const std::optional<at::Tensor>& weight,
                const std::optional<at::Tensor>& bias, double eps,
                const std::optional<at::Tensor>& channel_bias) {
  check_defined("x", x);
  TORCH_CHECK_VALUE(x.dim() >= 3, "x: expected rank >= 3 [N, C, *spatial], got shape ",
                    x.sizes());
  check_dtype("x", x, kFloatDtypes);
  const int64_t n = x.size(0), c = x.size(1);
  TORCH_CHECK_VALUE(num_groups > 0, "num_groups: expected a positive int, got ", num_groups);
  TORCH_CHECK_VALUE(c % num_groups == 0, "num_groups: C=", c, " is not divisible by num_groups=",
                    num_groups);
  TORCH_CHECK_VALUE(eps >= 0, "eps: expected eps >= 0, got ", py_float(eps));
  check_param("weight", weight, {c}, x, kFloatDtypes, "x");
  check_param("bias", bias, {c}, x, kFloatDtypes, "x");
  check_param("channel_bias", channel_bias, {n, c}, x, kFloatDtypes, "x");
}

// Kernels see small parameters contiguous, in x's dtype or fp32.
std::optional<at::Tensor> prepared(const std::optional<at::Tensor>& p, at::ScalarType dtype) {
  if (!p.has_value()) return p;
  const auto t = p->scalar_type();
  return (t == dtype || t == at::kFloat ? *p : p->to(at::kFloat)).contiguous();
}

at::Tensor group_norm_silu(const at::Tensor& x_, int64_t num_groups,
                           const std::optional<at::Tensor>& weight_,
                           const std::optional<at::Tensor>& bias_, double eps, bool silu,
                           const std::optional<at::Tensor>& channel_bias_) {
  check_args(x_, num_groups, weight_, bias_, eps, channel_bias_);
  const auto format = memory_format_of(x_);
  if (x_.numel() == 0) return at::empty_like(x_, x_.options(), format);
  const at::Tensor x = x_.contiguous(format);
  const auto weight = prepared(weight_, x.scalar_type()), bias = prepared(bias_, x.scalar_type()),
             channel_bias = prepared(channel_bias_, x.scalar_type());
  const bool kernel_dtype = is_kernel_dtype(x.scalar_type());
  const Backend b = route(x.device().type(), kernel_dtype, kernel_dtype);
  if (b == Backend::Cpu) return group_norm_silu_cpu(x, num_groups, weight, bias, eps, silu, channel_bias);
#ifdef DIFFKERNELS_WITH_CUDA
  if (b == Backend::Cuda)
    return group_norm_silu_cuda(x, num_groups, weight, bias, eps, silu, channel_bias);
#endif
  static const auto python = python_backend_op("diffkernels::_group_norm_silu_backend")
      .typed<at::Tensor(c10::string_view, const at::Tensor&, int64_t,
                        const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
                        double, bool, const std::optional<at::Tensor>&)>();
  return python.call(backend_name(b), x, num_groups, weight, bias, eps, silu, channel_bias);
}

at::Tensor group_norm_silu_autograd(const at::Tensor& x, int64_t num_groups,
                                    const std::optional<at::Tensor>& weight,
                                    const std::optional<at::Tensor>& bias, double eps, bool silu,
                                    const std::optional<at::Tensor>& channel_bias) {
  static const auto op = c10::Dispatcher::singleton()
      .findSchemaOrThrow("diffkernels::group_norm_silu", "")
      .typed<decltype(group_norm_silu)>();
  at::Tensor y;
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    y = op.call(x, num_groups, weight, bias, eps, silu, channel_bias);
  }
  raise_at_backward("diffkernels::group_norm_silu: backward is not implemented (forward-only "
                    "inference kernel)", y, x, weight, bias, channel_bias);
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(diffkernels, m) {
  m.def("group_norm_silu(Tensor x, int num_groups, Tensor? weight=None, Tensor? bias=None, "
        "float eps=1e-05, bool silu=True, Tensor? channel_bias=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(diffkernels, CPU, m) { m.impl("group_norm_silu", &group_norm_silu); }
TORCH_LIBRARY_IMPL(diffkernels, CUDA, m) { m.impl("group_norm_silu", &group_norm_silu); }
TORCH_LIBRARY_IMPL(diffkernels, Autograd, m) {
  m.impl("group_norm_silu", &group_norm_silu_autograd);
}

}  // namespace diffkernels
