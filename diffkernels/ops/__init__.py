"""The public operators. Each module defines torch.ops.diffkernels.<op> (schema, fake kernel,
backend dispatch) and the Python function users call."""
from .attention import attention
from .group_norm_silu import group_norm_silu
from .diffusion_step import diffusion_step

__all__ = ["attention", "group_norm_silu", "diffusion_step"]
