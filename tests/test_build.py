"""The build: the CUDA extension holds sm_80 and sm_90 cubins of every op, and CMakeLists.txt
builds the same csrc/ as a libtorch library."""
import glob
import os
import shutil
import subprocess
import sys

import pytest
import torch

from diffkernels import _backend

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OPS = ("group_norm_silu", "attention", "diffusion_step")
CUDA_BUILD_EXPECTED = torch.version.cuda is not None and (
    shutil.which("nvcc") or os.path.exists("/usr/local/cuda/bin/nvcc"))


def _cuobjdump():
    """cuobjdump from PATH, CUDA_HOME, or the copy bundled with triton's NVIDIA backend."""
    candidates = [shutil.which("cuobjdump"),
                  os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "cuobjdump")]
    try:
        import triton
        candidates.append(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia",
                                       "bin", "cuobjdump"))
    except ImportError:
        pass
    return next((c for c in candidates if c and os.path.exists(c)), None)


def _extension_path():
    import diffkernels._C as ext
    return ext.__file__


def test_extension_loads_and_registers_every_op():
    assert _backend.extension_loaded(), "diffkernels._C is not built: run `bash .ci/install`"
    for op in OPS:
        for key in ("CPU", "CUDA", "Autograd"):  # one C++ operator per op, no *_cxx twin
            assert torch._C._dispatch_has_kernel_for_dispatch_key(f"diffkernels::{op}", key), (op, key)
        assert not hasattr(torch.ops.diffkernels, f"{op}_cxx")


@pytest.mark.skipif(not CUDA_BUILD_EXPECTED, reason="CPU-only torch or no nvcc: CPU-only build")
def test_cuda_kernels_built_for_sm80_and_sm90():
    assert _backend.extension_has_cuda(), "the extension was built without its CUDA kernels"
    if torch.cuda.is_available() and os.environ.get("TORCH_CUDA_ARCH_LIST"):
        pytest.skip("built for this GPU's arch only (gpu_suite.sh)")
    cuobjdump = _cuobjdump()
    if cuobjdump is None:
        pytest.skip("no cuobjdump (CUDA toolkit or triton's bundled one) to list the cubins")
    listing = subprocess.run([cuobjdump, "--list-elf", _extension_path()], capture_output=True,
                             text=True, check=True).stdout
    for arch in ("sm_80", "sm_90"):
        assert arch in listing, f"no {arch} cubin in the extension:\n{listing}"


@pytest.mark.slow
def test_cmake_builds_the_cpu_library(tmp_path):
    if shutil.which("cmake") is None:
        pytest.skip("cmake not installed")
    build = tmp_path / "build"
    env = dict(os.environ)
    args = ["cmake", "-S", ROOT, "-B", str(build), "-DCMAKE_BUILD_TYPE=Release",
            f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}"]
    if torch.version.cuda:
        # A CUDA libtorch's TorchConfig looks for the CUDA toolkit even for CPU sources: point it
        # at nvcc's install and at the nvrtc of the nvidia wheels torch came with; a fixed arch
        # list skips its GPU detection.
        env["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
        args.append(f"-DCUDA_TOOLKIT_ROOT_DIR={os.environ.get('CUDA_HOME', '/usr/local/cuda')}")
        import nvidia
        nvrtc = sorted(glob.glob(os.path.join(list(nvidia.__path__)[0], "*", "lib", "libnvrtc.so*")))
        if nvrtc:
            args.append(f"-DCUDA_nvrtc_LIBRARY={nvrtc[0]}")
    configure = subprocess.run(args, capture_output=True, text=True, env=env)
    assert configure.returncode == 0, configure.stdout[-4000:] + configure.stderr[-4000:]
    jobs = str(os.cpu_count() or 2)
    built = subprocess.run(["cmake", "--build", str(build), "-j", jobs], capture_output=True,
                           text=True, env=env)
    assert built.returncode == 0, built.stdout[-4000:] + built.stderr[-4000:]
    lib = glob.glob(str(build / "libdiffkernels*.so"))
    assert lib, os.listdir(build)
    # Load it in a fresh process (the extension already registered these ops in this one) and
    # call an operator through the dispatcher, as a libtorch user would.
    script = (
        "import torch, torch.nn.functional as F, sys\n"
        "torch.ops.load_library(sys.argv[1])\n"
        "x = torch.randn(2, 64, 5, 5)\n"
        "y = torch.ops.diffkernels.group_norm_silu(x, 8, None, None, 1e-5, True, None)\n"
        "torch.testing.assert_close(y, F.silu(F.group_norm(x, 8)), atol=1e-4, rtol=1e-4)\n"
        "print('ok')\n")
    run = subprocess.run([sys.executable, "-c", script, lib[0]], capture_output=True, text=True)
    assert run.returncode == 0 and "ok" in run.stdout, run.stdout + run.stderr
