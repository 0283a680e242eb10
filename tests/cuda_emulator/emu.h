// Host emulation of the warp-level primitives used by csrc/cuda/attention.cu, written from the PTX ISA
// fragment tables (NOT from the kernel's own index math), so that the kernel's addressing, fragment
// layouts, softmax, masking and cp.async pipelining can be checked on a machine without a GPU.
// Every CUDA thread is a ucontext fiber; collectives (ldmatrix, mma, shfl, __syncwarp,
// __syncthreads) are real barriers; the scheduler picks a random runnable fiber, so warps drift
// apart between barriers; cp.async copies land either at issue or only at cp.async.wait_group
// (random), so both "read before wait" and "overwrite while in use" hazards show up as wrong output.
// The last section stands in for the CUDA runtime / c10 calls of the kernel's host launch code.
// See tests/test_cuda_emulator.py for what is and is not modelled.
#pragma once
#include <ucontext.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <atomic>
#include <functional>
#include <map>
#include <random>
#include <type_traits>
#include <vector>

#define __device__
#define __global__
#define __forceinline__ inline
#define __launch_bounds__(...)

using u32 = uint32_t;
struct uint4 { uint32_t x, y, z, w; };
inline uint4 make_uint4(uint32_t a, uint32_t b, uint32_t c, uint32_t d) { return {a, b, c, d}; }
struct Dim { int x; };

// ---------------- 16-bit float storage types (round to nearest even) ----------------
struct __half { uint16_t bits; };
struct __nv_bfloat16 { uint16_t bits; };

inline float bits_to_float(uint32_t b) { float f; memcpy(&f, &b, 4); return f; }
inline uint32_t float_to_bits(float f) { uint32_t b; memcpy(&b, &f, 4); return b; }

inline float half_to_float(uint16_t h) {
  const uint32_t s = (h >> 15) & 1, e = (h >> 10) & 31, m = h & 1023;
  float v;
  if (e == 0) v = std::ldexp(float(m), -24);
  else if (e == 31) v = m ? NAN : INFINITY;
  else v = std::ldexp(float(m | 1024), int(e) - 25);
  return s ? -v : v;
}
inline uint16_t float_to_half(float f) {  // RNE via double arithmetic, overflow -> inf
  if (std::isnan(f)) return 0x7e00;
  const uint16_t s = std::signbit(f) ? 0x8000 : 0;
  double a = std::fabs(double(f));
  if (a == 0) return s;
  int e;
  std::frexp(a, &e);        // a = f * 2^e, f in [0.5, 1)
  int ex = e - 1;           // a in [2^ex, 2^(ex+1))
  if (ex < -14) ex = -14;   // subnormal spacing 2^-24
  double q = std::nearbyint(std::ldexp(a, 10 - ex));  // mantissa units of 2^(ex-10)
  double v = std::ldexp(q, ex - 10);
  if (v >= 65520.0) return s | 0x7c00;
  // re-encode exactly
  if (v < std::ldexp(1.0, -14)) return s | uint16_t(std::nearbyint(std::ldexp(v, 24)));
  int e2; std::frexp(v, &e2); int ex2 = e2 - 1;
  uint16_t m = uint16_t(std::nearbyint(std::ldexp(v, 10 - ex2)) - 1024);
  return s | uint16_t((ex2 + 15) << 10) | m;
}
inline float bf16_to_float(uint16_t h) { return bits_to_float(uint32_t(h) << 16); }
inline uint16_t float_to_bf16(float f) {
  if (std::isnan(f)) return 0x7fc0;
  uint32_t b = float_to_bits(f);
  b += 0x7fff + ((b >> 16) & 1);
  return uint16_t(b >> 16);
}
template <typename T> float to_f(uint16_t b);
template <> inline float to_f<__half>(uint16_t b) { return half_to_float(b); }
template <> inline float to_f<__nv_bfloat16>(uint16_t b) { return bf16_to_float(b); }
template <typename T> uint16_t from_f(float f);
template <> inline uint16_t from_f<__half>(float f) { return float_to_half(f); }
template <> inline uint16_t from_f<__nv_bfloat16>(float f) { return float_to_bf16(f); }

// ---------------- fibers, barriers, memory registry ----------------
namespace emu {
[[noreturn]] inline void fail(const char* what) { fprintf(stderr, "EMU FAILURE: %s\n", what); fflush(stderr); abort(); }

struct Copy { char* dst; unsigned char data[16]; };
struct Lane {
  ucontext_t ctx;
  Dim tid;
  bool done = false;
  int wait_kind = 0;  // 0 none, 1 warp barrier, 2 block barrier
  int wait_gen = 0;
  std::vector<char> stack;
  std::vector<Copy> open;
  std::vector<std::vector<Copy>> groups;
};
struct Warp {
  int count = 0, gen = 0;
  const void* ptr[32];
  int kind[32];
  u32 a[32][4], b[32][2];
  float f[32];
};
struct Region { const char* lo; const char* hi; };

inline std::vector<Lane> lanes;
inline std::vector<Warp> warps;
inline int cur = -1;
inline ucontext_t sched_ctx;
inline int block_count = 0, block_gen = 0, nthreads = 0;
inline Dim block_idx;
inline std::vector<char> smem;  // 16 B-aligned dynamic shared memory + guard
inline size_t smem_bytes = 0;
inline std::vector<Region> globals;  // readable global buffers
inline std::mt19937 rng(1234);
inline std::function<void()> kernel_fn;
inline long long n_collectives = 0;

inline Lane& me() { return lanes[cur]; }
inline int lane_id() { return me().tid.x & 31; }
inline Warp& my_warp() { return warps[me().tid.x >> 5]; }
inline void yield() { swapcontext(&me().ctx, &sched_ctx); }

inline void warp_barrier() {
  Warp& w = my_warp();
  const int gen = w.gen;
  if (++w.count == 32) { w.count = 0; ++w.gen; return; }
  me().wait_kind = 1; me().wait_gen = gen;
  yield();
}
inline void block_barrier() {
  const int gen = block_gen;
  if (++block_count == nthreads) { block_count = 0; ++block_gen; return; }
  me().wait_kind = 2; me().wait_gen = gen;
  yield();
}
inline bool runnable(const Lane& l) {
  if (l.done) return false;
  if (l.wait_kind == 1) return warps[l.tid.x >> 5].gen != l.wait_gen;
  if (l.wait_kind == 2) return block_gen != l.wait_gen;
  return true;
}
inline void trampoline() { kernel_fn(); me().done = true; }  // returns to uc_link (scheduler)

inline char* smem_base() { return smem.data(); }
inline void check_smem(const void* p, size_t n, const char* what) {
  const char* c = static_cast<const char*>(p);
  if (c < smem_base() || c + n > smem_base() + smem_bytes) fail(what);
}
inline void check_global(const void* p, size_t n, const char* what) {
  const char* c = static_cast<const char*>(p);
  for (auto& r : globals) if (c >= r.lo && c + n <= r.hi) return;
  fail(what);
}

// Runs one thread block of `threads` fibers to completion.
inline void run_block(int bid, int threads, size_t smem_size, std::function<void()> fn) {
  nthreads = threads;
  block_idx.x = bid;
  smem_bytes = smem_size;
  smem.assign(smem_size + 64, char(0xff));  // NaN pattern for fp16 and bf16: unwritten smem poisons results
  lanes.clear();
  lanes.resize(threads);
  warps.assign((threads + 31) / 32, Warp{});
  block_count = 0; block_gen = 0;
  kernel_fn = fn;
  for (int i = 0; i < threads; ++i) {
    Lane& l = lanes[i];
    l.tid.x = i;
    l.stack.resize(256 * 1024);
    getcontext(&l.ctx);
    l.ctx.uc_stack.ss_sp = l.stack.data();
    l.ctx.uc_stack.ss_size = l.stack.size();
    l.ctx.uc_link = &sched_ctx;
    makecontext(&l.ctx, trampoline, 0);
  }
  std::vector<int> ready;
  for (;;) {
    ready.clear();
    bool all_done = true;
    for (int i = 0; i < threads; ++i) {
      if (!lanes[i].done) all_done = false;
      if (runnable(lanes[i])) ready.push_back(i);
    }
    if (all_done) break;
    if (ready.empty()) fail("deadlock: a collective or barrier that not every thread reaches");
    cur = ready[rng() % ready.size()];
    lanes[cur].wait_kind = 0;
    swapcontext(&sched_ctx, &lanes[cur].ctx);
  }
  for (int i = 0; i < threads; ++i)
    if (!lanes[i].open.empty()) fail("cp.async copies never committed");
  for (size_t i = smem_size; i < smem_size + 64; ++i)
    if (smem[i] != char(0xff)) fail("shared memory written past the dynamic allocation");
  cur = -1;
}
}  // namespace emu

#define threadIdx (emu::me().tid)
#define blockIdx (emu::block_idx)

// ---------------- the primitives, as the PTX ISA defines them ----------------
inline char* dyn_smem() { return emu::smem_base(); }
inline void __syncthreads() { emu::block_barrier(); }
inline void __syncwarp() { emu::warp_barrier(); }

inline uint16_t ld16(const char* p) { uint16_t v; memcpy(&v, p, 2); return v; }

// ldmatrix .m8n8 .x4 .b16: lanes 8j..8j+7 give the 8 row addresses of matrix j (16-byte aligned, 8
// contiguous b16 each). Without .trans lane l receives matrix j's row l/4, elements 2(l%4), 2(l%4)+1;
// with .trans it receives rows 2(l%4), 2(l%4)+1 of column l/4.
inline void ldmatrix_impl(u32 (&r)[4], const void* p, int kind) {
  emu::Warp& w = emu::my_warp();
  const int lane = emu::lane_id();
  w.ptr[lane] = p;
  w.kind[lane] = kind;
  emu::warp_barrier();
  ++emu::n_collectives;
  for (int i = 0; i < 32; ++i) {
    if (w.kind[i] != kind) emu::fail("ldmatrix: lanes disagree on the instruction");
    if (reinterpret_cast<uintptr_t>(w.ptr[i]) % 16) emu::fail("ldmatrix: row address not 16-byte aligned");
    emu::check_smem(w.ptr[i], 16, "ldmatrix: row outside shared memory");
  }
  const int g = lane >> 2, t = lane & 3;
  for (int j = 0; j < 4; ++j) {
    uint16_t lo, hi;
    if (kind == 1) {
      const char* row = static_cast<const char*>(w.ptr[8 * j + g]);
      lo = ld16(row + 2 * (2 * t));
      hi = ld16(row + 2 * (2 * t + 1));
    } else {
      lo = ld16(static_cast<const char*>(w.ptr[8 * j + 2 * t]) + 2 * g);
      hi = ld16(static_cast<const char*>(w.ptr[8 * j + 2 * t + 1]) + 2 * g);
    }
    r[j] = u32(lo) | (u32(hi) << 16);
  }
  emu::warp_barrier();
}
inline void ldmatrix_x4(u32 (&r)[4], const void* p) { ldmatrix_impl(r, p, 1); }
inline void ldmatrix_x4_trans(u32 (&r)[4], const void* p) { ldmatrix_impl(r, p, 2); }

// mma.m16n8k16 .row.col f32 += f16/bf16: fragment tables of the PTX ISA (g = lane/4, t = lane%4)
//   A: a_i (i = 0..7, two per register, low half first): row g for i in {0,1,4,5} else g+8;
//      col 2t + (i&1) for i < 4, 2t + (i&1) + 8 for i >= 4
//   B: b_i (i = 0..3): row 2t + (i&1) for i < 2, 2t + (i&1) + 8 for i >= 2; col g
//   C/D: c_i: row g for i < 2, g+8 otherwise; col 2t + (i&1)
template <typename T>
inline void mma_16816(float (&d)[4], const u32 (&a)[4], u32 b0, u32 b1) {
  emu::Warp& w = emu::my_warp();
  const int lane = emu::lane_id();
  for (int i = 0; i < 4; ++i) w.a[lane][i] = a[i];
  w.b[lane][0] = b0; w.b[lane][1] = b1;
  w.kind[lane] = 10 + int(sizeof(T) == 2 && std::is_same<T, __half>::value);
  emu::warp_barrier();
  ++emu::n_collectives;
  for (int i = 0; i < 32; ++i) if (w.kind[i] != w.kind[lane]) emu::fail("mma: lanes disagree");
  // inverse tables (built once from the formulas): element -> (lane, element index i)
  static int a_lane[16][16], a_idx[16][16], b_lane[16][8], b_idx[16][8];
  static bool built = false;
  if (!built) {
    for (int L = 0; L < 32; ++L) {
      const int g = L >> 2, t = L & 3;
      for (int i = 0; i < 8; ++i) {
        const int r = (i < 2 || (i >= 4 && i < 6)) ? g : g + 8;
        const int c = (i < 4) ? 2 * t + (i & 1) : 2 * t + (i & 1) + 8;
        a_lane[r][c] = L; a_idx[r][c] = i;
      }
      for (int i = 0; i < 4; ++i) {
        const int r = (i < 2) ? 2 * t + (i & 1) : 2 * t + (i & 1) + 8;
        b_lane[r][g] = L; b_idx[r][g] = i;
      }
    }
    built = true;
  }
  auto A = [&](int row, int col) {
    const int L = a_lane[row][col], i = a_idx[row][col];
    const u32 reg = w.a[L][i / 2];
    return to_f<T>(uint16_t((i & 1) ? reg >> 16 : reg & 0xffff));
  };
  auto B = [&](int row, int col) {
    const int L = b_lane[row][col], i = b_idx[row][col];
    const u32 reg = w.b[L][i / 2];
    return to_f<T>(uint16_t((i & 1) ? reg >> 16 : reg & 0xffff));
  };
  const int g = lane >> 2, t = lane & 3;
  for (int i = 0; i < 4; ++i) {
    const int row = i < 2 ? g : g + 8, col = 2 * t + (i & 1);
    float acc = 0.f;
    for (int k = 0; k < 16; ++k) acc += A(row, k) * B(k, col);
    d[i] += acc;
  }
  emu::warp_barrier();
}

inline float warp_xor(float x, int m) {
  emu::Warp& w = emu::my_warp();
  const int lane = emu::lane_id();
  w.f[lane] = x;
  emu::warp_barrier();
  ++emu::n_collectives;
  const float y = w.f[lane ^ m];
  emu::warp_barrier();
  return y;
}

// cp.async.cg 16: src_bytes 0 -> zero fill (src not read), 16 -> copy. Lands at issue or at wait.
inline void cp_async_16(void* dst, const void* src, int src_bytes) {
  if (reinterpret_cast<uintptr_t>(dst) % 16) emu::fail("cp.async: dst not 16-byte aligned");
  emu::check_smem(dst, 16, "cp.async: dst outside shared memory");
  if (src_bytes != 0 && src_bytes != 16) emu::fail("cp.async: src-size other than 0/16");
  emu::Copy c;
  c.dst = static_cast<char*>(dst);
  if (src_bytes) {
    if (reinterpret_cast<uintptr_t>(src) % 16) emu::fail("cp.async: src not 16-byte aligned");
    emu::check_global(src, 16, "cp.async: src outside every global buffer");
    memcpy(c.data, src, 16);
  } else {
    memset(c.data, 0, 16);
  }
  if (emu::rng() & 1) memcpy(c.dst, c.data, 16);
  else emu::me().open.push_back(c);
}
inline void cp_async_commit() {
  emu::me().groups.push_back(std::move(emu::me().open));
  emu::me().open.clear();
}
template <int N>
inline void cp_async_wait() {
  auto& gs = emu::me().groups;
  while (int(gs.size()) > N) {
    for (auto& c : gs.front()) memcpy(c.dst, c.data, 16);
    gs.erase(gs.begin());
  }
}

inline float fast_exp2(float x) { return exp2f(x); }

template <typename T>
inline u32 pack2(float lo, float hi) { return u32(from_f<T>(lo)) | (u32(from_f<T>(hi)) << 16); }


// ---------------- host side: what the kernel's launch code calls ----------------
// The host section of attention.cu (launch, launch_for_head_dim) is compiled unchanged, except that
// the extraction step rewrites `kernel<<<grid, block, smem, stream>>>(args)` into
// emu::launch_kernel(kernel, grid, block, smem, stream, args). Launch rules checked as the driver
// would: grid and block sizes, and dynamic shared memory above 48 KB only after the opt-in.
using cudaStream_t = struct CUstream_st*;
using cudaError_t = int;
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize };
enum cudaDeviceAttr { cudaDevAttrMaxSharedMemoryPerBlockOptin };

#define TORCH_CHECK(cond, ...) \
  do { if (!(cond)) emu::fail("TORCH_CHECK(" #cond ") failed in the host launch code"); } while (0)
#define C10_CUDA_CHECK(expr) \
  do { if ((expr) != 0) emu::fail(#expr " returned an error"); } while (0)
#define C10_CUDA_KERNEL_LAUNCH_CHECK() do {} while (0)  // launch errors fail in launch_kernel
namespace c10::cuda { inline int current_device() { return 0; } }

namespace emu {
// The smallest opt-in shared memory limit of the sm_80+ parts (sm_86 / sm_89: 99 KB).
constexpr int kMaxOptInSmem = 99 * 1024;
// The emulated device's opt-in limit (cudaDeviceGetAttribute, cudaFuncSetAttribute): 99 KB unless
// a case emulates an sm_80 (163 KB) or sm_90 (227 KB).
inline int optin_smem = kMaxOptInSmem;
inline std::map<const void*, int> max_dyn_smem;  // per kernel, set by cudaFuncSetAttribute
struct LaunchInfo { long long grid = 0; int block = 0; long long smem = 0; };
inline LaunchInfo last_launch;

template <typename... P, typename... A>
void launch_kernel(void (*fn)(P...), long long grid, int block, long long smem, cudaStream_t,
                   const A&... args) {
  if (grid < 1 || grid > 2147483647LL) fail("launch: grid size outside [1, 2^31 - 1]");
  if (block < 1 || block > 1024) fail("launch: block size outside [1, 1024]");
  if (smem < 0) fail("launch: negative dynamic shared memory");
  if (smem > 48 * 1024) {
    auto it = max_dyn_smem.find(reinterpret_cast<const void*>(fn));
    if (it == max_dyn_smem.end() || it->second < smem)
      fail("launch: more than 48 KB of dynamic shared memory without cudaFuncSetAttribute");
  }
  last_launch = {grid, block, smem};
  for (long long bid = 0; bid < grid; ++bid)
    run_block(int(bid), block, size_t(smem), [&] { fn(args...); });
}
}  // namespace emu

template <typename... P>
cudaError_t cudaFuncSetAttribute(void (*fn)(P...), cudaFuncAttribute, int value) {
  if (value < 0 || value > emu::optin_smem) return 1;  // cudaErrorInvalidValue
  emu::max_dyn_smem[reinterpret_cast<const void*>(fn)] = value;
  return 0;
}

inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr, int device) {
  if (device != 0) return 1;  // cudaErrorInvalidDevice
  *value = emu::optin_smem;
  return 0;
}
