"""Backend selection: which implementation of an op runs for a given call.

Backends (DESIGN.md 4): "reference" (plain PyTorch, any device), "cpu" (C++ kernels, CPU
tensors), "triton" (Triton kernels, CUDA tensors, or CPU tensors under TRITON_INTERPRET=1),
"cuda" (CUDA C++ kernels). "auto" picks per device. A call the chosen backend cannot do runs
on the reference: the same answer, never a wrong one.
"""
import contextlib
import functools
import os
import threading

import torch

BACKENDS = ("reference", "cpu", "triton", "cuda")
_state = threading.local()


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(None)
def extension_loaded() -> bool:
    try:
        import diffkernels._C  # noqa: F401  (registers the *_cxx operators)
        return True
    except ImportError:
        return False


@functools.lru_cache(None)
def extension_has_cuda() -> bool:
    return extension_loaded() and torch._C._dispatch_has_kernel_for_dispatch_key(
        "diffkernels::group_norm_silu_cxx", "CUDA")


@functools.lru_cache(None)
def triton_importable() -> bool:
    try:
        import triton  # noqa: F401
        return True
    except ImportError:
        return False


def available_backends() -> list:
    """The backends that can run on this machine, in the order of BACKENDS."""
    out = ["reference"]
    if extension_loaded():
        out.append("cpu")
    if triton_importable() and (torch.cuda.is_available() or triton_interpret()):
        out.append("triton")
    if extension_has_cuda() and torch.cuda.is_available():
        out.append("cuda")
    return out


def _check_name(name):
    if name != "auto" and name not in BACKENDS:
        raise ValueError(f"backend: expected 'auto' or one of {BACKENDS}, got {name!r}")
    if name not in ("auto", "reference") and name not in available_backends():
        raise RuntimeError(f"backend: {name!r} is not available here "
                           f"(available: {available_backends()}); see `python -m diffkernels info`")


def set_backend(name: str) -> None:
    """Select the backend for all ops in this thread ("auto" restores the default)."""
    _check_name(name)
    _state.name = name


def get_backend() -> str:
    return getattr(_state, "name", "auto")


@contextlib.contextmanager
def backend(name: str):
    """`with dk.backend("triton"): ...` runs the block on one backend."""
    _check_name(name)
    previous = get_backend()
    _state.name = name
    try:
        yield
    finally:
        _state.name = previous


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
    return [b for b in available_backends() if b != "reference" and _device_ok(b, device)]


class Dispatch:
    """The implementations of one op. Each backend registers `impl(*args)` and optionally
    `supports(*args) -> bool` for the cases it handles; `auto_order` lists the backends "auto"
    tries for CUDA tensors (the faster first, as the benchmarks show)."""

    def __init__(self, op_name, auto_order_cuda=("cuda", "triton")):
        self.op_name = op_name
        self.auto_order_cuda = auto_order_cuda
        self.impls = {}

    def register(self, name, supports=None):
        def deco(fn):
            self.impls[name] = (fn, supports)
            return fn
        return deco

    def choose(self, device, *args) -> str:
        """The backend that will run these arguments."""
        name = get_backend()
        if name == "auto":
            candidates = ("cpu",) if device.type == "cpu" else self.auto_order_cuda
            if device.type == "cpu" and triton_interpret():
                candidates = ("triton", "cpu")
        else:
            candidates = (name,)
        avail = available_backends()
        for cand in candidates:
            if cand in self.impls and cand in avail and _device_ok(cand, device):
                supports = self.impls[cand][1]
                if supports is None or supports(*args):
                    return cand
        return "reference"

    def __call__(self, device, *args):
        return self.impls[self.choose(device, *args)][0](*args)
