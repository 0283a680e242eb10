// diffusion_step kernel body, compiled once per CPU capability (csrc/cpu/capability/): one
// DDPM/DDIM step in one pass over the elements (see csrc/cpu/diffusion_step.cpp for the layout).
// Included after capability.h only.
namespace diffkernels::CPU_CAPABILITY {
namespace {

using Params = cpu::StepParams;
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
      // maximum/minimum keep NaN (in x0 or the bounds), like torch.clamp; at::vec::clamp's
      // DEFAULT version would drop it.
      if (bound) x0 = at::vec::minimum(at::vec::maximum(x0, neg_h), h);
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

void run_kernel_impl(const Params& p, const at::Tensor& model_output, const at::Tensor& sample,
                const at::Tensor& noise, const float* thr, at::Tensor& prev, at::Tensor& x0) {
  switch (sample.scalar_type()) {
    case at::kFloat: return run_typed<float>(p, model_output, sample, noise, thr, prev, x0);
    case at::kHalf: return run_typed<at::Half>(p, model_output, sample, noise, thr, prev, x0);
    default:  // bfloat16, the only dtype left after the checks
      return run_typed<at::BFloat16>(p, model_output, sample, noise, thr, prev, x0);
  }
}

}  // namespace

void diffusion_step_kernel(const cpu::StepParams& p, const at::Tensor& model_output,
                           const at::Tensor& sample, const at::Tensor& noise,
                           const float* threshold, at::Tensor& prev, at::Tensor& x0) {
  run_kernel_impl(p, model_output, sample, noise, threshold, prev, x0);
}

}  // namespace diffkernels::CPU_CAPABILITY
