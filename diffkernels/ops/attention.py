"""attention: softmax(q k^T * scale + mask) v for diffusion self- and cross-attention.

The operator diffkernels::attention is defined in C++ (csrc/attention.cpp: schema, checks,
backend route, CPU and CUDA kernels, a backward that raises). This module holds the public
function, the fake kernel for torch.compile, and the Python backends the C++ router calls."""
from typing import Optional

import torch
from torch import Tensor

from .. import reference
from ._checks import check_device, check_dtype, check_tensor
from ._library import clearer_error, define_python_backends

MAX_HEAD_DIM = 512  # the VAE's single 512-wide head
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

_op = torch.ops.diffkernels.attention.default


def attention(q: Tensor, k: Tensor, v: Tensor, *, scale: Optional[float] = None,
              key_padding_mask: Optional[Tensor] = None) -> Tensor:
    """softmax(q @ k^T * scale, masked) @ v, flash-style (online softmax in fp32).

    q: [B, H, Lq, D], k/v: [B, H, Lk, D], any strides with unit last-dim stride (transposed
    [B, L, H, D] views are read in place). D a multiple of 8, at most 512. scale defaults to
    D**-0.5. key_padding_mask: bool [B, Lk], True = attend; a query with no key to attend
    gives zeros. NaN and inf propagate as in F.scaled_dot_product_attention. The output has
    q's layout when q is dense (a BSHD view gives a BSHD view).
    """
    try:
        return _op(q, k, v, scale, key_padding_mask)
    except (TypeError, RuntimeError) as e:
        clearer_error(e, check_args, q, k, v, key_padding_mask)


def check_args(q, k, v, key_padding_mask):
    """The checks of csrc/attention.cpp, with the same messages (for the fake kernel and for
    arguments the dispatcher rejects before the C++ checks run)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t)
        if t.dim() != 4:
            raise ValueError(f"{name}: expected rank 4 [B, H, L, D], got shape {list(t.shape)}")
        check_dtype(name, t, _DTYPES)
        if t.dtype != q.dtype:
            raise TypeError(f"{name}: expected dtype {q.dtype} (the dtype of q), got {t.dtype}")
        check_device(name, t, q, "q")
        if t.numel() > 0 and t.stride(-1) != 1 and t.shape[-1] > 1:
            raise ValueError(f"{name}: expected unit stride in the last (head) dim, got strides "
                             f"{list(t.stride())}")
    B, H, _, D = q.shape
    if k.shape[0] != B or v.shape[0] != B:
        raise ValueError(f"k, v: expected batch {B} (q's), got k {k.shape[0]} and v {v.shape[0]}")
    if k.shape[1] != H or v.shape[1] != H:
        raise ValueError(f"k, v: expected {H} heads (q's), got k {k.shape[1]} and v {v.shape[1]}")
    if k.shape[3] != D or v.shape[3] != D:
        raise ValueError(f"k, v: expected head dim {D} (q's), got k {k.shape[3]} and v {v.shape[3]}")
    if k.shape[2] != v.shape[2]:
        raise ValueError(f"v: expected length {k.shape[2]} (k's), got {v.shape[2]}")
    if D > MAX_HEAD_DIM or D % 8 != 0:
        raise ValueError(f"q: head dim D must be a multiple of 8 and at most {MAX_HEAD_DIM}, got {D}")
    if key_padding_mask is not None:
        check_tensor("key_padding_mask", key_padding_mask)
        if key_padding_mask.dtype != torch.bool:
            raise TypeError(f"key_padding_mask: expected dtype bool (True = attend), got "
                            f"{key_padding_mask.dtype}")
        if key_padding_mask.dim() != 2 or tuple(key_padding_mask.shape) != (B, k.shape[2]):
            raise ValueError(f"key_padding_mask: expected shape [B, Lk] = [{B}, {k.shape[2]}], got "
                             f"{list(key_padding_mask.shape)}")
        check_device("key_padding_mask", key_padding_mask, q, "q")


@torch.library.register_fake("diffkernels::attention")
def _(q, k, v, scale=None, key_padding_mask=None):
    check_args(q, k, v, key_padding_mask)
    # Same strides as q when q is dense (empty_like preserves them), else contiguous.
    return torch.empty_like(q)


def _triton(q, k, v, scale, key_padding_mask):
    from ..triton.attention import attention as kernel
    return kernel(q, k, v, scale, key_padding_mask)


define_python_backends(
    "attention",
    "Tensor q, Tensor k, Tensor v, float scale, Tensor? key_padding_mask) -> Tensor",
    {"reference": reference.attention, "triton": _triton})
