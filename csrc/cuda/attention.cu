// CUDA backend of diffkernels::attention_cxx (fp16 / bf16, sm_80+): a tensor-core flash-attention
// forward.
//
// One program = BM query rows of one (batch, head). It streams K and V in blocks of BN keys through
// double-buffered shared memory (cp.async), computes S = Q K^T and O += P V with
// mma.sync.m16n8k16 (fp16/bf16 in, fp32 accumulate; fragments from shared memory by ldmatrix) and
// keeps the softmax online in fp32 (running row max and row sum). Scores are scaled in fp32 on the
// accumulator, so fp16 inputs whose q.k overflows fp16 still give the right answer.
//
// Head dims: the MMA K-step is 16, so the kernel is templated on DP, the head dim padded to a
// multiple of 16 in shared memory only (D = 40 -> 48, 64, 80, 160), plus generic DP = 128 / 256 / 384
// / 512 for the other multiples of 8 up to 512. D itself is a runtime value: columns >= D are
// zero-filled. Above 256 (the VAE's 512-wide head) a CTA accumulates a 128-column slice of the output
// and recomputes the scores over the whole head dim (see attention_fwd_kernel).
// Layout: q/k/v/out are read and written through their strides (unit last-dim stride), so the
// transposed [B, L, H, D] views diffusers hands over are read in place. 16-byte vector loads need
// 16-byte-aligned rows; otherwise (odd storage offsets) a scalar path gives the same result.
// key_padding_mask: bool [B, Lk], True = attend; a row with nothing to attend gives zeros.
// NaN / inf inputs propagate as in F.scaled_dot_product_attention's math implementation (an additive
// -inf mask: a NaN score stays NaN, also at a masked key; 0 * NaN in P V), except that a row with
// nothing to attend gives zeros whatever K and V hold.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <atomic>
#include <cstdint>
#include <optional>

#include "../kernels.h"

namespace {

// ================================ PTX primitives ================================
// Warp-level building blocks. Fragment layouts (PTX ISA, "Matrix Fragments for mma.m16n8k16 with
// floating point type"; g = lane / 4, t = lane % 4):
//   A 16x16 (4 x .b32, 2 halves each, low half = lower column):
//     a0 = (row g,   cols 2t, 2t+1)   a1 = (row g+8, cols 2t, 2t+1)
//     a2 = (row g,   cols 2t+8, +9)   a3 = (row g+8, cols 2t+8, +9)
//   B 16x8 (k x n): b0 = (k 2t, 2t+1; n g)   b1 = (k 2t+8, 2t+9; n g)
//   C/D 16x8 fp32: c0, c1 = (row g, cols 2t, 2t+1)   c2, c3 = (row g+8, cols 2t, 2t+1)
// ldmatrix.x4: lanes 8j..8j+7 give the row addresses of 8x8 matrix j; register j of every lane
// receives matrix j's (row g, cols 2t, 2t+1); with .trans it receives (rows 2t, 2t+1; col g).
using u32 = uint32_t;

__device__ __forceinline__ u32 smem_addr(const void* p) {
  return static_cast<u32>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void ldmatrix_x4(u32 (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}

__device__ __forceinline__ void ldmatrix_x4_trans(u32 (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}

// d += a * b for one 16x8x16 tile, fp32 accumulators.
template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const u32 (&a)[4], u32 b0, u32 b1);

template <>
__device__ __forceinline__ void mma_16816<__half>(float (&d)[4], const u32 (&a)[4], u32 b0, u32 b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
      "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&d)[4], const u32 (&a)[4], u32 b0,
                                                         u32 b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
      "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// 16-byte global -> shared copy; src_bytes = 0 writes zeros without reading src.
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src),
               "r"(src_bytes));
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

// Wait until at most N of this thread's committed groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// 2^x; 2^-inf = 0, which the masking relies on.
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// Two floats -> one .b32 holding two T values (lo in the low half, as the fragments want).
template <typename T>
__device__ __forceinline__ u32 pack2(float lo, float hi);

template <>
__device__ __forceinline__ u32 pack2<__half>(float lo, float hi) {
  __half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<u32*>(&h);
}

template <>
__device__ __forceinline__ u32 pack2<__nv_bfloat16>(float lo, float hi) {
  __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<u32*>(&h);
}

__device__ __forceinline__ float warp_xor(float x, int lane_mask) {
  return __shfl_xor_sync(0xffffffffu, x, lane_mask);
}

__device__ __forceinline__ char* dyn_smem() {
  extern __shared__ __align__(16) char dk_attention_smem[];
  return dk_attention_smem;
}

// ==================================== kernel ====================================

struct Params {
  const void* q;
  const void* k;
  const void* v;
  void* o;
  const uint8_t* mask;  // bool [B, Lk] contiguous, or nullptr
  // element strides of dims (B, H, L); the head dim has stride 1 except o_sd (see vec_out)
  int64_t q_sb, q_sh, q_sl, k_sb, k_sh, k_sl, v_sb, v_sh, v_sl, o_sb, o_sh, o_sl, o_sd;
  int H, Lq, Lk, D;
  int n_qblocks;
  int n_dslices;     // output head-dim slices of DV columns per (batch, head, query block)
  float scale_log2;  // scale * log2(e): softmax in base 2
  bool vec_in;       // q, k, v rows 16-byte aligned: cp.async; else scalar loads
  bool vec_out;      // out rows 16-byte aligned with unit stride: 16-byte stores; else scalar
};

// Stage rows [row0, row0 + ROWS) x cols [0, DP) of a [L, D] matrix (row stride `stride`) into
// shared memory (row stride LDS); rows >= L and cols >= D become zeros. D % 8 == 0, so a 16-byte
// chunk is either all inside D or all outside. A thread keeps one chunk column and walks rows, so
// its addresses advance by a constant (few live registers across the main loop).
template <typename T, int ROWS, int DP, int NTHREADS>
__device__ __forceinline__ void load_tile(T* s, const T* g, int64_t stride, int row0, int L, int D,
                                          bool vec, int tid) {
  constexpr int LDS = DP + 8;
  constexpr int CPR = DP / 8;              // 16-byte chunks per row
  constexpr int RSTEP = NTHREADS / CPR;    // rows per pass
  constexpr int PASSES = (ROWS + RSTEP - 1) / RSTEP;
  static_assert(RSTEP >= 1, "more chunks per row than threads");
  if (tid >= RSTEP * CPR) return;
  const int col = (tid % CPR) * 8;
  const int r0 = tid / CPR;
  const bool col_ok = col < D;
  T* dst = s + r0 * LDS + col;
  const T* src = g + (int64_t)(row0 + r0) * stride + col;
#pragma unroll
  for (int i = 0; i < PASSES; ++i) {
    if (ROWS % RSTEP != 0 && r0 + i * RSTEP >= ROWS) break;
    const bool ok = col_ok && row0 + r0 + i * RSTEP < L;
    T* d = dst + i * RSTEP * LDS;
    const T* sp = src + i * RSTEP * stride;
    if (vec) {
      cp_async_16(d, ok ? sp : g, ok ? 16 : 0);
    } else {  // unaligned rows: 2-byte loads, plain shared store (ordered by __syncthreads)
      const uint16_t* s16 = reinterpret_cast<const uint16_t*>(sp);
      u32 w[4] = {0u, 0u, 0u, 0u};
      if (ok) {
#pragma unroll
        for (int e = 0; e < 4; ++e) w[e] = u32(s16[2 * e]) | (u32(s16[2 * e + 1]) << 16);
      }
      *reinterpret_cast<uint4*>(d) = make_uint4(w[0], w[1], w[2], w[3]);
    }
  }
}

// WARPS warps, each owning MT m-tiles of 16 query rows (BM = 16 * MT * WARPS); BN keys per block.
// The scores use the whole (padded) head dim DP; a program accumulates output columns
// [dv0, dv0 + DV) of its rows: DV = DP (one slice) up to D = 256, DV < DP above, where a
// [BM, 512] fp32 accumulator does not fit in registers: D / DV programs then share a query block,
// each recomputing S = Q K^T (the VAE's single 512-wide head).
// Shared memory: Q [BM][LDS], K [2][BN][LDS], V [2][BN][LDSV] (T elements). LDS = DP + 8 (LDSV =
// DV + 8): the 16-byte pad shifts consecutive rows by 4 banks, so each 8-row ldmatrix phase is
// conflict-free.
template <typename T, int DP, int DV, int WARPS, int MT, int BN>
__global__ void __launch_bounds__(WARPS * 32) attention_fwd_kernel(const Params p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();  // cp.async and bf16 mma need sm_80; the host refuses older devices before launching
#else
  constexpr int NTHREADS = WARPS * 32;
  constexpr int BM = 16 * MT * WARPS;
  constexpr int LDS = DP + 8;
  constexpr int LDSV = DV + 8;
  constexpr int KS = DP / 16;  // K-steps of S = Q K^T
  constexpr int NT = BN / 8;   // 8-key n-tiles of S
  constexpr int DT = DV / 8;   // 8-column n-tiles of O
  // Small heads keep their Q fragments in registers for the whole program; larger ones re-read
  // them from shared memory (ldmatrix) every K-step, which saves registers.
  constexpr bool Q_IN_REGS = MT * KS <= 8;
  static_assert(DP % 16 == 0 && DV % 16 == 0 && BN % 16 == 0 && DV <= DP,
                "tile shapes must be multiples of the MMA shape");

  T* sQ = reinterpret_cast<T*>(dyn_smem());
  T* sK = sQ + BM * LDS;
  T* sV = sK + 2 * BN * LDS;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int t = lane & 3;  // threadID_in_group; rows of this thread: g and g + 8 (g = lane >> 2)
  // query blocks fastest, then output slices: the programs of one head run together (K/V in L2)
  const int qb = blockIdx.x % p.n_qblocks;
  const int ds = DV == DP ? 0 : (blockIdx.x / p.n_qblocks) % p.n_dslices;  // one slice: p.n_dslices = 1
  const int bh = DV == DP ? blockIdx.x / p.n_qblocks : blockIdx.x / p.n_qblocks / p.n_dslices;
  const int b = bh / p.H, h = bh % p.H;
  const int q0 = qb * BM;
  const int D = p.D, Lk = p.Lk;
  const int dv0 = ds * DV, DVv = D - dv0;  // this slice's first column, valid columns from there

  const T* Qg = static_cast<const T*>(p.q) + b * p.q_sb + h * p.q_sh;
  const T* Kg = static_cast<const T*>(p.k) + b * p.k_sb + h * p.k_sh;
  const T* Vg = static_cast<const T*>(p.v) + b * p.v_sb + h * p.v_sh + dv0;
  const uint8_t* mrow = p.mask ? p.mask + (int64_t)b * Lk : nullptr;
  const int nkb = (Lk + BN - 1) / BN;

  // Prologue: group 0 = Q + K/V block 0, group 1 = K/V block 1 (maybe empty). Exactly one group
  // is committed per loop iteration, so "wait until <= 1 in flight" always means block j landed.
  load_tile<T, BM, DP, NTHREADS>(sQ, Qg, p.q_sl, q0, p.Lq, D, p.vec_in, tid);
  load_tile<T, BN, DP, NTHREADS>(sK, Kg, p.k_sl, 0, Lk, D, p.vec_in, tid);
  load_tile<T, BN, DV, NTHREADS>(sV, Vg, p.v_sl, 0, Lk, DVv, p.vec_in, tid);
  cp_async_commit();
  if (nkb > 1) {
    load_tile<T, BN, DP, NTHREADS>(sK + BN * LDS, Kg, p.k_sl, BN, Lk, D, p.vec_in, tid);
    load_tile<T, BN, DV, NTHREADS>(sV + BN * LDSV, Vg, p.v_sl, BN, Lk, DVv, p.vec_in, tid);
  }
  cp_async_commit();

  // A mask that lets the rows attend no key gives zeros, whatever K and V hold (NaN included).
  // Each warp scans the mask row once, while the first tiles load (outside the main loop).
  bool no_key = false;
  if (mrow != nullptr) {
    float any = 0.f;
    for (int c = lane; c < Lk; c += 32)
      if (mrow[c] != 0) { any = 1.f; break; }
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) any = fmaxf(any, warp_xor(any, o));
    no_key = any == 0.f;
  }

  // ldmatrix row addresses of this lane (see the layouts above):
  //   A (Q, 16x16 at rows m0, cols k0): row m0 + lane % 16, col k0 + (lane / 16) * 8
  //   B for S (K stored [key][d], x4 = keys n0..n0+15 x d k0..k0+15, non-transposed):
  //     key n0 + lane % 8 + (lane / 16) * 8, d k0 + ((lane / 8) % 2) * 8
  //     -> r0, r1 = b0, b1 of key tile n0;  r2, r3 = b0, b1 of key tile n0 + 8
  //   B for O (V stored [key][d], x4 = keys k0..k0+15 x d n0..n0+15, transposed):
  //     key k0 + lane % 16, d n0 + (lane / 16) * 8
  //     -> r0, r1 = b0, b1 of column tile n0;  r2, r3 = b0, b1 of column tile n0 + 8
  const int a_row = lane & 15, a_col = (lane >> 4) * 8;
  const int k_row = (lane & 7) + ((lane >> 4) << 3), k_col = ((lane >> 3) & 1) * 8;
  const int v_row = lane & 15, v_col = (lane >> 4) * 8;
  const T* sQw = sQ + (warp * MT * 16) * LDS;  // this warp's query rows

  float o[MT][DT][4];
  float m_run[MT][2], l_run[MT][2];  // per row (g, g + 8): running max (base 2), partial sum
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int dt = 0; dt < DT; ++dt) o[mt][dt][0] = o[mt][dt][1] = o[mt][dt][2] = o[mt][dt][3] = 0.f;
    m_run[mt][0] = m_run[mt][1] = -INFINITY;
    l_run[mt][0] = l_run[mt][1] = 0.f;
  }

  u32 qf[Q_IN_REGS ? MT : 1][Q_IN_REGS ? KS : 1][4];
  if constexpr (Q_IN_REGS) {
    cp_async_wait<1>();
    __syncthreads();
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int ks = 0; ks < KS; ++ks)
        ldmatrix_x4(qf[mt][ks], sQw + (mt * 16 + a_row) * LDS + ks * 16 + a_col);
  }

  for (int j = 0; j < nkb; ++j) {
    cp_async_wait<1>();
    __syncthreads();
    const T* sKj = sK + (j & 1) * BN * LDS;
    const T* sVj = sV + (j & 1) * BN * LDSV;

    // ---- S = Q K^T (fp32) ----
    float s[MT][NT][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) s[mt][nt][0] = s[mt][nt][1] = s[mt][nt][2] = s[mt][nt][3] = 0.f;
#pragma unroll
    for (int ks = 0; ks < KS; ++ks) {
      u32 a[MT][4];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        if constexpr (Q_IN_REGS) {
#pragma unroll
          for (int e = 0; e < 4; ++e) a[mt][e] = qf[mt][ks][e];
        } else {
          ldmatrix_x4(a[mt], sQw + (mt * 16 + a_row) * LDS + ks * 16 + a_col);
        }
      }
#pragma unroll
      for (int np = 0; np < NT / 2; ++np) {
        u32 bk[4];
        ldmatrix_x4(bk, sKj + (np * 16 + k_row) * LDS + ks * 16 + k_col);
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          mma_16816<T>(s[mt][2 * np], a[mt], bk[0], bk[1]);
          mma_16816<T>(s[mt][2 * np + 1], a[mt], bk[2], bk[3]);
        }
      }
    }

    // ---- scale (fp32, base 2), mask, online softmax ----
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) s[mt][nt][e] *= p.scale_log2;
    // Keys past Lk (zero-filled K: an inf in q would give inf * 0 = NaN) are set to -inf; masked
    // keys get -inf added, as SDPA's additive mask does, so a NaN score stays NaN.
    const int kbase = j * BN;
    if (mrow != nullptr || kbase + BN > Lk) {  // block-uniform: only partial / masked blocks pay
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int c = kbase + nt * 8 + 2 * t + e;  // key of accumulator columns e and 2 + e
          const bool inside = c < Lk;
          const bool attend = inside && (mrow == nullptr || mrow[c] != 0);
          if (!attend) {
#pragma unroll
            for (int mt = 0; mt < MT; ++mt)
#pragma unroll
              for (int f = e; f < 4; f += 2)
                s[mt][nt][f] = inside ? s[mt][nt][f] + -INFINITY : -INFINITY;
          }
        }
    }
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int r = 0; r < 2; ++r) {  // r = 0: row g (elements 0, 1); r = 1: row g + 8 (2, 3)
        float mx = -INFINITY;
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) mx = fmaxf(mx, fmaxf(s[mt][nt][2 * r], s[mt][nt][2 * r + 1]));
        // the 4 lanes of a group (same g) hold the row's columns
        mx = fmaxf(mx, warp_xor(mx, 1));
        mx = fmaxf(mx, warp_xor(mx, 2));
        const float m_new = fmaxf(m_run[mt][r], mx);
        // no finite score so far (a mask, or -inf scores from inf inputs): subtract 0, so
        // exp2(-inf) = 0 instead of exp2(-inf + inf) = NaN. fmaxf drops NaN scores, but their
        // exp2(NaN - m) = NaN still reaches l and O: the row is NaN, as in SDPA.
        const float m_sub = m_new == -INFINITY ? 0.f : m_new;
        const float alpha = fast_exp2(m_run[mt][r] - m_sub);
        m_run[mt][r] = m_new;
        float sum = 0.f;
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const float pv = fast_exp2(s[mt][nt][2 * r + e] - m_sub);
            s[mt][nt][2 * r + e] = pv;
            sum += pv;
          }
        l_run[mt][r] = l_run[mt][r] * alpha + sum;  // this lane's part; summed over the group at the end
#pragma unroll
        for (int dt = 0; dt < DT; ++dt) {
          o[mt][dt][2 * r] *= alpha;
          o[mt][dt][2 * r + 1] *= alpha;
        }
      }

    // ---- O += P V: the S accumulators of key tiles 2kk, 2kk+1 are exactly P's A fragment ----
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) {
      u32 pa[MT][4];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        pa[mt][0] = pack2<T>(s[mt][2 * kk][0], s[mt][2 * kk][1]);
        pa[mt][1] = pack2<T>(s[mt][2 * kk][2], s[mt][2 * kk][3]);
        pa[mt][2] = pack2<T>(s[mt][2 * kk + 1][0], s[mt][2 * kk + 1][1]);
        pa[mt][3] = pack2<T>(s[mt][2 * kk + 1][2], s[mt][2 * kk + 1][3]);
      }
#pragma unroll
      for (int dp = 0; dp < DT / 2; ++dp) {
        u32 bv[4];
        ldmatrix_x4_trans(bv, sVj + (kk * 16 + v_row) * LDSV + dp * 16 + v_col);
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          mma_16816<T>(o[mt][2 * dp], pa[mt], bv[0], bv[1]);
          mma_16816<T>(o[mt][2 * dp + 1], pa[mt], bv[2], bv[3]);
        }
      }
    }

    // ---- prefetch block j + 2 into the buffer everyone just finished reading ----
    __syncthreads();
    if (j + 2 < nkb) {
      load_tile<T, BN, DP, NTHREADS>(sK + (j & 1) * BN * LDS, Kg, p.k_sl, (j + 2) * BN, Lk, D,
                                     p.vec_in, tid);
      load_tile<T, BN, DV, NTHREADS>(sV + (j & 1) * BN * LDSV, Vg, p.v_sl, (j + 2) * BN, Lk, DVv,
                                     p.vec_in, tid);
    }
    cp_async_commit();
  }
  cp_async_wait<0>();

  // ---- normalise, stage this warp's rows in its own part of sQ, store 16-byte chunks ----
  T* sO = sQ + (warp * MT * 16) * LDS;
  __syncwarp();  // every lane of the warp is done reading these sQ rows
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float l = l_run[mt][r];
      l += warp_xor(l, 1);
      l += warp_xor(l, 2);
      // l = 0 (every score -inf): O * 0, which is 0, or NaN from a NaN/inf in V, as in SDPA.
      // l = NaN: 0 too, O is NaN already.
      const float inv = l > 0.f ? 1.f / l : 0.f;
      const int row = mt * 16 + (lane >> 2) + 8 * r;
#pragma unroll
      for (int dt = 0; dt < DT; ++dt)
        *reinterpret_cast<u32*>(sO + row * LDS + dt * 8 + 2 * t) =
            no_key ? 0u : pack2<T>(o[mt][dt][2 * r] * inv, o[mt][dt][2 * r + 1] * inv);
    }
  __syncwarp();
  T* Og = static_cast<T*>(p.o) + b * p.o_sb + h * p.o_sh + dv0 * p.o_sd;
  constexpr int CPR = DV / 8;  // even: a warp's 16 * MT rows are a whole number of 32-chunk rounds
  static_assert(MT * 16 * CPR % 32 == 0, "output chunks per warp must be a multiple of 32");
#pragma unroll
  for (int i = 0; i < MT * 16 * CPR / 32; ++i) {
    const int c = i * 32 + lane;
    const int r = c / CPR, col = (c % CPR) * 8;
    const int row = q0 + warp * MT * 16 + r;
    if (row < p.Lq && col < DVv) {
      const uint4 val = *reinterpret_cast<const uint4*>(sO + r * LDS + col);
      T* dst = Og + (int64_t)row * p.o_sl;
      if (p.vec_out) {
        *reinterpret_cast<uint4*>(dst + col) = val;
      } else {
        const T* e = reinterpret_cast<const T*>(&val);
#pragma unroll
        for (int i = 0; i < 8; ++i) dst[(int64_t)(col + i) * p.o_sd] = e[i];
      }
    }
  }
#endif
}

// ===================================== host =====================================

// Opt-in shared memory per block: sm_86/89 allow 99 KB, sm_80 163 KB, sm_90 227 KB.
constexpr int kSmallSmemBytes = 99 * 1024;
constexpr int kMaxSmemBytes = 163 * 1024;

// Q [BM][DP + 8], K [2][BN][DP + 8], V [2][BN][DV + 8] elements of T.
template <typename T, int DP, int DV, int WARPS, int MT, int BN>
constexpr int smem_bytes() {
  return ((16 * MT * WARPS + 2 * BN) * (DP + 8) + 2 * BN * (DV + 8)) * int(sizeof(T));
}

template <typename T, int DP, int DV, int WARPS, int MT, int BN>
void launch(Params& p, int64_t bh, cudaStream_t stream) {
  constexpr int BM = 16 * MT * WARPS;
  constexpr int smem = smem_bytes<T, DP, DV, WARPS, MT, BN>();
  static_assert(smem <= kMaxSmemBytes, "shared memory per block above sm_80's 163 KB");
  static_assert(DV < DP || smem <= kSmallSmemBytes, "D <= 256 must run on every sm_80+ part (99 KB)");
  p.n_qblocks = (p.Lq + BM - 1) / BM;
  p.n_dslices = (p.D + DV - 1) / DV;
  const int64_t grid = int64_t(p.n_qblocks) * p.n_dslices * bh;
  TORCH_CHECK(grid <= INT32_MAX, "attention_cxx (CUDA): too many (batch, head, query block) "
              "programs: ", grid);
  auto kernel = attention_fwd_kernel<T, DP, DV, WARPS, MT, BN>;
  if (smem > 48 * 1024) {  // opt in to more than 48 KB, once per device (setting it twice is harmless)
    static std::atomic<bool> configured[64];
    const int dev = c10::cuda::current_device();
    if (dev >= 64 || !configured[dev].load(std::memory_order_relaxed)) {
      C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
      if (dev < 64) configured[dev].store(true, std::memory_order_relaxed);
    }
  }
  kernel<<<unsigned(grid), WARPS * 32, smem, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Block shapes per padded head dim: (output slice width, warps, m-tiles per warp, keys per block).
// BN = 64 keeps a 77-token text context in the two K/V buffers for the whole program
// (cross-attention). Up to D = 256 one program holds the whole output row (DV = DP), in at most
// 99 KB of shared memory (every sm_80+ part). Above, 128-column output slices; the 64-row block needs 115 / 147 KB
// (DP = 384 / 512), which sm_80 and sm_90 have; devices with less (sm_86/89: 99 KB) take a
// 32-row block with 16-key blocks (58 / 74 KB).
template <typename T>
void launch_for_head_dim(Params& p, int64_t bh, cudaStream_t stream) {
  const int D = p.D;
  if (D <= 48) launch<T, 48, 48, 4, 2, 64>(p, bh, stream);          // 40 (and 8..48)
  else if (D <= 64) launch<T, 64, 64, 4, 2, 64>(p, bh, stream);     // 64, 56
  else if (D <= 80) launch<T, 80, 80, 4, 2, 64>(p, bh, stream);     // 80, 72
  else if (D <= 128) launch<T, 128, 128, 4, 2, 32>(p, bh, stream);  // generic 88..128
  else if (D <= 160) launch<T, 160, 160, 8, 1, 32>(p, bh, stream);  // 160, 136..152
  else if (D <= 256) launch<T, 256, 256, 4, 1, 32>(p, bh, stream);  // generic 168..256
  else {
    int optin = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin,
                                          c10::cuda::current_device()));
    if (D <= 384) {  // 264..384
      if (optin >= smem_bytes<T, 384, 128, 4, 1, 32>()) launch<T, 384, 128, 4, 1, 32>(p, bh, stream);
      else launch<T, 384, 128, 2, 1, 16>(p, bh, stream);
    } else {  // 392..512
      if (optin >= smem_bytes<T, 512, 128, 4, 1, 32>()) launch<T, 512, 128, 4, 1, 32>(p, bh, stream);
      else launch<T, 512, 128, 2, 1, 16>(p, bh, stream);
    }
  }
}

bool rows_16b_aligned(const at::Tensor& t) {
  if (reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 != 0) return false;
  for (int d = 0; d < 3; ++d)  // a size-1 dim's stride is never used
    if (t.size(d) > 1 && t.stride(d) % 8 != 0) return false;
  return true;
}

}  // namespace

bool diffkernels::attention_cuda_supports(const at::Tensor& q) {
  // fp16/bf16 tensor cores (mma.sync m16n8k16, cp.async): sm_80 and newer; any D <= 512.
  if (q.scalar_type() != at::kHalf && q.scalar_type() != at::kBFloat16) return false;
  return at::cuda::getDeviceProperties(q.device().index())->major >= 8;
}

// Called by csrc/attention.cpp with checked arguments (attention_cuda_supports(q) true),
// non-empty q and Lk > 0; the mask is a contiguous bool [B, Lk].
at::Tensor diffkernels::attention_cuda(const at::Tensor& q, const at::Tensor& k,
                                       const at::Tensor& v, double scale,
                                       const std::optional<at::Tensor>& key_padding_mask) {
  const int64_t B = q.size(0), H = q.size(1), Lq = q.size(2), D = q.size(3), Lk = k.size(2);
  TORCH_CHECK_VALUE(Lq <= INT32_MAX && Lk <= INT32_MAX,
                    "q, k: sequence length above 2^31 - 1 is not supported by the CUDA kernel");
  const uint8_t* mask = key_padding_mask
      ? reinterpret_cast<const uint8_t*>(key_padding_mask->const_data_ptr<bool>()) : nullptr;
  c10::cuda::CUDAGuard guard(q.device());
  at::Tensor out = at::empty_like(q);  // q's strides when q is dense, else contiguous

  Params p{};
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.o = out.data_ptr();
  p.mask = mask;
  p.q_sb = q.stride(0), p.q_sh = q.stride(1), p.q_sl = q.stride(2);
  p.k_sb = k.stride(0), p.k_sh = k.stride(1), p.k_sl = k.stride(2);
  p.v_sb = v.stride(0), p.v_sh = v.stride(1), p.v_sl = v.stride(2);
  p.o_sb = out.stride(0), p.o_sh = out.stride(1), p.o_sl = out.stride(2), p.o_sd = out.stride(3);
  p.H = int(H), p.Lq = int(Lq), p.Lk = int(Lk), p.D = int(D);
  p.scale_log2 = float(scale * 1.4426950408889634);
  p.vec_in = rows_16b_aligned(q) && rows_16b_aligned(k) && rows_16b_aligned(v);
  p.vec_out = rows_16b_aligned(out) && out.stride(3) == 1;

  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  if (q.scalar_type() == at::kHalf) launch_for_head_dim<__half>(p, B * H, stream);
  else launch_for_head_dim<__nv_bfloat16>(p, B * H, stream);
  return out;
}
