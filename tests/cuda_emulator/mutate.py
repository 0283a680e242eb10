"""Mutation check of the CUDA emulator (a developer tool, not run in CI: ~3 min on 2 cores).

Plants one known bug at a time in a copy of csrc/cuda/attention.cu, builds the emulator against it
and runs every case: each mutant must be killed (non-zero exit). A survivor means the emulator or
its cases have stopped seeing that class of bug. The unmutated kernel must pass first.

    python tests/cuda_emulator/mutate.py [name-substring] [--seed N]

When the kernel is edited so that a mutant's `old` text no longer occurs, update that mutant.
"""
import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from build_emulator import KERNEL_SRC, build  # noqa: E402

# (name, text in attention.cu, replacement)
MUTANTS = [
    ("k_row halves swapped",
     "const int k_row = (lane & 7) + ((lane >> 4) << 3), k_col = ((lane >> 3) & 1) * 8;",
     "const int k_row = (lane & 7) + (((lane >> 3) & 1) << 3), k_col = (lane >> 4) * 8;"),
    ("V not transposed", "ldmatrix_x4_trans(bv,", "ldmatrix_x4(bv,"),
    ("bk regs swapped", "mma_16816<T>(s[mt][2 * np], a[mt], bk[0], bk[1]);",
     "mma_16816<T>(s[mt][2 * np], a[mt], bk[0], bk[2]);"),
    ("pa regs swapped", "pa[mt][1] = pack2<T>(s[mt][2 * kk][2]",
     "pa[mt][2] = pack2<T>(s[mt][2 * kk][2]"),
    ("wait 2 in loop", "  for (int j = 0; j < nkb; ++j) {\n    cp_async_wait<1>();",
     "  for (int j = 0; j < nkb; ++j) {\n    cp_async_wait<2>();"),
    ("no sync before prefetch", "    __syncthreads();\n    if (j + 2 < nkb) {",
     "    if (j + 2 < nkb) {"),
    ("no -inf guard", "const float m_sub = m_new == -INFINITY ? 0.f : m_new;",
     "const float m_sub = m_new;"),
    ("row bound off by one", "const bool ok = col_ok && row0 + r0 + i * RSTEP < L;",
     "const bool ok = col_ok && row0 + r0 + i * RSTEP <= L;"),
    ("key bound off by one", "const bool inside = c < Lk;", "const bool inside = c <= Lk;"),
    ("mask assigns -inf (drops NaN)", "s[mt][nt][f] = inside ? s[mt][nt][f] + -INFINITY : -INFINITY;",
     "s[mt][nt][f] = -INFINITY;"),
    ("padding keys keep inf*0", "s[mt][nt][f] = inside ? s[mt][nt][f] + -INFINITY : -INFINITY;",
     "s[mt][nt][f] = s[mt][nt][f] + -INFINITY;"),
    ("fully masked rows not zeroed", "    no_key = any == 0.f;", "    no_key = false;"),
    ("wrong output slice", "const int dv0 = ds * DV, DVv = D - dv0;",
     "const int dv0 = 0 * ds * DV, DVv = D - dv0;"),
    ("a_col wrong", "const int a_row = lane & 15, a_col = (lane >> 4) * 8;",
     "const int a_row = lane & 15, a_col = ((lane >> 3) & 1) * 8;"),
    ("v_row wrong", "const int v_row = lane & 15, v_col",
     "const int v_row = (lane & 7) + ((lane >> 4) << 3), v_col"),
    ("no alpha rescale", "          o[mt][dt][2 * r] *= alpha;", "          o[mt][dt][2 * r] *= 1.f;"),
    ("partial-block mask skipped", "if (mrow != nullptr || kbase + BN > Lk) {",
     "if (mrow != nullptr) {"),
    ("no group reduce of l", "      l += warp_xor(l, 2);\n", ""),
    ("output stride ignored", "for (int i = 0; i < 8; ++i) dst[(int64_t)(col + i) * p.o_sd] = e[i];",
     "for (int i = 0; i < 8; ++i) dst[(int64_t)(col + i)] = e[i];"),
    ("host: smem too small", "+ 2 * BN * (DV + 8)) * int(sizeof(T));",
     "+ 1 * BN * (DV + 8)) * int(sizeof(T));"),
    ("host: no smem opt-in", "if (smem > 48 * 1024) {", "if (smem > 96 * 1024) {"),
]


def run(exe, seed, timeout=600):
    r = subprocess.run([str(exe), "--seed", str(seed)], capture_output=True, text=True,
                       timeout=timeout)
    lines = r.stdout.strip().splitlines() or ["(no output)"]
    why = r.stderr.strip().splitlines()[-1] if r.returncode and r.stderr.strip() else lines[-1]
    return r.returncode, why


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("filter", nargs="?", default="")
    ap.add_argument("--seed", type=int, default=1)
    a = ap.parse_args()
    src = KERNEL_SRC.read_text()
    with tempfile.TemporaryDirectory(prefix="dk_mutate_") as tmp:
        rc, why = run(build(Path(tmp) / "clean"), a.seed)
        if rc != 0:
            sys.exit(f"the unmutated kernel fails the emulator: {why}")
        survivors = []
        for name, old, new in MUTANTS:
            if a.filter not in name:
                continue
            if src.count(old) != 1:
                sys.exit(f"mutant '{name}': its text occurs {src.count(old)} times in attention.cu")
            cu = Path(tmp) / "mutant.cu"
            cu.write_text(src.replace(old, new))
            rc, why = run(build(Path(tmp) / "mutant", cu), a.seed)
            print(f"{name:28s} {'killed  ' if rc else 'SURVIVED'} rc={rc}  {why[:90]}", flush=True)
            if rc == 0:
                survivors.append(name)
    print("survivors:", survivors or "none")
    sys.exit(1 if survivors else 0)


if __name__ == "__main__":
    main()
