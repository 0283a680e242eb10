// diffusion_step_cxx on CPU: one DDPM/DDIM sampler step in one pass over the elements: the CFG
// combine, x0 prediction, clip / dynamic threshold, the affine update and the noise term. The
// math is the generic affine step of diffkernels/reference.py::diffusion_step (its docstring is
// the spec); the scheduler computes the 11 per-step coefficients on the host.
//
// Layout (all contiguous): sample x [B, C, *S] is B rows of n = C*prod(S) elements.
// model_output [B or 2B (cfg: uncond half first), C or 2C, *S] is rows of mo_row = n or 2n, so
// for the element (b, j) of x: uncond = mo[b*mo_row + j], cond = mo[(B+b)*mo_row + j], and the
// learned variance (channels C..2C, of the cond half with cfg) is 'that row' + n + j.
#include <torch/library.h>

#include "kernels.h"

TORCH_LIBRARY_FRAGMENT(diffkernels, m) {
  m.def(
      "diffusion_step_cxx(Tensor model_output, Tensor sample, Tensor? noise, Tensor? threshold, "
      "float[] coeffs, int variance_mode, float clip_range, float guidance_scale, bool cfg) "
      "-> (Tensor, Tensor)");
}

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <vector>

namespace diffkernels {

// Shared with csrc/cuda/diffusion_step.cu: every check that keeps the kernels in bounds.
// Errors name the argument (libtorch users call the op directly, without the Python checks).
void check_diffusion_step_args(const at::Tensor& model_output, const at::Tensor& sample,
                               const std::optional<at::Tensor>& noise,
                               const std::optional<at::Tensor>& threshold,
                               c10::ArrayRef<double> coeffs, int64_t variance_mode, bool cfg) {
  const auto dt = sample.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16,
              "diffusion_step_cxx: sample: expected dtype float32, float16 or bfloat16, got ", dt);
  TORCH_CHECK(sample.dim() >= 2, "diffusion_step_cxx: sample: expected shape [B, C, *spatial], "
              "got ", sample.sizes());
  const int64_t B = sample.size(0), C = sample.size(1);
  TORCH_CHECK(model_output.scalar_type() == dt, "diffusion_step_cxx: model_output: expected ",
              "dtype ", dt, " (the dtype of sample), got ", model_output.scalar_type());
  TORCH_CHECK(model_output.device() == sample.device(), "diffusion_step_cxx: model_output: ",
              "expected a tensor on ", sample.device(), " (the device of sample), got ",
              model_output.device());
  TORCH_CHECK(model_output.dim() == sample.dim() &&
                  model_output.size(0) == (cfg ? 2 * B : B) &&
                  (model_output.size(1) == C || model_output.size(1) == 2 * C) &&
                  model_output.sizes().slice(2) == sample.sizes().slice(2),
              "diffusion_step_cxx: model_output: expected shape [", cfg ? "2B" : "B",
              ", C or 2C, *spatial] for sample of shape [B, C, *spatial] = ", sample.sizes(),
              ", got ", model_output.sizes());
  TORCH_CHECK(variance_mode >= 0 && variance_mode <= 2,
              "diffusion_step_cxx: variance_mode: expected 0 (scalar), 1 (learned) or 2 "
              "(learned_range), got ", variance_mode);
  TORCH_CHECK(variance_mode == 0 || !noise.has_value() || model_output.size(1) == 2 * C,
              "diffusion_step_cxx: model_output: a learned variance_mode needs 2C = ", 2 * C,
              " channels (the variance in channels C..2C), got ", model_output.size(1));
  TORCH_CHECK(coeffs.size() == 11, "diffusion_step_cxx: coeffs: expected 11 floats, got ",
              coeffs.size());
  if (noise.has_value()) {
    TORCH_CHECK(noise->sizes() == sample.sizes(), "diffusion_step_cxx: noise: expected shape ",
                sample.sizes(), " (the shape of sample), got ", noise->sizes());
    TORCH_CHECK(noise->scalar_type() == dt, "diffusion_step_cxx: noise: expected dtype ", dt,
                " (the dtype of sample), got ", noise->scalar_type());
    TORCH_CHECK(noise->device() == sample.device(), "diffusion_step_cxx: noise: expected a ",
                "tensor on ", sample.device(), " (the device of sample), got ", noise->device());
  }
  if (threshold.has_value()) {
    TORCH_CHECK(threshold->dim() == 1 && threshold->size(0) == B,
                "diffusion_step_cxx: threshold: expected shape [", B, "] (one per sample), got ",
                threshold->sizes());
    TORCH_CHECK(threshold->scalar_type() == at::kFloat,
                "diffusion_step_cxx: threshold: expected dtype float32, got ",
                threshold->scalar_type());
    TORCH_CHECK(threshold->device() == sample.device(), "diffusion_step_cxx: threshold: ",
                "expected a tensor on ", sample.device(), " (the device of sample), got ",
                threshold->device());
  }
}

}  // namespace diffkernels

namespace diffkernels {
namespace {

using Params = cpu::StepParams;

std::tuple<at::Tensor, at::Tensor> diffusion_step_cpu(
    const at::Tensor& model_output_, const at::Tensor& sample_,
    const std::optional<at::Tensor>& noise_, const std::optional<at::Tensor>& threshold_,
    c10::ArrayRef<double> coeffs, int64_t variance_mode, double clip_range,
    double guidance_scale, bool cfg) {
  check_diffusion_step_args(model_output_, sample_, noise_, threshold_, coeffs, variance_mode,
                            cfg);
  // The Python op hands over contiguous tensors; this makes direct C++ calls safe too.
  const at::Tensor sample = sample_.contiguous(), model_output = model_output_.contiguous();
  const at::Tensor noise = noise_.has_value() ? noise_->contiguous() : at::Tensor();
  const at::Tensor threshold = threshold_.has_value() ? threshold_->contiguous() : at::Tensor();
  Params p;
  for (int i = 0; i < 11; ++i) p.k[i] = static_cast<float>(coeffs[i]);
  p.clip_range = static_cast<float>(clip_range);
  p.guidance = static_cast<float>(guidance_scale);
  p.variance_mode = variance_mode;
  p.cfg = cfg;
  p.clip = clip_range > 0;
  if (sample.numel() == 0) return {at::empty_like(sample), at::empty_like(sample)};
  at::Tensor prev = at::empty_like(sample), x0 = at::empty_like(sample);
  DK_CPU_KERNEL(diffusion_step_kernel)(
      p, model_output, sample, noise,
      threshold.defined() ? threshold.const_data_ptr<float>() : nullptr, prev, x0);
  return {prev, x0};
}

}  // namespace

TORCH_LIBRARY_IMPL(diffkernels, CPU, m) {
  m.impl("diffusion_step_cxx", &diffusion_step_cpu);
}

}  // namespace diffkernels
