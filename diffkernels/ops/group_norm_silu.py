"""group_norm_silu: GroupNorm (+ the time-embedding add) + SiLU as one operator."""
from typing import Optional

import torch
from torch import Tensor

from .. import reference
from ..reference import memory_format_of
from .._backend import Dispatch
from ._checks import check_dtype, check_param, check_tensor

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

dispatch = Dispatch("group_norm_silu")


def group_norm_silu(x: Tensor, num_groups: int, weight: Optional[Tensor] = None,
                    bias: Optional[Tensor] = None, eps: float = 1e-5, *, silu: bool = True,
                    channel_bias: Optional[Tensor] = None) -> Tensor:
    """silu(group_norm(x + channel_bias[..., None, None], num_groups, weight, bias, eps)).

    x: [N, C, *spatial], contiguous or channels_last; the output keeps x's dtype and memory
    format. Statistics in fp32. channel_bias: [N, C] (the UNet's time-embedding add).
    silu=False gives plain GroupNorm.
    """
    check_tensor("x", x)  # before the dispatcher's own, less helpful, schema error
    return torch.ops.diffkernels.group_norm_silu(x, num_groups, weight, bias, eps, silu,
                                                 channel_bias)


def check_args(x, num_groups, weight, bias, eps, channel_bias):
    check_tensor("x", x)
    if x.dim() < 3:
        raise ValueError(f"x: expected rank >= 3 [N, C, *spatial], got shape {tuple(x.shape)}")
    check_dtype("x", x, _FLOATS)
    n, c = x.shape[:2]
    if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups <= 0:
        raise ValueError(f"num_groups: expected a positive int, got {num_groups!r}")
    if c % num_groups != 0:
        raise ValueError(f"num_groups: C={c} is not divisible by num_groups={num_groups}")
    if not eps >= 0:
        raise ValueError(f"eps: expected eps >= 0, got {eps}")
    check_param("weight", weight, (c,), x, _FLOATS)
    check_param("bias", bias, (c,), x, _FLOATS)
    check_param("channel_bias", channel_bias, (n, c), x, _FLOATS)


@torch.library.custom_op("diffkernels::group_norm_silu", mutates_args=())
def _group_norm_silu(x: Tensor, num_groups: int, weight: Optional[Tensor],
                     bias: Optional[Tensor], eps: float, silu: bool,
                     channel_bias: Optional[Tensor]) -> Tensor:
    check_args(x, num_groups, weight, bias, eps, channel_bias)
    if x.numel() == 0:
        return torch.empty_like(x, memory_format=memory_format_of(x))
    # Kernels see x contiguous or channels_last, and small parameters contiguous in x's dtype
    # or fp32.
    x = x.contiguous(memory_format=memory_format_of(x))
    weight, bias, channel_bias = (
        None if p is None else (p if p.dtype in (x.dtype, torch.float32) else p.float()).contiguous()
        for p in (weight, bias, channel_bias))
    return dispatch(x.device, x, num_groups, weight, bias, eps, silu, channel_bias)


@_group_norm_silu.register_fake
def _(x, num_groups, weight, bias, eps, silu, channel_bias):
    check_args(x, num_groups, weight, bias, eps, channel_bias)
    return torch.empty_like(x, memory_format=memory_format_of(x))


def _kernel_supports(x, num_groups, weight, bias, eps, silu, channel_bias):
    return x.dtype in _KERNEL_DTYPES


dispatch.register("reference")(reference.group_norm_silu)


@dispatch.register("cpu", supports=_kernel_supports)
@dispatch.register("cuda", supports=_kernel_supports)
def _native(x, num_groups, weight, bias, eps, silu, channel_bias):
    return torch.ops.diffkernels.group_norm_silu_cxx(x, num_groups, weight, bias, eps, silu,
                                                     channel_bias)


@dispatch.register("triton", supports=_kernel_supports)
def _triton(x, num_groups, weight, bias, eps, silu, channel_bias):
    from ..triton.group_norm_silu import group_norm_silu as kernel
    return kernel(x, num_groups, weight, bias, eps, silu, channel_bias)
