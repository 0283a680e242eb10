// diffusion_step_cxx on CPU: one DDPM/DDIM sampler step in one pass over the elements: the CFG
// combine, x0 prediction, clip / dynamic threshold, the affine update and the noise term. The
// math is the generic affine step of diffkernels/reference.py::diffusion_step (its docstring is
// the spec); the scheduler computes the 11 per-step coefficients on the host.
//
// Layout (all contiguous): sample x [B, C, *S] is B rows of n = C*prod(S) elements.
// model_output [B or 2B (cfg: uncond half first), C or 2C, *S] is rows of mo_row = n or 2n, so
// for the element (b, j) of x: uncond = mo[b*mo_row + j], cond = mo[(B+b)*mo_row + j], and the
// learned variance (channels C..2C, of the cond half with cfg) is 'that row' + n + j.
#include <ATen/ATen.h>

#include <optional>
#include <tuple>

#include "../kernels.h"
#include "kernels.h"

namespace diffkernels {

// Called by csrc/diffusion_step.cpp with checked, contiguous, non-empty arguments.
std::tuple<at::Tensor, at::Tensor> diffusion_step_cpu(
    const at::Tensor& model_output, const at::Tensor& sample,
    const std::optional<at::Tensor>& noise, const std::optional<at::Tensor>& threshold,
    c10::ArrayRef<double> coeffs, int64_t variance_mode, double clip_range,
    double guidance_scale, bool cfg) {
  cpu::StepParams p;
  for (int i = 0; i < 11; ++i) p.k[i] = static_cast<float>(coeffs[i]);
  p.clip_range = static_cast<float>(clip_range);
  p.guidance = static_cast<float>(guidance_scale);
  p.variance_mode = variance_mode;
  p.cfg = cfg;
  p.clip = clip_range > 0;
  at::Tensor prev = at::empty_like(sample), x0 = at::empty_like(sample);
  DK_CPU_KERNEL(diffusion_step_kernel)(p, model_output, sample, noise ? *noise : at::Tensor(),
                                       threshold ? threshold->const_data_ptr<float>() : nullptr,
                                       prev, x0);
  return {prev, x0};
}

}  // namespace diffkernels
