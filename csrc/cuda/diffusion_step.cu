// diffusion_step_cxx on CUDA: one DDPM/DDIM sampler step as one kernel launch (the math and
// layout are described in csrc/cpu/diffusion_step.cpp and diffkernels/reference.py).
//
// Grid: blockIdx.y walks the B sample rows, blockIdx.x / threads grid-stride over one row of
// n = C*prod(S) elements, VEC elements per thread per step: 16-byte loads and stores (VEC = 8
// for fp16/bf16, 4 for fp32) when n is a multiple of VEC and every pointer is 16-byte aligned,
// one element otherwise. The 11 coefficients travel by value in the kernel's parameters (no
// device buffer, no host<->device copy, no sync), or are read from device memory (kdev) when
// the step is captured in a CUDA graph that is replayed for every step. cfg and the
// noise/variance mode are template parameters (loads that do not happen are not compiled);
// clip and threshold fold into one clamp bound per sample, so the loop body has no branches.
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <optional>
#include <type_traits>

#include "../kernels.h"

namespace diffkernels {

namespace {

constexpr int kThreads = 256;

// What the noise term reads: nothing, k8 (scalar std), sqrt(v), exp(k9 + k10 v).
enum NoiseMode : int { kNoNoise = 0, kScalarStd = 1, kLearned = 2, kLearnedRange = 3 };

struct StepParams {
  float k[11];
  float clip_range, guidance;  // clip_range: +inf without clip
  int64_t n;         // elements per sample row: C * prod(S)
  int64_t mo_row;    // elements per model_output row: n, or 2n with a learned variance
  int64_t cond_off;  // from row b of the uncond half to row b of the cond half: B * mo_row
  int64_t var_off;   // from row b of the uncond half to its variance: n, or cond_off + n
  int64_t batch;
};

// VEC elements as fp32 <-> memory. A 16-byte pack moves as one uint4 through __ldg / __stwb:
// a plain uint4 store gets split into 4-byte stores by the compiler here.
template <typename T, int VEC>
__device__ __forceinline__ void load(const T* p, float (&out)[VEC]) {
  if constexpr (VEC * sizeof(T) == 16) {
    const uint4 raw = __ldg(reinterpret_cast<const uint4*>(p));
    T pack[VEC];
    memcpy(pack, &raw, 16);
#pragma unroll
    for (int e = 0; e < VEC; ++e) out[e] = static_cast<float>(pack[e]);
  } else {
#pragma unroll
    for (int e = 0; e < VEC; ++e) out[e] = static_cast<float>(p[e]);
  }
}

template <typename T>
__device__ __forceinline__ uint32_t bits(float v) {
  if constexpr (sizeof(T) == 4) {
    return __float_as_uint(v);
  } else {
    return static_cast<T>(v).x;  // c10::Half / c10::BFloat16 bits
  }
}

template <typename T, int VEC>
__device__ __forceinline__ void store(T* p, const float (&in)[VEC]) {
  if constexpr (VEC * sizeof(T) == 16) {
    uint32_t w[4];
    constexpr int kPer = 4 / sizeof(T);  // elements per 32-bit word
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      w[i] = bits<T>(in[i * kPer]);
      if constexpr (kPer == 2) w[i] |= bits<T>(in[i * kPer + 1]) << 16;
    }
    __stwb(reinterpret_cast<uint4*>(p), make_uint4(w[0], w[1], w[2], w[3]));
  } else {
#pragma unroll
    for (int e = 0; e < VEC; ++e) p[e] = static_cast<T>(in[e]);
  }
}

// clamp that keeps NaN (like torch.clamp); fminf/fmaxf would replace it by a bound.
__device__ __forceinline__ float clamp_nan(float x, float lo, float hi) {
  return x < lo ? lo : (x > hi ? hi : x);
}

// sqrt within ~1 ulp (sqrt(0) = 0, sqrt(inf) = inf, negative -> NaN). The IEEE sqrtf has a
// subroutine slow path whose calling convention spills registers in the scalar fp32 kernels.
__device__ __forceinline__ float sqrt_approx(float v) {
  float r;
  asm("sqrt.approx.f32 %0, %1;" : "=f"(r) : "f"(v));
  return r;
}

template <typename T, int VEC, bool CFG, int NOISE>
__global__ void __launch_bounds__(kThreads)
diffusion_step_kernel(const T* __restrict__ mo, const T* __restrict__ x,
                      const T* __restrict__ noise, const float* __restrict__ thr,
                      const float* __restrict__ kdev, T* __restrict__ prev,
                      T* __restrict__ x0_out, const StepParams p) {
  float k[11];
#pragma unroll
  for (int i = 0; i < 11; ++i) k[i] = kdev != nullptr ? __ldg(kdev + i) : p.k[i];
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads * VEC;
  for (int64_t b = blockIdx.y; b < p.batch; b += gridDim.y) {
    const T* u_row = mo + b * p.mo_row;
    const int64_t row = b * p.n;
    // clip then threshold: clamp(clamp(x0, -r, r), -s, s) / s = clamp(x0, -h, h) / s with
    // h = min(r, s); r = inf without clip, s = 1 (and h = r) without threshold. One clamp and
    // one divide on every path keeps the loop branch-free (and the stores 16-byte wide).
    const float s = thr != nullptr ? thr[b] : 1.f;
    const float h = thr != nullptr ? fminf(p.clip_range, s) : p.clip_range;
    // No unrolling: with 64-bit indices an unrolled scalar (VEC = 1) loop spills on sm_90.
#pragma unroll 1
    for (int64_t j = (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) * VEC; j < p.n;
         j += stride) {
      float xv[VEC], m[VEC], cv[VEC], vv[VEC], nv[VEC], pv[VEC], ov[VEC];
      load<T, VEC>(x + row + j, xv);
      load<T, VEC>(u_row + j, m);
      if constexpr (CFG) load<T, VEC>(u_row + p.cond_off + j, cv);
      if constexpr (NOISE >= kLearned) load<T, VEC>(u_row + p.var_off + j, vv);
      if constexpr (NOISE != kNoNoise) load<T, VEC>(noise + row + j, nv);
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        if constexpr (CFG) m[e] = fmaf(p.guidance, cv[e] - m[e], m[e]);  // u + g * (c - u)
        float x0 = fmaf(k[1], m[e], k[0] * xv[e]);
        x0 = clamp_nan(x0, -h, h) / s;
        const float eps = fmaf(k[4], x0, fmaf(k[3], m[e], k[2] * xv[e]));
        float pr = fmaf(k[7], eps, fmaf(k[6], xv[e], k[5] * x0));
        if constexpr (NOISE != kNoNoise) {
          float std_dev = k[8];
          if constexpr (NOISE == kLearned) std_dev = sqrt_approx(vv[e]);
          if constexpr (NOISE == kLearnedRange) std_dev = expf(fmaf(k[10], vv[e], k[9]));
          pr = fmaf(std_dev, nv[e], pr);
        }
        pv[e] = pr;
        ov[e] = x0;
      }
      store<T, VEC>(prev + row + j, pv);
      store<T, VEC>(x0_out + row + j, ov);
    }
  }
}

template <typename T, int VEC>
void launch(const StepParams& p, bool cfg, int noise_mode, const T* mo, const T* x,
            const T* noise, const float* thr, const float* kdev, T* prev, T* x0,
            cudaStream_t stream) {
  const int64_t vecs = p.n / VEC;
  const int grid_y = static_cast<int>(std::min<int64_t>(p.batch, 65535));
  // Enough blocks to fill the GPU (8 resident blocks of 256 threads per SM), no more.
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t want_x = std::max<int64_t>(1, static_cast<int64_t>(sms) * 8 / grid_y);
  const dim3 grid(static_cast<unsigned>(
                      std::min<int64_t>((vecs + kThreads - 1) / kThreads, want_x)),
                  grid_y);
  auto go = [&](auto cfg_c, auto noise_c) {
    diffusion_step_kernel<T, VEC, decltype(cfg_c)::value, decltype(noise_c)::value>
        <<<grid, kThreads, 0, stream>>>(mo, x, noise, thr, kdev, prev, x0, p);
  };
  auto with_noise = [&](auto cfg_c) {
    switch (noise_mode) {
      case kNoNoise: return go(cfg_c, std::integral_constant<int, kNoNoise>{});
      case kScalarStd: return go(cfg_c, std::integral_constant<int, kScalarStd>{});
      case kLearned: return go(cfg_c, std::integral_constant<int, kLearned>{});
      default: return go(cfg_c, std::integral_constant<int, kLearnedRange>{});
    }
  };
  if (cfg) {
    with_noise(std::true_type{});
  } else {
    with_noise(std::false_type{});
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

template <typename T>
void launch_typed(const StepParams& p, bool cfg, int noise_mode, const at::Tensor& model_output,
                  const at::Tensor& sample, const at::Tensor& noise, const float* thr,
                  const float* kdev, at::Tensor& prev, at::Tensor& x0) {
  constexpr int kVec = 16 / sizeof(T);
  const T* mo = model_output.const_data_ptr<T>();
  const T* x = sample.const_data_ptr<T>();
  const T* nz = noise.defined() ? noise.const_data_ptr<T>() : nullptr;
  T* po = prev.mutable_data_ptr<T>();
  T* xo = x0.mutable_data_ptr<T>();
  // Row starts (multiples of n) and the variance/cond offsets are then multiples of kVec too.
  const bool vec = p.n % kVec == 0 && aligned16(mo) && aligned16(x) && aligned16(po) &&
                   aligned16(xo) && (nz == nullptr || aligned16(nz));
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  if (vec) {
    launch<T, kVec>(p, cfg, noise_mode, mo, x, nz, thr, kdev, po, xo, stream);
  } else {
    launch<T, 1>(p, cfg, noise_mode, mo, x, nz, thr, kdev, po, xo, stream);
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> diffusion_step_cuda(
    const at::Tensor& model_output_, const at::Tensor& sample_,
    const std::optional<at::Tensor>& noise_, const std::optional<at::Tensor>& threshold_,
    c10::ArrayRef<double> coeffs, int64_t variance_mode, double clip_range,
    double guidance_scale, bool cfg, const float* kdev) {
  const c10::cuda::CUDAGuard guard(sample_.device());
  // csrc/diffusion_step.cpp checked the arguments and made them contiguous.
  const at::Tensor sample = sample_.contiguous(), model_output = model_output_.contiguous();
  const at::Tensor noise = noise_.has_value() ? noise_->contiguous() : at::Tensor();
  const at::Tensor threshold = threshold_.has_value() ? threshold_->contiguous() : at::Tensor();
  at::Tensor prev = at::empty_like(sample), x0 = at::empty_like(sample);
  if (sample.numel() == 0) return {prev, x0};

  const int64_t B = sample.size(0);
  StepParams p;
  for (int i = 0; i < 11; ++i) p.k[i] = kdev != nullptr ? 0.f : static_cast<float>(coeffs[i]);
  p.guidance = static_cast<float>(guidance_scale);
  p.clip_range = clip_range > 0 ? static_cast<float>(clip_range) : INFINITY;
  p.batch = B;
  p.n = sample.numel() / B;
  p.mo_row = model_output.numel() / model_output.size(0);
  p.cond_off = cfg ? B * p.mo_row : 0;
  p.var_off = p.cond_off + p.n;
  const int noise_mode = !noise.defined() ? kNoNoise : static_cast<int>(variance_mode) + 1;
  const float* thr = threshold.defined() ? threshold.const_data_ptr<float>() : nullptr;
  switch (sample.scalar_type()) {
    case at::kFloat:
      launch_typed<float>(p, cfg, noise_mode, model_output, sample, noise, thr, kdev, prev,
                         x0);
      break;
    case at::kHalf:
      launch_typed<at::Half>(p, cfg, noise_mode, model_output, sample, noise, thr, kdev, prev,
                            x0);
      break;
    default:  // bfloat16, the only dtype left after the checks
      launch_typed<at::BFloat16>(p, cfg, noise_mode, model_output, sample, noise, thr, kdev, prev,
                                x0);
      break;
  }
  return {prev, x0};
}


}  // namespace diffkernels
