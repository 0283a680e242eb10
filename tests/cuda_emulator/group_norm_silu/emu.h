// Host emulation of the few CUDA features group_norm_silu.cu uses: one pthread per CUDA thread,
// std::barrier for __syncthreads and for warp shuffles, blocks run one after another.
#pragma once
#include <pthread.h>

#include <barrier>
#include <cmath>
#include <cstdlib>
#include <memory>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define C10_CUDA_KERNEL_LAUNCH_CHECK() \
  do {                                 \
  } while (0)

struct float2 {
  float x, y;
};
inline float2 make_float2(float a, float b) { return {a, b}; }
struct emu_dim3 {
  unsigned x = 0, y = 0, z = 0;
};
inline thread_local emu_dim3 threadIdx, blockIdx;
inline emu_dim3 gridDim, blockDim;
inline float __fdividef(float a, float b) { return a / b; }
inline float __expf(float a) { return std::exp(a); }
inline float rsqrtf(float a) { return 1.f / std::sqrt(a); }
using cudaStream_t = int;

namespace emu {
inline int get_sms() { return std::getenv("EMU_SMS") ? std::atoi(std::getenv("EMU_SMS")) : 132; }
inline std::barrier<>* block_bar = nullptr;
struct Warp {
  std::barrier<>* bar;
  float buf[32];
};
inline Warp warps[32];
inline long launches = 0;

inline float exchange(float v, int src) {
  Warp& w = warps[threadIdx.x / 32];
  const int l = threadIdx.x % 32;
  w.buf[l] = v;
  w.bar->arrive_and_wait();
  const float r = w.buf[src];
  w.bar->arrive_and_wait();
  return r;
}

template <class F>
struct Arg {
  F* f;
  unsigned b, t;
};

template <class F>
void* body(void* a) {
  auto* arg = static_cast<Arg<F>*>(a);
  threadIdx = {arg->t, 0, 0};
  blockIdx = {arg->b, 0, 0};
  (*arg->f)();
  // An exited thread no longer takes part in barriers (as on the GPU).
  block_bar->arrive_and_drop();
  warps[arg->t / 32].bar->arrive_and_drop();
  return nullptr;
}

template <class F>
void launch(unsigned grid, int threads, F f) {
  ++launches;
  gridDim = {grid, 1, 1};
  blockDim = {static_cast<unsigned>(threads), 1, 1};
  pthread_attr_t attr;
  pthread_attr_init(&attr);
  pthread_attr_setstacksize(&attr, 256 * 1024);
  std::vector<Arg<F>> args(threads);
  std::vector<pthread_t> ts(threads);
  for (unsigned b = 0; b < grid; ++b) {
    std::barrier<> bb(threads);
    block_bar = &bb;
    std::vector<std::unique_ptr<std::barrier<>>> wb;
    for (int w = 0; w < threads / 32; ++w) {
      wb.emplace_back(new std::barrier<>(32));
      warps[w].bar = wb.back().get();
    }
    for (int t = 0; t < threads; ++t) {
      args[t] = {&f, b, static_cast<unsigned>(t)};
      if (pthread_create(&ts[t], &attr, body<F>, &args[t]) != 0) std::abort();
    }
    for (int t = 0; t < threads; ++t) pthread_join(ts[t], nullptr);
  }
  pthread_attr_destroy(&attr);
}
}  // namespace emu

inline float __shfl_xor_sync(unsigned, float v, int m) {
  return emu::exchange(v, (threadIdx.x % 32) ^ m);
}
inline float __shfl_sync(unsigned, float v, int src) { return emu::exchange(v, src); }
inline void __syncthreads() { emu::block_bar->arrive_and_wait(); }

// Occupancy as on sm_80/sm_90 for these kernels (__launch_bounds__(512, 2)).
template <class K>
inline int cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* n, K, int, int) {
  *n = 2;
  return 0;
}
#define C10_CUDA_CHECK(x) (void)(x)
