// attention on CPU: blocked flash attention (online softmax, fp32 accumulation) for
// q [B,H,Lq,D], k/v [B,H,Lk,D] with any strides whose last-dim stride is 1. The kernel is
// csrc/cpu/attention_kernel.h, built per CPU capability (csrc/cpu/kernels.h).
#include <ATen/ATen.h>

#include <optional>

#include "../kernels.h"
#include "kernels.h"

namespace diffkernels {

int64_t attention_cpu_max_head_dim() { return 512; }

// Called by csrc/attention.cpp with checked arguments, non-empty q and Lk > 0; the mask is a
// contiguous bool [B, Lk].
at::Tensor attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                         double scale, const std::optional<at::Tensor>& key_padding_mask) {
  const bool* mask = key_padding_mask ? key_padding_mask->const_data_ptr<bool>() : nullptr;
  at::Tensor out = at::empty_like(q);  // q's strides when q is dense (a BSHD view stays one)
  if (out.stride(3) != 1) out = at::empty(q.sizes(), q.options());
  DK_CPU_KERNEL(attention_kernel)(q, k, v, out, static_cast<float>(scale), mask);
  return out;
}

}  // namespace diffkernels
