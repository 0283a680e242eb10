#!/usr/bin/env bash
# The whole GPU check in one command (DESIGN.md 5), for a lent CUDA machine:
#   bash benchmarks/gpu_suite.sh OUTDIR
# builds the extension for this GPU, runs the test suite (CUDA cases included), runs every
# benchmark, and writes logs + JSON + markdown into OUTDIR, ending with a summary table.
# Budget: every part has its own time limit (build, tests 200 s, ops 60 s each, unet 120 s,
# pipeline 240 s): at most about 14 minutes, typically well under. Needs no network.
set -uo pipefail
OUT=${1:?usage: benchmarks/gpu_suite.sh OUTDIR}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
t0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - t0 )) s] $*"; }

cc=$(python -c "import torch; p = torch.cuda.get_device_capability(); print(f'{p[0]}.{p[1]}')")
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$cc} MAX_JOBS=${MAX_JOBS:-16}
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
stamp "building for sm_${cc/./} ..."
if ! python setup.py build_ext --inplace > "$OUT/build.log" 2>&1; then
  tail -40 "$OUT/build.log"; stamp "BUILD FAILED"; exit 1
fi
python -m diffkernels info | tee "$OUT/info.txt"

stamp "tests ..."
# The CPU-only verification (Triton interpreter and cubin compiles, CUDA emulators, CMake) ran in
# CI already: the GPU's minutes go to the tests with CUDA cases.
timeout 200 python -m pytest -q -p no:cacheprovider tests --junitxml="$OUT/tests.xml" \
  --ignore=tests/test_triton_compile.py --ignore=tests/test_triton_interpret.py \
  --ignore=tests/test_cuda_emulator.py --ignore=tests/test_cuda_emulator_group_norm_silu.py \
  --ignore=tests/test_install.py --ignore=tests/test_cpu_fallback.py \
  --deselect tests/test_build.py::test_cmake_builds_the_cpu_library > "$OUT/tests.log" 2>&1
test_rc=$?
tail -5 "$OUT/tests.log"

stamp "benchmarks ..."
# Each part has its own limit, so a slow one (torch.compile of a full UNet) cannot starve the
# rest; every part writes its results as it finishes.
bench_rc=0
for op in group_norm_silu attention diffusion_step overhead; do
  timeout 60 python -m diffkernels bench --device cuda --op $op --out "$OUT/results" \
    >> "$OUT/bench.log" 2>&1 || bench_rc=1
done
# SD-shaped fp16 models vs diffusers (needs its wheel). pipeline = end to end: ours plain and
# with cuda_graph=True, diffusers eager / +torch.compile / +accelerate(), SD 1.5 512 px in quick
# mode (the full run adds SD 2.1 768 px and SDXL 1024 px: minutes of torch.compile each).
timeout 120 python -m diffkernels bench --device cuda --op unet --quick --out "$OUT/results" \
  >> "$OUT/bench.log" 2>&1 || bench_rc=1
timeout 240 python -m diffkernels bench --device cuda --op pipeline --quick --out "$OUT/results" \
  >> "$OUT/bench.log" 2>&1 || bench_rc=1

stamp "summary"
python - "$OUT" <<'PY'
import glob, json, os, statistics, sys
out = sys.argv[1]
print(f"{'op':16} {'provider':22} {'rows':>4} {'median ratio':>12} {'median %roof':>12}")
for path in sorted(glob.glob(os.path.join(out, "results", "*.json"))):
    rows = json.load(open(path))["rows"]
    for prov in sorted({r["provider"] for r in rows}):
        rs = [r for r in rows if r["provider"] == prov]
        ratios = [r["ratio"] for r in rs if r.get("ratio")]
        roof = [r.get("pct_copy_bw") or r.get("pct_matmul") for r in rs]
        roof = [x for x in roof if x]
        print(f"{rs[0]['op']:16} {prov:22} {len(rs):4} "
              f"{statistics.median(ratios) if ratios else float('nan'):12.2f} "
              f"{statistics.median(roof) if roof else float('nan'):12.1f}")
PY
stamp "done: tests rc=$test_rc, bench rc=$bench_rc; logs in $OUT"
exit $(( test_rc != 0 || bench_rc != 0 ))
