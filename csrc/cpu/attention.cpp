// attention_cxx on CPU: blocked flash attention (online softmax, fp32 accumulation) for
// q [B,H,Lq,D], k/v [B,H,Lk,D] with any strides whose last-dim stride is 1.
#include <torch/library.h>

#include "kernels.h"
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <optional>

at::Tensor attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                         double scale, const std::optional<at::Tensor>& key_padding_mask);

TORCH_LIBRARY_FRAGMENT(diffkernels, m) {
  m.def("attention_cxx(Tensor q, Tensor k, Tensor v, float scale, Tensor? key_padding_mask) -> Tensor");
}

TORCH_LIBRARY_IMPL(diffkernels, CPU, m) {
  m.impl("attention_cxx", &attention_cpu);
}

at::Tensor attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                         double scale, const std::optional<at::Tensor>& key_padding_mask) {
  for (const auto* t : {&q, &k, &v}) {
    const char* name = t == &q ? "q" : t == &k ? "k" : "v";
    TORCH_CHECK(t->dim() == 4, "attention_cxx: ", name, " must have rank 4 [B, H, L, D], got ",
                t->sizes());
    TORCH_CHECK(t->device().is_cpu(), "attention_cxx: ", name, " must be a CPU tensor");
    TORCH_CHECK(t->scalar_type() == q.scalar_type(), "attention_cxx: ", name, " has dtype ",
                t->scalar_type(), ", expected q's dtype ", q.scalar_type());
    TORCH_CHECK(t->stride(3) == 1 || t->numel() == 0, "attention_cxx: ", name,
                " must have unit stride in the head dim, got strides ", t->strides());
  }
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kHalf ||
                  q.scalar_type() == at::kBFloat16,
              "attention_cxx: q must be float32, float16 or bfloat16, got ", q.scalar_type());
  const int64_t B = q.size(0), H = q.size(1), D = q.size(3), Lk = k.size(2);
  TORCH_CHECK(k.size(0) == B && v.size(0) == B && k.size(1) == H && v.size(1) == H,
              "attention_cxx: k and v must have q's batch and heads [", B, ", ", H, "], got k ",
              k.sizes(), " and v ", v.sizes());
  TORCH_CHECK(k.size(3) == D && v.size(3) == D, "attention_cxx: k and v must have q's head dim ",
              D, ", got k ", k.sizes(), " and v ", v.sizes());
  TORCH_CHECK(v.size(2) == Lk, "attention_cxx: v must have k's length ", Lk, ", got ", v.size(2));
  TORCH_CHECK(D % 8 == 0 && D <= 512, "attention_cxx: q's head dim must be a multiple of 8 and "
              "at most 512, got ", D);
  const bool* mask = nullptr;
  if (key_padding_mask.has_value()) {
    const at::Tensor& km = *key_padding_mask;
    TORCH_CHECK(km.scalar_type() == at::kBool, "attention_cxx: key_padding_mask must be bool, got ",
                km.scalar_type());
    TORCH_CHECK(km.device().is_cpu(), "attention_cxx: key_padding_mask must be a CPU tensor");
    TORCH_CHECK(km.dim() == 2 && km.size(0) == B && km.size(1) == Lk && km.is_contiguous(),
                "attention_cxx: key_padding_mask must be a contiguous [B, Lk] = [", B, ", ", Lk,
                "] tensor, got ", km.sizes());
    mask = km.const_data_ptr<bool>();
  }
  at::Tensor out = at::empty_like(q);  // q's strides when q is dense (a BSHD view stays one)
  if (out.stride(3) != 1) out = at::empty(q.sizes(), q.options());
  if (out.numel() == 0) return out;
  if (Lk == 0) return out.zero_();
  DK_CPU_KERNEL(attention_kernel)(q, k, v, out, static_cast<float>(scale), mask);
  return out;
}
