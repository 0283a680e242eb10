// diffkernels::attention: softmax(q k^T * scale, key padding mask) v, one operator. Checks and
// the backend route live here; the kernels are csrc/cpu/attention.cpp and
// csrc/cuda/attention.cu. q: [B, H, Lq, D], k/v: [B, H, Lk, D], any strides with unit
// last-dim stride (transposed [B, L, H, D] views are read in place).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>

#include "backend.h"
#include "checks.h"
#include "forward_only.h"
#include "kernels.h"

namespace diffkernels {
namespace {

constexpr int64_t kMaxHeadDim = 512;  // the VAE's single 512-wide head

void check_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                const std::optional<at::Tensor>& key_padding_mask) {
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor*>{"q", &q}, {"k", &k},
                                {"v", &v}}) {
    check_defined(name, *t);
    TORCH_CHECK_VALUE(t->dim() == 4, name, ": expected rank 4 [B, H, L, D], got shape ",
                      t->sizes());
    check_dtype(name, *t, {at::kHalf, at::kBFloat16, at::kFloat});
    TORCH_CHECK_TYPE(t->scalar_type() == q.scalar_type(), name, ": expected dtype torch.",
                     dtype_name(q.scalar_type()), " (the dtype of q), got torch.",
                     dtype_name(t->scalar_type()));
    check_device(name, *t, q, "q");
    TORCH_CHECK_VALUE(t->numel() == 0 || t->stride(3) == 1 || t->size(3) <= 1, name,
                      ": expected unit stride in the last (head) dim, got strides ",
                      t->strides());
  }
  const int64_t B = q.size(0), H = q.size(1), D = q.size(3);
  TORCH_CHECK_VALUE(k.size(0) == B && v.size(0) == B, "k, v: expected batch ", B,
                    " (q's), got k ", k.size(0), " and v ", v.size(0));
  TORCH_CHECK_VALUE(k.size(1) == H && v.size(1) == H, "k, v: expected ", H,
                    " heads (q's), got k ", k.size(1), " and v ", v.size(1));
  TORCH_CHECK_VALUE(k.size(3) == D && v.size(3) == D, "k, v: expected head dim ", D,
                    " (q's), got k ", k.size(3), " and v ", v.size(3));
  TORCH_CHECK_VALUE(k.size(2) == v.size(2), "v: expected length ", k.size(2), " (k's), got ",
                    v.size(2));
  TORCH_CHECK_VALUE(D <= kMaxHeadDim && D % 8 == 0, "q: head dim D must be a multiple of 8 and "
                    "at most ", kMaxHeadDim, ", got ", D);
  if (key_padding_mask.has_value()) {
    const at::Tensor& m = *key_padding_mask;
    TORCH_CHECK_TYPE(m.scalar_type() == at::kBool, "key_padding_mask: expected dtype bool "
                     "(True = attend), got torch.", dtype_name(m.scalar_type()));
    TORCH_CHECK_VALUE(m.dim() == 2 && m.size(0) == B && m.size(1) == k.size(2),
                      "key_padding_mask: expected shape [B, Lk] = [", B, ", ", k.size(2),
                      "], got ", m.sizes());
    check_device("key_padding_mask", m, q, "q");
  }
}

bool native_supports(const at::Tensor& q) {
#ifdef DIFFKERNELS_WITH_CUDA
  if (q.is_cuda()) return attention_cuda_supports(q);
#endif
  return q.is_cpu() && q.size(3) <= attention_cpu_max_head_dim();
}

at::Tensor attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     std::optional<double> scale,
                     const std::optional<at::Tensor>& key_padding_mask) {
  check_args(q, k, v, key_padding_mask);
  if (q.numel() == 0) return at::empty_like(q);  // q's strides when q is dense
  if (k.size(2) == 0) return at::empty_like(q).zero_();  // nothing to attend: a masked row
  const double s = scale.has_value() ? *scale : std::pow(static_cast<double>(q.size(3)), -0.5);
  const auto mask = key_padding_mask.has_value()
                        ? std::optional<at::Tensor>(key_padding_mask->contiguous())
                        : std::nullopt;
  const Backend b = route(q.device().type(), native_supports(q), /*triton_ok=*/true);
  if (b == Backend::Cpu) return attention_cpu(q, k, v, s, mask);
#ifdef DIFFKERNELS_WITH_CUDA
  if (b == Backend::Cuda) return attention_cuda(q, k, v, s, mask);
#endif
  static const auto python = python_backend_op("diffkernels::_attention_backend")
      .typed<at::Tensor(c10::string_view, const at::Tensor&, const at::Tensor&,
                        const at::Tensor&, double, const std::optional<at::Tensor>&)>();
  return python.call(backend_name(b), q, k, v, s, mask);
}

at::Tensor attention_autograd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                              std::optional<double> scale,
                              const std::optional<at::Tensor>& key_padding_mask) {
  static const auto op = c10::Dispatcher::singleton()
      .findSchemaOrThrow("diffkernels::attention", "")
      .typed<decltype(attention)>();
  at::Tensor out;
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    out = op.call(q, k, v, scale, key_padding_mask);
  }
  raise_at_backward("diffkernels::attention: backward is not implemented yet (forward only); "
                    "use F.scaled_dot_product_attention for training", out, q, k, v);
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(diffkernels, m) {
  m.def("attention(Tensor q, Tensor k, Tensor v, float? scale=None, "
        "Tensor? key_padding_mask=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(diffkernels, CPU, m) { m.impl("attention", &attention); }
TORCH_LIBRARY_IMPL(diffkernels, CUDA, m) { m.impl("attention", &attention); }
TORCH_LIBRARY_IMPL(diffkernels, Autograd, m) { m.impl("attention", &attention_autograd); }

}  // namespace diffkernels
