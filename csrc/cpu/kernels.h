// The CPU kernels and how one of them is picked at run time.
//
// Every kernel source csrc/cpu/<op>_kernel.h is compiled once per CPU capability, as ATen does
// for its own kernels: csrc/cpu/capability/<op>_<level>.cpp includes capability.h (which sets a
// GCC target pragma and at::vec's CPU_CAPABILITY macros) and then the kernel, whose code lands in
// namespace diffkernels::<CPU_CAPABILITY> (DEFAULT, AVX2, AVX512). The entry functions in
// csrc/cpu/<op>.cpp stay baseline x86-64 and call the level at::get_cpu_capability() reports:
// the best the CPU supports, or the one ATEN_CPU_CAPABILITY=default|avx2|avx512 asks for.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

// AVX2 / AVX-512 variants exist where the target pragma does: GCC on x86-64. Elsewhere only
// DEFAULT (at::vec's portable implementation) is built.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define DK_X86_CAPABILITIES 1
#else
#define DK_X86_CAPABILITIES 0
#endif

namespace diffkernels::cpu {

enum class Capability : int { kDefault = 0, kAVX2 = 1, kAVX512 = 2 };

// The level the kernels run at in this process (decided once, like ATen's).
Capability capability();
const char* capability_name(Capability c);

// Arguments of the kernels, already validated by the entry functions.
struct GroupNormParams {
  const float* weight;        // [C] or nullptr
  const float* bias;          // [C] or nullptr
  const float* channel_bias;  // [N, C] or nullptr
  double eps;
};

struct StepParams {
  float k[11];
  float clip_range, guidance;
  int64_t variance_mode;
  bool cfg, clip;
};

}  // namespace diffkernels::cpu

#define DK_DECLARE_CPU_KERNELS(CAP)                                                           \
  namespace diffkernels::CAP {                                                                \
  void attention_kernel(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,       \
                        const at::Tensor& out, float scale, const bool* mask);               \
  void group_norm_silu_kernel(const at::Tensor& x, at::Tensor& y, bool channels_last,        \
                              int64_t num_groups, bool silu, const cpu::GroupNormParams& p); \
  void diffusion_step_kernel(const cpu::StepParams& p, const at::Tensor& model_output,       \
                             const at::Tensor& sample, const at::Tensor& noise,              \
                             const float* threshold, at::Tensor& prev, at::Tensor& x0);      \
  }

DK_DECLARE_CPU_KERNELS(DEFAULT)
#if DK_X86_CAPABILITIES
DK_DECLARE_CPU_KERNELS(AVX2)
DK_DECLARE_CPU_KERNELS(AVX512)
#endif

// The variant of kernel `fn` for this process's capability.
#if DK_X86_CAPABILITIES
#define DK_CPU_KERNEL(fn)                                                                   \
  (::diffkernels::cpu::capability() == ::diffkernels::cpu::Capability::kAVX512 ? &::diffkernels::AVX512::fn \
   : ::diffkernels::cpu::capability() == ::diffkernels::cpu::Capability::kAVX2 ? &::diffkernels::AVX2::fn   \
                                                                                : &::diffkernels::DEFAULT::fn)
#else
#define DK_CPU_KERNEL(fn) (&::diffkernels::DEFAULT::fn)
#endif
