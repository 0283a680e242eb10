// diffkernels::diffusion_step: one DDPM/DDIM update (CFG combine, x0, clip / dynamic threshold,
// posterior mean, noise) as one operator, and diffkernels::dynamic_threshold, the per-sample
// quantile scale it takes. The math is reference.diffusion_step's (its docstring is the spec);
// the kernels are csrc/cpu/diffusion_step.cpp and csrc/cuda/diffusion_step.cu.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "backend.h"
#include "checks.h"
#include "forward_only.h"
#include "kernels.h"

namespace diffkernels {
namespace {

constexpr int64_t kNumCoeffs = 11;
using Outputs = std::tuple<at::Tensor, at::Tensor>;

void check_args(const at::Tensor& model_output, const at::Tensor& sample,
                const std::optional<at::Tensor>& noise,
                const std::optional<at::Tensor>& threshold, c10::ArrayRef<double> coeffs,
                int64_t variance_mode, double clip_range, bool cfg,
                const std::optional<at::Tensor>& device_coeffs) {
  check_defined("model_output", model_output);
  check_defined("sample", sample);
  TORCH_CHECK_VALUE(sample.dim() >= 2, "sample: expected rank >= 2 [B, C, *spatial], got shape ",
                    sample.sizes());
  check_dtype("sample", sample, kFloatDtypes);
  TORCH_CHECK_TYPE(model_output.scalar_type() == sample.scalar_type(),
                   "model_output: expected dtype torch.", dtype_name(sample.scalar_type()),
                   " (the dtype of sample), got torch.", dtype_name(model_output.scalar_type()));
  check_device("model_output", model_output, sample, "sample");
  TORCH_CHECK_VALUE(variance_mode >= 0 && variance_mode <= 2, "variance_mode: expected one of "
                    "[0, 1, 2] (scalar, learned, learned_range), got ", variance_mode);
  const int64_t b = sample.size(0), c = sample.size(1);
  const int64_t want_b = cfg ? 2 * b : b, want_c = variance_mode == 0 ? c : 2 * c;
  const auto spatial = sample.sizes().slice(2);
  if (model_output.dim() != sample.dim() || model_output.size(0) != want_b ||
      model_output.sizes().slice(2) != spatial) {
    std::vector<int64_t> want{want_b, want_c};
    want.insert(want.end(), spatial.begin(), spatial.end());
    TORCH_CHECK_VALUE(false, "model_output: expected shape ",
                      cfg ? "[2B, ...] (both CFG halves, cfg=True)" : "[B, ...]", " = ",
                      at::IntArrayRef(want), " for sample ", sample.sizes(), ", got ",
                      model_output.sizes());
  }
  const int64_t got_c = model_output.size(1);
  if (got_c != want_c) {
    TORCH_CHECK_VALUE(got_c != 2 * c, "model_output: has 2C = ", 2 * c, " channels (a learned "
                      "variance) but variance_mode is scalar: expected ", c, " channels, or a "
                      "learned variance_mode");
    const char* mode = variance_mode == 1 ? "learned" : "learned_range";
    if (want_c == c)
      TORCH_CHECK_VALUE(false, "model_output: expected ", want_c, " channels (C = ", c,
                        ") for sample ", sample.sizes(), ", got ", got_c);
    TORCH_CHECK_VALUE(false, "model_output: expected ", want_c, " channels (2C: mean and "
                      "variance, variance_mode ", mode, ") for sample ", sample.sizes(),
                      ", got ", got_c);
  }
  if (noise.has_value()) {
    TORCH_CHECK_VALUE(noise->sizes() == sample.sizes(), "noise: expected shape ", sample.sizes(),
                      " (sample's), got ", noise->sizes());
    TORCH_CHECK_TYPE(noise->scalar_type() == sample.scalar_type(), "noise: expected dtype torch.",
                     dtype_name(sample.scalar_type()), " (the dtype of sample), got torch.",
                     dtype_name(noise->scalar_type()));
    check_device("noise", *noise, sample, "sample");
  }
  if (threshold.has_value()) {
    TORCH_CHECK_VALUE(threshold->dim() == 1 && threshold->size(0) == b, "threshold: expected "
                      "shape [B] = [", b, "] (one scale per sample), got ", threshold->sizes());
    check_dtype("threshold", *threshold, {at::kFloat});
    check_device("threshold", *threshold, sample, "sample");
  }
  if (device_coeffs.has_value()) {
    TORCH_CHECK_VALUE(coeffs.empty(), "coeffs: expected [] with device_coeffs (the kernel reads "
                      "k0..k10 from device_coeffs), got ", coeffs.size(), " floats");
    TORCH_CHECK_VALUE(device_coeffs->dim() == 1 && device_coeffs->size(0) == kNumCoeffs,
                      "device_coeffs: expected shape [", kNumCoeffs, "] (k0..k10), got ",
                      device_coeffs->sizes());
    check_dtype("device_coeffs", *device_coeffs, {at::kFloat});
    check_device("device_coeffs", *device_coeffs, sample, "sample");
  } else {
    TORCH_CHECK_VALUE(static_cast<int64_t>(coeffs.size()) == kNumCoeffs, "coeffs: expected ",
                      kNumCoeffs, " floats k0..k10, got ", coeffs.size());
  }
  TORCH_CHECK_VALUE(clip_range >= 0, "clip_range: expected >= 0 (0 = no clipping), got ",
                    py_float(clip_range));
}

std::optional<at::Tensor> contiguous(const std::optional<at::Tensor>& t) {
  return t.has_value() ? std::optional<at::Tensor>(t->contiguous()) : std::nullopt;
}

Outputs diffusion_step(const at::Tensor& model_output_, const at::Tensor& sample_,
                       const std::optional<at::Tensor>& noise_,
                       const std::optional<at::Tensor>& threshold_, c10::ArrayRef<double> coeffs,
                       int64_t variance_mode, double clip_range, double guidance_scale,
                       bool cfg, const std::optional<at::Tensor>& device_coeffs_) {
  check_args(model_output_, sample_, noise_, threshold_, coeffs, variance_mode, clip_range, cfg,
             device_coeffs_);
  if (sample_.numel() == 0)
    return {at::empty(sample_.sizes(), sample_.options()),
            at::empty(sample_.sizes(), sample_.options())};
  // Kernels see contiguous tensors; the outputs are contiguous in sample's dtype.
  const at::Tensor model_output = model_output_.contiguous(), sample = sample_.contiguous();
  const auto noise = contiguous(noise_), threshold = contiguous(threshold_);
  const auto device_coeffs = contiguous(device_coeffs_);
  const bool kernel_dtype = is_kernel_dtype(sample.scalar_type());
  const Backend b = route(sample.device().type(), kernel_dtype, kernel_dtype);
  if (b == Backend::Cpu) {
    // Host memory: read the coefficients here, the kernel takes them by value.
    std::vector<double> host_coeffs(coeffs.begin(), coeffs.end());
    if (device_coeffs.has_value()) {
      const float* k = device_coeffs->const_data_ptr<float>();
      host_coeffs.assign(k, k + kNumCoeffs);
    }
    return diffusion_step_cpu(model_output, sample, noise, threshold, host_coeffs,
                              variance_mode, clip_range, guidance_scale, cfg);
  }
#ifdef DIFFKERNELS_WITH_CUDA
  if (b == Backend::Cuda)
    return diffusion_step_cuda(model_output, sample, noise, threshold, coeffs, variance_mode,
                               clip_range, guidance_scale, cfg,
                               device_coeffs ? device_coeffs->const_data_ptr<float>() : nullptr);
#endif
  static const auto python = python_backend_op("diffkernels::_diffusion_step_backend")
      .typed<Outputs(c10::string_view, const at::Tensor&, const at::Tensor&,
                     const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
                     c10::ArrayRef<double>, int64_t, double, double, bool,
                     const std::optional<at::Tensor>&)>();
  return python.call(backend_name(b), model_output, sample, noise, threshold, coeffs,
                     variance_mode, clip_range, guidance_scale, cfg, device_coeffs);
}

Outputs diffusion_step_autograd(const at::Tensor& model_output, const at::Tensor& sample,
                                const std::optional<at::Tensor>& noise,
                                const std::optional<at::Tensor>& threshold,
                                c10::ArrayRef<double> coeffs, int64_t variance_mode,
                                double clip_range, double guidance_scale, bool cfg,
                                const std::optional<at::Tensor>& device_coeffs) {
  static const auto op = c10::Dispatcher::singleton()
      .findSchemaOrThrow("diffkernels::diffusion_step", "")
      .typed<decltype(diffusion_step)>();
  Outputs out;
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    out = op.call(model_output, sample, noise, threshold, coeffs, variance_mode, clip_range,
                  guidance_scale, cfg, device_coeffs);
  }
  raise_at_backward("diffkernels::diffusion_step: backward is not implemented (forward-only "
                    "sampler step)", {std::get<0>(out), std::get<1>(out)}, model_output, sample,
                    noise, threshold);
  return out;
}

// torch.quantile(x, q, dim=1) (linear interpolation) with the rank computed on the host in
// fp32, as torch computes it: sort + two column reads + lerp, no device->host read.
at::Tensor quantile_rows(const at::Tensor& x, double q) {
  TORCH_CHECK_VALUE(q >= 0.0 && q <= 1.0, "dynamic_thresholding_ratio: expected a quantile in "
                    "[0, 1], got ", py_float(q));
  const int64_t n = x.size(1);
  if (n == 0) return at::full({x.size(0)}, NAN, x.options());
  const float rank = static_cast<float>(q) * static_cast<float>(n - 1);
  const int64_t lo = static_cast<int64_t>(std::floor(rank));
  const int64_t hi = std::min<int64_t>(static_cast<int64_t>(std::ceil(rank)), n - 1);
  const double weight = rank - static_cast<float>(lo);
  const at::Tensor sorted = std::get<0>(x.sort(1));
  const at::Tensor out = at::lerp(sorted.select(1, lo), sorted.select(1, hi), weight);
  // torch.quantile propagates NaN (sort puts NaN last, where a low rank would miss it).
  const at::Tensor last = sorted.select(1, n - 1);
  return at::where(last.isnan(), last, out);
}

// Imagen's dynamic-thresholding scale s per sample (fp32 [B]): the `ratio` quantile of |x0|,
// x0 = k0*x + k1*m with m the CFG-combined model output, clamped to [1, max_value].
at::Tensor dynamic_threshold(const at::Tensor& model_output, const at::Tensor& sample,
                             c10::ArrayRef<double> coeffs, double ratio, double max_value,
                             double guidance_scale, bool cfg) {
  TORCH_CHECK_VALUE(static_cast<int64_t>(coeffs.size()) == kNumCoeffs, "coeffs: expected ",
                    kNumCoeffs, " floats k0..k10, got ", coeffs.size());
  const int64_t b = sample.size(0), c = sample.size(1);
  const at::Tensor mo = model_output.to(at::kFloat);
  at::Tensor m = mo.slice(0, 0, b).slice(1, 0, c);
  if (cfg) m = m + guidance_scale * (mo.slice(0, b).slice(1, 0, c) - m);
  const at::Tensor x0 = coeffs[0] * sample.to(at::kFloat) + coeffs[1] * m;
  return quantile_rows(x0.abs().reshape({b, -1}), ratio).clamp(1.0, max_value);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(diffkernels, m) {
  m.def("diffusion_step(Tensor model_output, Tensor sample, Tensor? noise, Tensor? threshold, "
        "float[] coeffs, int variance_mode=0, float clip_range=0., float guidance_scale=1., "
        "bool cfg=False, Tensor? device_coeffs=None) -> (Tensor, Tensor)");
  // Plain ATen ops (CompositeImplicitAutograd): torch.compile traces through it.
  m.def("dynamic_threshold(Tensor model_output, Tensor sample, float[] coeffs, float ratio, "
        "float max_value, float guidance_scale=1., bool cfg=False) -> Tensor",
        &dynamic_threshold);
}

TORCH_LIBRARY_IMPL(diffkernels, CPU, m) { m.impl("diffusion_step", &diffusion_step); }
TORCH_LIBRARY_IMPL(diffkernels, CUDA, m) { m.impl("diffusion_step", &diffusion_step); }
TORCH_LIBRARY_IMPL(diffkernels, Autograd, m) {
  m.impl("diffusion_step", &diffusion_step_autograd);
}

}  // namespace diffkernels
