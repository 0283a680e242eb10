"""diffkernels: fused kernels for diffusion models, as PyTorch operators."""
from ._backend import available_backends, backend, get_backend, set_backend  # loads the C++ ops
from .ops import attention, diffusion_step, group_norm_silu

__version__ = "0.1.0"
__all__ = ["attention", "group_norm_silu", "diffusion_step", "available_backends", "set_backend", "get_backend", "backend"]
