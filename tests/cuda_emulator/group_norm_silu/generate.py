"""Turn csrc/cuda/group_norm_silu.cu into host C++ (kernels unchanged) and build it.

The kernels and the host launch code are kept as they are; only the CUDA runtime glue is swapped
for emu.h (one pthread per CUDA thread, std::barrier for __syncthreads and warp shuffles):
- the CUDA-only includes, the device guard and the current stream are dropped;
- the SM count comes from the EMU_SMS environment variable (emu::get_sms), so small values force
  the split paths on small inputs;
- every `kernel<<<grid, kThreads, 0, stream>>>(args);` becomes `emu::launch(grid, kThreads, ...)`;
- kMinBlockValues is lowered (default 1024) so that the split paths run on small shapes;
- a `dkemu` library is appended with the entry point diffkernels::group_norm_silu_cuda on CPU
  tensors (`torch.ops.dkemu.gn`) and a launch counter (`torch.ops.dkemu.launches`).
The result is a torch shared library; run_cases.py loads it and checks it.

Command line (developers):
    python tests/cuda_emulator/group_norm_silu/generate.py OUT_DIR [--src FILE.cu]   # build OUT_DIR/gn_emu.so
"""
import argparse
import re
import subprocess
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]
KERNEL_SRC = ROOT / "csrc" / "cuda" / "group_norm_silu.cu"
CXXFLAGS = ["-std=c++20", "-O2", "-fPIC", "-shared", "-pthread", "-Wall", "-Wno-unused-function"]

_REPLACE = [  # (text in the .cu, host replacement); each must be present
    ("#include <ATen/cuda/CUDAContext.h>\n", ""),
    ("#include <c10/cuda/CUDAException.h>\n", ""),
    ("#include <c10/cuda/CUDAGuard.h>\n", ""),
    ("namespace {\n", '#include "emu.h"\n\nnamespace {\n'),
    ("at::cuda::getCurrentDeviceProperties()->multiProcessorCount", "emu::get_sms()"),
    ("at::cuda::getCurrentCUDAStream()", "0"),
    ("  const c10::cuda::CUDAGuard guard(x.device());\n", ""),
    ("x.is_cuda()", "x.is_cpu()"),
    ('#include "../kernels.h"\n', '#define DIFFKERNELS_WITH_CUDA\n#include "kernels.h"\n'),
]
_LAUNCH = re.compile(r"(\w+(?:<[^<>;]*>)?)<<<(.+?), kThreads, 0, stream>>>\((.*?)\);")
_MIN_BLOCK = re.compile(r"constexpr int64_t kMinBlockValues = \d+;")
_ENTRY = '''#include <torch/library.h>

long emu_launches() { return emu::launches; }

TORCH_LIBRARY(dkemu, m) {
  m.def("gn(Tensor x, int num_groups, Tensor? weight, Tensor? bias, float eps, bool silu, "
        "Tensor? channel_bias) -> Tensor", &diffkernels::group_norm_silu_cuda);
  m.def("launches() -> int", &emu_launches);
}
'''


def _fail(what):
    raise ValueError(f"group_norm_silu.cu: {what}; update tests/cuda_emulator/group_norm_silu/"
                     "generate.py (and emu.h if the kernels use new CUDA features)")


def to_host_cpp(src, min_block_values=1024):
    """The host C++ text for the emulator from the text of group_norm_silu.cu."""
    for old, new in _REPLACE:
        if old not in src:
            _fail(f"expected {old.strip()!r}")
        src = src.replace(old, new, 1 if old == "namespace {\n" else -1)
    src, n = _MIN_BLOCK.subn(f"constexpr int64_t kMinBlockValues = {min_block_values};", src)
    if n != 1:
        _fail("expected one `constexpr int64_t kMinBlockValues = N;`")
    src, n = _LAUNCH.subn(r"emu::launch(\2, kThreads, [&] { \1(\3); });", src)
    if n == 0 or "<<<" in src:
        _fail("every launch must read `kernel<<<grid, kThreads, 0, stream>>>(args);`")
    if "TORCH_LIBRARY" in src:
        _fail("the operator registration belongs in csrc/group_norm_silu.cpp, not here")
    return src + "\n" + _ENTRY


def build(out_dir, src_path=KERNEL_SRC, min_block_values=1024, cxx="g++", timeout=600):
    """Generate into `out_dir` and compile there; returns the path of the shared library."""
    import torch
    from torch.utils import cpp_extension

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cpp = out_dir / "gn_emu.cpp"
    cpp.write_text(to_host_cpp(Path(src_path).read_text(), min_block_values))
    lib = out_dir / "gn_emu.so"
    libdirs = cpp_extension.library_paths()
    cmd = [cxx, *CXXFLAGS, f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
           f"-I{HERE}", f"-I{ROOT / 'csrc'}", *(f"-isystem{p}" for p in cpp_extension.include_paths()), str(cpp),
           "-o", str(lib), *(f"-L{p}" for p in libdirs), *(f"-Wl,-rpath,{p}" for p in libdirs),
           "-lc10", "-ltorch_cpu", "-ltorch"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"emulator build failed ({' '.join(cmd)}):\n{r.stderr[-6000:]}")
    return lib


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out_dir")
    ap.add_argument("--src", default=str(KERNEL_SRC), help="the .cu file (default: %(default)s)")
    a = ap.parse_args()
    print(build(a.out_dir, a.src))
