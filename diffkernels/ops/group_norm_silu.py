"""group_norm_silu: GroupNorm (+ the time-embedding add) + SiLU as one operator.

The operator diffkernels::group_norm_silu is defined in C++ (csrc/group_norm_silu.cpp: schema,
checks, backend route, CPU and CUDA kernels). This module holds the public function, the fake
kernel for torch.compile, and the Python backends the C++ router calls."""
from typing import Optional

import torch
from torch import Tensor

from .. import reference
from ..reference import memory_format_of
from ._checks import check_dtype, check_param, check_tensor
from ._library import clearer_error, define_python_backends

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

_op = torch.ops.diffkernels.group_norm_silu.default


def group_norm_silu(x: Tensor, num_groups: int, weight: Optional[Tensor] = None,
                    bias: Optional[Tensor] = None, eps: float = 1e-5, *, silu: bool = True,
                    channel_bias: Optional[Tensor] = None) -> Tensor:
    """silu(group_norm(x + channel_bias[..., None, None], num_groups, weight, bias, eps)).

    x: [N, C, *spatial], contiguous or channels_last; the output keeps x's dtype and memory
    format. Statistics in fp32. channel_bias: [N, C] (the UNet's time-embedding add).
    silu=False gives plain GroupNorm.
    """
    try:
        return _op(x, num_groups, weight, bias, eps, silu, channel_bias)
    except (TypeError, RuntimeError) as e:
        clearer_error(e, check_args, x, num_groups, weight, bias, eps, channel_bias)


def check_args(x, num_groups, weight, bias, eps, channel_bias):
    """The checks of csrc/group_norm_silu.cpp, with the same messages (for the fake kernel and
    for arguments the dispatcher rejects before the C++ checks run)."""
    check_tensor("x", x)
    if x.dim() < 3:
        raise ValueError(f"x: expected rank >= 3 [N, C, *spatial], got shape {list(x.shape)}")
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


@torch.library.register_fake("diffkernels::group_norm_silu")
def _(x, num_groups, weight=None, bias=None, eps=1e-5, silu=True, channel_bias=None):
    check_args(x, num_groups, weight, bias, eps, channel_bias)
    return torch.empty_like(x, memory_format=memory_format_of(x))


def _triton(x, num_groups, weight, bias, eps, silu, channel_bias):
    from ..triton.group_norm_silu import group_norm_silu as kernel
    return kernel(x, num_groups, weight, bias, eps, silu, channel_bias)


define_python_backends(
    "group_norm_silu",
    "Tensor x, int num_groups, Tensor? weight, Tensor? bias, float eps, bool silu, "
    "Tensor? channel_bias) -> Tensor",
    {"reference": reference.group_norm_silu, "triton": _triton})
