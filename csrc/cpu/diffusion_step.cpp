// diffusion_step_cxx on CPU: one DDPM/DDIM sampler step in one pass over the elements: the CFG
// combine, x0 prediction, clip / dynamic threshold, the affine update and the noise term. The
// math is the generic affine step of diffkernels/reference.py::diffusion_step (its docstring is
// the spec); the scheduler computes the 11 per-step coefficients on the host.
//
// Layout (all contiguous): sample x [B, C, *S] is B rows of n = C*prod(S) elements.
// model_output [B or 2B (cfg: uncond half first), C or 2C, *S] is rows of mo_row = n or 2n, so
// for the element (b, j) of x: uncond = mo[b*mo_row + j], cond = mo[(B+b)*mo_row + j], and the
// learned variance (channels C..2C, of the cond half with cfg) is 'that row' + n + j.
#include "../kernels.h"
#include "cpu_features.h"

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

namespace {

struct Params {
  float k[11];
  float clip_range, guidance;
  int64_t variance_mode;
  bool cfg, clip;
};

}  // namespace
}  // namespace diffkernels

// setup.py compiles without -mavx2, which leaves at::vec on its generic per-lane fallback (6x
// slower here). On x86 with GCC the kernel section below is compiled for AVX2+FMA+F16C
// (at::vec's AVX2 implementation) and diffusion_step_cpu checks the CPU before entering it;
// everything outside the section (registration, checks) stays baseline x86-64. Same scheme as
// csrc/cpu/group_norm_silu.cpp.
#if defined(__GNUC__) && !defined(__clang__) && (defined(__x86_64__) || defined(__i386__)) && \
    !defined(CPU_CAPABILITY)
#define DK_STEP_AVX2 1
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"  // a note about 32-byte vector arguments (GCC 4.6 ABI)
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
// sleef.h (included by at::vec) declares its AVX2 functions only under these macros, which the
// pragma does not define; they are undefined again right after the include.
#ifndef __AVX__
#define __AVX__ 1
#define DK_STEP_UNDEF_AVX
#endif
#ifndef __AVX2__
#define __AVX2__ 1
#define DK_STEP_UNDEF_AVX2
#endif
#endif
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#ifdef DK_STEP_UNDEF_AVX
#undef __AVX__
#endif
#ifdef DK_STEP_UNDEF_AVX2
#undef __AVX2__
#endif

namespace diffkernels {
namespace {

using fVec = at::vec::Vectorized<float>;

// Loads / stores one SIMD chunk of T as kF fp32 vectors (fp16/bf16: a chunk is two of them).
template <typename T>
struct Io {
  using bVec = at::vec::Vectorized<T>;
  static constexpr int64_t kW = bVec::size();
  static constexpr int kF = std::is_same_v<T, float> ? 1 : 2;
  using F = std::array<fVec, kF>;

  C10_ALWAYS_INLINE static F load(const T* p, int64_t n) {
    const bVec v = n == kW ? bVec::loadu(p) : bVec::loadu(p, n);  // a partial load zero-fills
    if constexpr (kF == 1) {
      return {v};
    } else {
      auto [a, b] = at::vec::convert_to_float<T>(v);
      return {a, b};
    }
  }
  C10_ALWAYS_INLINE static void store(T* p, const F& f, int64_t n) {
    bVec v;
    if constexpr (kF == 1) {
      v = f[0];
    } else {
      v = at::vec::convert_from_float<T>(f[0], f[1]);
    }
    if (n == kW) {
      v.store(p);
    } else {
      v.store(p, n);
    }
  }
};

// What the noise term reads: nothing, k8 (scalar std), sqrt(v), exp(k9 + k10 v).
enum NoiseMode : int { kNoNoise = 0, kScalarStd = 1, kLearned = 2, kLearnedRange = 3 };

// n consecutive elements of one sample's row. cfg and the noise mode are template parameters
// (absent loads are not compiled); c (cond half), v (variance) and nz (noise) are null when
// absent, thr (this sample's threshold) is null without thresholding.
template <typename T, bool CFG, int NOISE>
void step_row(const Params& p, const T* x, const T* u, const T* c, const T* v, const T* nz,
              const float* thr, T* prev, T* x0_out, int64_t n) {
  using IO = Io<T>;
  fVec k[11];
  for (int i = 0; i < 11; ++i) k[i] = fVec(p.k[i]);
  const fVec g(p.guidance);
  // clip then threshold: clamp(clamp(x0, -r, r), -s, s) / s = clamp(x0, -h, h) / s with
  // h = min(r, s): one clamp whichever of the two is on.
  const bool bound = p.clip || thr != nullptr;
  const float r = p.clip ? p.clip_range : INFINITY;
  const fVec s(thr != nullptr ? *thr : 1.f), h(thr != nullptr ? std::min(r, *thr) : r);
  const fVec neg_h = fVec(0.f) - h;
  for (int64_t j = 0; j < n; j += IO::kW) {
    const int64_t cnt = std::min<int64_t>(IO::kW, n - j);
    const auto X = IO::load(x + j, cnt), U = IO::load(u + j, cnt);
    typename IO::F Cd, V, N, P, X0;
    if constexpr (CFG) Cd = IO::load(c + j, cnt);
    if constexpr (NOISE >= kLearned) V = IO::load(v + j, cnt);
    if constexpr (NOISE != kNoNoise) N = IO::load(nz + j, cnt);
    for (int f = 0; f < IO::kF; ++f) {
      fVec m = U[f];
      if constexpr (CFG) m = at::vec::fmadd(g, Cd[f] - m, m);  // u + g * (c - u)
      fVec x0 = at::vec::fmadd(k[1], m, k[0] * X[f]);
      if (bound) x0 = at::vec::clamp(x0, neg_h, h);  // keeps NaN, like torch.clamp
      if (thr != nullptr) x0 = x0 / s;
      const fVec eps = at::vec::fmadd(k[4], x0, at::vec::fmadd(k[3], m, k[2] * X[f]));
      fVec pr = at::vec::fmadd(k[7], eps, at::vec::fmadd(k[6], X[f], k[5] * x0));
      if constexpr (NOISE == kScalarStd) pr = at::vec::fmadd(k[8], N[f], pr);
      if constexpr (NOISE == kLearned) pr = at::vec::fmadd(V[f].sqrt(), N[f], pr);
      if constexpr (NOISE == kLearnedRange) {
        pr = at::vec::fmadd(at::vec::fmadd(k[10], V[f], k[9]).exp(), N[f], pr);
      }
      P[f] = pr;
      X0[f] = x0;
    }
    IO::store(prev + j, P, cnt);
    IO::store(x0_out + j, X0, cnt);
  }
}

template <typename T>
using RowFn = void (*)(const Params&, const T*, const T*, const T*, const T*, const T*,
                       const float*, T*, T*, int64_t);

template <typename T, bool CFG>
RowFn<T> pick_noise(int noise_mode) {
  switch (noise_mode) {
    case kNoNoise: return &step_row<T, CFG, kNoNoise>;
    case kScalarStd: return &step_row<T, CFG, kScalarStd>;
    case kLearned: return &step_row<T, CFG, kLearned>;
    default: return &step_row<T, CFG, kLearnedRange>;
  }
}

// The flat range over B rows of n elements, split across threads; a chunk may span rows, so
// it is walked row piece by row piece.
template <typename T>
void run_typed(const Params& p, const at::Tensor& model_output, const at::Tensor& sample,
               const at::Tensor& noise, const float* thr, at::Tensor& prev, at::Tensor& x0) {
  const int64_t B = sample.size(0);
  const int64_t n = sample.numel() / B;                                // C * prod(S)
  const int64_t mo_row = model_output.numel() / model_output.size(0);  // n or 2n
  const int noise_mode = noise.defined() ? static_cast<int>(p.variance_mode) + 1 : kNoNoise;
  const RowFn<T> row_fn =
      p.cfg ? pick_noise<T, true>(noise_mode) : pick_noise<T, false>(noise_mode);
  const T* mo = model_output.const_data_ptr<T>();
  const T* xs = sample.const_data_ptr<T>();
  const T* ns = noise.defined() ? noise.const_data_ptr<T>() : nullptr;
  T* po = prev.mutable_data_ptr<T>();
  T* xo = x0.mutable_data_ptr<T>();
  at::parallel_for(0, B * n, at::internal::GRAIN_SIZE, [&](int64_t begin, int64_t end) {
    for (int64_t pos = begin; pos < end;) {
      const int64_t b = pos / n, j = pos % n, len = std::min(end - pos, n - j);
      const T* row = mo + b * mo_row;                                // uncond (or only) half
      const T* cond = p.cfg ? row + B * mo_row : nullptr;            // cond half, row b
      const T* var = (p.cfg ? row + B * mo_row : row) + n;           // channels C..2C
      row_fn(p, xs + b * n + j, row + j, cond ? cond + j : nullptr,
             noise_mode >= kLearned ? var + j : nullptr, ns ? ns + b * n + j : nullptr,
             thr ? thr + b : nullptr, po + b * n + j, xo + b * n + j, len);
      pos += len;
    }
  });
}

void run_kernel(const Params& p, const at::Tensor& model_output, const at::Tensor& sample,
                const at::Tensor& noise, const float* thr, at::Tensor& prev, at::Tensor& x0) {
  switch (sample.scalar_type()) {
    case at::kFloat: return run_typed<float>(p, model_output, sample, noise, thr, prev, x0);
    case at::kHalf: return run_typed<at::Half>(p, model_output, sample, noise, thr, prev, x0);
    default:  // bfloat16, the only dtype left after the checks
      return run_typed<at::BFloat16>(p, model_output, sample, noise, thr, prev, x0);
  }
}

}  // namespace
}  // namespace diffkernels

#ifdef DK_STEP_AVX2
#pragma GCC diagnostic pop
#pragma GCC pop_options
#endif

namespace diffkernels {
namespace {

bool simd_kernel_usable() {
#ifdef DK_STEP_AVX2
  return diffkernels::cpu_has_avx2_fma_f16c();
#else
  return true;
#endif
}

// The same math as ATen ops in fp32, for x86 CPUs without AVX2 (the kernel is compiled for it).
std::tuple<at::Tensor, at::Tensor> composite(const Params& p, const at::Tensor& model_output,
                                             const at::Tensor& sample, const at::Tensor& noise,
                                             const at::Tensor& threshold) {
  const int64_t B = sample.size(0), C = sample.size(1);
  const at::Tensor x = sample.to(at::kFloat), mo = model_output.to(at::kFloat);
  at::Tensor m = mo.narrow(0, 0, B).narrow(1, 0, C), var_src = mo.narrow(0, 0, B);
  if (p.cfg) {
    var_src = mo.narrow(0, B, B);
    m = m + p.guidance * (var_src.narrow(1, 0, C) - m);
  }
  const float* k = p.k;
  at::Tensor x0 = k[0] * x + k[1] * m;
  if (p.clip) x0 = x0.clamp(-p.clip_range, p.clip_range);
  if (threshold.defined()) {
    std::vector<int64_t> shape(x.dim(), 1);
    shape[0] = B;
    const at::Tensor s = threshold.reshape(shape);
    x0 = at::minimum(at::maximum(x0, -s), s) / s;
  }
  const at::Tensor eps = k[2] * x + k[3] * m + k[4] * x0;
  at::Tensor prev = k[5] * x0 + k[6] * x + k[7] * eps;
  if (noise.defined()) {
    const at::Tensor nf = noise.to(at::kFloat);
    if (p.variance_mode == 0) {
      prev = prev + k[8] * nf;
    } else {
      const at::Tensor v = var_src.narrow(1, C, C);
      prev = prev + (p.variance_mode == 1 ? v.sqrt() : (k[9] + k[10] * v).exp()) * nf;
    }
  }
  return {prev.to(sample.scalar_type()), x0.to(sample.scalar_type())};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> diffusion_step_cpu(
    const at::Tensor& model_output_, const at::Tensor& sample_,
    const std::optional<at::Tensor>& noise_, const std::optional<at::Tensor>& threshold_,
    c10::ArrayRef<double> coeffs, int64_t variance_mode, double clip_range,
    double guidance_scale, bool cfg) {
  // csrc/diffusion_step.cpp checked the arguments and made them contiguous.
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
  if (!simd_kernel_usable()) return composite(p, model_output, sample, noise, threshold);
  at::Tensor prev = at::empty_like(sample), x0 = at::empty_like(sample);
  run_kernel(p, model_output, sample, noise,
             threshold.defined() ? threshold.const_data_ptr<float>() : nullptr, prev, x0);
  return {prev, x0};
}

}  // namespace diffkernels
