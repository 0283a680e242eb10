"""The CUDA group_norm_silu kernels (csrc/cuda/group_norm_silu.cu) run on the CPU by a host emulation.

CI has no GPU, so this is what checks the kernels' logic there. At test time
tests/cuda_emulator/group_norm_silu/generate.py turns the CURRENT .cu file into host C++ with the
kernels and the host launch code unchanged (only the CUDA glue is swapped for emu.h), g++ builds
it as a torch library, and run_cases.py calls it in a subprocess on CPU tensors and compares each
output with a float64 group norm + SiLU at the DESIGN.md 6 tolerances (fp32 1e-4, fp16 2e-3,
bf16 1.6e-2, relative and absolute). Each case also checks the output strides (like
empty_like(x)) and, where the path is fixed, the number of kernel launches, so a case cannot pass
on the wrong path. The SM count (EMU_SMS) and kMinBlockValues (1024) are forced small so that
small shapes take every path: one block per group with the group cached in registers or read
twice, the split contiguous path (stats + normalise), channels_last in one launch or three
(stats + finalize + normalise, incl. several column passes), and the wide-group fallback to the
contiguous kernels; with fp32 / fp16 / bf16 x, fp32 parameters with half x, a misaligned view
(narrower vectors), a 1e4 common offset and fp16 values near 6e4; plus empty and invalid inputs.

Modelled (emu.h): every CUDA thread is a pthread, so the threads of a block really run
concurrently; __syncthreads is a block barrier and __shfl_xor_sync / __shfl_sync exchange through
a per-warp barrier (a thread that returns drops out of both, as on the GPU); __shared__ memory is
one copy per block (blocks run one after another); blockIdx / threadIdx / gridDim / blockDim.
Not modelled: timing, occupancy and performance (cudaOccupancyMaxActiveBlocksPerMultiprocessor
answers 2, the real occupancy is not known here); concurrency between blocks of a grid (a kernel
that relied on inter-block ordering would not be caught); the memory model beyond what the
barriers order (a plain store is visible at once; no warp-divergence or lockstep semantics
except at shuffles); the precision of fast-math intrinsics (__expf, __fdividef and rsqrtf are
exact libm / IEEE operations here); out-of-bounds accesses are not detected (only wrong outputs
are); register / shared-memory limits and __launch_bounds__.

By hand:
    python tests/cuda_emulator/group_norm_silu/generate.py /tmp/gn_emu
    python tests/cuda_emulator/group_norm_silu/run_cases.py /tmp/gn_emu/gn_emu.so [--subset all] [name]
"""
import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

EMU_DIR = Path(__file__).resolve().parent / "cuda_emulator" / "group_norm_silu"
_spec = importlib.util.spec_from_file_location("gn_generate", EMU_DIR / "generate.py")
gen = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gen)

NEEDS_GXX = pytest.mark.skipif(
    shutil.which("g++") is None or not sys.platform.startswith("linux"),
    reason="the group_norm_silu CUDA emulation needs g++ (C++20) and pthreads on Linux")


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    return gen.build(tmp_path_factory.mktemp("gn_emulator"), timeout=600)


def run_cases(lib, subset):
    cmd = [sys.executable, str(EMU_DIR / "run_cases.py"), str(lib), "--subset", subset]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    report = f"{r.stdout}\n{r.stderr[-3000:]}\nrc={r.returncode}; reproduce: {' '.join(cmd)}"
    summary = re.search(r"^(\d+)/(\d+) cases passed$", r.stdout, re.M)
    assert r.returncode == 0 and summary, f"emulated kernel failed:\n{report}"
    passed, total = map(int, summary.groups())
    ok_lines = re.findall(r"^ok ", r.stdout, re.M)
    assert passed == total == len(ok_lines) > 0, f"not every case passed:\n{report}"
    assert not re.search(r"^FAIL", r.stdout, re.M), report


def test_generation_keeps_the_kernels():
    """The host C++ holds the .cu's kernel code verbatim: only launches and CUDA glue change."""
    src = gen.KERNEL_SRC.read_text()
    host = gen.to_host_cpp(src)
    assert "<<<" not in host and "getCurrentCUDAStream" not in host
    start = src.index("namespace {\n")
    end = src.index("void check_grid(")  # the kernels end where the host code starts
    assert src[start + len("namespace {\n"):end].replace(
        re.search(r"constexpr int64_t kMinBlockValues = \d+;", src).group(0),
        "constexpr int64_t kMinBlockValues = 1024;") in host


@NEEDS_GXX
def test_group_norm_silu_kernels_on_emulator(emulator):
    run_cases(emulator, "default")


@NEEDS_GXX
@pytest.mark.slow
def test_group_norm_silu_kernels_on_emulator_more_cases(emulator):
    """The other cases: all dtypes per path, more shapes, many groups / column passes."""
    run_cases(emulator, "extra")
