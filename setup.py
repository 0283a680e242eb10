"""Build diffkernels._C: CPU C++ kernels always, CUDA kernels when torch is a CUDA build and nvcc exists.

Install with `pip install --no-build-isolation -e .` (or `pip wheel --no-build-isolation .`)
after torch (DESIGN.md 4.1): the extension must compile against the torch that is installed.
"""
import glob
import os
import re
import shutil
import subprocess

from setuptools import setup

import torch

ROOT = os.path.dirname(os.path.abspath(__file__))


def _toolkit_of_nvcc():
    """The CUDA toolkit folder of the nvcc on PATH, as nvcc itself reports it (`_HERE_` of a dry
    run): right even when PATH holds a wrapper script outside the toolkit, where
    torch.utils.cpp_extension would guess the wrapper's parent folder and fail to link cudart."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    try:
        out = subprocess.run([nvcc, "-dryrun", "-E", "-x", "cu", os.devnull], capture_output=True,
                             text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    here = re.search(r"^#\$ _HERE_=(.+)$", out.stdout + out.stderr, re.MULTILINE)
    home = os.path.dirname(here.group(1).strip()) if here else None
    return home if home and os.path.isfile(os.path.join(home, "bin", "nvcc")) else None


# cpp_extension reads CUDA_HOME when it is imported.
if not (os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")) and torch.version.cuda:
    _home = _toolkit_of_nvcc() or ("/usr/local/cuda" if os.path.isdir("/usr/local/cuda") else None)
    if _home:
        os.environ["CUDA_HOME"] = _home

from torch.utils import cpp_extension  # noqa: E402


def _cuda_build_possible():
    if os.environ.get("DIFFKERNELS_NO_CUDA", "0") == "1":
        return False
    return torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None


def _nvidia_wheel_includes():
    # ATen/cuda headers include cusparse.h / cublas headers; the nvidia wheels that come with a
    # CUDA torch carry them (nvcc's own install here lacks them).
    try:
        import nvidia
    except ImportError:
        return []
    dirs = []
    for base in getattr(nvidia, "__path__", []):
        dirs += sorted(glob.glob(os.path.join(base, "cu*", "include")))
        dirs += sorted(glob.glob(os.path.join(base, "*", "include")))
    return [d for d in dirs if os.path.isdir(d)]


def _extension():
    # csrc/cpu/capability/: each CPU kernel once per capability (csrc/cpu/kernels.h)
    sources = (sorted(glob.glob("csrc/*.cpp")) + sorted(glob.glob("csrc/cpu/*.cpp"))
               + sorted(glob.glob("csrc/cpu/capability/*.cpp")))
    cxx_flags = ["-O3", "-fopenmp"]  # cpp_extension adds the -std= this torch needs
    if not _cuda_build_possible():
        return cpp_extension.CppExtension(
            "diffkernels._C", sources, extra_compile_args={"cxx": cxx_flags},
            extra_link_args=["-fopenmp"])
    if not torch.cuda.is_available():
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    sources += sorted(glob.glob("csrc/cuda/*.cu"))
    nvcc_flags = ["-O3", "--expt-relaxed-constexpr", "-lineinfo",
                  "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
                  "-U__CUDA_NO_BFLOAT16_CONVERSIONS__", "-U__CUDA_NO_HALF2_OPERATORS__"]
    return cpp_extension.CUDAExtension(
        "diffkernels._C", sources, include_dirs=_nvidia_wheel_includes(),
        extra_compile_args={"cxx": cxx_flags + ["-DDIFFKERNELS_WITH_CUDA"],
                            "nvcc": nvcc_flags + ["-DDIFFKERNELS_WITH_CUDA"]},
        extra_link_args=["-fopenmp"])


class BuildExtension(cpp_extension.BuildExtension):
    """One object folder for every way of building (build_ext --inplace, pip install -e,
    pip wheel): pip's editable builds would otherwise compile everything again in a temporary
    folder, and ninja skips what is up to date there (the CUDA sources take minutes)."""

    def finalize_options(self):
        super().finalize_options()
        self.build_temp = os.path.join(ROOT, "build", "objects")


# Metadata, dependencies and extras are in pyproject.toml; this file adds the extension.
setup(
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
