"""Backend selection: which implementation of an op runs for a given call.

Backends (DESIGN.md 4): "reference" (plain PyTorch, any device), "cpu" (C++ kernels, CPU
tensors), "triton" (Triton kernels, CUDA tensors, or CPU tensors under TRITON_INTERPRET=1),
"cuda" (CUDA C++ kernels). "auto" picks per device. The choice is made in C++ (csrc/backend.cpp)
after the op's argument checks: set_backend only tells the C++ router this thread's choice, so
the default path costs no Python. A call the chosen backend cannot do runs on the reference:
the same answer, never a wrong one.
"""
import contextlib
import functools
import importlib.util
import os
import threading

import torch

BACKENDS = ("reference", "cpu", "triton", "cuda")
_CODES = {"auto": 0, "reference": 1, "cpu": 2, "triton": 3, "cuda": 4}  # csrc/backend.h
_state = threading.local()


@functools.lru_cache(None)
def triton_interpret() -> bool:
    # Read once: TRITON_INTERPRET must be set before the @triton.jit functions are created.
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _load_extension():
    try:
        from . import _C
    except ImportError as e:
        raise ImportError(
            "diffkernels._C (the operators) is not built; install the package with "
            "`pip install --no-build-isolation -e .` after torch (see README.md)") from e
    return _C


_C = _load_extension()


def extension_loaded() -> bool:
    return True  # importing diffkernels fails without it


def extension_has_cuda() -> bool:
    """Whether diffkernels._C holds the CUDA kernels (a CUDA torch and nvcc at build time)."""
    return bool(_C.WITH_CUDA)


@functools.lru_cache(None)
def triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


@functools.lru_cache(None)
def _available() -> tuple:
    out = ["reference", "cpu"]
    if triton_importable() and (torch.cuda.is_available() or triton_interpret()):
        out.append("triton")
    if extension_has_cuda() and torch.cuda.is_available():
        out.append("cuda")
    return tuple(out)


def available_backends() -> list:
    """The backends that can run on this machine, in the order of BACKENDS (found once)."""
    return list(_available())


def _check_name(name):
    if name != "auto" and name not in BACKENDS:
        raise ValueError(f"backend: expected 'auto' or one of {BACKENDS}, got {name!r}")
    if name not in ("auto", "reference") and name not in _available():
        raise RuntimeError(f"backend: {name!r} is not available here "
                           f"(available: {available_backends()}); see `python -m diffkernels info`")


def _select(name):
    _state.name = name
    _C._set_backend(_CODES[name])


def set_backend(name: str) -> None:
    """Select the backend for all ops in this thread ("auto" restores the default)."""
    _check_name(name)
    _select(name)


def get_backend() -> str:
    return getattr(_state, "name", "auto")


@contextlib.contextmanager
def backend(name: str):
    """`with dk.backend("triton"): ...` runs the block on one backend."""
    _check_name(name)
    previous = get_backend()
    _select(name)
    try:
        yield
    finally:
        _select(previous)


def _device_ok(name, device) -> bool:
    if name == "reference":
        return True
    if name == "cpu":
        return device.type == "cpu"
    if name == "triton":
        return device.type == ("cpu" if triton_interpret() else "cuda")
    return device.type == "cuda"  # "cuda"


def kernel_backends(device) -> list:
    """The available non-reference backends that run tensors on `device`."""
    device = torch.device(device)
    return [b for b in _available() if b != "reference" and _device_ok(b, device)]


_C._set_triton_availability("triton" in _available(), triton_interpret())
