// group_norm_silu on CUDA: y = silu(group_norm(x + channel_bias[n, c], num_groups, weight, bias)).
//
// Statistics in fp32 without E[x^2] - E[x]^2: every value v = x + cb[n, c] is shifted by the
// group's first value (Kx + Kc, x and channel_bias parts) and computed as d = (x - Kx) +
// (cb - Kc), so a large common offset (x = 1e4 + noise) costs no precision (not even the
// rounding of x + cb). Each thread takes a two-pass mean/M2 of every vector (of all its values
// in the register-cached path); vectors, threads, warps and blocks are merged with Chan's formula.
// The normalise pass computes silu((x - Kx) * a + b) with a = rstd * w[c] and
// b = bias[c] + (cb[c] - Kc - mean(d)) * a: every term is of the data's spread, not its offset.
//
// Contiguous x [N, C, *spatial]: a group is the contiguous block of Cg * S values.
//   - N*G fills the GPU (>= the blocks it holds at once), or small groups: one block per group
//     (gn_nchw<kBoth>); a group of <= 8192 values (16-byte fp16/bf16 vectors; else 4096) stays
//     in registers between statistics and normalisation, a larger one is read twice.
//   - otherwise every group is split over `nchunks` blocks (one wave in all): gn_nchw<kStats>
//     writes (n, mean, M2) per chunk, gn_nchw<kNorm> merges its group's partials and normalises.
// channels_last x = [N, S, C]: a block owns a range of spatial rows of one sample and all C
//   channels; each thread keeps fixed channel columns, so a warp reads contiguous memory. Blocks
//   reduce per group; kStats -> gn_finalize (merge the chunks of each group) -> kNorm, or kBoth
//   when one block per sample is enough. A group wider than 512 vectors runs on a contiguous copy.
// kNorm blocks run in reverse order, so the part of x that kStats read last is still in L2.
// Vectors are 16 bytes when the contiguous extent (the group; Cg for channels_last) and the
// alignment of x and y allow, else 8/4/2 bytes or scalars. Groups hold < 2^31 - 8192 values.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/detail/IntegerDivider.cuh>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <optional>

#include "../kernels.h"

namespace {

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;
constexpr int64_t kMinBlockValues = 8192;  // values per block: no finer split than this

// Vectors per thread per loop step (2 x 16 bytes in flight for 16-byte vectors); VEC * units is
// also the register cache of one thread in gn_nchw<kBoth>. More would spill at 64 registers.
template <int VEC>
constexpr int units() { return VEC >= 8 ? 2 : 8 / VEC; }

enum Phase { kStats, kNorm, kBoth };

struct Stats {
  float n, mean, m2;  // count, mean, sum of squared deviations from the mean
};

struct Params {
  const void* x;
  void* y;
  const void* w;   // [C] or null
  const void* b;   // [C] or null
  const void* cb;  // [N, C] or null
  bool w32, b32, cb32;  // parameter is float32 (else x's dtype)
  Stats* part;          // [N*G, nchunks] partial statistics (split paths)
  float2* fin;          // [N*G] (mean of d, rstd) (channels_last split path)
  int C, G, Cg;
  int64_t S, M;    // spatial size, values per group (Cg * S)
  int64_t chunk;   // contiguous: values per block; channels_last: rows per block
  int nchunks;     // blocks per group (contiguous) or per sample (channels_last)
  int gpp;         // channels_last: groups per column pass
  at::cuda::detail::IntDivider<unsigned int> divS;
  float eps;
  bool silu;
};

__host__ __device__ __forceinline__ int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}
__device__ __forceinline__ int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }

// Chan et al.: merge b into a.
__device__ __forceinline__ void merge(Stats& a, const Stats& b) {
  if (b.n == 0.f) return;
  const float n = a.n + b.n, f = __fdividef(b.n, n), d = b.mean - a.mean;
  a.mean += d * f;
  a.m2 += b.m2 + d * d * a.n * f;
  a.n = n;
}

// The warp's total, the same in every lane (lanes may differ in the last bit: take lane 0's).
__device__ __forceinline__ Stats warp_reduce(Stats s) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    merge(s, Stats{__shfl_xor_sync(0xffffffffu, s.n, o), __shfl_xor_sync(0xffffffffu, s.mean, o),
                   __shfl_xor_sync(0xffffffffu, s.m2, o)});
  }
  return Stats{__shfl_sync(0xffffffffu, s.n, 0), __shfl_sync(0xffffffffu, s.mean, 0),
               __shfl_sync(0xffffffffu, s.m2, 0)};
}

// The block's total in every thread; every warp reduces the kWarps partials (no 2nd barrier).
__device__ __forceinline__ Stats block_reduce(Stats s, Stats* sh) {
  s = warp_reduce(s);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) sh[warp] = s;
  __syncthreads();
  s = warp_reduce(lane < kWarps ? sh[lane] : Stats{0.f, 0.f, 0.f});
  __syncthreads();  // sh may be reused
  return s;
}

// One warp merges `count` partials.
__device__ __forceinline__ Stats merge_partials(const Stats* part, int count) {
  Stats s{0.f, 0.f, 0.f};
  for (int j = threadIdx.x % 32; j < count; j += 32) merge(s, part[j]);
  return warp_reduce(s);
}

// Merges the first `valid` values of v (the rest are zero) into acc: two-pass in registers.
template <int B>
__device__ __forceinline__ void accumulate(Stats& acc, const float (&v)[B], int valid) {
  if (valid == 0) return;
  float sum = 0.f;
#pragma unroll
  for (int k = 0; k < B; ++k) sum += v[k];
  const float mean = __fdividef(sum, static_cast<float>(valid));
  float m2 = 0.f;
#pragma unroll
  for (int k = 0; k < B; ++k) {
    const float d = v[k] - mean;
    m2 += k < valid ? d * d : 0.f;
  }
  merge(acc, Stats{static_cast<float>(valid), mean, m2});
}

template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

template <typename T, int VEC>
__device__ __forceinline__ Pack<T, VEC> load(const T* p) {
  return *reinterpret_cast<const Pack<T, VEC>*>(p);
}

template <typename T, int VEC>
__device__ __forceinline__ void store(T* p, const float* v) {
  Pack<T, VEC> pk;
#pragma unroll
  for (int k = 0; k < VEC; ++k) pk.v[k] = static_cast<T>(v[k]);
  *reinterpret_cast<Pack<T, VEC>*>(p) = pk;
}

template <typename T>
__device__ __forceinline__ float param(const void* p, bool f32, int64_t i, float absent) {
  if (p == nullptr) return absent;
  return f32 ? static_cast<const float*>(p)[i] : static_cast<float>(static_cast<const T*>(p)[i]);
}

__device__ __forceinline__ float finish(float y, bool silu) {
  // __fdividef(y, inf) = 0 is silu's limit for y -> -inf.
  return silu ? __fdividef(y, 1.f + __expf(-y)) : y;
}

// One group of contiguous x, as the normalise pass needs it.
struct Group {
  int64_t cb0;   // channel_bias index of the group's first channel
  int w0;        // weight/bias index of the group's first channel
  float Kx, Kc;  // shift: the group's first x and channel_bias
  float mean;    // mean of d
  float rstd;
};

// The VEC values of contiguous x from in-group index e; the channel changes every S values.
// kShift: v = d = (x - Kx) + (cb[c] - Kc).  kNormalize: v = silu(v * a[c] + b[c]) (from x with
// kShift, channel_bias folded into b; from d without).
template <typename T, int VEC, bool kShift, bool kNormalize>
__device__ __forceinline__ void nchw_apply(const Params& p, const Group& gr, int e, float* v) {
  if (!kNormalize && p.cb == nullptr) {  // statistics without channel_bias: no channel needed
#pragma unroll
    for (int k = 0; k < VEC; ++k) v[k] -= gr.Kx;
    return;
  }
  const unsigned int S = static_cast<unsigned int>(p.S);
  const auto dm = p.divS.divmod(static_cast<unsigned int>(e));
  unsigned int c = dm.div, r = dm.mod;
  float cb = 0.f, a = 0.f, b = 0.f;
  auto channel = [&](unsigned int ch) {
    if (kShift) cb = param<T>(p.cb, p.cb32, gr.cb0 + ch, 0.f) - gr.Kc;
    if (kNormalize) {
      a = gr.rstd * param<T>(p.w, p.w32, gr.w0 + ch, 1.f);
      b = param<T>(p.b, p.b32, gr.w0 + ch, 0.f) + (cb - gr.mean) * a;
    }
  };
  channel(c);
#pragma unroll
  for (int k = 0; k < VEC; ++k) {
    if (k > 0 && ++r == S) {
      r = 0;
      channel(++c);
    }
    float d = v[k];
    if (kShift) d -= gr.Kx;
    if (kNormalize) {
      d = finish(fmaf(d, a, b), p.silu);
    } else if (kShift) {
      d += cb;
    }
    v[k] = d;
  }
}

// Contiguous x. Block = (group, chunk); kBoth has one chunk per group.
template <typename T, int VEC, Phase P>
__global__ void __launch_bounds__(kThreads, 2) gn_nchw(const Params p) {
  constexpr int U = units<VEC>(), B = U * VEC;
  __shared__ Stats sh[kWarps];
  const int blk = P == kNorm ? gridDim.x - 1 - blockIdx.x : blockIdx.x;  // grid < 2^31
  const int ng = blk / p.nchunks;  // n * G + g
  const int chunk = blk - ng * p.nchunks;
  const int n = ng / p.G, g = ng - n * p.G;
  const T* x = static_cast<const T*>(p.x) + int64_t{ng} * p.M;
  T* y = static_cast<T*>(p.y) + int64_t{ng} * p.M;
  Group gr;
  gr.cb0 = int64_t{n} * p.C + g * p.Cg;
  gr.w0 = g * p.Cg;
  gr.Kx = static_cast<float>(x[0]);
  gr.Kc = param<T>(p.cb, p.cb32, gr.cb0, 0.f);
  // This block's vectors [lo, hi); p.M and p.chunk are multiples of VEC, p.M < 2^31 - 2^13.
  const int lo = static_cast<int>(chunk * p.chunk / VEC);
  const int hi = static_cast<int>(imin(p.M, (chunk + 1) * p.chunk) / VEC);
  const int t = threadIdx.x;
  Stats st{0.f, 0.f, 0.f};

  if (P == kBoth && hi - lo <= U * kThreads) {
    // The group fits in registers: x is read once.
    Pack<T, VEC> raw[U];
    float v[B];
    int valid = 0;
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int i = lo + t + u * kThreads;
      if (i < hi) raw[u] = load<T, VEC>(x + i * VEC);
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int i = lo + t + u * kThreads;
#pragma unroll
      for (int k = 0; k < VEC; ++k) v[u * VEC + k] = i < hi ? static_cast<float>(raw[u].v[k]) : 0.f;
      if (i < hi) {
        nchw_apply<T, VEC, true, false>(p, gr, i * VEC, v + u * VEC);
        valid += VEC;
      }
    }
    accumulate(st, v, valid);
    st = block_reduce(st, sh);
    gr.mean = st.mean;
    gr.rstd = rsqrtf(st.m2 / st.n + p.eps);
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int i = lo + t + u * kThreads;
      if (i < hi) {
        nchw_apply<T, VEC, false, true>(p, gr, i * VEC, v + u * VEC);
        store<T, VEC>(y + i * VEC, v + u * VEC);
      }
    }
    return;
  }

  if (P != kNorm) {
    for (int i0 = lo + t; i0 < hi; i0 += U * kThreads) {
      Pack<T, VEC> raw[U];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int i = i0 + u * kThreads;
        if (i < hi) raw[u] = load<T, VEC>(x + i * VEC);
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int i = i0 + u * kThreads;
        if (i < hi) {
          float v[VEC];
#pragma unroll
          for (int k = 0; k < VEC; ++k) v[k] = static_cast<float>(raw[u].v[k]);
          nchw_apply<T, VEC, true, false>(p, gr, i * VEC, v);
          accumulate(st, v, VEC);
        }
      }
    }
    st = block_reduce(st, sh);
    if (P == kStats) {
      if (t == 0) p.part[blk] = st;
      return;
    }
  } else {
    st = merge_partials(p.part + int64_t{ng} * p.nchunks, p.nchunks);
  }
  gr.mean = st.mean;
  gr.rstd = rsqrtf(st.m2 / st.n + p.eps);
  for (int i0 = lo + t; i0 < hi; i0 += U * kThreads) {
    Pack<T, VEC> raw[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int i = i0 + u * kThreads;
      if (i < hi) raw[u] = load<T, VEC>(x + i * VEC);
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int i = i0 + u * kThreads;
      if (i < hi) {
        float v[VEC];
#pragma unroll
        for (int k = 0; k < VEC; ++k) v[k] = static_cast<float>(raw[u].v[k]);
        nchw_apply<T, VEC, true, true>(p, gr, i * VEC, v);
        store<T, VEC>(y + i * VEC, v);
      }
    }
  }
}

// channels_last x = [N, S, C]. Block = (sample, chunk of rows), all channels, in column passes
// of p.gpp whole groups: thread (tx, ty) owns channels [c0, c0 + VEC) of rows ty, ty + ty_n, ...
// kBoth runs only where the work is small (or N alone fills the GPU): it may take more registers
// (one block per SM) rather than spill.
template <typename T, int VEC, Phase P>
__global__ void __launch_bounds__(kThreads, P == kBoth ? 1 : 2) gn_nhwc(const Params p) {
  constexpr int U = units<VEC>();
  __shared__ Stats sh[kThreads];
  __shared__ float2 grp[kThreads];  // kBoth: (mean of d, rstd) of the pass's groups
  const int blk = P == kNorm ? gridDim.x - 1 - blockIdx.x : blockIdx.x;  // grid < 2^31
  const int n = blk / p.nchunks, chunk = blk - n * p.nchunks;
  const int cvg = p.Cg / VEC;  // vector columns per group
  const int tx_n = p.gpp * cvg, ty_n = kThreads / tx_n;
  const int tx = threadIdx.x % tx_n, ty = threadIdx.x / tx_n;
  const int r0 = static_cast<int>(chunk * p.chunk), r1 = static_cast<int>(imin(p.S, r0 + p.chunk));
  const int step = U * ty_n;  // rows per loop step
  const int64_t rs = int64_t{ty_n} * p.C;  // between a thread's consecutive rows
  const T* x = static_cast<const T*>(p.x) + n * p.S * p.C;
  T* y = static_cast<T*>(p.y) + n * p.S * p.C;
  const int64_t cbn = int64_t{n} * p.C;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;

  for (int g0 = 0; g0 < p.G; g0 += p.gpp) {
    __syncthreads();  // sh and grp of the previous pass are consumed
    const int g = g0 + tx / cvg;
    const bool active = ty < ty_n && g < p.G;
    const int c0 = g0 * p.Cg + tx * VEC;
    // Shift: the group's first x (Kx) and channel_bias (Kc); cb[k] - Kc of this thread's channels
    // is loaded where used (fewer live registers).
    const int64_t first = int64_t{g} * p.Cg;  // the group's first channel (row 0)
    auto load_cb = [&](float (&cb)[VEC]) {
      const float Kc = param<T>(p.cb, p.cb32, cbn + first, 0.f);
#pragma unroll
      for (int k = 0; k < VEC; ++k) cb[k] = param<T>(p.cb, p.cb32, cbn + c0 + k, 0.f) - Kc;
    };
    const float Kx = active ? static_cast<float>(x[first]) : 0.f;
    float mean = 0.f, rstd = 0.f;
    if (P != kNorm) {
      Stats acc{0.f, 0.f, 0.f};
      if (active) {
        float cb[VEC];
        load_cb(cb);
        int64_t off = int64_t{r0 + ty} * p.C + c0;
        for (int r = r0 + ty; r < r1; r += step, off += U * rs) {
          Pack<T, VEC> raw[U];
#pragma unroll
          for (int u = 0; u < U; ++u) {
            if (r + u * ty_n < r1) raw[u] = load<T, VEC>(x + off + u * rs);
          }
#pragma unroll
          for (int u = 0; u < U; ++u) {
            if (r + u * ty_n < r1) {
              float v[VEC];
#pragma unroll
              for (int k = 0; k < VEC; ++k) v[k] = (static_cast<float>(raw[u].v[k]) - Kx) + cb[k];
              accumulate(acc, v, VEC);
            }
          }
        }
      }
      sh[threadIdx.x] = acc;
      __syncthreads();
      // Warp j merges group g0 + j: its cvg columns x ty_n rows of threads.
      for (int j = warp; j < p.gpp && g0 + j < p.G; j += kWarps) {
        Stats s{0.f, 0.f, 0.f};
        for (int q = lane; q < cvg * ty_n; q += 32) {
          merge(s, sh[(q / cvg) * tx_n + j * cvg + q % cvg]);
        }
        s = warp_reduce(s);
        if (lane == 0) {
          if (P == kStats) {
            p.part[(int64_t{n} * p.G + g0 + j) * p.nchunks + chunk] = s;
          } else {
            grp[j] = make_float2(s.mean, rsqrtf(s.m2 / s.n + p.eps));
          }
        }
      }
      if (P == kStats) continue;
      __syncthreads();
      if (active) {
        const float2 f = grp[tx / cvg];
        mean = f.x;
        rstd = f.y;
      }
    } else if (active) {
      const float2 f = p.fin[int64_t{n} * p.G + g];
      mean = f.x;
      rstd = f.y;
    }
    if (!active) continue;
    float a[VEC], b[VEC];
    {
      float cb[VEC];
      load_cb(cb);
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        a[k] = rstd * param<T>(p.w, p.w32, c0 + k, 1.f);
        b[k] = param<T>(p.b, p.b32, c0 + k, 0.f) + (cb[k] - mean) * a[k];
      }
    }
    int64_t off = int64_t{r0 + ty} * p.C + c0;
    for (int r = r0 + ty; r < r1; r += step, off += U * rs) {
      Pack<T, VEC> raw[U];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        if (r + u * ty_n < r1) raw[u] = load<T, VEC>(x + off + u * rs);
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        if (r + u * ty_n < r1) {
          float o[VEC];
#pragma unroll
          for (int k = 0; k < VEC; ++k) {
            o[k] = finish(fmaf(static_cast<float>(raw[u].v[k]) - Kx, a[k], b[k]), p.silu);
          }
          store<T, VEC>(y + off + u * rs, o);
        }
      }
    }
  }
}

// channels_last split path: one warp per group merges its nchunks partials.
__global__ void __launch_bounds__(kThreads) gn_finalize(const Params p, int64_t groups) {
  const int64_t gi = int64_t{blockIdx.x} * kWarps + threadIdx.x / 32;
  if (gi >= groups) return;  // whole warps
  const Stats s = merge_partials(p.part + gi * p.nchunks, p.nchunks);
  if (threadIdx.x % 32 == 0) p.fin[gi] = make_float2(s.mean, rsqrtf(s.m2 / s.n + p.eps));
}

void check_grid(int64_t blocks) {
  TORCH_CHECK(blocks <= std::numeric_limits<int>::max(), "x: too large for the CUDA kernel (",
              blocks, " blocks)");
}

// Blocks of `kernel` that the GPU holds at once (blocks per SM: one query per kernel and process).
template <auto kernel>
int64_t resident_blocks() {
  static const int per_sm = [] {
    int n = 0;
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kernel, kThreads, 0));
    return std::max(n, 1);
  }();
  return int64_t{per_sm} * at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
}

// Splits are sized to one wave: as many blocks as fit on the GPU at once, all of equal size (a
// second, partial wave would leave most SMs idle at the end), and none under kMinBlockValues.
template <typename T, int VEC>
void launch(Params p, bool nhwc, int64_t N, const at::Tensor& x) {
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int64_t groups = N * p.G;
  auto workspace = [&](int64_t nparts, bool fin) {
    const int64_t part_floats = (3 * nparts + 1) / 2 * 2;  // keep fin 8-byte aligned
    at::Tensor ws =
        at::empty({part_floats + (fin ? 2 * groups : 0)}, x.options().dtype(at::kFloat));
    p.part = reinterpret_cast<Stats*>(ws.data_ptr<float>());
    p.fin = fin ? reinterpret_cast<float2*>(ws.data_ptr<float>() + part_floats) : nullptr;
    return ws;  // alive until the launches are queued: the allocator reuses it in stream order
  };
  if (!nhwc) {
    // Blocks per group; 1 (one block per group, gn_nchw<kBoth>) when the groups fill the GPU.
    const int64_t wave = resident_blocks<gn_nchw<T, VEC, kStats>>();
    int64_t nchunks = std::max<int64_t>(1, std::min(wave / groups, ceil_div(p.M, kMinBlockValues)));
    p.chunk = ceil_div(ceil_div(p.M, nchunks), VEC) * VEC;
    nchunks = ceil_div(p.M, p.chunk);
    check_grid(groups * nchunks);
    p.nchunks = static_cast<int>(nchunks);
    const unsigned int grid = static_cast<unsigned int>(groups * nchunks);
    if (p.nchunks == 1) {
      gn_nchw<T, VEC, kBoth><<<grid, kThreads, 0, stream>>>(p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return;
    }
    at::Tensor ws = workspace(groups * p.nchunks, false);
    gn_nchw<T, VEC, kStats><<<grid, kThreads, 0, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    gn_nchw<T, VEC, kNorm><<<grid, kThreads, 0, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  const int cvg = p.Cg / VEC;  // <= kThreads, checked by the caller
  p.gpp = std::min(p.G, kThreads / cvg);
  const int ty_n = kThreads / (p.gpp * cvg);
  // Row chunks per sample; 1 (gn_nhwc<kBoth>) when the samples fill the GPU or are small.
  const int64_t wave = resident_blocks<gn_nhwc<T, VEC, kStats>>();
  int64_t nchunks = std::min({wave / N, ceil_div(p.S * p.C, kMinBlockValues), ceil_div(p.S, ty_n)});
  nchunks = std::max<int64_t>(1, nchunks);
  p.chunk = ceil_div(p.S, nchunks);
  nchunks = ceil_div(p.S, p.chunk);
  check_grid(N * nchunks);
  p.nchunks = static_cast<int>(nchunks);
  const unsigned int grid = static_cast<unsigned int>(N * nchunks);
  if (p.nchunks == 1) {
    gn_nhwc<T, VEC, kBoth><<<grid, kThreads, 0, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  at::Tensor ws = workspace(groups * p.nchunks, true);
  gn_nhwc<T, VEC, kStats><<<grid, kThreads, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  check_grid(ceil_div(groups, kWarps));
  const unsigned int fgrid = static_cast<unsigned int>(ceil_div(groups, kWarps));
  gn_finalize<<<fgrid, kThreads, 0, stream>>>(p, groups);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  gn_nhwc<T, VEC, kNorm><<<grid, kThreads, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// VEC = the widest of 16/sizeof(T), ..., 2, 1 that `vec` allows.
template <typename T, int VEC = 16 / sizeof(T)>
void launch_vec(const Params& p, bool nhwc, int64_t N, const at::Tensor& x, int vec) {
  if constexpr (VEC > 1) {
    if (vec < VEC) return launch_vec<T, VEC / 2>(p, nhwc, N, x, vec);
  }
  launch<T, VEC>(p, nhwc, N, x);
}

void check_param(const char* name, const std::optional<at::Tensor>& t, at::IntArrayRef shape,
                 const at::Tensor& x) {
  if (!t.has_value() || !t->defined()) return;
  const at::Tensor& p = *t;
  TORCH_CHECK(p.device() == x.device(), name, ": expected a tensor on ", x.device(),
              " (like x), got ", p.device());
  TORCH_CHECK(p.sizes() == shape, name, ": expected shape ", shape, ", got ", p.sizes());
  TORCH_CHECK(p.scalar_type() == x.scalar_type() || p.scalar_type() == at::kFloat, name,
              ": expected dtype ", x.scalar_type(), " (like x) or float32, got ", p.scalar_type());
  TORCH_CHECK(p.is_contiguous(), name, ": expected a contiguous tensor");
}

const void* ptr_of(const std::optional<at::Tensor>& t, bool* f32) {
  if (!t.has_value() || !t->defined()) return nullptr;
  *f32 = t->scalar_type() == at::kFloat;
  return t->data_ptr();
}

}  // namespace

at::Tensor diffkernels::group_norm_silu_cuda(const at::Tensor& x, int64_t num_groups,
                                const std::optional<at::Tensor>& weight,
                                const std::optional<at::Tensor>& bias, double eps, bool silu,
                                const std::optional<at::Tensor>& channel_bias) {
  TORCH_CHECK(x.is_cuda(), "x: expected a CUDA tensor, got ", x.device());
  TORCH_CHECK(x.dim() >= 3, "x: expected rank >= 3 [N, C, *spatial], got shape ", x.sizes());
  const auto dtype = x.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
              "x: expected float32, float16 or bfloat16, got ", dtype);
  const int64_t N = x.size(0), C = x.size(1);
  TORCH_CHECK(num_groups > 0 && C % num_groups == 0,
              "num_groups: expected a positive divisor of C=", C, ", got ", num_groups);
  TORCH_CHECK(eps >= 0, "eps: expected eps >= 0, got ", eps);
  check_param("weight", weight, {C}, x);
  check_param("bias", bias, {C}, x);
  check_param("channel_bias", channel_bias, {N, C}, x);
  bool nhwc = false;
  if (!x.is_contiguous()) {
    nhwc = (x.dim() == 4 && x.is_contiguous(at::MemoryFormat::ChannelsLast)) ||
           (x.dim() == 5 && x.is_contiguous(at::MemoryFormat::ChannelsLast3d));
    TORCH_CHECK(nhwc, "x: expected a contiguous or channels_last tensor, got strides ",
                x.strides());
  }
  at::Tensor y = at::empty_like(x);  // same strides as x: contiguous or channels_last
  if (x.numel() == 0) return y;
  const int64_t S = x.numel() / (N * C), Cg = C / num_groups;
  // 32-bit in-group indices (with headroom for the last loop step).
  const int64_t max_group = std::numeric_limits<int>::max() - kMinBlockValues;
  TORCH_CHECK(C <= max_group && Cg * S <= max_group, "x: groups of more than ", max_group,
              " values are not supported by the CUDA kernel, got ", Cg * S);
  const c10::cuda::CUDAGuard guard(x.device());

  Params p{};
  p.x = x.data_ptr();
  p.y = y.data_ptr();
  p.w = ptr_of(weight, &p.w32);
  p.b = ptr_of(bias, &p.b32);
  p.cb = ptr_of(channel_bias, &p.cb32);
  p.C = static_cast<int>(C);
  p.G = static_cast<int>(num_groups);
  p.Cg = static_cast<int>(Cg);
  p.S = S;
  p.M = Cg * S;
  p.divS = at::cuda::detail::IntDivider<unsigned int>(static_cast<unsigned int>(S));
  p.eps = static_cast<float>(eps);
  p.silu = silu;

  // Widest vector the layout's contiguous extent (the group, or Cg channels of a row) and the
  // alignment of x and y allow.
  const int64_t elem = x.element_size(), extent = nhwc ? Cg : p.M;
  int vec = static_cast<int>(16 / elem);
  while (vec > 1 && (extent % vec != 0 || reinterpret_cast<uintptr_t>(p.x) % (vec * elem) != 0 ||
                     reinterpret_cast<uintptr_t>(p.y) % (vec * elem) != 0)) {
    vec /= 2;
  }
  if (nhwc && Cg / vec > kThreads) {
    // A group wider than one block's columns (rare: Cg > 512 * vec): run on a contiguous copy.
    const auto format =
        x.dim() == 4 ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::ChannelsLast3d;
    return group_norm_silu_cuda(x.contiguous(), num_groups, weight, bias, eps, silu, channel_bias)
        .contiguous(format);
  }
  switch (dtype) {
    case at::kFloat: launch_vec<float>(p, nhwc, N, x, vec); break;
    case at::kHalf: launch_vec<at::Half>(p, nhwc, N, x, vec); break;
    default: launch_vec<at::BFloat16>(p, nhwc, N, x, vec); break;
  }
  return y;
}

