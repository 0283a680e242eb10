// attention kernel body, compiled once per CPU capability (csrc/cpu/capability/). Included
// after capability.h only.
//
// Blocked flash attention: per (batch, head, block of query rows), over blocks of keys,
//   S = Q K^T (GEMM), online softmax of S * scale in fp32 (at::vec, this capability's width),
//   O = alpha * O + P V (GEMM), and finally out = O / l.
// The GEMMs are at::native::cpublas::brgemm, the micro-kernels PyTorch exports to extensions
// (oneDNN's brgemm ukernels, JIT-compiled for the CPU; MKL/BLAS sgemm where oneDNN has none):
// the same ones ATen's own flash attention uses. fp32 q and v are read in place (any row
// stride); K is transposed once per head into a thread-local panel; fp16/bf16 operands are
// converted to fp32 on the way in (brgemm's 16-bit paths need AMX's VNNI layout).
//
// NaN/inf propagate as in F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None,
// None, :]): the mask is an additive 0/-inf bias (so a NaN score stays NaN even at a masked
// key), the row max keeps NaN, and P V includes the zero weights (0 * inf = NaN, as in SDPA).
// A row whose scores are all -inf (every key masked) gives zeros, as SDPA's flash kernel does.
namespace diffkernels::CPU_CAPABILITY {
namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kVL = Vec::size();
constexpr int64_t kBlockQ = 64;   // query rows per task (at most)
constexpr int64_t kBlockK = 512;  // keys per online-softmax step (at most)
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// 2^x for x <= 0 (scores in log2 units minus their max): Cephes' exp2f polynomial on the
// fraction, the integer part put into the exponent bits; ~2e-7 relative error. x <= -127
// (a masked key: -inf) gives exactly 0; NaN stays NaN (maximum keeps it; n is garbage then, but
// p is NaN).
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

// max that keeps NaN (std::max(m, NaN) would return m).
inline float nan_max(float a, float b) { return (a != a || a > b) ? a : b; }

// Online softmax of one row of n raw scores s, in place: t = s * c + bias (c = scale * log2 e,
// bias 0 or -inf), s <- 2^(t - m_new), l <- l * alpha + sum, m <- m_new. While every score so
// far is -inf, m stays -inf, the weights are 0 and alpha is 1.
inline void softmax_row(float* s, const float* bias, int64_t n, float c, float& m, float& l,
                        float& alpha) {
  const Vec vc(c);
  Vec vmax(kNegInf);
  int64_t j = 0;
  for (; j + kVL <= n; j += kVL) {
    const Vec t = at::vec::fmadd(Vec::loadu(s + j), vc, Vec::loadu(bias + j));
    t.store(s + j);
    vmax = at::vec::maximum(vmax, t);
  }
  float row_max = at::vec::vec_reduce_all<float>(
      [](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, vmax);
  for (; j < n; ++j) {
    s[j] = s[j] * c + bias[j];
    row_max = nan_max(row_max, s[j]);
  }
  const float m_new = nan_max(m, row_max);
  if (m_new == kNegInf) {
    std::fill(s, s + n, 0.f);
    alpha = 1.f;
    return;
  }
  alpha = std::exp2(m - m_new);  // m = -inf: 0; NaN stays NaN
  const Vec vm(m_new);
  Vec sum0(0.f), sum1(0.f);
  for (j = 0; j + 2 * kVL <= n; j += 2 * kVL) {
    const Vec e0 = exp2_neg(Vec::loadu(s + j) - vm), e1 = exp2_neg(Vec::loadu(s + j + kVL) - vm);
    e0.store(s + j);
    e1.store(s + j + kVL);
    sum0 = sum0 + e0;
    sum1 = sum1 + e1;
  }
  for (; j < n; j += kVL) {
    const int64_t cnt = std::min(kVL, n - j);
    const Vec e = exp2_neg(Vec::loadu(s + j, cnt) - vm);
    e.store(s + j, cnt);
    sum0 = sum0 + Vec::set(Vec(0.f), e, cnt);
  }
  l = l * alpha + at::vec::vec_reduce_all<float>(
                      [](Vec& a, Vec& b) { return a + b; }, sum0 + sum1);
  m = m_new;
}

// o[0, n) *= a.
inline void scale_row(float* o, int64_t n, float a) {
  const Vec va(a);
  int64_t d = 0;
  for (; d + kVL <= n; d += kVL) (Vec::loadu(o + d) * va).store(o + d);
  if (d < n) (Vec::loadu(o + d, n - d) * va).store(o + d, n - d);
}

// dst[0, n) = float(src[0, n)).
template <typename T>
inline void to_float(const T* src, float* dst, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    std::memcpy(dst, src, n * sizeof(float));
  } else {
    at::vec::convert(src, dst, n);
  }
}

template <typename T>
void attention_typed(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     const at::Tensor& out, float scale, const bool* mask) {
  constexpr bool kF32 = std::is_same_v<T, float>;
  const int64_t B = q.size(0), H = q.size(1), Lq = q.size(2), Lk = k.size(2), D = q.size(3);
  // Query rows per task: kBlockQ, fewer when there would be too few tasks to feed the threads.
  int64_t bq = kBlockQ;
  while (bq > 16 && B * H * ((Lq + bq - 1) / bq) < 2 * at::get_num_threads()) bq /= 2;
  const int64_t nqb = (Lq + bq - 1) / bq;
  // Keys per step: kBlockK, fewer for wide heads so the K^T slice of a step (D * bk floats)
  // stays within about 256 KB of L2.
  int64_t bk = kBlockK;
  while (bk > 64 && D * bk > 65536) bk /= 2;
  bk = std::min(bk, Lk);
  const int64_t ldk = (Lk + 15) / 16 * 16;  // K^T panel row stride (64-byte rows)
  const T* qd = q.const_data_ptr<T>();
  const T* kd = k.const_data_ptr<T>();
  const T* vd = v.const_data_ptr<T>();
  T* od = out.data_ptr<T>();
  const auto qs = q.strides(), ks = k.strides(), vs = v.strides(), os = out.strides();
  const float c = scale * kLog2e;  // scores in log2 units: exp -> exp2
  // Batches with no key to attend give zeros, whatever q, k, v hold (NaN included).
  std::vector<char> attends(B, 1);
  if (mask != nullptr)
    for (int64_t b = 0; b < B; ++b)
      attends[b] = std::any_of(mask + b * Lk, mask + (b + 1) * Lk, [](bool x) { return x; });
  // fp32 q / v rows are GEMM operands in place when their row stride is one brgemm takes.
  const bool direct_q = kF32 && qs[2] >= D, direct_v = kF32 && vs[2] >= D;

  at::parallel_for(0, B * H * nqb, 1, [&](int64_t begin, int64_t end) {
    // Thread-local scratch; a thread's tasks are consecutive, so K/V are packed once per head.
    const int64_t n_kv = D * ldk + (direct_v ? 0 : Lk * D) + ldk;
    const int64_t n_q = (direct_q ? 0 : kBlockQ * D) + kBlockQ * bk + kBlockQ * D + 3 * kBlockQ;
    at::Tensor scratch = at::empty({n_kv + n_q}, at::kFloat);
    float* kt = scratch.data_ptr<float>();  // [D][ldk]
    float* vp = kt + D * ldk;                  // [Lk][D] (unless v is read in place)
    float* bias = vp + (direct_v ? 0 : Lk * D);  // [Lk]: 0 or -inf
    float* qp = bias + ldk;                    // [bq][D] (unless q is read in place)
    float* S = qp + (direct_q ? 0 : kBlockQ * D);
    float* O = S + kBlockQ * bk;
    float* m = O + kBlockQ * D;
    float* l = m + kBlockQ;
    float* alpha = l + kBlockQ;
    int64_t packed_bh = -1;

    for (int64_t task = begin; task < end; ++task) {
      const int64_t bh = task / nqb, b = bh / H, h = bh % H;
      const int64_t q0 = (task % nqb) * bq, nq = std::min(bq, Lq - q0);
      T* orow = od + b * os[0] + h * os[1] + q0 * os[2];
      if (!attends[b]) {
        for (int64_t r = 0; r < nq; ++r)
          std::fill(orow + r * os[2], orow + r * os[2] + D, static_cast<T>(0.f));
        continue;
      }
      const T* kh = kd + b * ks[0] + h * ks[1];
      const T* vh = vd + b * vs[0] + h * vs[1];
      if (bh != packed_bh) {
        for (int64_t j = 0; j < Lk; ++j) {
          const T* kr = kh + j * ks[2];
          for (int64_t d = 0; d < D; ++d) kt[d * ldk + j] = static_cast<float>(kr[d]);
          bias[j] = (mask == nullptr || mask[b * Lk + j]) ? 0.f : kNegInf;
          if (!direct_v) to_float(vh + j * vs[2], vp + j * D, D);
        }
        packed_bh = bh;
      }
      const float* vf = vp;
      int64_t ldv = D;
      const T* qrow = qd + b * qs[0] + h * qs[1] + q0 * qs[2];
      const float* qf = qp;
      int64_t ldq = D;
      if constexpr (kF32) {
        if (direct_v) {
          vf = vh;
          ldv = vs[2];
        }
        if (direct_q) {
          qf = qrow;
          ldq = qs[2];
        }
      }
      if (!direct_q)
        for (int64_t r = 0; r < nq; ++r) to_float(qrow + r * qs[2], qp + r * D, D);
      std::fill(m, m + nq, kNegInf);
      std::fill(l, l + nq, 0.f);

      for (int64_t k0 = 0; k0 < Lk; k0 += bk) {
        const int64_t nk = std::min(bk, Lk - k0);
        at::native::cpublas::brgemm(nq, nk, D, ldq, ldk, bk, false, qf, kt + k0, S);
        for (int64_t r = 0; r < nq; ++r)
          softmax_row(S + r * bk, bias + k0, nk, c, m[r], l[r], alpha[r]);
        if (k0 > 0)  // alpha = 1 (the row max did not grow) is common after the first steps
          for (int64_t r = 0; r < nq; ++r)
            if (alpha[r] != 1.f) scale_row(O + r * D, D, alpha[r]);
        at::native::cpublas::brgemm(nq, D, nk, bk, ldv, D, k0 > 0, S, vf + k0 * ldv, O);
      }

      for (int64_t r = 0; r < nq; ++r) {
        T* dst = orow + r * os[2];
        if (l[r] == 0.f) {  // every score -inf: zeros (as SDPA), even where v holds a NaN
          std::fill(dst, dst + D, static_cast<T>(0.f));
          continue;
        }
        float* o = O + r * D;
        scale_row(o, D, 1.f / l[r]);
        if constexpr (kF32) {
          std::memcpy(dst, o, D * sizeof(float));
        } else {
          at::vec::convert(o, dst, D);
        }
      }
    }
  });
}

}  // namespace

void attention_kernel(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                      const at::Tensor& out, float scale, const bool* mask) {
  switch (q.scalar_type()) {
    case at::kFloat: return attention_typed<float>(q, k, v, out, scale, mask);
    case at::kHalf: return attention_typed<at::Half>(q, k, v, out, scale, mask);
    default: return attention_typed<at::BFloat16>(q, k, v, out, scale, mask);
  }
}

}  // namespace diffkernels::CPU_CAPABILITY
