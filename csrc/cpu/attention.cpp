// attention on CPU: blocked flash attention (online softmax, fp32 accumulation) for
// q [B,H,Lq,D], k/v [B,H,Lk,D] with any strides whose last-dim stride is 1.
#include "../kernels.h"
#include "cpu_features.h"
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <optional>


// setup.py compiles without -mavx2, which would leave at::vec on its scalar fallback. On x86
// with GCC the kernel section below is compiled for AVX2+FMA+F16C (at::vec's AVX2
// implementation, 8 floats per vector) and the CPU is checked at run time (an ATen composite
// runs otherwise); the rest of the file stays baseline x86-64. Other compilers/architectures
// get at::vec's default implementation.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && !defined(CPU_CAPABILITY)
#define DK_ATTN_AVX2 1
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
// sleef.h declares its 256-bit functions only under __AVX__ (a -mavx macro the pragma does
// not set): define it around that one include.
#ifndef __AVX__
#define __AVX__ 1
#define DK_UNDEF_AVX 1
#endif
#include <sleef.h>
#ifdef DK_UNDEF_AVX
#undef __AVX__
#endif
#endif
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kVL = Vec::size();
constexpr int64_t kNR = 2 * kVL;   // keys per packed K^T panel (one QK^T micro-tile width)
constexpr int64_t kBlockQ = 64;    // query rows per task (at most)
constexpr int64_t kBlockK = 256;   // keys per online-softmax step (a multiple of kNR)
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// 2^x for the softmax weights (x <= 0, scores are kept in log2 units): Cephes' exp2f
// polynomial on the fraction, the integer part put into the exponent bits; ~2e-7 relative
// error. x <= -126.5 (a masked key: -inf) rounds to 2^-127, whose exponent field is 0: exactly 0.
// NaN must not reach it: fully masked rows are zeroed before.
inline Vec exp2_neg(Vec x) {
  x = at::vec::maximum(x, Vec(-127.f));
  const Vec n = x.round();
  const Vec f = x - n;
  Vec p(1.535336188319500e-4f);
  p = at::vec::fmadd(p, f, Vec(1.339887440266574e-3f));
  p = at::vec::fmadd(p, f, Vec(9.618437357674640e-3f));
  p = at::vec::fmadd(p, f, Vec(5.550332471162809e-2f));
  p = at::vec::fmadd(p, f, Vec(2.402264791363012e-1f));
  p = at::vec::fmadd(p, f, Vec(6.931472028550421e-1f));
  p = at::vec::fmadd(p, f, Vec(1.f));
  using IVec = at::vec::Vectorized<int32_t>;
  const IVec e = (at::vec::convert_to_int_of_same_size(n) + IVec(127)) << IVec(23);
  return p * at::vec::cast<float>(e);
}

// Per-head packed operands, fp32: K^T in panels [Lkp/kNR][D][kNR], V rows [Lkp][Dp], and the
// additive key bias (0 = attend, -inf = masked or padding key).
template <typename T>
void pack_kv(const T* k, int64_t sk, const T* v, int64_t sv, const bool* mask, int64_t Lk,
             int64_t Lkp, int64_t D, int64_t Dp, float* kt, float* vp, float* bias) {
  for (int64_t j = 0; j < Lkp; ++j) {
    float* ktj = kt + (j / kNR) * D * kNR + (j % kNR);
    float* vj = vp + j * Dp;
    if (j < Lk) {
      const T* kr = k + j * sk;
      const T* vr = v + j * sv;
      for (int64_t d = 0; d < D; ++d) {
        ktj[d * kNR] = static_cast<float>(kr[d]);
        vj[d] = static_cast<float>(vr[d]);
      }
      bias[j] = (mask == nullptr || mask[j]) ? 0.f : kNegInf;
    } else {
      for (int64_t d = 0; d < D; ++d) {
        ktj[d * kNR] = 0.f;
        vj[d] = 0.f;
      }
      bias[j] = kNegInf;
    }
    for (int64_t d = D; d < Dp; ++d) vj[d] = 0.f;
  }
}

// S[R rows][kNR keys] = bias + Q[R rows] . K^T panel: rank-1 updates over d, R*2 accumulators.
template <int R>
inline void qk_tile(const float* q, int64_t D, const float* kt, const float* bias, float* s,
                    int64_t lds) {
  Vec acc[R][2];
  const Vec b0 = Vec::loadu(bias), b1 = Vec::loadu(bias + kVL);
  for (int i = 0; i < R; ++i) {
    acc[i][0] = b0;
    acc[i][1] = b1;
  }
  for (int64_t d = 0; d < D; ++d) {
    const Vec k0 = Vec::loadu(kt + d * kNR), k1 = Vec::loadu(kt + d * kNR + kVL);
    for (int i = 0; i < R; ++i) {
      const Vec qi(q[i * D + d]);
      acc[i][0] = at::vec::fmadd(qi, k0, acc[i][0]);
      acc[i][1] = at::vec::fmadd(qi, k1, acc[i][1]);
    }
  }
  for (int i = 0; i < R; ++i) {
    acc[i][0].store(s + i * lds);
    acc[i][1].store(s + i * lds + kVL);
  }
}

template <int R>
inline void qk_rows(int64_t rows, const float* q, int64_t D, const float* kt, const float* bias,
                    float* s, int64_t lds) {
  if constexpr (R > 0) {
    for (; rows >= R; rows -= R, q += R * D, s += R * lds) qk_tile<R>(q, D, kt, bias, s, lds);
    if (rows > 0) qk_rows<R - 1>(rows, q, D, kt, bias, s, lds);
  }
}

// O[R rows][NV vectors] = alpha * O + P[R rows][nk] . V[nk][NV vectors].
template <int R, int NV>
inline void pv_tile(const float* p, int64_t ldp, const float* v, int64_t ldv, int64_t nk,
                    float* o, int64_t ldo, const float* alpha, bool first) {
  Vec acc[R][NV];
  for (int i = 0; i < R; ++i) {
    const Vec a(alpha[i]);
    for (int c = 0; c < NV; ++c)
      acc[i][c] = first ? Vec(0.f) : Vec::loadu(o + i * ldo + c * kVL) * a;
  }
  for (int64_t j = 0; j < nk; ++j) {
    Vec vj[NV];
    for (int c = 0; c < NV; ++c) vj[c] = Vec::loadu(v + j * ldv + c * kVL);
    for (int i = 0; i < R; ++i) {
      const Vec pi(p[i * ldp + j]);
      for (int c = 0; c < NV; ++c) acc[i][c] = at::vec::fmadd(pi, vj[c], acc[i][c]);
    }
  }
  for (int i = 0; i < R; ++i)
    for (int c = 0; c < NV; ++c) acc[i][c].store(o + i * ldo + c * kVL);
}

template <int NV, int R = (NV == 1 ? 8 : NV == 2 ? 6 : 4)>
inline void pv_rows(int64_t rows, const float* p, int64_t ldp, const float* v, int64_t ldv,
                    int64_t nk, float* o, int64_t ldo, const float* alpha, bool first) {
  if constexpr (R > 0) {
    for (; rows >= R; rows -= R, p += R * ldp, o += R * ldo, alpha += R)
      pv_tile<R, NV>(p, ldp, v, ldv, nk, o, ldo, alpha, first);
    if (rows > 0) pv_rows<NV, R - 1>(rows, p, ldp, v, ldv, nk, o, ldo, alpha, first);
  }
}

// Online softmax of one score row (log2 units) in place: s <- 2^(s - m_new),
// l <- l*alpha + sum, m <- m_new. A row whose keys so far are all masked keeps m = -inf,
// weights 0 and alpha 1.
inline void softmax_row(float* s, int64_t n, float& m, float& l, float& alpha) {
  Vec vmax(kNegInf);
  for (int64_t j = 0; j < n; j += kVL) vmax = at::vec::maximum(vmax, Vec::loadu(s + j));
  const float m_new = std::max(m, at::vec::vec_reduce_all<float>(
                                      [](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, vmax));
  if (m_new == kNegInf) {
    std::fill(s, s + n, 0.f);
    alpha = 1.f;
    return;
  }
  alpha = std::exp2(m - m_new);  // m = -inf: 0
  const Vec vm(m_new);
  Vec sum0(0.f), sum1(0.f);
  int64_t j = 0;
  for (; j + 2 * kVL <= n; j += 2 * kVL) {
    const Vec e0 = exp2_neg(Vec::loadu(s + j) - vm), e1 = exp2_neg(Vec::loadu(s + j + kVL) - vm);
    e0.store(s + j);
    e1.store(s + j + kVL);
    sum0 = sum0 + e0;
    sum1 = sum1 + e1;
  }
  for (; j < n; j += kVL) {
    const Vec e = exp2_neg(Vec::loadu(s + j) - vm);
    e.store(s + j);
    sum0 = sum0 + e;
  }
  l = l * alpha + at::vec::vec_reduce_all<float>(
                      [](Vec& a, Vec& b) { return a + b; }, sum0 + sum1);
  m = m_new;
}

struct Shape {
  int64_t B, H, Lq, Lk, D;
};

template <typename T>
void attention_kernel(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                      const at::Tensor& out, float scale, const bool* mask, Shape sh) {
  const int64_t B = sh.B, H = sh.H, Lq = sh.Lq, Lk = sh.Lk, D = sh.D;
  const int64_t Dp = (D + kVL - 1) / kVL * kVL;
  const int64_t Lkp = (Lk + kNR - 1) / kNR * kNR;
  const int64_t nvec = Dp / kVL;
  // Query rows per task: kBlockQ, smaller when there would be too few tasks to feed the threads.
  int64_t bq = kBlockQ;
  while (bq > 16 && B * H * ((Lq + bq - 1) / bq) < 2 * at::get_num_threads()) bq /= 2;
  const int64_t nqb = (Lq + bq - 1) / bq;
  const T* qd = q.const_data_ptr<T>();
  const T* kd = k.const_data_ptr<T>();
  const T* vd = v.const_data_ptr<T>();
  T* od = out.data_ptr<T>();
  const auto qs = q.strides(), ks = k.strides(), vs = v.strides(), os = out.strides();
  const int64_t ldS = std::min(kBlockK, Lkp);
  const float qscale = scale * kLog2e;  // scores in log2 units: exp -> exp2

  at::parallel_for(0, B * H * nqb, 1, [&](int64_t begin, int64_t end) {
    // Thread-local scratch; a thread's tasks are consecutive, so K/V are packed once per head.
    const int64_t n_kv = Lkp * D + Lkp * Dp + Lkp;
    const int64_t n_q = kBlockQ * (D + ldS + Dp + 3);
    at::Tensor scratch = at::empty({n_kv + n_q}, at::kFloat);
    float* kt = scratch.data_ptr<float>();
    float* vp = kt + Lkp * D;
    float* bias = vp + Lkp * Dp;
    float* qp = bias + Lkp;
    float* S = qp + kBlockQ * D;
    float* O = S + kBlockQ * ldS;
    float* m = O + kBlockQ * Dp;
    float* l = m + kBlockQ;
    float* alpha = l + kBlockQ;
    int64_t packed_bh = -1;

    for (int64_t task = begin; task < end; ++task) {
      const int64_t bh = task / nqb, b = bh / H, h = bh % H;
      const int64_t q0 = (task % nqb) * bq, nq = std::min(bq, Lq - q0);
      if (bh != packed_bh) {
        pack_kv<T>(kd + b * ks[0] + h * ks[1], ks[2], vd + b * vs[0] + h * vs[1], vs[2],
                   mask ? mask + b * Lk : nullptr, Lk, Lkp, D, Dp, kt, vp, bias);
        packed_bh = bh;
      }
      const T* qrow = qd + b * qs[0] + h * qs[1] + q0 * qs[2];
      for (int64_t r = 0; r < nq; ++r)
        for (int64_t d = 0; d < D; ++d)
          qp[r * D + d] = static_cast<float>(qrow[r * qs[2] + d]) * qscale;
      for (int64_t r = 0; r < nq; ++r) {
        m[r] = kNegInf;
        l[r] = 0.f;
      }

      for (int64_t k0 = 0; k0 < Lkp; k0 += kBlockK) {
        const int64_t nk = std::min(kBlockK, Lkp - k0);
        for (int64_t p = 0; p < nk; p += kNR)
          qk_rows<6>(nq, qp, D, kt + (k0 + p) * D, bias + k0 + p, S + p, ldS);
        for (int64_t r = 0; r < nq; ++r) softmax_row(S + r * ldS, nk, m[r], l[r], alpha[r]);
        // P.V over D in chunks of <= 3 vectors (register budget); avoid a lone 1-vector chunk.
        const bool first = k0 == 0;
        const float* vblk = vp + k0 * Dp;
        int64_t c = 0;
        for (; nvec - c >= 3 && nvec - c != 4; c += 3)
          pv_rows<3>(nq, S, ldS, vblk + c * kVL, Dp, nk, O + c * kVL, Dp, alpha, first);
        for (; nvec - c >= 2; c += 2)
          pv_rows<2>(nq, S, ldS, vblk + c * kVL, Dp, nk, O + c * kVL, Dp, alpha, first);
        if (c < nvec) pv_rows<1>(nq, S, ldS, vblk + c * kVL, Dp, nk, O + c * kVL, Dp, alpha, first);
      }

      T* orow = od + b * os[0] + h * os[1] + q0 * os[2];
      for (int64_t r = 0; r < nq; ++r) {
        const float inv = l[r] > 0.f ? 1.f / l[r] : 0.f;  // no attendable key: zeros
        for (int64_t d = 0; d < D; ++d) orow[r * os[2] + d] = static_cast<T>(O[r * Dp + d] * inv);
      }
    }
  });
}

void attention_dispatch(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                        const at::Tensor& out, float scale, const bool* mask, Shape sh) {
  switch (q.scalar_type()) {
    case at::kFloat: return attention_kernel<float>(q, k, v, out, scale, mask, sh);
    case at::kHalf: return attention_kernel<at::Half>(q, k, v, out, scale, mask, sh);
    case at::kBFloat16: return attention_kernel<at::BFloat16>(q, k, v, out, scale, mask, sh);
    default: TORCH_CHECK(false, "attention_cxx: unsupported dtype ", q.scalar_type());
  }
}

}  // namespace

#ifdef DK_ATTN_AVX2
#pragma GCC pop_options
#endif

namespace {

bool simd_kernel_usable() {
#ifdef DK_ATTN_AVX2
  return diffkernels::cpu_has_avx2_fma_f16c();
#else
  return true;
#endif
}

// ATen composite (fp32, the same math) for x86 CPUs without AVX2.
void attention_composite(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                         double scale, const std::optional<at::Tensor>& mask, at::Tensor& out) {
  at::Tensor s = at::matmul(q.to(at::kFloat), k.to(at::kFloat).transpose(-1, -2)) * scale;
  if (mask.has_value())
    s = s.masked_fill(mask->logical_not().view({q.size(0), 1, 1, k.size(2)}), kNegInf);
  out.copy_(at::matmul(at::softmax(s, -1).nan_to_num(0.0), v.to(at::kFloat)));
}

}  // namespace

int64_t diffkernels::attention_cpu_max_head_dim() { return 256; }

at::Tensor diffkernels::attention_cpu(const at::Tensor& q, const at::Tensor& k,
                                      const at::Tensor& v, double scale,
                                      const std::optional<at::Tensor>& key_padding_mask) {
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
  const int64_t B = q.size(0), H = q.size(1), Lq = q.size(2), D = q.size(3), Lk = k.size(2);
  TORCH_CHECK(k.size(0) == B && v.size(0) == B && k.size(1) == H && v.size(1) == H,
              "attention_cxx: k and v must have q's batch and heads [", B, ", ", H, "], got k ",
              k.sizes(), " and v ", v.sizes());
  TORCH_CHECK(k.size(3) == D && v.size(3) == D, "attention_cxx: k and v must have q's head dim ",
              D, ", got k ", k.sizes(), " and v ", v.sizes());
  TORCH_CHECK(v.size(2) == Lk, "attention_cxx: v must have k's length ", Lk, ", got ", v.size(2));
  TORCH_CHECK(D % 8 == 0 && D <= 256, "attention_cxx: q's head dim must be a multiple of 8 and "
              "at most 256, got ", D);
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
  if (!simd_kernel_usable()) {
    attention_composite(q, k, v, scale, key_padding_mask, out);
    return out;
  }
  attention_dispatch(q, k, v, out, static_cast<float>(scale), mask, Shape{B, H, Lq, Lk, D});
  return out;
}
