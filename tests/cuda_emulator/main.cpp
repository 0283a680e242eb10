// Emulated runs of attention_fwd_kernel (csrc/cuda/attention.cu, compiled unchanged on the CPU with
// emu.h standing in for the PTX primitives and the CUDA runtime) against a float64 reference.
// What is and is not modelled: tests/test_cuda_emulator.py. Build: build_emulator.py.
// Usage: emu_test [--seed N] [case-name-substring]
// Prints one line per case ending in OK or FAIL and a final "P/N cases passed"; exits 1 if any case
// fails. An emulator-detected fault (bad address, deadlock, launch error) aborts with "EMU FAILURE".
#include <string>

#include "emu.h"

namespace {
#include "kernel_section.inc"  // attention.cu's kernel section (Params, load_tile, the kernel)
#include "host_section.inc"    // attention.cu's launch() and launch_for_head_dim(), launch rewritten
}  // namespace

struct Tensor4 {  // a strided [B, H, L, D] view into 64-byte-aligned storage with NaN guards
  uint16_t* raw = nullptr;
  size_t raw_elems = 0, off = 0, span = 0;
  int64_t sb, sh, sl, sd;
  int B, H, L, D;
  uint16_t* data() const { return raw + off; }
  uint16_t& at(int b, int h, int l, int d) const { return data()[b * sb + h * sh + l * sl + d * sd]; }
};
// layout: 0 = [B,H,L,D], 1 = [B,L,H,D] (transposed view), 2 = [B,H,D,L] (head dim strided)
Tensor4 make(int B, int H, int L, int D, int layout, int pad, int offset, uint16_t fill) {
  Tensor4 t;
  t.B = B; t.H = H; t.L = L; t.D = D;
  const int64_t row = D + pad;
  if (layout == 0) { t.sd = 1; t.sl = row; t.sh = row * L; t.sb = row * L * H; t.span = size_t(B) * H * L * row; }
  else if (layout == 1) { t.sd = 1; t.sh = row; t.sl = row * H; t.sb = row * H * L; t.span = size_t(B) * L * H * row; }
  else { t.sl = 1; t.sd = L + pad; t.sh = int64_t(D) * (L + pad); t.sb = t.sh * H; t.span = size_t(B) * H * D * (L + pad); }
  const size_t guard = 64;
  t.raw_elems = t.span + 2 * guard + offset + 64;
  t.raw = static_cast<uint16_t*>(aligned_alloc(64, (t.raw_elems * 2 + 63) / 64 * 64));
  for (size_t i = 0; i < t.raw_elems; ++i) t.raw[i] = fill;
  t.off = guard + offset;
  return t;
}

struct Case {
  const char* name;
  bool bf16;
  int B, H, Lq, Lk, D;
  int layout;       // q/k/v layout (0 or 1)
  int pad, offset;  // row padding / storage offset (elements): misaligned -> scalar loads
  int mask;         // 0 none, 1 random, 2 random + batch 0 fully masked, 3 first 64 keys masked
  double scale;     // 0 -> D^-0.5
  double amp;       // input magnitude
  int out_layout;   // -1: like empty_like(q); 0/1/2 explicit; +10: storage offset 1
  int poison = 0;   // NaN/inf inputs, see poison_inputs
  int optin_kb = 0; // the emulated device's opt-in shared memory (KB); 0: 99 (sm_86/89)
};

// Non-finite inputs (DESIGN.md 7: they propagate as SDPA's math implementation propagates them).
// 1..6: one element of every batch: q (row 3) or k / v (key 5), column 5, becomes
// 1 q NaN, 2 k NaN, 3 v NaN, 4 q +inf, 5 k -inf, 6 v +inf; with a mask, key 5 of the last batch is
// masked (SDPA still propagates there: NaN + -inf = NaN, 0 * NaN = NaN).
// 7: q[:, 0] > 0 and k[first 64 keys, 0] = -inf: every row's first key block scores -inf.
// 8: q[row 3, 0] = +inf and k[:, 0] < 0: row 3 scores -inf at every key (SDPA: zeros); the zero-
//    filled padding keys past Lk would give inf * 0 = NaN there if they were not set to -inf.
template <typename T>
void poison_inputs(const Case& c, Tensor4& q, Tensor4& k, Tensor4& v, std::vector<uint8_t>& mask) {
  if (c.poison == 0) return;
  const uint16_t NAN_ = from_f<T>(NAN), PINF = from_f<T>(INFINITY), NINF = from_f<T>(-INFINITY);
  if (c.poison == 8) {
    for (int b = 0; b < c.B; ++b) for (int h = 0; h < c.H; ++h) {
      q.at(b, h, std::min(3, c.Lq - 1), 0) = PINF;
      for (int j = 0; j < c.Lk; ++j) k.at(b, h, j, 0) = from_f<T>(-std::fabs(to_f<T>(k.at(b, h, j, 0))) - 0.1f);
    }
    return;
  }
  if (c.poison == 7) {
    for (int b = 0; b < c.B; ++b) for (int h = 0; h < c.H; ++h) {
      for (int i = 0; i < c.Lq; ++i) q.at(b, h, i, 0) = from_f<T>(std::fabs(to_f<T>(q.at(b, h, i, 0))) + 0.5f);
      for (int j = 0; j < std::min(64, c.Lk); ++j) k.at(b, h, j, 0) = NINF;
    }
    return;
  }
  Tensor4* t = c.poison % 3 == 1 ? &q : c.poison % 3 == 2 ? &k : &v;
  const uint16_t val = c.poison <= 3 ? NAN_ : c.poison == 5 ? NINF : PINF;
  const int row = t == &q ? 3 : 5;
  for (int b = 0; b < c.B; ++b) t->at(b, 0, std::min(row, t->L - 1), std::min(5, c.D - 1)) = val;
  if (c.mask && c.Lk > 5) mask[size_t(c.B - 1) * c.Lk + 5] = 0;
}

template <typename T>
bool run_case(const Case& c) {
  std::mt19937 gen(42);
  std::uniform_real_distribution<double> U(-1.0, 1.0);
  const uint16_t NANBITS = 0xffff;
  Tensor4 q = make(c.B, c.H, c.Lq, c.D, c.layout, c.pad, c.offset, NANBITS);
  Tensor4 k = make(c.B, c.H, c.Lk, c.D, c.layout, c.pad, c.offset, NANBITS);
  Tensor4 v = make(c.B, c.H, c.Lk, c.D, c.layout, c.pad, c.offset, NANBITS);
  for (Tensor4* t : {&q, &k, &v})
    for (int b = 0; b < t->B; ++b) for (int h = 0; h < t->H; ++h) for (int l = 0; l < t->L; ++l)
      for (int d = 0; d < t->D; ++d) t->at(b, h, l, d) = from_f<T>(float((t == &v ? 1.0 : c.amp) * U(gen)));
  std::vector<uint8_t> mask;
  if (c.mask) {
    mask.resize(size_t(c.B) * c.Lk);
    for (auto& m : mask) m = (gen() % 10) < 7;
    if (c.mask == 2) for (int j = 0; j < c.Lk; ++j) mask[j] = 0;
    if (c.mask == 3) for (int b = 0; b < c.B; ++b) for (int j = 0; j < std::min(64, c.Lk); ++j) mask[b * c.Lk + j] = 0;
  }
  poison_inputs<T>(c, q, k, v, mask);
  // out: empty_like(q) keeps q's strides when q is dense, else contiguous
  int ol = c.out_layout % 10, ooff = c.out_layout >= 10 ? 1 : 0;
  if (c.out_layout == -1) { ol = (c.pad == 0 && c.offset == 0) ? c.layout : 0; ooff = 0; }
  const uint16_t SENT = 0x7e01;  // a NaN: never a legit output
  Tensor4 o = make(c.B, c.H, c.Lq, c.D, ol, 0, ooff, SENT);

  emu::globals.clear();
  for (Tensor4* t : {&q, &k, &v})
    emu::globals.push_back({reinterpret_cast<const char*>(t->data()), reinterpret_cast<const char*>(t->data() + t->span)});

  Params p{};
  p.q = q.data(); p.k = k.data(); p.v = v.data(); p.o = o.data();
  p.mask = c.mask ? mask.data() : nullptr;
  p.q_sb = q.sb; p.q_sh = q.sh; p.q_sl = q.sl;
  p.k_sb = k.sb; p.k_sh = k.sh; p.k_sl = k.sl;
  p.v_sb = v.sb; p.v_sh = v.sh; p.v_sl = v.sl;
  p.o_sb = o.sb; p.o_sh = o.sh; p.o_sl = o.sl; p.o_sd = o.sd;
  p.H = c.H; p.Lq = c.Lq; p.Lk = c.Lk; p.D = c.D;
  const double scale = c.scale != 0 ? c.scale : 1.0 / std::sqrt(double(c.D));
  p.scale_log2 = float(scale * 1.4426950408889634);
  // the host's rule (rows_16b_aligned): 16-byte-aligned pointer and strides % 8 == 0 on dims of size > 1
  auto aligned = [](const Tensor4& t) {
    if (reinterpret_cast<uintptr_t>(t.data()) % 16) return false;
    const int64_t st[3] = {t.sb, t.sh, t.sl};
    const int sz[3] = {t.B, t.H, t.L};
    for (int d = 0; d < 3; ++d) if (sz[d] > 1 && st[d] % 8) return false;
    return true;
  };
  p.vec_in = aligned(q) && aligned(k) && aligned(v);
  p.vec_out = aligned(o) && o.sd == 1;

  printf("%-34s vec_in=%d vec_out=%d", c.name, p.vec_in, p.vec_out);
  fflush(stdout);
  emu::n_collectives = 0;
  emu::optin_smem = c.optin_kb ? c.optin_kb * 1024 : emu::kMaxOptInSmem;
  launch_for_head_dim<T>(p, int64_t(c.B) * c.H, nullptr);
  printf("  [grid=%lld block=%d smem=%lld]", emu::last_launch.grid, emu::last_launch.block,
         emu::last_launch.smem);

  // reference (float64 from the rounded inputs) with the semantics of SDPA's math implementation:
  // an additive -inf mask, softmax (NaN if a score is NaN or the max is +inf; zeros if every score
  // is -inf), then P V (0 * inf = NaN); plus our contract: a row the mask lets attend no key is 0.
  double max_err = 0, max_ref = 0;
  bool ok = true;
  long long n_nonfinite = 0;
  const double tol = c.bf16 ? 1.6e-2 : 2e-3;
  std::vector<double> s(c.Lk);
  for (int b = 0; b < c.B; ++b) for (int h = 0; h < c.H; ++h) for (int i = 0; i < c.Lq; ++i) {
    double mx = -INFINITY;
    bool any_key = !c.mask, any_nan = false;
    for (int j = 0; j < c.Lk; ++j) {
      double acc = 0;
      for (int d = 0; d < c.D; ++d) acc += double(to_f<T>(q.at(b, h, i, d))) * double(to_f<T>(k.at(b, h, j, d)));
      const bool attend = !c.mask || mask[b * c.Lk + j];
      any_key |= attend;
      s[j] = acc * scale + (attend ? 0.0 : -INFINITY);
      any_nan |= std::isnan(s[j]);
      mx = std::max(mx, s[j]);
    }
    if (any_nan) mx = NAN;
    double sum = 0;
    for (int j = 0; j < c.Lk; ++j) { s[j] = mx == -INFINITY ? 0.0 : std::exp(s[j] - mx); sum += s[j]; }
    for (int d = 0; d < c.D; ++d) {
      double ref = 0;
      for (int j = 0; j < c.Lk; ++j) ref += s[j] * double(to_f<T>(v.at(b, h, j, d)));
      if (mx != -INFINITY) ref /= sum;
      if (!any_key) ref = 0;
      const uint16_t bits = o.at(b, h, i, d);
      const double got = to_f<T>(bits);
      const double err = std::fabs(got - ref);
      const bool match = std::isnan(ref) ? std::isnan(got)
                         : std::isinf(ref) ? got == ref
                                           : std::isfinite(got) && err <= tol + tol * std::fabs(ref);
      n_nonfinite += !std::isfinite(ref);
      if (!match) {
        if (ok) printf("\n    MISMATCH b=%d h=%d i=%d d=%d got=%g ref=%g", b, h, i, d, got, ref);
        ok = false;
      }
      if (!any_key && bits != 0 && bits != 0x8000) {
        if (ok) printf("\n    fully masked row not exactly zero");
        ok = false;
      }
      if (std::isfinite(ref)) {
        max_err = std::max(max_err, std::isnan(err) ? INFINITY : err);
        max_ref = std::max(max_ref, std::fabs(ref));
      }
    }
  }
  if (c.poison && c.poison <= 6 && n_nonfinite == 0) { printf("\n    poisoned case without a non-finite output"); ok = false; }
  // nothing outside the logical output was written
  size_t written_outside = 0, logical = 0;
  std::vector<char> is_logical(o.raw_elems, 0);
  for (int b = 0; b < c.B; ++b) for (int h = 0; h < c.H; ++h) for (int i = 0; i < c.Lq; ++i)
    for (int d = 0; d < c.D; ++d) { is_logical[&o.at(b, h, i, d) - o.raw] = 1; ++logical; }
  for (size_t e = 0; e < o.raw_elems; ++e) if (!is_logical[e] && o.raw[e] != SENT) ++written_outside;
  if (written_outside) { printf("\n    %zu elements written outside the output view", written_outside); ok = false; }
  printf("  max_err=%.2e (max|ref|=%.2f) nonfinite=%lld collectives=%lld  %s\n", max_err, max_ref,
         n_nonfinite, emu::n_collectives, ok ? "OK" : "FAIL");
  for (Tensor4* t : {&q, &k, &v, &o}) free(t->raw);
  return ok;
}

// FNV-1a: a per-case scheduler seed that does not depend on which other cases run.
uint32_t name_hash(const char* s) {
  uint32_t h = 2166136261u;
  for (; *s; ++s) h = (h ^ uint8_t(*s)) * 16777619u;
  return h;
}

int main(int argc, char** argv) {
  const char* filter = "";
  uint32_t seed = 1;
  for (int i = 1; i < argc; ++i) {
    if (std::string(argv[i]) == "--seed" && i + 1 < argc) seed = uint32_t(std::stoul(argv[++i]));
    else filter = argv[i];
  }
  const Case cases[] = {
      // name                                 bf16 B  H  Lq   Lk   D  lay pad off mask scale amp out
      {"d40_f16_bshd_cross77_mask",          false, 2, 2, 100, 77, 40, 1, 0, 0, 1, 0, 1, -1},
      {"d64_bf16_bhsd_130x200",              true, 1, 2, 130, 200, 64, 0, 0, 0, 0, 0, 1, -1},
      {"d80_f16_bshd_77x77_firstblockmasked", false, 2, 1, 77, 77, 80, 1, 0, 0, 3, 0, 1, -1},
      {"d160_bf16_bshd_64x100_mask",         true, 1, 2, 64, 100, 160, 1, 0, 0, 1, 0, 1, -1},
      {"d8_f16_1x1",                         false, 2, 2, 1, 1, 8, 0, 0, 0, 0, 0, 1, -1},
      {"d72_f16_misaligned_scalar_path",     false, 1, 2, 64, 100, 72, 1, 3, 1, 1, 0, 1, -1},
      {"d128_f16_bshd_100x77",               false, 1, 2, 100, 77, 128, 1, 0, 0, 0, 0, 1, -1},
      {"d256_bf16_70x100_batch0_masked",     true, 2, 1, 70, 100, 256, 0, 0, 0, 2, 0, 1, -1},
      {"d136_f16_40x50",                     false, 1, 1, 40, 50, 136, 1, 0, 0, 0, 0, 1, -1},
      {"d64_f16_overflowing_scores",         false, 1, 2, 64, 128, 64, 0, 0, 0, 0, 1.0 / 4000, 100, -1},
      {"d40_f16_negative_scale",             false, 1, 1, 33, 65, 40, 0, 0, 0, 0, -0.3, 1, -1},
      {"d64_bf16_out_headdim_strided",       true, 1, 2, 50, 70, 64, 1, 0, 0, 1, 0, 1, 2},
      {"d48_f16_out_misaligned",             false, 1, 1, 20, 30, 48, 0, 0, 0, 0, 0, 1, 10},
      {"d40_bf16_bshd_257x1031_mask",        true, 1, 1, 257, 1031, 40, 1, 0, 0, 1, 0, 1, -1},
      {"d96_f16_odd_offset_in_and_out",      false, 2, 2, 17, 33, 96, 1, 0, 1, 2, 0, 1, -1},
      // D > 256: 128-column output slices; 163 KB opt-in (sm_80): 64-row blocks, else 32-row ones
      {"d512_f16_bshd_70x100_mask_sm80",     false, 1, 2, 70, 100, 512, 1, 0, 0, 1, 0, 1, -1, 0, 163},
      {"d512_bf16_40x77_batch0_masked",      true, 2, 1, 40, 77, 512, 0, 0, 0, 2, 0, 1, -1},
      {"d264_f16_misaligned_outstrided_sm90", false, 1, 1, 33, 40, 264, 1, 3, 1, 1, 0, 1, 2, 0, 227},
      {"d392_bf16_out_misaligned",           true, 1, 2, 20, 50, 392, 0, 0, 0, 0, 0, 1, 10},
      {"d384_f16_sm80",                      false, 1, 1, 65, 33, 384, 0, 0, 0, 0, 0, 1, -1, 0, 163},
      // NaN / inf inputs (poison, see poison_inputs)
      {"nan_q_d40_f16_mask",                 false, 2, 1, 20, 77, 40, 1, 0, 0, 2, 0, 1, -1, 1},
      {"nan_k_d64_bf16_mask",                true, 2, 2, 20, 100, 64, 0, 0, 0, 2, 0, 1, -1, 2},
      {"nan_v_d80_f16_mask",                 false, 2, 1, 30, 70, 80, 1, 0, 0, 2, 0, 1, -1, 3},
      {"inf_q_d40_bf16_mask",                true, 2, 1, 20, 77, 40, 0, 0, 0, 2, 0, 1, -1, 4},
      {"ninf_k_d128_f16",                    false, 1, 2, 40, 50, 128, 1, 0, 0, 0, 0, 1, -1, 5},
      {"inf_v_d160_bf16_mask",               true, 2, 1, 20, 40, 160, 0, 0, 0, 1, 0, 1, -1, 6},
      {"ninf_first_block_d40_f16",           false, 1, 1, 40, 130, 40, 0, 0, 0, 0, 0, 1, -1, 7},
      {"inf_q_row_all_ninf_d40_bf16_77",     true, 1, 2, 20, 77, 40, 1, 0, 0, 0, 0, 1, -1, 8},
      {"nan_k_d256_f16",                     false, 1, 1, 20, 40, 256, 0, 0, 0, 0, 0, 1, -1, 2},
      {"nan_v_d512_bf16_mask_sm80",          true, 2, 1, 20, 40, 512, 0, 0, 0, 2, 0, 1, -1, 3, 163},
      {"nan_q_d264_f16_misaligned",          false, 2, 1, 20, 33, 264, 1, 3, 1, 2, 0, 1, -1, 1},
  };
  int fails = 0, ran = 0;
  for (const Case& c : cases) {
    if (!strstr(c.name, filter)) continue;
    ++ran;
    emu::rng.seed(seed ^ name_hash(c.name));  // warp interleaving and cp.async landing times
    const bool ok = c.bf16 ? run_case<__nv_bfloat16>(c) : run_case<__half>(c);
    fails += !ok;
  }
  printf("%d/%d cases passed (seed %u)\n", ran - fails, ran, seed);
  return fails ? 1 : 0;
}
