// group_norm_silu kernel body, compiled once per CPU capability (csrc/cpu/capability/); the
// algorithm is described at the top of csrc/cpu/group_norm_silu.cpp. Included after
// capability.h only.
namespace diffkernels::CPU_CAPABILITY {
namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kV = Vec::size();
constexpr int64_t kW = 2 * kV;    // elements per step: one fp16/bf16 vector, two fp32 vectors
constexpr int64_t kChunk = 2048;  // contiguous statistics: elements per chunk (L1-resident)
constexpr int64_t kBlock = 32768; // channels_last statistics: elements per block of rows (L2)

inline float hsum(const Vec& v) {
  float tmp[kV];
  v.store(tmp);
  float s = 0.f;
  for (int64_t i = 0; i < kV; ++i) s += tmp[i];
  return s;
}

// kW values of T as two fp32 vectors, and back; n < kW touches only n values (the rest read
// as 0).
inline void load2(const float* p, Vec& a, Vec& b, int64_t n = kW) {
  if (n >= kW) {
    a = Vec::loadu(p);
    b = Vec::loadu(p + kV);
  } else {
    a = Vec::loadu(p, std::min(n, kV));
    b = n > kV ? Vec::loadu(p + kV, n - kV) : Vec(0.f);
  }
}
inline void store2(float* p, const Vec& a, const Vec& b, int64_t n = kW) {
  if (n >= kW) {
    a.store(p);
    b.store(p + kV);
  } else {
    a.store(p, std::min(n, kV));
    if (n > kV) b.store(p + kV, n - kV);
  }
}
template <typename T>
inline void load2(const T* p, Vec& a, Vec& b, int64_t n = kW) {
  using VT = at::vec::Vectorized<T>;
  static_assert(VT::size() == kW, "16-bit vectors hold two fp32 vectors");
  const VT v = n >= kW ? VT::loadu(p) : VT::loadu(p, n);
  if constexpr (std::is_same_v<T, c10::Half>) {
    std::tie(a, b) = at::vec::convert_half_float(v);
  } else {
    std::tie(a, b) = at::vec::convert_bfloat16_float(v);
  }
}
template <typename T>
inline void store2(T* p, const Vec& a, const Vec& b, int64_t n = kW) {
  if constexpr (std::is_same_v<T, c10::Half>) {
    at::vec::convert_float_half(a, b).store(p, std::min(n, kW));
  } else {
    at::vec::convert_float_bfloat16(a, b).store(p, std::min(n, kW));
  }
}

// Running (count, mean, M2) in fp64, merged with Chan's formula.
struct Moments {
  double n = 0, mean = 0, m2 = 0;
  void add(double nb, double mean_b, double m2_b) {
    const double tot = n + nb, d = mean_b - mean;
    mean += d * (nb / tot);
    m2 += m2_b + d * d * (n * nb / tot);
    n = tot;
  }
};

// Mean and M2 of p[0, len) in two passes (the chunk is in L1 for the second). Values are
// shifted by p[0] first, so the sums stay small when the data have a large common offset.
template <typename T>
void chunk_moments(const T* p, int64_t len, Moments& acc) {
  const float k = static_cast<float>(p[0]);
  const Vec kv(k), zero(0.f);
  Vec a0(0.f), a1(0.f), a2(0.f), a3(0.f), x0, x1, x2, x3;
  int64_t i = 0;
  for (; i + 2 * kW <= len; i += 2 * kW) {
    load2(p + i, x0, x1);
    load2(p + i + kW, x2, x3);
    a0 = a0 + (x0 - kv);
    a1 = a1 + (x1 - kv);
    a2 = a2 + (x2 - kv);
    a3 = a3 + (x3 - kv);
  }
  for (; i < len; i += kW) {
    const int64_t n = std::min(kW, len - i);
    load2(p + i, x0, x1, n);
    a0 = a0 + Vec::set(zero, x0 - kv, std::min(n, kV));
    a1 = a1 + Vec::set(zero, x1 - kv, std::max<int64_t>(n - kV, 0));
  }
  const float o = hsum((a0 + a1) + (a2 + a3)) / static_cast<float>(len);
  const Vec ov(o);
  a0 = a1 = a2 = a3 = zero;
  for (i = 0; i + 2 * kW <= len; i += 2 * kW) {
    load2(p + i, x0, x1);
    load2(p + i + kW, x2, x3);
    x0 = x0 - kv - ov;
    x1 = x1 - kv - ov;
    x2 = x2 - kv - ov;
    x3 = x3 - kv - ov;
    a0 = at::vec::fmadd(x0, x0, a0);
    a1 = at::vec::fmadd(x1, x1, a1);
    a2 = at::vec::fmadd(x2, x2, a2);
    a3 = at::vec::fmadd(x3, x3, a3);
  }
  for (; i < len; i += kW) {
    const int64_t n = std::min(kW, len - i);
    load2(p + i, x0, x1, n);
    x0 = Vec::set(zero, x0 - kv - ov, std::min(n, kV));
    x1 = Vec::set(zero, x1 - kv - ov, std::max<int64_t>(n - kV, 0));
    a0 = at::vec::fmadd(x0, x0, a0);
    a1 = at::vec::fmadd(x1, x1, a1);
  }
  acc.add(static_cast<double>(len), static_cast<double>(k) + o, hsum((a0 + a1) + (a2 + a3)));
}

// exp(-y) for the SiLU: 2^t = 2^n * 2^f with t = -y * log2(e) clamped to [-126, 100] (2^n stays
// a normal float), n = round(t), and 2^f (|f| <= 0.5) by a degree-5 fit (relative error 2e-7;
// about 2e-6 in total where |y| is large, from rounding t). Cheaper than Vectorized::exp_u20,
// which made the SiLU the bottleneck of the normalise pass.
inline Vec exp_neg(const Vec& y) {
  using VI = at::vec::Vectorized<int32_t>;
  const Vec t = at::vec::clamp(y * Vec(-1.44269504088896341f), Vec(-126.f), Vec(100.f));
  const Vec n = t.round();
  const Vec f = t - n;
  Vec p = at::vec::fmadd(Vec(1.3266970636e-3f), f, Vec(9.6754599362e-3f));
  p = at::vec::fmadd(p, f, Vec(5.5507425219e-2f));
  p = at::vec::fmadd(p, f, Vec(2.4022121727e-1f));
  p = at::vec::fmadd(p, f, Vec(6.9314694405e-1f));
  p = at::vec::fmadd(p, f, Vec(1.0000001192e+0f));
  const VI bits = at::vec::cast<int32_t>(p) + (at::vec::convert_to_int_of_same_size(n) << VI(23));
  return at::vec::cast<float>(bits);
}

template <bool kSilu>
inline Vec activate(const Vec& y) {
  if constexpr (kSilu) {
    // NaN propagates through y. silu(-inf) is NaN in torch (-inf / (1 + exp(inf))), but
    // exp_neg saturates at 2^100: put the NaN in for y = -inf.
    const Vec r = y / (Vec(1.f) + exp_neg(y));
    return r + ((y == Vec(-std::numeric_limits<float>::infinity())) &
                Vec(std::numeric_limits<float>::quiet_NaN()));
  } else {
    return y;
  }
}

// y[i] = act((x[i] - center) * scale + shift) for i in [0, len), walking down from the end:
// the statistics pass read the end last, so it is the part still in cache.
template <typename T, bool kSilu>
void normalize_span(const T* x, T* y, int64_t len, float center, float scale, float shift) {
  const Vec c(center), s(scale), b(shift);
  Vec x0, x1;
  const int64_t head = len % kW;
  for (int64_t i = len - kW; i >= head; i -= kW) {
    load2(x + i, x0, x1);
    store2(y + i, activate<kSilu>(at::vec::fmadd(x0 - c, s, b)),
           activate<kSilu>(at::vec::fmadd(x1 - c, s, b)));
  }
  if (head > 0) {
    load2(x, x0, x1, head);
    store2(y, activate<kSilu>(at::vec::fmadd(x0 - c, s, b)),
           activate<kSilu>(at::vec::fmadd(x1 - c, s, b)), head);
  }
}

// One row of C channels: y[c] = act((x[c] - center[c]) * scale[c] + shift[c]), top down.
// center/scale/shift are padded to a multiple of kW.
template <typename T, bool kSilu>
void normalize_row(const T* x, T* y, int64_t C, const float* center, const float* scale,
                   const float* shift) {
  Vec x0, x1;
  for (int64_t c = C - kW; c > -kW; c -= kW) {
    const int64_t c0 = std::max<int64_t>(c, 0), n = c >= 0 ? kW : c + kW;
    load2(x + c0, x0, x1, n);
    const Vec y0 = at::vec::fmadd(x0 - Vec::loadu(center + c0), Vec::loadu(scale + c0),
                                  Vec::loadu(shift + c0));
    const Vec y1 = at::vec::fmadd(x1 - Vec::loadu(center + c0 + kV),
                                  Vec::loadu(scale + c0 + kV), Vec::loadu(shift + c0 + kV));
    store2(y + c0, activate<kSilu>(y0), activate<kSilu>(y1), n);
  }
}

using Params = cpu::GroupNormParams;

// Folds group statistics into per-channel (center, scale, shift) for channels [c0, c0 + D) of
// sample n. mean/m2: per-channel moments of x over `count` elements each (before channel_bias).
void group_affine(const double* mean, const double* m2, int64_t D, double count, int64_t n,
                  int64_t C, int64_t c0, const Params& p, float* center, float* scale,
                  float* shift) {
  const float* cb = p.channel_bias ? p.channel_bias + n * C + c0 : nullptr;
  double gmean = 0;
  for (int64_t c = 0; c < D; ++c) gmean += mean[c] + (cb ? cb[c] : 0.f);
  gmean /= static_cast<double>(D);
  double gm2 = 0;
  for (int64_t c = 0; c < D; ++c) {
    const double d = mean[c] + (cb ? cb[c] : 0.f) - gmean;
    gm2 += m2[c] + count * d * d;
  }
  const double rstd = 1.0 / std::sqrt(gm2 / (count * static_cast<double>(D)) + p.eps);
  for (int64_t c = 0; c < D; ++c) {
    // y = (x + cb - gmean) * rstd * w + b = (x - M) * sc + b with M = gmean - cb; M is split
    // into its fp32 rounding (center) and the remainder, which goes into shift.
    const double M = gmean - (cb ? cb[c] : 0.f);
    const double sc = rstd * (p.weight ? p.weight[c0 + c] : 1.f);
    center[c] = static_cast<float>(M);
    scale[c] = static_cast<float>(sc);
    shift[c] = static_cast<float>((p.bias ? p.bias[c0 + c] : 0.f) -
                                  (M - static_cast<double>(center[c])) * sc);
    if (!std::isfinite(scale[c]) || !std::isfinite(shift[c])) {
      // An inf/NaN weight or bias (or statistics): ATen's form y = (x + cb) * scale +
      // (b - mean * scale), so that infinities meet (or cancel into NaN) where they do in
      // F.group_norm applied to x + cb.
      center[c] = cb ? -cb[c] : 0.f;
      shift[c] = (p.bias ? p.bias[c0 + c] : 0.f) - static_cast<float>(gmean) * scale[c];
    }
  }
}

// x, y: [N, C, S] contiguous. One task per (n, group): statistics, then the normalise pass
// while the group is still in cache.
template <typename T, bool kSilu>
void kernel_contiguous(const T* x, T* y, int64_t N, int64_t C, int64_t S, int64_t G,
                       const Params& p) {
  const int64_t D = C / G;
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, D * S));
  at::parallel_for(0, N * G, grain, [&, D, S, C, G](int64_t begin, int64_t end) {
    std::vector<double> mean(D), m2(D);
    std::vector<float> center(D), scale(D), shift(D);
    for (int64_t ng = begin; ng < end; ++ng) {
      const int64_t n = ng / G, c0 = (ng % G) * D;
      const T* xg = x + (n * C + c0) * S;
      T* yg = y + (n * C + c0) * S;
      for (int64_t c = 0; c < D; ++c) {
        Moments acc;
        for (int64_t a = 0; a < S; a += kChunk)
          chunk_moments(xg + c * S + a, std::min(kChunk, S - a), acc);
        mean[c] = acc.mean;
        m2[c] = acc.m2;
      }
      group_affine(mean.data(), m2.data(), D, static_cast<double>(S), n, C, c0, p,
                   center.data(), scale.data(), shift.data());
      for (int64_t c = D - 1; c >= 0; --c)
        normalize_span<T, kSilu>(xg + c * S, yg + c * S, S, center[c], scale[c], shift[c]);
    }
  });
}

// channels_last statistics: merges the moments of `rows` rows of C channels at xb into the
// running per-channel (o = mean - k, m2) over the `done` rows before them. Per kW channels, in
// registers: pass 1 = block mean of x - k, pass 2 (that column of the block is in L1) = squared
// deviations from it; rows go in pairs, for two independent add chains.
template <typename T>
void block_moments(const T* xb, int64_t rows, int64_t C, double done, const float* k, float* o,
                   float* m2) {
  const double tot = done + rows;
  const Vec inv(1.f / static_cast<float>(rows)), wb(static_cast<float>(rows / tot)),
      wab(static_cast<float>(done * rows / tot));
  Vec x0, x1, x2, x3;
  for (int64_t c = 0; c < C; c += kW) {
    const int64_t n = std::min(kW, C - c);
    const Vec k0 = Vec::loadu(k + c), k1 = Vec::loadu(k + c + kV);
    Vec s0(0.f), s1(0.f), s2(0.f), s3(0.f);
    int64_t i = 0;
    for (; i + 1 < rows; i += 2) {
      load2(xb + i * C + c, x0, x1, n);
      load2(xb + (i + 1) * C + c, x2, x3, n);
      s0 = s0 + (x0 - k0);
      s1 = s1 + (x1 - k1);
      s2 = s2 + (x2 - k0);
      s3 = s3 + (x3 - k1);
    }
    if (i < rows) {
      load2(xb + i * C + c, x0, x1, n);
      s0 = s0 + (x0 - k0);
      s1 = s1 + (x1 - k1);
    }
    const Vec o0 = (s0 + s2) * inv, o1 = (s1 + s3) * inv;
    Vec q0(0.f), q1(0.f), q2(0.f), q3(0.f);
    for (i = 0; i + 1 < rows; i += 2) {
      load2(xb + i * C + c, x0, x1, n);
      load2(xb + (i + 1) * C + c, x2, x3, n);
      x0 = x0 - k0 - o0;
      x1 = x1 - k1 - o1;
      x2 = x2 - k0 - o0;
      x3 = x3 - k1 - o1;
      q0 = at::vec::fmadd(x0, x0, q0);
      q1 = at::vec::fmadd(x1, x1, q1);
      q2 = at::vec::fmadd(x2, x2, q2);
      q3 = at::vec::fmadd(x3, x3, q3);
    }
    if (i < rows) {
      load2(xb + i * C + c, x0, x1, n);
      x0 = x0 - k0 - o0;
      x1 = x1 - k1 - o1;
      q0 = at::vec::fmadd(x0, x0, q0);
      q1 = at::vec::fmadd(x1, x1, q1);
    }
    // Chan merge into the running moments (offsets from k stay small). Lanes past C read 0
    // and k is 0 there, so they stay 0.
    const Vec d0 = o0 - Vec::loadu(o + c), d1 = o1 - Vec::loadu(o + c + kV);
    at::vec::fmadd(d0, wb, Vec::loadu(o + c)).store(o + c);
    at::vec::fmadd(d1, wb, Vec::loadu(o + c + kV)).store(o + c + kV);
    (Vec::loadu(m2 + c) + at::vec::fmadd(d0 * d0, wab, q0 + q2)).store(m2 + c);
    (Vec::loadu(m2 + c + kV) + at::vec::fmadd(d1 * d1, wab, q1 + q3)).store(m2 + c + kV);
  }
}

// x, y: [N, S, C] (channels_last). Tasks split each sample's S rows into `parts` ranges and
// produce per-channel partial moments, merged afterwards; the normalise pass uses the same
// split (so each thread re-reads the rows it read last) and walks it bottom up.
template <typename T, bool kSilu>
void kernel_channels_last(const T* x, T* y, int64_t N, int64_t C, int64_t S, int64_t G,
                          const Params& p) {
  const int64_t threads = at::get_num_threads();
  // N * parts is a multiple of the thread count, so the static split is balanced.
  int64_t parts = threads / std::gcd(N, threads);
  if (N * S * C < 65536) parts = 1;  // small input: not worth splitting samples
  parts = std::max<int64_t>(1, std::min(parts, S));
  const int64_t ntasks = N * parts;
  const int64_t Cp = (C + kW - 1) / kW * kW;  // per-channel arrays padded to whole steps
  const int64_t R = std::max<int64_t>(1, kBlock / C);  // rows per block
  auto rows_of = [parts, S](int64_t t) {
    const int64_t part = t % parts;
    return std::make_pair(S * part / parts, S * (part + 1) / parts);
  };
  std::vector<double> tmean(ntasks * C), tm2(ntasks * C);

  at::parallel_for(0, ntasks, 1, [&, C, S, R, Cp](int64_t begin, int64_t end) {
    // k: shift (first row of the task); o/m2: running mean offset from k and M2.
    std::vector<float> work(3 * Cp);
    float *k = work.data(), *o = k + Cp, *m2 = o + Cp;
    Vec x0, x1;
    for (int64_t t = begin; t < end; ++t) {
      const auto [r0, r1] = rows_of(t);
      const T* xt = x + ((t / parts) * S + r0) * C;
      std::fill(work.begin(), work.end(), 0.f);
      for (int64_t c = 0; c < C; c += kW) {
        load2(xt + c, x0, x1, std::min(kW, C - c));
        x0.store(k + c);
        x1.store(k + c + kV);
      }
      for (int64_t r = 0; r < r1 - r0; r += R)
        block_moments(xt + r * C, std::min(R, r1 - r0 - r), C, static_cast<double>(r), k, o, m2);
      for (int64_t c = 0; c < C; ++c) {
        tmean[t * C + c] = static_cast<double>(k[c]) + o[c];
        tm2[t * C + c] = m2[c];
      }
    }
  });

  // Merge the parts of each sample, then fold each group into per-channel affine parameters.
  const int64_t D = C / G;
  std::vector<float> aff(3 * N * Cp);
  float *center = aff.data(), *scale = center + N * Cp, *shift = scale + N * Cp;
  std::vector<double> mean(C), m2(C);
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t c = 0; c < C; ++c) {
      Moments acc;
      for (int64_t t = n * parts; t < (n + 1) * parts; ++t) {
        const auto [r0, r1] = rows_of(t);
        if (r1 > r0) acc.add(static_cast<double>(r1 - r0), tmean[t * C + c], tm2[t * C + c]);
      }
      mean[c] = acc.mean;
      m2[c] = acc.m2;
    }
    for (int64_t c0 = 0; c0 < C; c0 += D)
      group_affine(mean.data() + c0, m2.data() + c0, D, static_cast<double>(S), n, C, c0, p,
                   center + n * Cp + c0, scale + n * Cp + c0, shift + n * Cp + c0);
  }

  at::parallel_for(0, ntasks, 1, [&, C, S, Cp](int64_t begin, int64_t end) {
    for (int64_t t = end - 1; t >= begin; --t) {
      const auto [r0, r1] = rows_of(t);
      const int64_t n = t / parts;
      for (int64_t r = r1 - 1; r >= r0; --r)
        normalize_row<T, kSilu>(x + (n * S + r) * C, y + (n * S + r) * C, C, center + n * Cp,
                                scale + n * Cp, shift + n * Cp);
    }
  });
}

template <typename T>
void run_kernel_impl(const at::Tensor& x, at::Tensor& y, bool channels_last, int64_t G, bool silu,
                     const Params& p) {
  const int64_t N = x.size(0), C = x.size(1), S = x.numel() / (N * C);
  const T* xp = x.const_data_ptr<T>();
  T* yp = y.mutable_data_ptr<T>();
  if (channels_last) {
    silu ? kernel_channels_last<T, true>(xp, yp, N, C, S, G, p)
         : kernel_channels_last<T, false>(xp, yp, N, C, S, G, p);
  } else {
    silu ? kernel_contiguous<T, true>(xp, yp, N, C, S, G, p)
         : kernel_contiguous<T, false>(xp, yp, N, C, S, G, p);
  }
}

}  // namespace

void group_norm_silu_kernel(const at::Tensor& x, at::Tensor& y, bool channels_last,
                            int64_t num_groups, bool silu, const cpu::GroupNormParams& p) {
  switch (x.scalar_type()) {
    case at::kFloat: return run_kernel_impl<float>(x, y, channels_last, num_groups, silu, p);
    case at::kHalf: return run_kernel_impl<c10::Half>(x, y, channels_last, num_groups, silu, p);
    default: return run_kernel_impl<c10::BFloat16>(x, y, channels_last, num_groups, silu, p);
  }
}

}  // namespace diffkernels::CPU_CAPABILITY
