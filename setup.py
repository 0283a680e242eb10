"""Build diffkernels._C: CPU C++ kernels always, CUDA kernels when torch is a CUDA build and nvcc exists.

Install with `pip install --no-build-isolation -e .` after torch (DESIGN.md 4.1): the extension
must compile against the torch that is installed.
"""
import glob
import os

from setuptools import find_packages, setup

import torch
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))


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


setup(
    name="diffkernels",
    version="0.1.0",
    description="Fused GPU/CPU kernels for diffusion models, as PyTorch operators",
    packages=find_packages(include=["diffkernels", "diffkernels.*"]),
    python_requires=">=3.9",
    install_requires=["torch>=2.4", "numpy"],
    extras_require={
        "triton": ["triton>=3.0"],
        "test": ["pytest", "pytest-benchmark", "diffusers", "safetensors"],
        "clip": ["transformers"],
    },
    ext_modules=[_extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
    entry_points={"console_scripts": ["diffkernels=diffkernels.cli:main"]},
)
