// The native kernels behind the operators of csrc/<op>.cpp: csrc/cpu/<op>.cpp and
// csrc/cuda/<op>.cu. They are called with checked arguments, prepared as the op file says
// (contiguous or channels_last x; contiguous parameters; [B, H, L, D] views with unit
// last-dim stride), and non-empty inputs.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace diffkernels {

at::Tensor group_norm_silu_cpu(const at::Tensor& x, int64_t num_groups,
                               const std::optional<at::Tensor>& weight,
                               const std::optional<at::Tensor>& bias, double eps, bool silu,
                               const std::optional<at::Tensor>& channel_bias);

at::Tensor attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                         double scale, const std::optional<at::Tensor>& key_padding_mask);
// The head dims attention_cpu handles (every multiple of 8 up to this).
int64_t attention_cpu_max_head_dim();

std::tuple<at::Tensor, at::Tensor> diffusion_step_cpu(
    const at::Tensor& model_output, const at::Tensor& sample,
    const std::optional<at::Tensor>& noise, const std::optional<at::Tensor>& threshold,
    c10::ArrayRef<double> coeffs, int64_t variance_mode, double clip_range,
    double guidance_scale, bool cfg);

#ifdef DIFFKERNELS_WITH_CUDA
at::Tensor group_norm_silu_cuda(const at::Tensor& x, int64_t num_groups,
                                const std::optional<at::Tensor>& weight,
                                const std::optional<at::Tensor>& bias, double eps, bool silu,
                                const std::optional<at::Tensor>& channel_bias);

at::Tensor attention_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                          double scale, const std::optional<at::Tensor>& key_padding_mask);
// Whether attention_cuda handles q's dtype, head dim and device (fp16/bf16, sm_80+).
bool attention_cuda_supports(const at::Tensor& q);

// device_coeffs: k0..k10 in device memory (fp32 [11], read by the kernel: CUDA graphs replay
// one capture for every step), or nullptr for coeffs (passed by value).
std::tuple<at::Tensor, at::Tensor> diffusion_step_cuda(
    const at::Tensor& model_output, const at::Tensor& sample,
    const std::optional<at::Tensor>& noise, const std::optional<at::Tensor>& threshold,
    c10::ArrayRef<double> coeffs, int64_t variance_mode, double clip_range,
    double guidance_scale, bool cfg, const float* device_coeffs);
#endif

}  // namespace diffkernels
