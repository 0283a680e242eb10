"""diffkernels: fused kernels for diffusion models, as PyTorch operators."""
from ._backend import available_backends, backend, get_backend, set_backend
from ._backend import extension_loaded as _extension_loaded
from .ops import attention, group_norm_silu
from .ops import diffusion_step

_extension_loaded()  # register the C++ operators (torch.ops.diffkernels.*_cxx) when built

__version__ = "0.1.0"
__all__ = ["attention", "group_norm_silu", "diffusion_step", "available_backends", "set_backend", "get_backend", "backend"]
